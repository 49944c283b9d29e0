"""The serve stage: vLLM's OpenAI-compatible server on a merged model, or on one base with many adapters.

Checks run first (vLLM present, listen address and key, port, adapters, length, memory); then vLLM starts
in its own process group, we wait for /health, print the endpoint, the model ids and a ready curl line, and
keep it running until Ctrl-C or SIGTERM, which stop vLLM and all its workers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from qlora_app import console
from qlora_app.errors import UserError
from qlora_app.machine.doctor import check_driver
from qlora_app.machine.gpu import query_gpu
from qlora_app.model.architecture import load_architecture
from qlora_app.run.directory import file_stamp
from qlora_app.serve.auth import KEY_ENV
from qlora_app.serve.checks import (
    check_fits,
    check_listen,
    check_max_len,
    check_port_free,
    check_vllm_installed,
    is_loopback,
    serve_weight_bytes,
)
from qlora_app.serve.command import Listen, vllm_command
from qlora_app.serve.process import VllmServer, local_url, sigterm_as_interrupt
from qlora_app.serve.target import ServeTarget

STARTUP_TIMEOUT_S = 30 * 60  # an 8B model downloaded on first use can take this long


@dataclass(frozen=True)
class Endpoint:
    server: VllmServer
    model_ids: list[str]
    startup_seconds: float

    @property
    def url(self) -> str:  # where clients on this machine reach it
        return self.server.url


def preflight(target: ServeTarget, host: str, port: int, allow_unauthenticated: bool) -> list[str]:
    """Every check that can fail before weights load; returns the vLLM command line."""
    check_vllm_installed()
    check_driver()
    key_set = bool(os.environ.get(KEY_ENV))
    check_listen(host, key_set, allow_unauthenticated)
    check_port_free(host, port)
    arch = load_architecture(target.recipe.model)
    check_max_len(target, arch)
    gpu = query_gpu()
    if gpu.status == "ok":
        check_fits(target, arch, gpu.total_bytes, serve_weight_bytes(target, arch, cuda=True))
    elif gpu.status == "unqueryable":
        console.warn(f"a GPU is present but its memory cannot be read ({gpu.reason}): serving on it without "
                     "checking that the KV cache fits")
    elif target.recipe.serve.quantization != "none":
        console.note(f"no CUDA GPU: weights are served in 16-bit (serve.quantization="
                     f"{target.recipe.serve.quantization} applies on GPU)")
    return vllm_command(target, Listen(host, port, key_set), cuda=gpu.present)


@contextmanager
def running(target: ServeTarget, host: str, port: int, runs_root: Path, allow_unauthenticated: bool = False,
            echo: bool = True) -> Iterator[Endpoint]:
    """A vLLM server on target, up and answering, for the length of the block; stopped after it.
    With echo, vLLM's output goes to stderr once it is up (it always goes to the log)."""
    command = preflight(target, host, port, allow_unauthenticated)
    log = runs_root / "logs" / f"serve-{target.served_name}-{file_stamp()}.log"
    with VllmServer(command, local_url(host, port), log) as server:
        seconds = server.wait_ready(STARTUP_TIMEOUT_S)
        server.echo = echo
        yield Endpoint(server, target.model_ids, seconds)


def serve(target: ServeTarget, host: str, port: int, runs_root: Path, allow_unauthenticated: bool = False) -> None:
    """Serve until Ctrl-C or SIGTERM; a vLLM that dies on its own is an error."""
    try:
        with sigterm_as_interrupt(), running(target, host, port, runs_root, allow_unauthenticated) as endpoint:
            print_ready(target, endpoint, host, port)
            code = endpoint.server.wait()
        raise UserError(f"vLLM stopped on its own with exit code {code} (log: {endpoint.server.log_path})")
    except KeyboardInterrupt:
        console.note("vLLM stopped")


def serve_command(run_dir: str | None, recipe_name: str | None, base: str | None, adapters: tuple[str, ...],
                  overrides: tuple[str, ...], host: str | None, port: int | None, root: Path,
                  allow_unauthenticated: bool = False) -> None:
    """`qlora-app serve`: a run's merged model, or adapter mode (--base with --adapter), from the CLI's words."""
    from qlora_app.recipe.loader import load_recipe
    from qlora_app.run.directory import find_run
    from qlora_app.serve.target import adapter_target, merged_target, parse_adapters

    if base or adapters:
        if run_dir or recipe_name:
            raise UserError("give either a run (RUN_DIR / --recipe) or adapter mode (--base with --adapter)")
        if not base:
            raise UserError("--adapter needs --base RECIPE: the recipe whose base model serves the adapters")
        recipe = load_recipe(base, overrides)
        target = adapter_target(recipe, parse_adapters(adapters, recipe.serve.adapters))
    else:
        run = find_run(run_dir, recipe_name, root)
        recipe = load_recipe(str(run.recipe_file), overrides)
        target = merged_target(run, recipe)
    serve(target, host or recipe.serve.host, port or recipe.serve.port, root, allow_unauthenticated)


def print_ready(target: ServeTarget, endpoint: Endpoint, host: str, port: int) -> None:
    key = bool(os.environ.get(KEY_ENV))
    table = Table(title=f"serve: {target.served_name} is up", show_header=False)
    table.add_row("endpoint", f"{endpoint.url}/v1" + ("" if is_loopback(host) else f" (bound to {host})"))
    table.add_row("model ids", ", ".join(endpoint.model_ids))
    table.add_row("mode", f"{len(target.adapters)} LoRA adapters on {target.model}" if target.adapters
                  else f"merged model {target.model}")
    table.add_row("max model length", str(target.recipe.max_model_len))
    table.add_row("API key", f"required (${KEY_ENV})" if key else "none (loopback only)")
    table.add_row("startup", f"{endpoint.startup_seconds:.0f} s")
    table.add_row("log", str(endpoint.server.log_path))
    console.out.print(table)
    console.out.print("try it:", style="bold")
    console.out.print(curl_line(endpoint.url, endpoint.model_ids[-1], key), markup=False, highlight=False)
    console.note("Ctrl-C stops the server")


def curl_line(url: str, model: str, key: bool) -> str:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 64})
    auth = f' -H "Authorization: Bearer ${KEY_ENV}"' if key else ""
    return f"curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'"
