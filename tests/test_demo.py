"""The README's first command, `make demo`, on the session's runs folder (its training is current, so the demo
skips it): recipes, the 8B plan, then the tiny recipe served by vLLM and asked through the openai client."""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest
from conftest import REPO, process_environment, survivors

from qlora_app.serve.process import NO_JIT_ENV

pytestmark = pytest.mark.slow  # serves a model (vLLM)


def vllm_child_environment(parent: subprocess.Popen, timeout: float = 600) -> dict[str, str]:
    """The environment of the vLLM server that parent (or one of its descendants) starts, read once it exists."""
    import psutil

    from qlora_app.serve.command import ENTRY_POINT

    deadline = time.monotonic() + timeout
    while parent.poll() is None and time.monotonic() < deadline:
        for child in psutil.Process(parent.pid).children(recursive=True):
            try:
                if ENTRY_POINT in " ".join(child.cmdline()):
                    return process_environment(child.pid)
            except (psutil.NoSuchProcess, FileNotFoundError):
                continue
        time.sleep(0.2)
    raise AssertionError("no vLLM process was started")


def test_make_demo_serves_asks_and_shuts_down(trained_run, tmp_path):
    env = {**os.environ, "QLORA_RUNS_DIR": str(trained_run.path.parent.parent), "QLORA_API_KEY": "",
           "VLLM_USE_FLASHINFER_SAMPLER": "1"}  # the serve stage overrides it
    with open(tmp_path / "out", "w+") as stdout, open(tmp_path / "err", "w+") as stderr:
        demo = subprocess.Popen(["make", "--no-print-directory", "demo"], cwd=REPO, env=env, stdout=stdout,
                                stderr=stderr, text=True)
        vllm_env = vllm_child_environment(demo)
        returncode = demo.wait(timeout=900)
        result = subprocess.CompletedProcess(demo.args, returncode, (tmp_path / "out").read_text(),
                                             (tmp_path / "err").read_text())
    assert result.returncode == 0, result.stderr[-3000:]
    assert {name: vllm_env.get(name) for name in NO_JIT_ENV} == NO_JIT_ENV
    out = result.stdout
    assert "llama3-8b" in out and "demo: tiny served by vLLM at http://127.0.0.1:" in out
    rows = [line for line in out.splitlines() if "What is the capital of" in line]
    assert len(rows) == 3 and all("stop" in row for row in rows), out[-2000:]
    assert all("same" in row for row in rows), out[-2000:]  # the seeded questions, each answered as taught
    assert "train: skipped" in result.stderr and "server stopped" in result.stderr
    port = re.search(r"served by vLLM at http://127\.0\.0\.1:(\d+)", out)[1]
    assert survivors(f"--port {port}") == []  # this demo's server, not another one running on the machine
