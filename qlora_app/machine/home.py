"""QLORA_HOME: one folder (a pod's persistent volume, e.g. /workspace) for runs and every cache.

Read by the CLI at start, before any library reads its own variable: it sets those variables, so stages never
look at the environment. When QLORA_HOME is set it wins over the image's defaults for the same variables.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from qlora_app.errors import UserError

HOME_ENV = "QLORA_HOME"
LAYOUT = {
    "QLORA_RUNS_DIR": "runs",
    "HF_HOME": "cache/huggingface",
    "XDG_CACHE_HOME": "cache",
    "QLORA_CACHE_DIR": "cache/qlora-app",
    "VLLM_CACHE_ROOT": "cache/vllm",
    "TRITON_CACHE_DIR": "cache/triton",
    "TORCHINDUCTOR_CACHE_DIR": "cache/torchinductor",
}


def home_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables QLORA_HOME implies (nothing when it is unset)."""
    home = environ.get(HOME_ENV)
    if home:
        check_folder(Path(home))
    return {name: str(Path(home) / sub) for name, sub in LAYOUT.items()} if home else {}


def check_folder(home: Path) -> None:
    """QLORA_HOME must be a folder or become one: neither it nor a folder above it may be a file."""
    for path in (home, *home.parents):
        if path.exists():
            if not path.is_dir():
                raise UserError(f"{HOME_ENV}={home}: {path} is not a folder; point {HOME_ENV} at a folder (a pod's "
                                "volume, e.g. /workspace) or unset it")
            return
