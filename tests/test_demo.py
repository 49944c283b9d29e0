"""The README's first command, `make demo`, on the session's runs folder (its training is current, so the demo
skips it): recipes, the 8B plan, then the tiny recipe served by vLLM and asked through the openai client."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
from conftest import REPO, survivors

pytestmark = pytest.mark.slow  # serves a model (vLLM)


def test_make_demo_serves_asks_and_shuts_down(trained_run):
    env = {**os.environ, "QLORA_RUNS_DIR": str(trained_run.path.parent.parent), "QLORA_API_KEY": ""}
    result = subprocess.run(["make", "--no-print-directory", "demo"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "llama3-8b" in out and "demo: tiny served by vLLM at http://127.0.0.1:" in out
    rows = [line for line in out.splitlines() if "What is the capital of" in line]
    assert len(rows) == 3 and all("stop" in row for row in rows), out[-2000:]
    assert all("same" in row for row in rows), out[-2000:]  # the seeded questions, each answered as taught
    assert "train: skipped" in result.stderr and "server stopped" in result.stderr
    port = re.search(r"served by vLLM at http://127\.0\.0\.1:(\d+)", out)[1]
    assert survivors(f"--port {port}") == []  # this demo's server, not another one running on the machine
