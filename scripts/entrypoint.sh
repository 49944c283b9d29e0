#!/usr/bin/env bash
# The image's entrypoint: `docker run IMAGE ARGS...` runs `qlora-app ARGS...`, as on a VM with Docker.
# A pod cloud (RunPod, Vast.ai, Kubernetes) starts the image itself as the machine, with no arguments: with
# QLORA_POD=1 it prints the doctor report and what to type, then stays up for the SSH or web terminal until the
# pod is stopped (`qlora-app pod`, which handles SIGTERM and reaps orphans as PID 1). Without either, --help.
set -euo pipefail

if [[ $# -gt 0 ]]; then
  exec qlora-app "$@"
elif [[ "${QLORA_POD:-}" == 1 ]]; then
  exec qlora-app pod
else
  exec qlora-app --help
fi
