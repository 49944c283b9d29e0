"""Writing without ever leaving half a file or half a folder: write beside the target, then rename over it."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


@contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """A folder to fill beside `target`. When the block succeeds it takes target's place in one step; when it
    fails it is removed and target is untouched. Every folder a stage publishes (adapter, merged model, built-in
    model) goes through here."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield staging
        staging.chmod(0o755)
        if not (target.exists() and _exchange(staging, target)):
            if target.exists():  # no atomic exchange here: a rename aside, then the rename in
                target.rename(staging.with_name(staging.name + "-old"))
            staging.rename(target)
    finally:
        for leftover in (staging, staging.with_name(staging.name + "-old")):
            shutil.rmtree(leftover, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE): readers of b never find it missing."""
    rename = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    at_fdcwd, rename_exchange = -100, 2
    return rename is not None and rename(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def clean_stale(parent: Path, name: str) -> None:
    """Staging and set-aside folders of `name` left by a killed process: never the real thing, always safe."""
    for stale in parent.glob(f".{name}-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
