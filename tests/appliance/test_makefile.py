"""The Makefile's commands, read with `make -n` (nothing runs), and its Docker runs executed against a fake
docker: the image, GPU, user, mounts, ports, secrets passed by name only, and LOCAL=1."""

from __future__ import annotations

import os
import pty
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"qlora-app:{VERSION}"
SECRETS = {"HF_TOKEN": "hf_secretvalue", "QLORA_API_KEY": "sk-secret"}
APP_TARGETS = ["recipes", "plan", "train", "merge", "eval", "runs", "serve", "pipeline", "smoke"]
GPU_TARGETS = ["train", "merge", "eval", "serve", "pipeline", "smoke"]
ALL_TARGETS = ["help", "image", "demo", "test", "lint", "docs", "clean", "venv", "lock-cpu", "lock-gpu", "mutation",
               *APP_TARGETS]
UID_GID = f"{os.getuid()}:{os.getgid()}"


def make(*args: str, cwd: Path = REPO, dry: bool = True, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in SECRETS and k not in ("MAKEFLAGS", "MFLAGS")}
    environment |= {"HF_HOME": "/srv/hf"} | env
    command = ["make", "--no-print-directory", *(["-n"] if dry else []), *args]
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60)


def command_line(output: str, start: str) -> list[str]:
    """The words of the one printed command that starts with `start` (continuation lines joined)."""
    (line,) = [line for line in output.replace("\\\n", " ").splitlines() if line.startswith(start)]
    return shlex.split(line)


def docker_run(*args: str, **env: str) -> list[str]:
    result = make(*args, **env)
    assert result.returncode == 0, result.stderr
    return command_line(result.stdout, "docker run")


def app_args(words: list[str], image: str = IMAGE) -> list[str]:
    """What qlora-app is asked to do: the words after the image (or after .venv/bin/qlora-app)."""
    marker = image if image in words else ".venv/bin/qlora-app"
    return words[words.index(marker) + 1:]


def local_app(*args: str, **env: str) -> list[str]:
    result = make(*args, "LOCAL=1", **env)
    assert result.returncode == 0, result.stderr
    assert "docker" not in result.stdout
    return app_args(command_line(result.stdout, ".venv/bin/qlora-app"))


def option(words: list[str], flag: str) -> list[str]:
    return [words[i + 1] for i, word in enumerate(words) if word == flag]


# --- help ----------------------------------------------------------------------------------------------------

def test_help_lists_every_target_with_one_line():
    out = make("help", dry=False).stdout
    listed = re.findall(r"^  make (\S+) +\S", out, re.MULTILINE)
    assert sorted(listed) == sorted(ALL_TARGETS)
    phony = re.search(r"^\.PHONY: (.*)$", (REPO / "Makefile").read_text(), re.MULTILINE)[1].split()
    assert sorted(phony) == sorted(ALL_TARGETS), "a target without a help line, or a help line without a target"
    assert f"IMAGE={IMAGE}" in out and "LOCAL=1" in out


# --- Docker mode -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", GPU_TARGETS)
def test_gpu_targets_run_the_image_with_gpu_user_mounts_and_secrets_by_name(target):
    words = docker_run(target, "RECIPE=tiny")
    assert words[:4] == ["docker", "run", "--rm", "--init"]
    assert option(words, "--gpus") == ["all"]
    assert option(words, "--user") == [UID_GID]
    assert "--ipc=host" in words
    assert set(option(words, "-v")) == {f"{REPO}/runs:/app/runs", f"{REPO}/recipes:/app/recipes:ro",
                                        f"{REPO}/data:/app/data:ro", f"{REPO}/.cache/container:/cache",
                                        "/srv/hf:/cache/huggingface"}
    assert option(words, "-e") == ["HF_TOKEN", "QLORA_API_KEY"]
    assert IMAGE in words
    assert "--interactive" not in words, "stdin is not a terminal here"


def test_interactive_only_when_stdin_is_a_terminal():
    leader, terminal = pty.openpty()
    try:
        result = subprocess.run(["make", "-n", "train", "RECIPE=tiny"], cwd=REPO, stdin=terminal, capture_output=True, text=True,
                                timeout=60)
    finally:
        os.close(leader)
        os.close(terminal)
    words = command_line(result.stdout, "docker run")
    assert "--interactive" in words and "--tty" in words


@pytest.mark.parametrize("target", APP_TARGETS)
def test_app_targets_check_docker_and_create_mount_sources_first(target):
    out = make(target, "RECIPE=tiny").stdout
    gpu = "--gpu " if target in GPU_TARGETS else ""
    assert f"scripts/docker-preflight.sh {gpu}{IMAGE} && mkdir -p runs" in out
    assert out.index("docker-preflight.sh") < out.index("docker run")


@pytest.mark.parametrize("target", ["recipes", "plan"])
def test_cpu_targets_run_the_image_without_a_gpu(target):
    assert "--gpus" not in docker_run(target, "RECIPE=tiny")


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_secret_values_never_appear(target):
    for extra in ([], ["BIND=0.0.0.0"], ["LOCAL=1"]):
        result = make(target, "RECIPE=tiny", *extra, **SECRETS)
        for value in SECRETS.values():
            assert value not in result.stdout + result.stderr, (target, extra)


def test_image_variables_follow_the_package_version_and_overrides():
    assert f"docker build -t {IMAGE} " in make("image").stdout
    words = docker_run("train", "RECIPE=tiny", "IMAGE=me/qlora:dev", "GPUS=device=1", "HF_HOME=/data/hf")
    assert app_args(words, "me/qlora:dev") == ["train", "tiny"]
    assert option(words, "--gpus") == ["device=1"]
    assert "/data/hf:/cache/huggingface" in option(words, "-v")


def test_hf_cache_defaults_to_the_users():
    environment = {k: v for k, v in os.environ.items() if k not in ("HF_HOME", "MAKEFLAGS")} | {"HOME": "/home/ada"}
    result = subprocess.run(["make", "-n", "train", "RECIPE=tiny"], cwd=REPO, env=environment, capture_output=True, text=True)
    words = command_line(result.stdout, "docker run")
    assert "/home/ada/.cache/huggingface:/cache/huggingface" in option(words, "-v")


def test_train_recipe_overrides_and_resume():
    words = docker_run("train", "RECIPE=llama3-8b", "SET=train.lr=1e-4 lora.r=16")
    assert app_args(words) == ["train", "llama3-8b", "--set", "train.lr=1e-4", "--set", "lora.r=16"]
    assert app_args(docker_run("train", "RECIPE=llama3-8b", "RESUME=1")) == ["train", "llama3-8b", "--resume"]
    assert app_args(docker_run("train", "RECIPE=tiny", "RESUME=runs/tiny/abc"))[-2:] == ["--resume", "runs/tiny/abc"]


@pytest.mark.parametrize("target", ["train", "plan", "pipeline"])
def test_targets_that_start_from_a_recipe_need_one(target):
    result = make(target)
    assert result.returncode != 0 and f"make {target} needs RECIPE=<name>" in result.stderr


def test_train_ranks_follow_nproc_or_the_gpus_given():
    assert "--gpus" not in app_args(docker_run("train", "RECIPE=tiny"))  # default GPUS=all: the container's only
    words = docker_run("train", "RECIPE=tiny", "GPUS=all")
    assert option(words, "--gpus") == ["all", "all"]  # docker's, then qlora-app's
    words = docker_run("train", "RECIPE=tiny", "GPUS=2")
    assert option(words, "--gpus") == ["2", "2"]
    words = docker_run("train", "RECIPE=tiny", "NPROC=4", "RESUME=1")
    assert option(words, "--gpus") == ["all", "4"] and app_args(words)[-3:] == ["--resume", "--gpus", "4"]
    assert local_app("train", "RECIPE=tiny", "NPROC=2")[-2:] == ["--gpus", "2"]


def test_serve_hands_the_gpus_given_to_the_container():
    assert option(docker_run("serve", "GPUS=2"), "--gpus") == ["2"]


def test_merge_takes_the_latest_run_of_the_recipe_or_run():
    assert app_args(docker_run("merge")) == ["merge"]  # the CLI takes the latest run of any recipe
    assert app_args(docker_run("merge", "RECIPE=llama3-8b")) == ["merge", "--recipe", "llama3-8b"]
    assert app_args(docker_run("merge", "RUN=runs/tiny/abc")) == ["merge", "runs/tiny/abc"]
    # In the container runs/ is /app/runs and the working directory /app: a path inside the project is made
    # relative, so it means the same there.
    assert app_args(docker_run("merge", f"RUN={REPO}/runs/tiny/abc")) == ["merge", "runs/tiny/abc"]


def test_serve_publishes_on_loopback_without_a_key():
    words = docker_run("serve", "RECIPE=llama3-8b", "PORT=9000")
    assert option(words, "-p") == ["127.0.0.1:9000:8000"]
    assert app_args(words) == ["serve", "--recipe", "llama3-8b", "--host", "0.0.0.0", "--port", "8000",
                               "--allow-unauthenticated"]
    assert option(docker_run("serve", "BIND=localhost"), "-p") == ["127.0.0.1:8000:8000"]
    assert app_args(docker_run("serve", "SET=serve.max_model_len=4096"))[:3] == ["serve", "--set",
                                                                                "serve.max_model_len=4096"]


def test_serve_a_run_or_adapters():
    assert app_args(docker_run("serve", "RUN=runs/llama3-8b/A"))[:2] == ["serve", "runs/llama3-8b/A"]
    words = docker_run("serve", "BASE=llama3-8b", f"ADAPTERS=support=runs/llama3-8b/A legal={REPO}/runs/llama3-8b/B")
    assert app_args(words)[:6] == ["serve", "--base", "llama3-8b", "--adapter", "support=runs/llama3-8b/A",
                                   "--adapter"]
    assert app_args(words)[6] == "legal=runs/llama3-8b/B"


def test_public_bind_needs_a_key_and_gets_no_unauthenticated_flag():
    for target in ("serve", "pipeline"):
        words = docker_run(target, "RECIPE=tiny", "BIND=0.0.0.0", QLORA_API_KEY="sk-secret")
        assert option(words, "-p") == ["0.0.0.0:8000:8000"]
        assert "--allow-unauthenticated" not in words
        assert app_args(words)[-4:] == ["--host", "0.0.0.0", "--port", "8000"]


def test_pipeline_passes_recipe_overrides_and_port():
    words = docker_run("pipeline", "RECIPE=llama3-8b", "SET=train.epochs=1", "PORT=8080")
    assert option(words, "-p") == ["127.0.0.1:8080:8000"]
    assert app_args(words) == ["pipeline", "llama3-8b", "--set", "train.epochs=1", "--host", "0.0.0.0", "--port",
                               "8000", "--allow-unauthenticated"]


# --- LOCAL=1 -----------------------------------------------------------------------------------------------

def test_local_mode_runs_the_same_commands_in_the_venv():
    assert local_app("recipes") == ["recipes", "--gpu-memory", "24"]
    assert local_app("plan", "RECIPE=llama3-8b", "GPU_MEMORY=16") == ["plan", "llama3-8b", "--gpu-memory", "16",
                                                                      "--compare"]
    assert local_app("train", "RECIPE=llama3-8b", "SET=a.b=1 c.d=2") == ["train", "llama3-8b", "--set", "a.b=1",
                                                                         "--set", "c.d=2"]
    assert local_app("train", "RECIPE=tiny", "RESUME=1") == ["train", "tiny", "--resume"]
    assert local_app("merge", "RUN=runs/tiny/abc") == ["merge", "runs/tiny/abc"]
    assert local_app("merge") == ["merge"]


def test_local_mode_in_your_own_environment_builds_nothing():
    # A VENV other than .venv (a CUDA environment from requirements/gpu.lock) is used as it is.
    result = make("train", "LOCAL=1", "VENV=/opt/gpu-env", "RECIPE=llama3-8b")
    assert [line.strip() for line in result.stdout.splitlines()] == ["/opt/gpu-env/bin/qlora-app train llama3-8b"]


def test_local_serve_lets_the_cli_apply_its_own_rule():
    assert local_app("serve", "PORT=9000") == ["serve", "--host", "127.0.0.1", "--port", "9000"]
    assert local_app("serve", "BASE=llama3-8b", "ADAPTERS=a=runs/x") == [
        "serve", "--base", "llama3-8b", "--adapter", "a=runs/x", "--host", "127.0.0.1", "--port", "8000"]
    assert local_app("pipeline", "RECIPE=tiny", "BIND=0.0.0.0") == ["pipeline", "tiny", "--host", "0.0.0.0", "--port", "8000"]


def test_smoke_runs_the_doctor_smoke_with_the_recipe_given():
    assert app_args(docker_run("smoke")) == ["doctor", "--smoke"]
    assert app_args(docker_run("smoke", "RECIPE=mistral-7b")) == ["doctor", "--smoke", "--recipe", "mistral-7b"]
    assert "-p" not in docker_run("smoke")  # vLLM answers inside the container only
    assert local_app("smoke") == ["doctor", "--smoke"]


def test_demo_is_always_local():
    out = make("demo").stdout
    assert "docker" not in out
    lines = [line for line in out.splitlines() if line.startswith(".venv/bin/qlora-app")]
    assert lines == [".venv/bin/qlora-app recipes", ".venv/bin/qlora-app plan llama3-8b --compare",
                     ".venv/bin/qlora-app demo"]


def test_lint_runs_hadolint_and_actionlint_from_the_venv():
    out = make("lint").stdout
    assert ".venv/bin/hadolint Dockerfile" in out and ".venv/bin/actionlint .github/workflows/image.yml" in out


def test_lock_gpu_compiles_with_hashes_for_the_image():
    words = command_line(make("lock-gpu").stdout, ".lock-venv/bin/uv")
    assert words[1:5] == ["pip", "compile", "requirements/gpu.in", "-o"] and words[5] == "requirements/gpu.lock"
    assert {"--generate-hashes", "--only-binary"} <= set(words)


# --- executed, in a copy of the make layer -----------------------------------------------------------------

@pytest.fixture
def project(tmp_path):
    """The make layer (Makefile, scripts, requirements, pyproject) in an empty folder, and fakes of docker and nvidia-smi on PATH."""
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO / name, tmp_path / name)
    for folder in ("scripts", "requirements"):
        shutil.copytree(REPO / folder, tmp_path / folder)
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    fake("docker", bin_dir, '\n'.join(['echo "$*" >> "$FAKE_LOG"',
                                       '[ "$1" != info ] || echo "${FAKE_RUNTIMES:-nvidia runc}"',
                                       '[ "$1 $2" != "image inspect" ] || [ -z "${NO_IMAGE:-}" ]']))
    fake("nvidia-smi", bin_dir, 'echo "${FAKE_DRIVER:-580.65.06}"')
    return tmp_path


def fake(name: str, bin_dir: Path, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(0o755)


def run_in(project: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, str]:
    log = project / "docker.log"
    path = f"{project / 'fakebin'}:{os.environ['PATH']}"
    result = make(*args, cwd=project, dry=False, PATH=path, FAKE_LOG=str(log), CACHE_DIR=str(project / "cache"),
                  HF_HOME=str(project / "hf"), **env)
    return result, log.read_text() if log.exists() else ""


def test_a_docker_run_passes_secrets_by_name_only(project):
    result, log = run_in(project, "serve", "BIND=0.0.0.0", "RECIPE=llama3-8b", **SECRETS)
    assert result.returncode == 0, result.stderr
    (run,) = [line for line in log.splitlines() if line.startswith("run ")]
    assert "-e HF_TOKEN -e QLORA_API_KEY" in run and "-p 0.0.0.0:8000:8000" in run
    for value in SECRETS.values():
        assert value not in log + result.stdout + result.stderr
    # Mount sources exist before docker sees them (else it creates them owned by root).
    assert all((project / d).is_dir() for d in ("runs", "cache/huggingface", "hf"))


def test_public_bind_without_a_key_is_refused_before_docker_runs(project):
    result, log = run_in(project, "serve", "BIND=0.0.0.0")
    assert result.returncode != 0
    assert "export QLORA_API_KEY" in result.stderr
    assert log == ""


@pytest.mark.parametrize("setup, message", [
    ({"NO_IMAGE": "1"}, "make image"),
    ({"FAKE_DRIVER": "550.54.15"}, "too old"),
    pytest.param({"FAKE_RUNTIMES": "runc"}, "NVIDIA container toolkit is missing",
                 marks=pytest.mark.skipif(bool(shutil.which("nvidia-container-runtime-hook")),
                                          reason="this machine has the toolkit")),
])
def test_preflight_says_what_is_missing(project, setup, message):
    result, log = run_in(project, "train", "RECIPE=tiny", **setup)
    assert result.returncode != 0
    assert message in result.stderr and "LOCAL=1" in result.stderr
    assert "run " not in log


def test_preflight_without_docker(project):
    result = subprocess.run(["scripts/docker-preflight.sh", "--gpu", IMAGE], cwd=project, capture_output=True,
                            text=True, env=os.environ | {"DOCKER": str(project / "no-docker")})
    assert result.returncode == 1 and "docker is not installed" in result.stderr


def test_dry_run_builds_nothing(project):
    result = make("train", "LOCAL=1", "RECIPE=tiny", cwd=project)
    assert result.returncode == 0, result.stderr
    assert "-m venv .venv" in result.stdout, "the venv build is shown..."
    assert sorted(p.name for p in project.iterdir()) == ["Makefile", "fakebin", "pyproject.toml", "requirements",
                                                         "scripts"]


def test_clean_never_touches_runs(project):
    for path in ("runs/tiny/abc/adapter/weights", "runs/tiny/__pycache__/x.pyc", ".venv/bin/python",
                 ".cache/container/x", "pkg/__pycache__/y.pyc"):
        (project / path).parent.mkdir(parents=True, exist_ok=True)
        (project / path).write_text("x")
    result = make("clean", cwd=project, dry=False)
    assert result.returncode == 0, result.stderr
    assert (project / "runs/tiny/abc/adapter/weights").exists() and (project / "runs/tiny/__pycache__/x.pyc").exists()
    assert not any((project / p).exists() for p in (".venv", ".cache", "pkg/__pycache__"))
