"""`qlora-app doctor`: the verdict as a function of the facts, and the real command on this GPU-less machine."""

from __future__ import annotations

import pytest
from conftest import run_cli

from qlora_app.machine.doctor import Facts, KernelCheck, driver_problem, ready, verdict, wheels_cuda
from qlora_app.machine.gpu import GpuInfo
from qlora_app.machine.home import home_environment

GIB = 2**30


def gpu(driver="580.82.07", cuda="13.0", total=24 * GIB, free=23.5 * GIB) -> GpuInfo:
    return GpuInfo("ok", name="NVIDIA GeForce RTX 4090", driver=driver, cuda_driver=cuda, total_bytes=total,
                   free_bytes=int(free))


KERNELS_OK = (KernelCheck("torch CUDA matmul", True, "NVIDIA GeForce RTX 4090"), KernelCheck("bitsandbytes NF4", True, "nf4 ok"))


def test_r580_host_with_working_kernels_is_ready():
    findings = verdict(Facts(gpu(), "13.0", KERNELS_OK))
    assert ready(findings) and [f.level for f in findings] == ["ok"] * 4


def test_r570_host_is_not_ready_and_says_which_driver_and_hosts_to_pick():
    findings = verdict(Facts(gpu(driver="570.172.08", cuda="12.8"), "13.0"))
    assert not ready(findings)
    (failure,) = [f for f in findings if f.level == "fail"]
    assert failure.fix == driver_problem(gpu(driver="570.172.08", cuda="12.8"), "13.0")
    for fragment in ("driver 570.172.08 supports CUDA 12.8", "needs CUDA 13.0", "driver >= 580", "RunPod",
                     "Vast.ai"):
        assert fragment in failure.fix


@pytest.mark.parametrize("driver_cuda, wheels", [("13.0", "13.0"), ("13.1", "13.0"), ("13.0", "13.2"),
                                                 ("12.8", "12.6")])
def test_a_driver_of_the_same_cuda_major_runs_the_wheels(driver_cuda, wheels):
    assert driver_problem(gpu(cuda=driver_cuda), wheels) is None


def test_memory_held_by_another_process_is_a_warning_not_a_failure():
    findings = verdict(Facts(gpu(free=10 * GIB), "13.0", KERNELS_OK))
    assert ready(findings)
    assert [f.what for f in findings if f.level == "warn"] == ["only 10.0 of 24.0 GiB free"]


def test_a_kernel_that_does_not_load_is_a_failure():
    broken = (KERNELS_OK[0], KernelCheck("bitsandbytes NF4", False, "RuntimeError: no kernel image"))
    findings = verdict(Facts(gpu(), "13.0", broken))
    assert not ready(findings)
    assert any("bitsandbytes NF4 failed: RuntimeError" in f.what for f in findings if f.level == "fail")


@pytest.mark.parametrize("info, wheels, expected", [
    (GpuInfo("none"), "13.0", "no NVIDIA GPU visible"),
    (GpuInfo("unqueryable", reason="NVML failed: Driver Not Loaded"), "13.0", "Driver Not Loaded"),
    (gpu(), None, "CPU build"),
])
def test_no_gpu_an_unreadable_gpu_or_a_cpu_torch_is_not_ready(info, wheels, expected):
    (finding,) = verdict(Facts(info, wheels))
    assert finding.level == "fail" and expected in finding.what and finding.fix


def test_wheels_cuda_reads_torch_without_importing_it():
    import subprocess
    import sys

    code = ("import sys; from qlora_app.machine.doctor import wheels_cuda; c = wheels_cuda(); loaded = 'torch' in "
            "sys.modules; import torch; print(c == torch.version.cuda, loaded)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split() == ["True", "False"]
    assert wheels_cuda() is None  # this machine's torch is the +cpu build


def test_doctor_on_this_machine_says_no_gpu_and_exits_1():
    result = run_cli("doctor")
    assert result.returncode == 1, result.stderr
    assert "no NVIDIA GPU visible" in result.stdout and "not ready" in result.stdout
    assert "Traceback" not in result.stderr


def test_qlora_home_puts_runs_and_caches_under_one_folder(tmp_path):
    variables = home_environment({"QLORA_HOME": "/workspace"})
    assert variables["QLORA_RUNS_DIR"] == "/workspace/runs"
    assert variables["HF_HOME"] == "/workspace/cache/huggingface"
    assert all(v.startswith("/workspace/") for v in variables.values())
    assert home_environment({}) == {}
    # Through the real CLI: it wins over QLORA_RUNS_DIR (the image sets that one by default).
    result = run_cli("merge", env={"QLORA_HOME": str(tmp_path), "QLORA_RUNS_DIR": "/nonexistent"})
    assert result.returncode == 2 and f"no trained run under {tmp_path / 'runs'}" in result.stderr


def test_a_runs_folder_that_cannot_be_written_is_named_with_the_fix(tmp_path):
    findings = verdict(Facts(gpu(), "13.0", KERNELS_OK, tmp_path / "runs", runs_writable=False))
    assert not ready(findings) and f"cannot write runs to {tmp_path / 'runs'}" in findings[0].what
    assert "QLORA_HOME" in findings[0].fix


def test_a_kernel_check_reports_the_failure_line_of_its_subprocess():
    from qlora_app.machine.doctor import TORCH_MATMUL, run_kernel

    check = run_kernel("torch CUDA matmul", TORCH_MATMUL)  # this torch has no CUDA: the real failure
    assert not check.ok and "CUDA" in check.detail and "\n" not in check.detail


def test_a_kernel_check_that_hangs_is_cut_off_by_its_timeout():
    from qlora_app.machine.doctor import run_kernel

    check = run_kernel("hung driver", "import time; time.sleep(60)", timeout=1)  # stands in for a hung driver
    assert not check.ok and check.detail == "no answer within 1 s"


def test_a_flash_kernel_that_cannot_load_is_a_warning_with_the_fallback():
    """The real check, run here: this CPU environment has no `kernels` package, so the kernel cannot load;
    training still works (flex attention), so the machine stays ready."""
    from qlora_app.machine.doctor import FLASH_LOAD, run_kernel

    check = run_kernel("flash attention kernel", FLASH_LOAD, required=False)
    assert not check.ok and "the 'kernels' package is not installed" in check.detail
    findings = verdict(Facts(gpu(), "13.0", (*KERNELS_OK, check)))
    assert ready(findings)
    (warning,) = [f for f in findings if f.level == "warn"]
    assert warning.what.startswith("flash attention kernel unavailable") and "flex attention" in warning.fix
