"""`qlora-app doctor --smoke`: the whole stack proven on this machine in minutes, before the 8B download.

The doctor's checks, then the built-in tiny Llama trained for a few dozen steps with RECIPE's attention choice
(train.attention: flash via the kernels hub kernel, or its fallback), merged, served by vLLM and asked one question
through the OpenAI API. Each step prints one line with its time and what it used (the attention training ran
with, its tokens/s, vLLM's attention backend and sampler as its log names them); a last line gives the verdict.
The first step that fails ends the smoke with one line naming the step and its fix: exit 2 when the cause is one
the user can fix as said (a UserError), 1 when the stack itself broke (the traceback goes to failure.log).

On CPU the same steps run (sdpa attention, vLLM's CPU build). Runs go under <runs>/.smoke, emptied at each start:
apart from the user's runs and runs/latest.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
import traceback
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from qlora_app import console
from qlora_app.data.sources import load_splits
from qlora_app.errors import UserError
from qlora_app.machine.doctor import Facts, gather, verdict
from qlora_app.merge.stage import merge
from qlora_app.recipe.loader import load_recipe
from qlora_app.recipe.schema import Recipe
from qlora_app.run.directory import RunDir
from qlora_app.serve.auth import KEY_ENV
from qlora_app.serve.stage import Endpoint, running
from qlora_app.serve.target import merged_target
from qlora_app.train.attention import IMPLEMENTATION
from qlora_app.train.stage import train

SMOKE_DIR = ".smoke"
DEFAULT_RECIPE = "llama3-8b"
TINY = "tiny"
STEPS = 30
# On CPU vLLM reserves serve.gpu_memory_utilization of the RAM for its KV cache and fills it while starting (the
# tiny recipe's 0.5: 11 GiB and half a minute on the test machine); the tiny model's 256 tokens need a sliver.
CPU_SERVE_MEMORY = 0.05
MAX_ANSWER_TOKENS = 32

FIXES = {
    "recipe": "`qlora-app recipes` lists the recipe names; `qlora-app show RECIPE` prints one resolved",
    "doctor": "run qlora-app doctor and do what it says",
    "train": "run qlora-app doctor; the lines above show where training stopped",
    "merge": "the lines above show where the merge stopped; check free disk space under the runs folder",
    "serve": "read vLLM's log (named above, under the runs folder's .smoke/logs); qlora-app doctor checks the GPU",
    "ask": "read vLLM's log under the runs folder's .smoke/logs: the server was up but did not answer",
}


class SmokeFailed(UserError):
    def __init__(self, step: str, seconds: float, problem: str, fix: str, exit_code: int):
        super().__init__(f"smoke failed at {step} ({seconds:.0f} s): {problem}; fix: {fix}")
        self.step, self.exit_code = step, exit_code


class StepProblem(UserError):
    """A step's own failure, with the fix that belongs to it (the doctor's finding, say)."""

    def __init__(self, problem: str, fix: str):
        super().__init__(problem)
        self.fix = fix


@dataclass
class Line:
    detail: str = ""


@contextmanager
def step(name: str, root: Path) -> Iterator[Line]:
    """One smoke step: `smoke: NAME ok SECONDS  detail` once it succeeds, else SmokeFailed naming it."""
    started = time.monotonic()
    line = Line()
    try:
        yield line
    except UserError as exc:
        raise SmokeFailed(name, time.monotonic() - started, str(exc), getattr(exc, "fix", FIXES[name]),
                          exc.exit_code) from None
    except Exception as exc:  # the stack broke: the traceback is kept, the line says where
        log = write_failure(root, exc)
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise SmokeFailed(name, time.monotonic() - started, f"{type(exc).__name__}: {first} (traceback: {log})",
                          FIXES[name], 1) from None
    console.out.print(f"smoke: {name:<6} ok {time.monotonic() - started:6.1f} s  {line.detail}", markup=False,
                      highlight=False)


def write_failure(root: Path, exc: Exception) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "failure.log"
    path.write_text("".join(traceback.format_exception(exc)), encoding="utf-8")
    return path


def smoke(runs_root: Path, recipe_name: str = DEFAULT_RECIPE, kernels: bool = True) -> None:
    started, root = time.monotonic(), runs_root / SMOKE_DIR
    with step("recipe", root) as line:
        asked = load_recipe(recipe_name).train.attention
        line.detail = f"{recipe_name}: train.attention={asked}"
    with step("doctor", root) as line:
        facts = check_machine(runs_root, kernels)
        line.detail = machine_summary(facts)
    with step("train", root) as line:
        tiny, run = train_tiny(root, asked, cpu=not facts.gpu.present)
        line.detail = training_summary(run, asked)
    with step("merge", root) as line:
        line.detail = f"{merge(run, tiny.merge)} (verified against base + adapter)"
    with ExitStack() as server:
        with step("serve", root) as line:
            endpoint = server.enter_context(running(merged_target(run, tiny), "127.0.0.1", free_port(), root,
                                                    echo=False))
            backend, sampler = vllm_choices(endpoint.server.log_path)
            line.detail = (f"vLLM up at {endpoint.url} in {endpoint.startup_seconds:.0f} s; attention backend: "
                           f"{backend}; sampler: {sampler}")
        with step("ask", root) as line:
            line.detail = ask(endpoint, tiny)
    device = facts.gpu.name or "CPU (no NVIDIA GPU visible)"
    console.out.print(f"smoke: PASS in {time.monotonic() - started:.0f} s on {device}: trained, merged, served "
                      "by vLLM and answered through the OpenAI API", markup=False, highlight=False)


def check_machine(runs_root: Path, kernels: bool) -> Facts:
    """The doctor's facts and verdict; no GPU at all is the CPU path, not a failure."""
    facts = gather(runs_root, kernels)
    if facts.gpu.status == "none":
        return facts
    findings = verdict(facts)
    failed = next((f for f in findings if f.level == "fail"), None)
    if failed:
        raise StepProblem(failed.what, failed.fix)
    for finding in findings:
        if finding.level == "warn":
            console.warn(f"{finding.what} ({finding.fix})")
    return facts


def machine_summary(facts: Facts) -> str:
    gpu = facts.gpu
    if gpu.status == "none":
        return "no NVIDIA GPU visible: the CPU path (training on CPU, vLLM's CPU build)"
    checks = ", ".join(f"{k.name} {'ok' if k.ok else 'unavailable'}" for k in facts.kernels) or "kernels not loaded"
    return f"{gpu.name}, driver {gpu.driver}, CUDA {facts.cuda_needed}; {checks}"


def train_tiny(root: Path, attention: str, cpu: bool) -> tuple[Recipe, RunDir]:
    """The tiny recipe for STEPS steps with the attention asked for, in a fresh .smoke folder."""
    shutil.rmtree(root, ignore_errors=True)
    overrides = [f"train.attention={attention}", f"train.max_steps={STEPS}"]
    overrides += [f"serve.gpu_memory_utilization={CPU_SERVE_MEMORY}"] if cpu else []
    tiny = load_recipe(TINY, overrides)
    return tiny, train(tiny, root)


def training_summary(run: RunDir, asked: str) -> str:
    manifest = run.read_manifest()
    t, losses = manifest["training"], manifest["losses"]
    rate = t.get("steady_tokens_per_second") or t.get("tokens_per_second")
    used = manifest.get("attention") or "?"  # what from_pretrained was given: a hub kernel's repo for flash
    name = {implementation: name for name, implementation in IMPLEMENTATION.items()}.get(used, used)
    return (f"{t['steps']} steps of builtin:tiny-llama, attention {name}{f' via {used}' if name != used else ''} "
            f"(asked: {asked}), {rate:,.0f} tokens/s, held-out loss {losses['base_eval_loss']:.2f} -> "
            f"{losses['final_eval_loss']:.2f}")


# vLLM's own words (vllm/platforms/cuda.py, vllm/v1/sample/ops/topk_topp_sampler.py); its CPU build names
# neither: it always takes its CPU attention and sampler.
BACKEND_LINE = re.compile(r"Using (\S+) (?:attention )?backend")
SAMPLER_LINES = [
    (re.compile(r"Using FlashInfer for top-p & top-k sampling"), "FlashInfer"),
    (re.compile(r"FlashInfer top-p/top-k sampling disabled"), "PyTorch (FlashInfer sampler off)"),
    (re.compile(r"FlashInfer top-p/top-k sampling unavailable: ([^;]*)"), "PyTorch (FlashInfer unavailable: {})"),
]


def vllm_choices(log: Path) -> tuple[str, str]:
    """vLLM's attention backend and top-k/top-p sampler as its log names them ('not in vLLM's log' if not)."""
    text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
    found = BACKEND_LINE.search(text)
    backend = found[1].strip(".") if found else "not in vLLM's log"
    sampler = "not in vLLM's log"
    for pattern, name in SAMPLER_LINES:
        if match := pattern.search(text):
            sampler = name.format(*match.groups())
    return backend, sampler


def ask(endpoint: Endpoint, tiny: Recipe) -> str:
    """One question from the tiny data through the official openai client; its answer, or StepProblem."""
    from openai import OpenAI

    row = load_splits(tiny.data)[0].rows[0]["messages"]
    client = OpenAI(base_url=f"{endpoint.url}/v1", api_key=os.environ.get(KEY_ENV) or "not-needed", max_retries=0,
                    timeout=120)
    try:
        reply = client.chat.completions.create(model=tiny.name, messages=row[:-1], temperature=0,
                                               max_tokens=MAX_ANSWER_TOKENS).choices[0]
    finally:
        client.close()  # an open keep-alive connection would hold up the server's shutdown
    answer = (reply.message.content or "").strip()
    if not answer:
        raise StepProblem(f"vLLM answered with no text (finish reason {reply.finish_reason})", FIXES["ask"])
    taught = "as taught" if answer == row[-1]["content"].strip() else f"taught: {row[-1]['content']!r}"
    return f"{row[-2]['content']!r} -> {answer!r} ({reply.finish_reason}; {taught})"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
