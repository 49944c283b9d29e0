"""Checks before vLLM starts: each failure is one line that says what to do, found in seconds, not after
minutes of loading weights."""

from __future__ import annotations

import errno
import importlib.util
import ipaddress
import socket

from qlora_app.errors import UserError
from qlora_app.model.architecture import Architecture
from qlora_app.plan.planner import CUDA_CONTEXT, GiB
from qlora_app.serve.auth import KEY_ENV
from qlora_app.serve.target import ServeTarget

# vLLM's activations, sampler and LoRA slots beside weights and KV cache; generous for 7-8B models.
SERVER_OVERHEAD = int(1.5 * GiB)


def check_vllm_installed() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise UserError("vLLM is not installed in this environment: use the Docker image (make image), or the "
                        "project's environment (make venv on CPU, pip install '.[gpu]' on a CUDA machine)")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen(host: str, key_set: bool, allow_unauthenticated: bool) -> None:
    if not key_set and not is_loopback(host) and not allow_unauthenticated:
        raise UserError(f"refusing to serve on {host} without an API key: set {KEY_ENV} (clients then send "
                        f"'Authorization: Bearer <key>'), bind 127.0.0.1, or pass --allow-unauthenticated")


def check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UserError(f"port {port} on {host} is already in use (another server?): stop it or pick "
                                "another with --port") from None
            raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def check_max_len(target: ServeTarget, arch: Architecture) -> None:
    wanted = target.recipe.max_model_len
    if wanted > arch.max_positions:
        raise UserError(f"serve.max_model_len={wanted} is beyond the model's {arch.max_positions} positions "
                        f"(max_position_embeddings): lower it with --set serve.max_model_len=N")


def serve_weight_bytes(target: ServeTarget, arch: Architecture, cuda: bool) -> int:
    """16-bit weights; with fp8 the decoder's projections take one byte each (embeddings and head stay 16-bit)."""
    if cuda and target.recipe.serve.quantization == "fp8":
        return arch.total_params * 2 - arch.layers * arch.layer_linear_params
    return arch.total_params * 2


def kv_bytes_per_token(arch: Architecture) -> int:
    return 2 * arch.layers * arch.kv_heads * arch.head_dim * 2  # keys and values, 16-bit


def kv_bytes(arch: Architecture, tokens: int) -> int:
    """KV cache of one sequence of `tokens`: sliding-window layers (Gemma 3: 5 of 6) keep only their window."""
    per_layer = kv_bytes_per_token(arch) // arch.layers
    window = min(tokens, arch.sliding_window or tokens)
    return per_layer * ((arch.layers - arch.sliding_layers) * tokens + arch.sliding_layers * window)


def check_fits(target: ServeTarget, arch: Architecture, device_bytes: int, weight_bytes: int) -> None:
    """Each GPU must hold its share of the weights and of the KV cache of one full-length sequence: tensor
    parallelism splits both over tensor_parallel_size GPUs (KV heads no further than there are heads)."""
    util, tp = target.recipe.serve.gpu_memory_utilization, target.recipe.serve.tensor_parallel_size
    weight_bytes = weight_bytes // tp
    budget = device_bytes * util - weight_bytes - CUDA_CONTEXT - SERVER_OVERHEAD
    need = kv_bytes(arch, target.recipe.max_model_len) // min(tp, arch.kv_heads)
    if budget < need:
        raise UserError(
            f"serve.max_model_len={target.recipe.max_model_len} does not fit: its KV cache needs "
            f"{need / GiB:.2f} GiB but only {max(budget, 0) / GiB:.2f} GiB of {device_bytes / GiB:.0f} GiB x "
            f"gpu_memory_utilization {util} is left beside {weight_bytes / GiB:.1f} GiB of weights"
            f"{f' (1/{tp} of them on each GPU)' if tp > 1 else ''}: lower serve.max_model_len, raise "
            "serve.gpu_memory_utilization, or split the model over more GPUs (serve.tensor_parallel_size)")
