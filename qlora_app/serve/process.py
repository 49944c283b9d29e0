"""One vLLM server process: started in its own process group, watched until its health check answers,
stopped with everything it spawned. Its output goes to a log file (and, once it is up, to stderr).
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from qlora_app import console
from qlora_app.errors import UserError

STATE_PREFIX = "qlora-app-serve-"
# vLLM phones home with usage statistics unless told not to; an appliance should not. Unbuffered, so its
# output reaches the log (and a failed start's error line) as it is written.
CHILD_ENV = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1"}
# No JIT compiler at serve time (docs/serving-runtime.md): the image has gcc for Triton's launchers but neither
# nvcc nor g++, which FlashInfer's kernels are compiled with on first use. vLLM 0.32 runs FlashInfer's top-k/top-p
# sampler by default on compute capability 8.0-12.x (in its warm-up, so at every start); off, it samples with
# its PyTorch/Triton kernels. FlashInfer's all-reduce (tensor parallel) is JIT-compiled the same way, and so is
# DeepGEMM (block-scaled FP8 on sm_90+, which the app's models do not use; the CUDA vllm wheel vendors it). These
# win over the caller's environment: an inherited =1 would only bring back the failed start.
NO_JIT_ENV = {"VLLM_USE_FLASHINFER_SAMPLER": "0", "VLLM_ALLREDUCE_USE_FLASHINFER": "0", "VLLM_USE_DEEP_GEMM": "0",
              "VLLM_MOE_USE_DEEP_GEMM": "0"}


def child_environment(parent: dict[str, str] | None = None) -> dict[str, str]:
    """The environment vLLM starts with: the parent's (default: ours), with CHILD_ENV and NO_JIT_ENV on top."""
    return {**(os.environ if parent is None else parent), **CHILD_ENV, **NO_JIT_ENV}


@contextmanager
def sigterm_as_interrupt():
    """SIGTERM (docker stop, a pod's shutdown) raises KeyboardInterrupt like Ctrl-C, so the server's `with` block
    stops it and its children on either."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def local_url(host: str, port: int) -> str:
    """Where a client on this machine reaches a server bound to host (a wildcard bind answers on loopback)."""
    reach = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    return f"http://[{reach}]:{port}" if ":" in reach else f"http://{reach}:{port}"


def answers_health(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


class VllmServer:
    def __init__(self, command: list[str], url: str, log_path: Path) -> None:
        self.command, self.url, self.log_path = command, url, log_path
        self.process: subprocess.Popen | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self.echo = False
        self._state = Path(tempfile.gettempdir()) / f"{STATE_PREFIX}{os.getpid()}.json"

    def __enter__(self) -> VllmServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
            errors="replace", bufsize=1, start_new_session=True, env=child_environment())
        threading.Thread(target=self._pump, daemon=True).start()
        return self

    def __exit__(self, *_) -> None:
        self.stop()

    def _pump(self) -> None:
        with open(self.log_path, "a", encoding="utf-8") as log:
            for line in self.process.stdout:
                log.write(line)
                log.flush()
                self.tail.append(line.rstrip())
                if self.echo:
                    sys.stderr.write(line)

    def wait_ready(self, timeout: float) -> float:
        """Seconds until /health answered; a one-line error with vLLM's last words if it died or hung."""
        started = time.monotonic()
        with console.err.status("starting vLLM") as status:
            while not answers_health(self.url):
                elapsed = time.monotonic() - started
                if self.process.poll() is not None:
                    raise UserError(f"vLLM exited with code {self.process.returncode} while starting: "
                                    f"{self.last_error()} (full log: {self.log_path})")
                if elapsed > timeout:
                    raise UserError(f"vLLM did not answer {self.url}/health within {timeout:.0f} s "
                                    f"(log: {self.log_path})")
                status.update(f"starting vLLM ({elapsed:.0f} s): {self.last_line()[:90]}")
                time.sleep(0.5)
        self._state.write_text(json.dumps({"pid": os.getpid(), "url": self.url}))
        return time.monotonic() - started

    def last_line(self) -> str:
        return next((line for line in reversed(self.tail) if line.strip()), "")

    def last_error(self) -> str:
        """The most telling line of a failed start: the last exception message vLLM printed."""
        for line in reversed(self.tail):
            text = line.split("] ", 1)[-1].strip()
            if "Error" in text.split(":", 1)[0] and not text.startswith("RuntimeError: Engine core"):
                return text
        return self.last_line()

    def wait(self) -> int:
        return self.process.wait()

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM to vLLM and its workers (one process group), SIGKILL whatever is left after `grace` s."""
        self._state.unlink(missing_ok=True)
        self.echo = False  # vLLM's shutdown chatter (leak reports of its bindings) goes to the log only
        if self.process is None:
            return
        group = self.process.pid  # start_new_session: vLLM leads its own process group
        if self.process.poll() is None:
            signal_group(group, signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        signal_group(group, signal.SIGKILL)  # workers that outlived their parent, even one that crashed
        self.process.wait()


def signal_group(group: int, signum: int) -> None:
    try:
        os.killpg(group, signum)
    except ProcessLookupError:
        pass  # nobody left in the group


def healthy() -> bool:
    """True when no server runs here, or every running one answers its health check (Docker HEALTHCHECK)."""
    for path in Path(tempfile.gettempdir()).glob(f"{STATE_PREFIX}*.json"):
        try:
            state = json.loads(path.read_text())
            os.kill(state["pid"], 0)
        except (OSError, ValueError, KeyError):
            continue  # a server that is gone
        if not answers_health(state["url"], timeout=5):
            return False
    return True
