"""Telling a full disk from other failures, whichever library's writer hit it.

Python's own writes raise OSError(ENOSPC). safetensors raises SafetensorError, its message ending in the OS
error ("No space left on device (os error 28)"). torch.save's zip writer raises a bare RuntimeError
("[enforce fail at inline_container.cc] ... unexpected pos", or "PytorchStreamWriter failed writing file")
that keeps no errno; its partial file stays, so a full disk shows in the filesystem itself.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
NO_SPACE_MESSAGES = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT), f"os error {errno.ENOSPC}")
TORCH_WRITER = ("PytorchStreamWriter", "inline_container")
# A writer that ran out of space wrote until the last block: what is left is less than one write.
ALMOST_FULL = 1 << 20


def is_disk_full(exc: BaseException, path: Path) -> bool:
    """Whether exc (or an exception it came from) means the filesystem holding path ran out of space."""
    for error in chain(exc):
        if isinstance(error, OSError) and error.errno in NO_SPACE:
            return True
        message = str(error)
        if any(text in message for text in NO_SPACE_MESSAGES):
            return True
        if isinstance(error, RuntimeError) and any(text in message for text in TORCH_WRITER):
            return free_bytes(path) < ALMOST_FULL
    return False


def chain(exc: BaseException | None):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free
