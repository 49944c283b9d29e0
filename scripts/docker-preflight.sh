#!/usr/bin/env bash
# What `make` checks before it runs Docker: that docker works, that the GPU can reach a container (with --gpu),
# and that IMAGE is built. Each missing piece stops here with what to do, instead of an error from deep inside
# docker or CUDA.
# Usage: scripts/docker-preflight.sh [--gpu] [IMAGE]
set -euo pipefail

# CUDA 13.0, which the image's torch wheels bundle, needs driver branch R580 or newer on the host.
MIN_DRIVER=580
DOCKER=${DOCKER:-docker}

fail() {
  printf 'error: %s\n' "$1" >&2
  shift
  printf '  %s\n' "$@" "or, without Docker, use the local virtual environment: add LOCAL=1 to the make command" >&2
  exit 1
}

check_docker() {
  command -v "$DOCKER" >/dev/null ||
    fail "docker is not installed" "install Docker Engine: https://docs.docker.com/engine/install/ (README: Run on a rented GPU)"
  runtimes=$("$DOCKER" info --format '{{json .Runtimes}}' 2>/dev/null) ||
    fail "docker is installed but its daemon cannot be reached" \
      "start it (sudo systemctl start docker) or join the docker group (sudo usermod -aG docker \$USER, then log in again)"
}

check_gpu() {
  command -v nvidia-smi >/dev/null ||
    fail "no NVIDIA driver on this machine (nvidia-smi not found)" "install the driver (sudo ubuntu-drivers install), then reboot"
  local driver
  driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n 1)
  [ "${driver%%.*}" -ge "$MIN_DRIVER" ] 2>/dev/null ||
    fail "NVIDIA driver ${driver:-unknown} is too old for the image's CUDA 13.0 (needs $MIN_DRIVER or newer)" \
      "install a newer driver (sudo ubuntu-drivers install), then reboot"
  [[ $runtimes == *nvidia* ]] ||
    command -v nvidia-container-runtime-hook >/dev/null ||
    fail "the NVIDIA container toolkit is missing: containers cannot see the GPU" \
      "install it and configure Docker (README: Run on a rented GPU):" \
      "sudo apt-get install -y nvidia-container-toolkit && sudo nvidia-ctk runtime configure --runtime=docker && sudo systemctl restart docker"
}

check_image() {
  "$DOCKER" image inspect "$1" >/dev/null 2>&1 ||
    fail "image $1 not found" "build it first: make image (or pass IMAGE=name:tag)"
}

gpu=0
if [ "${1:-}" = --gpu ]; then
  gpu=1
  shift
fi
check_docker
[ "$gpu" = 0 ] || check_gpu
[ -z "${1:-}" ] || check_image "$1"
