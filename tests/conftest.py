"""Shared fixtures. Expensive things (the tiny model, a training run) are built once per session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


NEEDS_A_TRAINED_MODEL = {"trained_run"}


def pytest_configure(config):
    config.addinivalue_line("markers", "last: runs after the other tests of its module (it stops the module's "
                                       "server)")


def pytest_collection_modifyitems(config, items):
    """Tests marked `last` run after the rest of their module, whatever the selection; a test that needs the
    session's training run must be marked slow, so that `pytest -m 'not slow'` stays a fast loop."""
    unmarked = [item.nodeid for item in items if NEEDS_A_TRAINED_MODEL & set(getattr(item, "fixturenames", ()))
                and item.get_closest_marker("slow") is None]
    if unmarked:
        raise pytest.UsageError(f"these tests train a model but are not marked slow: {', '.join(unmarked)}")
    modules: dict = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], len(modules))
    items.sort(key=lambda item: (modules[item.nodeid.split("::")[0]], item.get_closest_marker("last") is not None))


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
    from qlora_app.model.tiny import materialize

    return materialize("builtin:tiny-llama")


def lint(tool: str, path: Path) -> subprocess.CompletedProcess:
    """A linter from the dev extra (beside this Python, or on PATH) run on path."""
    import shutil

    binary = Path(sys.executable).with_name(tool)
    found = str(binary) if binary.exists() else shutil.which(tool)
    assert found, f"{tool} is missing: it comes with the dev extra (make venv)"
    return subprocess.run([found, str(path)], capture_output=True, text=True)


def assert_one_line_error(result, *fragments, after: tuple[str, ...] = ()):
    """Exit 2 with one error line; `after` names the note lines allowed before it, in order."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 + len(after), result.stderr
    for note, line in zip(after, lines):
        assert line.startswith(note), result.stderr
    lines = lines[len(after):]
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real `qlora-app` entry point in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "qlora_app", *args],
        capture_output=True, text=True, cwd=cwd or REPO, env={**os.environ, **(env or {})}, timeout=600,
    )


def cli_in_process(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The same `qlora-app` command run in this process by click's runner: a fraction of a second where a fresh
    interpreter costs seconds, for the many one-line-error tests. What only a fresh process shows (start-up,
    imports, signals, the Hub's endpoint read at import) stays with run_cli. An exception that escapes is
    rendered as the interpreter would print it, so "no traceback" is still checked."""
    import traceback

    from click.testing import CliRunner

    from qlora_app.cli import main

    result = CliRunner().invoke(main, list(args), env=env, catch_exceptions=True)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "Traceback (most recent call last):\n" + "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, stderr)


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


def interrupted_copy_of(run_path: Path, root: Path, data_name: str):
    """A copy of a run under root/<recipe>/, marked interrupted, reading a copy of data/tiny/<data_name> of its
    own (a test may change it without touching the repository's)."""
    import shutil

    from qlora_app.machine.atomic import write_json_atomic
    from qlora_app.recipe.loader import dump_recipe
    from qlora_app.run.directory import RunDir

    run = RunDir(root / run_path.parent.name / run_path.name)
    shutil.copytree(run_path, run.path, ignore=shutil.ignore_patterns("merged", "tensorboard"))
    data = root / data_name
    shutil.copy(REPO / "data" / "tiny" / data_name, data)
    run.recipe_file.write_text(dump_recipe(run.recipe().with_section("data", source=str(data))))
    write_json_atomic(run.manifest, {**run.read_manifest(), "status": "interrupted"})
    return run


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


def live_processes(fragment: str) -> list:
    """psutil.Process of each live (not zombie) process whose command line contains fragment."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if fragment in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE and proc.pid != os.getpid():
            found.append(proc)
    return found


def processes_matching(fragment: str) -> list[str]:
    """Command lines of live processes that contain fragment."""
    return [" ".join(proc.info["cmdline"]) for proc in live_processes(fragment)]


def process_environment(pid: int) -> dict[str, str]:
    """The environment a running process started with, as the kernel keeps it (/proc/PID/environ)."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def vllm_environment(port: int | str) -> dict[str, str]:
    """The environment of the vLLM server the serve stage started on port (its API server process)."""
    from qlora_app.serve.command import ENTRY_POINT

    (server,) = [proc for proc in live_processes(ENTRY_POINT) if f"--port {port}" in " ".join(proc.info["cmdline"])]
    return process_environment(server.pid)


def survivors(fragment: str, timeout: float = 30) -> list[str]:
    """Command lines of processes matching fragment that are still alive after `timeout` s. A process sent
    SIGKILL is gone only once the kernel has run its exit, a moment after the signal: wait for that event
    (a zombie counts as gone: it runs nothing and holds no port)."""
    import psutil

    def gone(proc) -> bool:
        try:
            return proc.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    deadline = time.monotonic() + timeout
    alive = live_processes(fragment)
    while alive and time.monotonic() < deadline:
        alive = [proc for proc in alive if not gone(proc)]
        time.sleep(0.05)
    return [" ".join(proc.info["cmdline"]) for proc in alive]


def unavailable(reason: str) -> None:
    """A capability a test needs is missing: skip on a developer's machine, fail in CI (CI=true), where a skip
    would hide that the test never ran."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI=true: this test must run here)")
    pytest.skip(reason)


class SmallDisk:
    """A real tmpfs of `size` bytes, so that a full disk is the kernel's ENOSPC, without root: it is mounted in
    a private user and mount namespace (unshare) that a holder process keeps alive. Commands run inside it
    (`command`), where it sits at `path`; this process reaches the same files through `outside`
    (/proc/<holder>/root/...; never .resolve() such a path: that leaves the namespace)."""

    def __init__(self, path: Path, size: int):
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        mount = 'mount -t tmpfs -o size="$1" tmpfs "$2" && echo mounted && exec cat'
        try:
            self.holder = subprocess.Popen(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", mount,
                                            "sh", str(size), str(path)], stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        except FileNotFoundError:
            unavailable("no unshare command (util-linux) to mount a small tmpfs")
        if self.holder.stdout.readline() != "mounted\n":  # the holder prints it once mounted, or dies
            problem = self.holder.stderr.read().strip()
            self.close()
            unavailable(f"cannot mount a tmpfs in a user namespace: {problem}")
        self.outside = Path(f"/proc/{self.holder.pid}/root") / path.relative_to("/")

    def command(self, *argv: str) -> list[str]:
        return ["nsenter", f"--target={self.holder.pid}", "--user", "--mount", "--preserve-credentials",
                f"--wd={REPO}", *argv]

    def run_cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(sys.executable, "-m", "qlora_app", *args), capture_output=True,
                              text=True, cwd=REPO, timeout=600)

    def free(self) -> int:
        stat = os.statvfs(self.outside)
        return stat.f_bavail * stat.f_frsize

    def fill(self, leave: int) -> Path:
        """A file taking all the free space but `leave` bytes."""
        filler = self.outside / "filler"
        with filler.open("wb") as f:
            os.posix_fallocate(f.fileno(), 0, self.free() - leave)
        return filler

    def close(self) -> None:
        self.holder.stdin.close()  # cat ends, and with the last process the namespace and its tmpfs go
        self.holder.wait(timeout=30)
        self.holder.stdout.close()
        self.holder.stderr.close()


@pytest.fixture
def small_disk(tmp_path) -> Iterator[SmallDisk]:
    """A 64 MiB tmpfs; tests leave it as full as they need with SmallDisk.fill."""
    disk = SmallDisk(tmp_path / "small-disk", 64 * 2**20)
    yield disk
    disk.close()
