"""Reading and writing safetensors files one tensor at a time.

The safetensors library maps a file into memory (every page read stays in the process's resident set until
the file is closed) and writes a file from a dict of all its tensors. For a 5 GB shard that means gigabytes
resident twice over. The format is simple (8-byte little-endian header length, a JSON header with each tensor's
dtype, shape and byte range, then the raw bytes), so this reads each tensor with plain file reads and writes
each tensor as soon as it is ready, keeping one tensor in memory at a time. Files written here are read back
by the safetensors library in the tests.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I64": "int64",
          "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _torch_dtype(code: str):
    import torch

    return getattr(torch, DTYPES[code])


def _code(dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    return next(code for code, value in DTYPES.items() if value == name)


def read_header(path: Path) -> tuple[dict, int]:
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return header, 8 + size


def entries(header: dict) -> list[tuple[str, dict]]:
    """(name, info) of every tensor, in the order their bytes lie in the file."""
    return sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0])


def iter_tensors(path: Path) -> Iterator[tuple[str, object]]:
    """(name, tensor) in file order, each read into fresh memory with plain reads (no memory map)."""
    import torch

    header, start = read_header(path)
    with path.open("rb", buffering=0) as f:
        for name, info in entries(header):
            begin, end = info["data_offsets"]
            buffer = bytearray(end - begin)
            f.seek(start + begin)
            f.readinto(buffer)
            flat = torch.frombuffer(buffer, dtype=_torch_dtype(info["dtype"])) if buffer else \
                torch.empty(0, dtype=_torch_dtype(info["dtype"]))
            yield name, flat.reshape(info["shape"])


class StreamWriter:
    """Writes tensors of known names, dtypes and shapes to a safetensors file, one at a time, in order."""

    def __init__(self, path: Path, layout: list[tuple[str, object, tuple[int, ...]]]):
        import torch

        header, offset = {}, 0
        for name, dtype, shape in layout:
            nbytes = torch.empty(0, dtype=dtype).element_size()
            for dim in shape:
                nbytes *= dim
            header[name] = {"dtype": _code(dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self.order = [name for name, _, _ in layout]
        self.file = path.open("wb")
        self.file.write(struct.pack("<Q", len(encoded)) + encoded)

    def write(self, name: str, tensor) -> None:
        expected = self.order.pop(0)
        if name != expected:
            raise ValueError(f"tensors must be written in layout order: expected {expected}, got {name}")
        import torch

        self.file.write(memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy()))

    def __enter__(self) -> StreamWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            if exc_type is None:
                if self.order:
                    raise ValueError(f"{len(self.order)} tensors were never written")
                self.file.flush()
                os.fsync(self.file.fileno())
        finally:
            self.file.close()
