"""`qlora-app doctor`: the verdict as a function of the facts, and the real command on this GPU-less machine."""

from __future__ import annotations

import pytest
from conftest import run_cli

from qlora_app.machine.doctor import (
    CudaStart,
    Facts,
    KernelCheck,
    cuda_start_problem,
    driver_problem,
    probe_cuda,
    ready,
    verdict,
    wheels_cuda,
)
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


# --- a GPU that NVML sees and torch cannot start CUDA on -----------------------------------------------------
# torch.cuda.init()'s messages as users met them (torch prefixes cudaGetDeviceCount's error with its own text).
TORCH_PREFIX = ("Unexpected error from cudaGetDeviceCount(). Did you run some cuda functions before calling "
                "NumCudaDevices() that might have already set an error? ")
ERROR_804 = TORCH_PREFIX + "Error 804: forward compatibility was attempted on non supported HW"
ERROR_803 = TORCH_PREFIX + "Error 803: system has unsupported display driver / cuda driver combination"
TOO_OLD = ("The NVIDIA driver on your system is too old (found version 12080). Please update your GPU driver by "
           "downloading and installing a new version from the URL: http://www.nvidia.com/Download/index.aspx "
           "Alternatively, go to: https://pytorch.org to install a PyTorch version that has been compiled with "
           "your version of the CUDA driver.")
NO_DRIVER = ("Found no NVIDIA driver on your system. Please check that you have an NVIDIA GPU and installed a "
             "driver from http://www.nvidia.com/Download/index.aspx")
UNKNOWN = ("CUDA unknown error - this may be due to an incorrectly set up environment, e.g. changing env variable "
           "CUDA_VISIBLE_DEVICES after program start. Setting the available devices to be zero.")
COMPAT = "/usr/local/cuda-13.0/compat/libcuda.so.580.95.05"


@pytest.mark.parametrize(("error", "libcuda", "fragments"), [
    (ERROR_804, COMPAT, ["CUDA error 804", "forward-compatibility libcuda (" + COMPAT + ")", "GeForce",
                         "out of LD_LIBRARY_PATH", "R580+"]),
    (ERROR_803, "/usr/lib/x86_64-linux-gnu/libcuda.so.575.57.08",
     ["CUDA error 803", "libcuda.so.575.57.08", "kernel module", "reboot"]),
    (TOO_OLD, "", ["driver is too old", "R580 or newer"]),
    (NO_DRIVER, "", ["no NVIDIA driver library", "--gpus all"]),
    (UNKNOWN, "", ["CUDA unknown error", "nvidia-smi", "reboot"]),
    (TORCH_PREFIX + "Error 999: unknown error", "", ["(Error 999: unknown error)", "nvidia-smi"]),
])
def test_each_cuda_start_error_is_one_line_with_its_cause_and_fix(error, libcuda, fragments):
    problem = cuda_start_problem(error, libcuda, "13.0")
    assert "\n" not in problem and "Did you run" not in problem
    for fragment in fragments:
        assert fragment in problem


def test_no_error_is_no_problem():
    assert cuda_start_problem("", "/usr/lib/x86_64-linux-gnu/libcuda.so.580.82.07", "13.0") is None


def test_a_gpu_torch_cannot_start_is_not_ready_and_no_kernel_is_blamed():
    findings = verdict(Facts(gpu(), "13.0", (), cuda=CudaStart(ERROR_804, COMPAT)))
    assert not ready(findings)
    (failure,) = [f for f in findings if f.level == "fail"]
    assert failure.fix == cuda_start_problem(ERROR_804, COMPAT, "13.0")


def test_the_libcuda_in_use_is_named_and_a_compat_one_is_a_warning():
    host = "/usr/lib/x86_64-linux-gnu/libcuda.so.580.82.07"
    cuda = verdict(Facts(gpu(), "13.0", KERNELS_OK, cuda=CudaStart("", host)))[1]
    assert cuda.level == "ok" and host in cuda.what
    findings = verdict(Facts(gpu(), "13.0", KERNELS_OK, cuda=CudaStart("", COMPAT)))
    assert ready(findings)
    (warning,) = [f for f in findings if f.level == "warn"]
    assert COMPAT in warning.what and "LD_LIBRARY_PATH" in warning.fix


def test_the_probe_reads_torchs_own_error_from_a_child_process():
    """On this machine torch is a CPU build: torch.cuda.init() fails in the child, and the parent never loads
    CUDA (a failed init in our own process would stay for its lifetime)."""
    import sys

    start = probe_cuda()
    assert "not compiled with CUDA" in start.error and start.libcuda == ""
    assert "torch.cuda" not in sys.modules or not sys.modules["torch"].cuda.is_initialized()


def test_train_and_serve_stop_when_nvml_sees_a_gpu_and_cuda_does_not_start(monkeypatch):
    """check_driver (the first step of train and serve) on a host whose NVML answers: here the GPU is the one
    stand-in (this machine has none); CUDA's start is real, in a child, and fails as torch's CPU build does."""
    from qlora_app.errors import UserError
    from qlora_app.machine import doctor

    monkeypatch.setattr(doctor, "query_gpu", lambda: gpu())
    monkeypatch.setattr(doctor, "wheels_cuda", lambda: "13.0")
    with pytest.raises(UserError, match=r"CUDA cannot start on this GPU \(Torch not compiled with CUDA enabled\)"):
        doctor.check_driver()
