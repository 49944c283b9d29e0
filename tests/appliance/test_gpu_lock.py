"""requirements/gpu.lock holds one CUDA: every nvidia-*/cuda-* package of it belongs to the CUDA major of torch's
wheels. Two lines of one package name for two majors (cuda-python 12.6 beside cuda-bindings 13.x) overwrite
each other's files, and which one wins depends on pip's install order."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name
from packaging.version import Version
from test_image import GPU_LOCK, lock_blocks, pins

# Whose version is the CUDA version they were built with (13.0.96 is CUDA 13.0): the toolkit's own packages.
CUDA_VERSIONED = re.compile(r"^(cuda-(python|bindings|toolkit)|nvidia-cuda-.+|nvidia-cublas|nvidia-nv.+|"
                            r"nvidia-npp)$")
# The CUDA 13 toolkit's libraries that carry their own version (cuFFT 12.0 ships with CUDA 13.0): their major is
# that of the package that asks for them (cuda-toolkit), read from the lock's `# via` lines. CUDA 12 published
# the same libraries under -cu12 names (nvidia-cufft-cu12), which the suffix rule below catches.
LIBRARY_VERSIONED = {"nvidia-cufft", "nvidia-cufile", "nvidia-curand", "nvidia-cusolver", "nvidia-cusparse"}
# Tied to no CUDA major: they find, wrap or compile for whichever CUDA is installed.
ANY_CUDA = {
    "cuda-core": "Pythonic CUDA on top of whichever cuda-bindings is installed",
    "cuda-pathfinder": "finds the CUDA libraries installed, pure Python",
    "cuda-tile": "the cuTile compiler front end; its toolkit extra is not installed",
    "nvidia-cudnn-frontend": "cuDNN's graph API, loads the cuDNN it finds (nvidia-cudnn-cu13)",
    "nvidia-cutlass-dsl": "a meta-package over the libs below",
    "nvidia-cutlass-dsl-libs-base": "the DSL's Python, no CUDA libraries",
    "nvidia-cutlass-dsl-libs-core": "the DSL's Python, no CUDA libraries",
    "nvidia-ml-py": "NVML's ctypes bindings: talk to the driver's libnvidia-ml, whatever its branch",
}
# The one unavoidable exception: nvidia-cutlass-dsl 4.8.0 requires nvidia-cutlass-dsl-libs-cu12 unconditionally
# (its [cu13] extra, which flashinfer and cudnn-frontend ask for, adds -libs-cu13 beside it). The two install
# into different folders, so neither overwrites the other.
EXCEPTIONS = {"nvidia-cutlass-dsl-libs-cu12": "required by nvidia-cutlass-dsl 4.8.0 whatever the extra"}
SUFFIX = re.compile(r"-cu(\d+)$")


def is_cuda_package(name: str) -> bool:
    return name.startswith(("nvidia-", "cuda-"))


def via(path: Path) -> dict[str, list[str]]:
    """Each locked package's requesters, from the `# via` comments of a uv/pip-compile lock."""
    found: dict[str, list[str]] = {}
    for block in lock_blocks(path):
        name = pins_of_line(block[0])
        comments = [line.strip().lstrip("#").strip() for line in block[1:] if line.strip().startswith("#")]
        found[name] = [c.removeprefix("via").strip() for c in comments if c.removeprefix("via").strip()]
    return found


def pins_of_line(line: str) -> str:
    return canonicalize_name(re.split(r"[=\s]", line, maxsplit=1)[0])


def cuda_major(name: str, version: str, requesters: dict[str, list[str]], versions: dict[str, str]) -> int | None:
    """The CUDA major a locked package belongs to; None for one tied to no CUDA major. Raises for an unknown
    nvidia-*/cuda-* package: a new one must be classified here, with its reason."""
    if suffix := SUFFIX.search(name):
        return int(suffix[1])
    if CUDA_VERSIONED.match(name):
        return Version(version).major
    if name in LIBRARY_VERSIONED:
        majors = {cuda_major(r, versions[r], requesters, versions) for r in requesters[name] if r in versions}
        assert len(majors) == 1, f"{name} is asked for by packages of CUDA {majors}"
        return majors.pop()
    if name in ANY_CUDA:
        return None
    raise AssertionError(f"{name} {version}: not classified in tests/appliance/test_gpu_lock.py")


def majors_of(path: Path) -> dict[str, int]:
    versions = dict(pins(path))
    requesters = via(path)
    found = {name: cuda_major(name, version, requesters, versions) for name, version in versions.items()
             if is_cuda_package(name) and name not in EXCEPTIONS}
    return {name: major for name, major in found.items() if major is not None}


def test_every_cuda_package_of_the_lock_belongs_to_torchs_cuda_major():
    majors = majors_of(GPU_LOCK)
    assert majors["nvidia-cuda-runtime"] == 13
    assert {name: major for name, major in majors.items() if major != 13} == {}


def test_the_exceptions_are_still_needed_and_nothing_else_of_cuda_12_is_there():
    locked = dict(pins(GPU_LOCK))
    assert set(EXCEPTIONS) <= set(locked), "an exception no longer locked: drop it from EXCEPTIONS"
    assert "nvidia-cutlass-dsl" in via(GPU_LOCK)["nvidia-cutlass-dsl-libs-cu12"]


def test_cuda_python_is_the_thin_package_over_cuda_bindings():
    locked = dict(pins(GPU_LOCK))
    assert Version(locked["cuda-python"]).major == Version(locked["cuda-bindings"]).major == 13
    assert "cuda-python" in via(GPU_LOCK)["cuda-bindings"]  # 13.x depends on cuda-bindings; 12.6 replaced it


@pytest.mark.parametrize(("lock", "offender"), [
    ("cuda-bindings==13.5.0 \\\n    # via torch\ncuda-python==12.6.2.post1 \\\n    # via flashinfer-python\n",
     "cuda-python"),
    ("nvidia-cufft-cu12==11.3.3.83 \\\n    # via torch\n", "nvidia-cufft-cu12"),
    ("cuda-toolkit==12.9.1 \\\n    # via torch\nnvidia-cufft==12.0.0.61 \\\n    # via cuda-toolkit\n", "cuda-toolkit nvidia-cufft"),
])
def test_the_check_finds_a_package_of_another_major(tmp_path, lock, offender):
    path = tmp_path / "gpu.lock"
    path.write_text(lock)
    assert {name for name, major in majors_of(path).items() if major != 13} == set(offender.split())


def test_an_unknown_cuda_package_must_be_classified(tmp_path):
    path = tmp_path / "gpu.lock"
    path.write_text("nvidia-something-new==2.0 \\\n    # via torch\n")
    with pytest.raises(AssertionError, match="not classified"):
        majors_of(path)
