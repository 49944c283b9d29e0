"""The image as the machine: the entrypoint script run with bash, as a pod cloud and `docker run` start it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from conftest import REPO

ENTRYPOINT = REPO / "scripts" / "entrypoint.sh"


def entrypoint(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    """scripts/entrypoint.sh with this environment's qlora-app first on PATH, as the image's /opt/venv/bin is."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return subprocess.Popen(["bash", str(ENTRYPOINT), *args], env={**os.environ, "PATH": path, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, **kwargs)


def test_the_script_is_valid_bash_and_executable():
    assert subprocess.run(["bash", "-n", str(ENTRYPOINT)]).returncode == 0
    assert os.access(ENTRYPOINT, os.X_OK)


def test_arguments_run_qlora_app_as_docker_run_does():
    out, _ = entrypoint("--version").communicate(timeout=60)
    assert out.startswith("qlora-app, version")


def test_no_arguments_and_no_pod_mode_prints_help_and_exits():
    process = entrypoint(env={"QLORA_POD": ""})
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 0 and "Usage: qlora-app" in out


def test_pod_mode_reports_says_what_to_type_stays_up_and_stops_on_sigterm(tmp_path):
    process = entrypoint(env={"QLORA_POD": "1", "QLORA_HOME": str(tmp_path)}, start_new_session=True)
    try:
        seen = []
        for line in process.stdout:  # blocks until the pod has said it is waiting
            seen.append(line)
            if line.startswith("waiting"):
                break
        text = "".join(seen)
        assert "qlora-app doctor" in text and "no NVIDIA GPU visible" in text
        assert f"runs in {tmp_path / 'runs'}" in text and "--host 0.0.0.0" in text and "QLORA_API_KEY" in text
        assert process.poll() is None, "the pod must stay up"
        os.killpg(process.pid, signal.SIGTERM)  # the pod being stopped
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
