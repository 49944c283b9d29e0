"""What GPU this machine has, read through NVML (nvidia-ml-py) without creating a CUDA context.

A CUDA context in our process would hold memory that vLLM (serve) or the planner (auto batch size) counts
on, and a broken driver would crash torch later with a worse message. Three answers are kept apart: no GPU,
a GPU that answered, and a GPU that is there (its device nodes exist) but cannot be queried.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

DEVICE_NODE = Path("/dev/nvidiactl")  # present wherever an NVIDIA driver exposes a GPU, containers included


@dataclass(frozen=True)
class GpuInfo:
    status: Literal["none", "ok", "unqueryable"]
    name: str | None = None
    driver: str | None = None
    cuda_driver: str | None = None  # the newest CUDA the driver supports, e.g. "13.0"
    total_bytes: int | None = None
    free_bytes: int | None = None
    reason: str | None = None  # why it cannot be queried

    @property
    def present(self) -> bool:
        return self.status != "none"


def nvidia_device_present() -> bool:
    return DEVICE_NODE.exists()


def local_device(index: int | None = None) -> str | None:
    """The NVML name (index or UUID) of CUDA's device `index` (default: this rank's, LOCAL_RANK, else 0), or
    None when CUDA_VISIBLE_DEVICES hides it."""
    index = int(os.environ.get("LOCAL_RANK", "0")) if index is None else index
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return str(index)
    entries = [entry.strip() for entry in visible.split(",")]
    device = entries[index] if index < len(entries) else ""
    return None if device in ("", "-1") or entries[0] in ("", "-1") else device


def query_gpu(device: str | None = None) -> GpuInfo:
    """A GPU as NVML sees it (default: the one this process's CUDA uses); never raises."""
    device = device or local_device()
    if device is None:
        return GpuInfo("none")
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # no package, no driver library: pynvml raises its own classes or OSError
        if nvidia_device_present():
            return GpuInfo("unqueryable", reason=f"NVML failed: {exc or type(exc).__name__}")
        return GpuInfo("none")
    try:
        return _read(pynvml, device)
    except Exception as exc:
        return GpuInfo("unqueryable", reason=f"NVML failed: {exc or type(exc).__name__}")
    finally:
        pynvml.nvmlShutdown()


def _read(pynvml, device: str) -> GpuInfo:
    if device.isdigit() and int(device) >= pynvml.nvmlDeviceGetCount():
        return GpuInfo("none")
    handle = (pynvml.nvmlDeviceGetHandleByIndex(int(device)) if device.isdigit()
              else pynvml.nvmlDeviceGetHandleByUUID(device))
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    cuda = pynvml.nvmlSystemGetCudaDriverVersion()  # e.g. 13000
    return GpuInfo("ok", name=_text(pynvml.nvmlDeviceGetName(handle)),
                   driver=_text(pynvml.nvmlSystemGetDriverVersion()),
                   cuda_driver=f"{cuda // 1000}.{cuda % 1000 // 10}",
                   total_bytes=int(memory.total), free_bytes=int(memory.free))


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
