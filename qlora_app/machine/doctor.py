"""`qlora-app doctor`: is this machine ready to train and serve, and if not, the one thing to do.

Facts are gathered without a CUDA context in this process (NVML for the GPU and driver, torch's version file
for the CUDA the wheels were built for); the kernel checks run in subprocesses with a timeout, so a broken
driver can neither hang nor crash the report. The verdict is a pure function of the facts.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from qlora_app.errors import UserError
from qlora_app.machine.gpu import GpuInfo, query_gpu

# The oldest driver branch that runs each CUDA major (minor versions within a major are compatible).
MIN_DRIVER = {12: "525", 13: "580"}
KERNEL_TIMEOUT_S = 180
LOW_FREE_FRACTION = 0.9  # less free than this share of the card: something else holds GPU memory

TORCH_MATMUL = ("import torch; a = torch.ones(256, 256, device='cuda'); "
                "assert (a @ a).sum().item() == 256 ** 3; print(torch.cuda.get_device_name())")
BNB_4BIT = ("import torch, bitsandbytes.functional as F; w = torch.randn(256, 256, device='cuda', "
            "dtype=torch.bfloat16); q, s = F.quantize_4bit(w, quant_type='nf4'); "
            "assert (F.dequantize_4bit(q, s) - w).abs().mean().item() < 0.1; print('nf4 ok')")
# CUDA initialised once, in a child: the error torch gets (a CUDA error in the parent would stay for its lifetime),
# and which libcuda the CUDA runtime loaded (the host driver's, or a forward-compatibility one).
CUDA_START = ("import json\ntry:\n    import torch; torch.cuda.init(); error = ''\nexcept Exception as exc:\n"
              "    error = str(exc) or type(exc).__name__\nmaps = open('/proc/self/maps').read().splitlines()\n"
              "libcuda = next((m.split()[-1] for m in maps if '/libcuda.so' in m), '')\n"
              "print(json.dumps({'error': error, 'libcuda': libcuda}))")
CUDA_START_TIMEOUT_S = 120
# Loading the kernel downloads it into the HF cache (the pod's volume), so the first training run does not wait.
FLASH_LOAD = ("from qlora_app.train.attention import FLASH_KERNEL, flash_problem; problem = flash_problem(); "
              "assert problem is None, problem; print(FLASH_KERNEL + ' loaded')")


@dataclass(frozen=True)
class KernelCheck:
    name: str
    ok: bool
    detail: str
    required: bool = True  # False: training works without it, only slower


@dataclass(frozen=True)
class CudaStart:
    error: str  # torch.cuda.init()'s error, "" when CUDA started
    libcuda: str = ""  # the driver library the CUDA runtime loaded, "" when none was


@dataclass(frozen=True)
class Facts:
    gpu: GpuInfo
    cuda_needed: str | None  # the CUDA torch's wheels were built for, e.g. "13.0"; None: a CPU build
    kernels: tuple[KernelCheck, ...] = ()
    runs_dir: Path | None = None
    runs_writable: bool = True
    cuda: CudaStart | None = None  # None: not tried (no GPU, a CPU torch, a driver too old)


@dataclass(frozen=True)
class Finding:
    level: Literal["ok", "warn", "fail"]
    what: str
    fix: str = ""


def major(version: str) -> int:
    return int(version.split(".")[0])


def driver_problem(gpu: GpuInfo, cuda_needed: str | None) -> str | None:
    """One line when the driver cannot run the wheels' CUDA, else None."""
    if gpu.status != "ok" or not cuda_needed or not gpu.cuda_driver or major(gpu.cuda_driver) >= major(cuda_needed):
        return None
    minimum = MIN_DRIVER.get(major(cuda_needed), "newer")
    return (f"this host's driver {gpu.driver} supports CUDA {gpu.cuda_driver}; the image needs CUDA {cuda_needed} "
            f"(driver >= {minimum}): pick a host with driver {minimum}+ (RunPod: filter CUDA version "
            f"{cuda_needed}; Vast.ai: filter Max CUDA >= {cuda_needed}; a VM: install the R{minimum} driver)")


def cuda_start_problem(error: str, libcuda: str = "", cuda_needed: str | None = None) -> str | None:
    """What torch's CUDA error means and what to do, as one line; None for no error."""
    if not error:
        return None
    loaded = f" ({libcuda})" if libcuda else ""
    minimum = MIN_DRIVER.get(major(cuda_needed), "newer") if cuda_needed else "newer"
    if "Error 804" in error or "forward compatibility was attempted" in error:
        return (f"CUDA error 804: a CUDA forward-compatibility libcuda{loaded} is loaded, and forward compatibility "
                "does not work on this GPU (it is for data-centre GPUs, not GeForce/RTX cards): take the "
                "cuda/compat folder out of LD_LIBRARY_PATH so that the host driver's libcuda is used "
                f"(driver R{minimum}+ runs the image without it)")
    if "Error 803" in error or "unsupported display driver / cuda driver combination" in error:
        return (f"CUDA error 803: the driver library{loaded} does not match the loaded NVIDIA kernel module (a "
                "driver updated without a reboot, or another driver's libcuda on LD_LIBRARY_PATH): reboot the "
                "host, or remove the other libcuda from the library path; nvidia-smi shows the module's version")
    if "driver on your system is too old" in error:
        return (f"the NVIDIA driver is too old for the CUDA torch was built for: install driver R{minimum} or "
                "newer, or pick a host that has it")
    if "Found no NVIDIA driver" in error:
        return ("torch finds no NVIDIA driver library (libcuda.so.1) although the GPU is there: in Docker, start "
                "the container with --gpus all (the NVIDIA container toolkit mounts the library); on a VM, "
                "reinstall the driver")
    detail = re.sub(r"^.*?(Error \d+:)", r"\1", error.strip().splitlines()[-1])
    return f"CUDA cannot start on this GPU ({detail}): run nvidia-smi; if it fails too, reboot or reinstall the driver"


def is_compat(libcuda: str) -> bool:
    """A CUDA forward-compatibility libcuda (the cuda-compat package's, under /usr/local/cuda*/compat)."""
    return "/compat/" in libcuda


def cuda_finding(cuda: CudaStart, cuda_needed: str | None) -> Finding:
    problem = cuda_start_problem(cuda.error, cuda.libcuda, cuda_needed)
    if problem:
        return Finding("fail", "torch cannot start CUDA on this GPU", problem)
    if is_compat(cuda.libcuda):
        return Finding("warn", f"CUDA runs through a forward-compatibility libcuda: {cuda.libcuda}",
                       "it works on data-centre GPUs only and is not needed with driver R580+: take the "
                       "cuda/compat folder out of LD_LIBRARY_PATH to use the host driver's")
    return Finding("ok", f"CUDA starts (libcuda: {cuda.libcuda or 'not found in the process'})")


def verdict(facts: Facts) -> list[Finding]:
    """What is wrong (fail), worth knowing (warn) or fine (ok), each failure with its fix."""
    gpu = facts.gpu
    if gpu.status == "none":
        return [Finding("fail", "no NVIDIA GPU visible", "rent a GPU machine; in Docker pass --gpus all (needs "
                        "the NVIDIA container toolkit); check CUDA_VISIBLE_DEVICES")]
    if gpu.status == "unqueryable":
        return [Finding("fail", f"a GPU is present but cannot be queried: {gpu.reason}",
                        "the driver is broken or mismatched: run nvidia-smi on the host; reboot or reinstall it")]
    if not facts.runs_writable:
        return [Finding("fail", f"cannot write runs to {facts.runs_dir} as this user",
                        "set QLORA_HOME (or QLORA_RUNS_DIR) to a writable volume, or run the container as its "
                        "owner (Kubernetes: securityContext.fsGroup; Docker: --user)")]
    if facts.cuda_needed is None:
        return [Finding("fail", "this torch is a CPU build", "use the GPU image or install requirements/gpu.lock")]
    problem = driver_problem(gpu, facts.cuda_needed)
    findings = [Finding("fail", "driver too old", problem) if problem else
                Finding("ok", f"driver {gpu.driver} runs CUDA {facts.cuda_needed}")]
    if facts.cuda is not None:
        findings.append(cuda_finding(facts.cuda, facts.cuda_needed))
    findings.append(memory_finding(gpu))
    findings += [kernel_finding(k) for k in facts.kernels]
    return findings


def kernel_finding(check: KernelCheck) -> Finding:
    if check.ok:
        return Finding("ok", f"{check.name}: {check.detail}")
    if not check.required:
        return Finding("warn", f"{check.name} unavailable: {check.detail}",
                       "training falls back to torch's flex attention (slower); online, run qlora-app doctor again "
                       "to fetch the kernel into the HF cache")
    return Finding("fail", f"{check.name} failed: {check.detail}",
                   "see the line above; run qlora-app doctor after fixing the driver")


def memory_finding(gpu: GpuInfo) -> Finding:
    free, total = gpu.free_bytes or 0, gpu.total_bytes or 0
    if free < LOW_FREE_FRACTION * total:
        return Finding("warn", f"only {free / 2**30:.1f} of {total / 2**30:.1f} GiB free",
                       "another process holds GPU memory: stop it (nvidia-smi lists it) or plan for less")
    return Finding("ok", f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB free")


def ready(findings: list[Finding]) -> bool:
    return all(f.level != "fail" for f in findings)


def wheels_cuda() -> str | None:
    """torch.version.cuda read from torch's version file: importing torch could initialise CUDA's libraries."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    source = Path(spec.submodule_search_locations[0], "version.py").read_text()
    for node in ast.parse(source).body:
        target = getattr(node, "target", None) or (node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and target.id == "cuda":
            return ast.literal_eval(node.value)
    return None


def run_kernel(name: str, code: str, timeout: float = KERNEL_TIMEOUT_S, required: bool = True) -> KernelCheck:
    try:
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return KernelCheck(name, False, f"no answer within {timeout:.0f} s", required)
    lines = (result.stdout if result.returncode == 0 else result.stderr).strip().splitlines()
    detail = lines[-1] if lines else f"exit code {result.returncode}"
    return KernelCheck(name, result.returncode == 0, detail, required)


def probe_cuda(timeout: float = CUDA_START_TIMEOUT_S) -> CudaStart:
    """torch.cuda.init() in a child process: its error and the libcuda it loaded, without touching ours."""
    try:
        result = subprocess.run([sys.executable, "-c", CUDA_START], capture_output=True, text=True,
                                timeout=timeout)
    except subprocess.TimeoutExpired:
        return CudaStart(f"torch.cuda.init() gave no answer within {timeout:.0f} s")
    try:
        answer = json.loads(result.stdout.strip().splitlines()[-1])
        return CudaStart(answer["error"], answer["libcuda"])
    except (IndexError, ValueError, KeyError):
        lines = result.stderr.strip().splitlines()
        return CudaStart(lines[-1] if lines else f"the CUDA check exited with code {result.returncode}")


def writable(folder: Path) -> bool:
    """Whether runs can be created in folder (the nearest existing parent decides for one not yet made)."""
    existing = next(p for p in (folder.resolve(), *folder.resolve().parents) if p.exists())
    return os.access(existing, os.W_OK | os.X_OK)


def gather(runs_dir: Path, kernels: bool = True) -> Facts:
    gpu, cuda_needed = query_gpu(), wheels_cuda()
    checks: tuple[KernelCheck, ...] = ()
    cuda = None
    if gpu.status == "ok" and cuda_needed and not driver_problem(gpu, cuda_needed):
        cuda = probe_cuda()
        if kernels and not cuda.error:
            checks = (run_kernel("torch CUDA matmul", TORCH_MATMUL), run_kernel("bitsandbytes NF4", BNB_4BIT),
                      run_kernel("flash attention kernel", FLASH_LOAD, required=False))
    return Facts(gpu, cuda_needed, checks, runs_dir, writable(runs_dir), cuda)


def check_driver() -> None:
    """At the start of train and serve: a driver too old for the wheels, or a GPU that NVML sees and torch cannot
    start CUDA on (which would quietly train on the CPU), is one line before anything loads."""
    gpu, cuda_needed = query_gpu(), wheels_cuda()
    problem = driver_problem(gpu, cuda_needed)
    if not problem and gpu.status == "ok" and cuda_needed:
        cuda = probe_cuda()
        problem = cuda_start_problem(cuda.error, cuda.libcuda, cuda_needed)
    if problem:
        raise UserError(f"{problem} (details: qlora-app doctor)")


def print_report(facts: Facts, findings: list[Finding]) -> None:
    from rich.table import Table

    from qlora_app import console

    gpu = facts.gpu
    table = Table(title="qlora-app doctor", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [("GPU", gpu.name or {"none": "none visible", "unqueryable": "present, unreadable"}.get(gpu.status, "?")),
            ("driver", f"{gpu.driver} (CUDA {gpu.cuda_driver})" if gpu.driver else "n/a"),
            ("CUDA the wheels need", facts.cuda_needed or "none (CPU build of torch)"),
            ("libcuda in use", facts.cuda.libcuda or "none loaded" if facts.cuda else "n/a"),
            ("runs", str(facts.runs_dir)),
            ("memory free / total", f"{gpu.free_bytes / 2**30:.1f} / {gpu.total_bytes / 2**30:.1f} GiB"
             if gpu.total_bytes else "n/a")]
    mark = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[bold red]FAIL[/]"}
    rows += [(mark[f.level], f.what + (f"\n  -> {f.fix}" if f.fix else "")) for f in findings]
    for row in rows:
        table.add_row(*row)
    console.out.print(table)
    console.out.print("ready" if ready(findings) else "[bold red]not ready[/]: " + next(
        f.fix for f in findings if f.level == "fail"), highlight=False)


def doctor(runs_dir: Path, kernels: bool = True) -> bool:
    facts = gather(runs_dir, kernels)
    findings = verdict(facts)
    print_report(facts, findings)
    return ready(findings)
