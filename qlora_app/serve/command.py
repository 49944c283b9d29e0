"""The vLLM server's command line for a serve target: a pure function, so what we ask vLLM for is testable.

The server starts through vLLM's Python entry point (the `vllm` console script of the CPU build fails on
missing package metadata). Secrets never go on this line: the API key reaches the middleware through the
environment, and the Hub token through HF_TOKEN.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from qlora_app.serve.target import ServeTarget

ENTRY_POINT = "vllm.entrypoints.launchers.api_server.entry"
AUTH_MIDDLEWARE = "qlora_app.serve.auth.RequireApiKey"


@dataclass(frozen=True)
class Listen:
    host: str
    port: int
    with_key: bool


def vllm_command(target: ServeTarget, listen: Listen, cuda: bool, python: str = sys.executable) -> list[str]:
    serve, model = target.recipe.serve, target.recipe.model
    cmd = [python, "-m", ENTRY_POINT, "--model", target.model, "--served-model-name", target.served_name,
           "--tokenizer", str(target.tokenizer), "--chat-template", str(target.chat_template),
           "--generation-config", str(target.generation_config),
           "--max-model-len", str(target.recipe.max_model_len),
           "--gpu-memory-utilization", str(serve.gpu_memory_utilization),
           "--host", listen.host, "--port", str(listen.port)]
    if target.revision:
        cmd += ["--revision", target.revision]
    if model.template_kwargs:  # thinking on/off and the like, as the model was trained (request values still win)
        cmd += ["--default-chat-template-kwargs", json.dumps(model.template_kwargs, sort_keys=True)]
    if cuda and serve.quantization != "none":
        cmd += ["--quantization", serve.quantization]
    if serve.tensor_parallel_size > 1:
        cmd += ["--tensor-parallel-size", str(serve.tensor_parallel_size)]
    if serve.data_parallel_size > 1:
        cmd += ["--data-parallel-size", str(serve.data_parallel_size)]
    if target.adapters:
        cmd += adapter_flags(target)
    if model.trust_remote_code:
        cmd.append("--trust-remote-code")
    if not cuda:
        cmd.append("--enforce-eager")  # on CPU, torch.compile warm-up costs minutes and gains little
    if listen.with_key:
        cmd += ["--middleware", AUTH_MIDDLEWARE]
    return cmd


def adapter_flags(target: ServeTarget) -> list[str]:
    return ["--enable-lora", "--max-lora-rank", str(target.max_lora_rank),
            "--max-loras", str(min(target.recipe.serve.max_loras, len(target.adapters))),
            "--lora-modules", *(f"{a.name}={a.path}" for a in target.adapters)]
