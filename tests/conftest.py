"""Shared fixtures. Expensive things (the tiny model, a training run) are built once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def isolated_env(tmp_path_factory):
    """No hub access, and caches in the session's temporary folder."""
    cache = tmp_path_factory.mktemp("qlora-cache")
    os.environ["QLORA_CACHE_DIR"] = str(cache)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    yield


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from qlora_app.tiny_model import materialize

    return materialize("builtin:tiny-llama")


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real `qlora-app` entry point in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "qlora_app", *args],
        capture_output=True, text=True, cwd=cwd or REPO, env={**os.environ, **(env or {})}, timeout=600,
    )
