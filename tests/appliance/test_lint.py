"""The Python lints clean with pyproject's [tool.ruff] (unused and undefined names, unsorted imports), as `make lint`."""

import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_ruff_passes():
    ruff = Path(sys.executable).with_name("ruff")
    assert ruff.exists(), "ruff is missing: it comes with the dev extra (make venv)"
    result = subprocess.run([str(ruff), "check", "qlora_app", "tests", "bench", "scripts"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
