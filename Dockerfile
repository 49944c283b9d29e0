# The GPU appliance: qlora-app with CUDA torch, bitsandbytes and vLLM. Build with `make image`.
#
# torch 2.13.0 (the release vllm 0.32.0 pins) ships from PyPI built for CUDA 13.0 and carries its CUDA
# libraries in wheels; the base image matches that major and supplies the driver-compatibility layer. The host
# needs an NVIDIA driver for CUDA 13 (R580 or newer) and the NVIDIA container toolkit.
# Python 3.12 is Ubuntu 24.04's, and requirements/gpu.lock is resolved for it and glibc 2.39 (`make lock-gpu`).
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# DL3008 (pin apt versions) is ignored: the base tag fixes the Ubuntu release, and Ubuntu drops superseded
# package versions from its archive, so pinned versions would break the build after the next security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv /opt/venv
# Every package pinned with its hashes, wheels only but rouge-score (the eval stage's ROUGE-L, published as an
# sdist only, pure Python: built here from its hashed sdist): nothing unpinned slips in. The lock is complete,
# so --no-deps: pip's hash mode otherwise rejects a dependency asked for with an extra (nvidia-cutlass-dsl[cu13])
# as "not pinned"; `pip check` below proves nothing is missing.
COPY requirements/gpu.lock /tmp/gpu.lock
RUN /opt/venv/bin/pip install --require-hashes --no-deps --only-binary=:all: --no-binary=rouge-score,sqlitedict,word2number \
    -r /tmp/gpu.lock
# The project itself, its dependencies being exactly the lock's (setuptools is in the lock: no isolated build).
COPY pyproject.toml README.md /src/
COPY qlora_app /src/qlora_app
RUN /opt/venv/bin/pip install --no-deps --no-build-isolation /src \
    && /opt/venv/bin/pip check

FROM ${CUDA_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Triton (torch.compile in vLLM, vLLM's sampler and LoRA kernels) compiles one small C module (its driver.c) with
# gcc on first use: it needs a C compiler and Python.h at run time, not only at build time. Nothing else compiles
# at run time: no nvcc, no g++ (docs/serving-runtime.md; FlashInfer's JIT paths are switched off in vLLM's
# environment by the serve stage). DL3008: as above.
# The base image's CUDA forward-compatibility libcuda (/usr/local/cuda-*/compat) goes: the image needs a host
# driver of the CUDA 13 branch (R580+) anyway, which runs CUDA 13.x without it, and loaded on a GeForce/RTX card
# (by LD_LIBRARY_PATH or the container toolkit's compat hook) it fails every CUDA call with error 804.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       python3.12 python3.12-dev gcc libc6-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/* /usr/local/cuda/compat /usr/local/cuda-*/compat \
    && groupadd --system --gid 10001 qlora \
    && useradd --system --uid 10001 --gid qlora --home-dir /tmp --no-create-home qlora
COPY --from=build /opt/venv /opt/venv

# Any --user UID:GID must work (make passes the caller's, so files in runs/ are theirs), including one with no
# /etc/passwd entry: HOME is /tmp; LOGNAME/USER give getpass.getuser() a name (torch's inductor cache asks for
# one and raises without); every cache lives under /cache, which like /app/runs is writable by anyone when no
# volume is mounted there.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    LOGNAME=qlora \
    USER=qlora \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    QLORA_CACHE_DIR=/cache/qlora-app \
    VLLM_CACHE_ROOT=/cache/vllm \
    TRITON_CACHE_DIR=/cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor \
    QLORA_RECIPES_DIR=/app/recipes \
    QLORA_RUNS_DIR=/app/runs \
    VLLM_NO_USAGE_STATS=1 \
    HF_HUB_DISABLE_TELEMETRY=1

WORKDIR /app
COPY recipes /app/recipes
COPY data /app/data
COPY --chmod=0755 scripts/entrypoint.sh /usr/local/bin/qlora-entrypoint
# Last, the run-time compile path checked and the CLI run: Triton's own driver.c against its cuda.h and the
# Python.h its build step asks sysconfig for, and the /sbin/ldconfig it finds libcuda.so.1 with (mounted by the
# NVIDIA container toolkit at run time). A missing header fails the build here, not the first model load on a
# rented GPU. No nvcc, no c++ and no forward-compatibility libcuda: what docs/serving-runtime.md says the image is.
RUN mkdir -p /app/runs /cache/huggingface \
    && chmod 1777 /app/runs /cache /cache/huggingface \
    && echo '#include <Python.h>' | gcc -fsyntax-only -x c -I/usr/include/python3.12 - \
    && triton_nvidia=/opt/venv/lib/python3.12/site-packages/triton/backends/nvidia \
    && gcc -fsyntax-only -I"$triton_nvidia/include" \
       -I"$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" "$triton_nvidia/driver.c" \
    && test -x /sbin/ldconfig \
    && ! command -v nvcc && ! command -v c++ && ! command -v g++ \
    && test -z "$(find /usr/local -path '*/compat/libcuda.so*')" \
    && qlora-app --version
VOLUME ["/cache", "/app/runs"]

USER 10001:10001
EXPOSE 8000
# Healthy while no server runs in the container (train, merge); while one does, vLLM's /health decides.
# Loading an 8B model (and the first download of its weights) takes minutes: hence the long start period.
HEALTHCHECK --interval=30s --timeout=10s --start-period=15m --retries=3 CMD ["qlora-app", "health"]
# `docker run IMAGE train tiny` runs qlora-app train tiny; with no arguments and QLORA_POD=1 (a pod cloud's
# start), the container stays up as the machine (scripts/entrypoint.sh). QLORA_HOME=/workspace puts runs and
# caches on the pod's volume.
ENTRYPOINT ["qlora-entrypoint"]
