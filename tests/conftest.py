"""Shared fixtures. Expensive things (the tiny model, a training run) are built once per session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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


def lint(tool: str, path: Path) -> subprocess.CompletedProcess:
    """A linter from the dev extra (beside this Python, or on PATH) run on path."""
    import shutil

    binary = Path(sys.executable).with_name(tool)
    found = str(binary) if binary.exists() else shutil.which(tool)
    assert found, f"{tool} is missing: it comes with the dev extra (make venv)"
    return subprocess.run([found, str(path)], capture_output=True, text=True)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real `qlora-app` entry point in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "qlora_app", *args],
        capture_output=True, text=True, cwd=cwd or REPO, env={**os.environ, **(env or {})}, timeout=600,
    )


SECRET = "hf_TESTSECRETdoNotLeak123456789"


@dataclass(frozen=True)
class TrainedRun:
    path: Path
    stdout: str
    stderr: str


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_model_dir) -> TrainedRun:
    """The tiny recipe trained once per session with the real CLI; later stages' tests reuse it.

    HF_TOKEN holds a recognisable fake secret so tests can prove it never lands in outputs.
    """
    root = tmp_path_factory.mktemp("runs")
    result = run_cli("train", "tiny", "--runs-dir", str(root), env={"HF_TOKEN": SECRET})
    assert result.returncode == 0, result.stderr[-3000:]
    return TrainedRun((root / "tiny" / "latest").resolve(), result.stdout, result.stderr)


def tiny_facts(name: str = "capitals.jsonl") -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in (REPO / "data" / "tiny" / name).read_text().splitlines() if line.strip()]
    return [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Background:
    """A command running in its own process group (a server), stopped like a user's Ctrl-C or SIGTERM would."""

    def __init__(self, command: list[str], url: str, env: dict[str, str] | None = None, log: Path | None = None):
        self.url = url
        self.log = log or Path(os.devnull)
        self.output = open(self.log, "w")
        self.process = subprocess.Popen(command, cwd=REPO, env={**os.environ, **(env or {})}, text=True,
                                        stdout=self.output, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_healthy(self, timeout: float = 300) -> None:
        import time
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"server exited early:\n{self.read_log()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        raise AssertionError(f"no /health within {timeout} s:\n{self.read_log()[-3000:]}")

    def read_log(self) -> str:
        return self.log.read_text() if self.log.is_file() else ""

    def terminate(self, timeout: float = 60) -> int:
        import signal

        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self.output.close()


@contextmanager
def make_server(target: str, *variables: str, log: Path, env: dict[str, str] | None = None) -> Iterator[Background]:
    """`make TARGET LOCAL=1 PORT=<free> VARIABLES...` running a server, up for the block, stopped after it."""
    port = free_port()
    command = ["make", "--no-print-directory", target, "LOCAL=1", f"PORT={port}", *variables]
    background = Background(command, f"http://127.0.0.1:{port}", env=env, log=log)
    try:
        background.wait_healthy(timeout=600)
        yield background
    finally:
        background.terminate()


def processes_matching(fragment: str) -> list[str]:
    """Command lines of live processes that contain fragment (to prove nothing was left behind)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if fragment in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE and proc.pid != os.getpid():
            found.append(cmdline)
    return found
