"""`train.batch_size: auto`: the layout (micro-batch, accumulation, gradient checkpointing) a run trains with.

One function, choose_layout, decides for both `plan` (given a card's memory) and `train` (given the free memory
NVML reports before anything touches CUDA): the planner's fastest layout within that memory, keeping the
recipe's rows per optimizer update (fallback_batch_size x grad_accum, each data.max_length tokens) so results
stay comparable, and dropping gradient checkpointing when at least 4 rows fit without it. Where no GPU can be
read (CPU, a GPU NVML cannot query) auto means the fallback layout: fallback_batch_size x grad_accum with the
recipe's gradient_checkpointing. The planner's totals already hold the CUDA context and fragmentation, so the
free memory is the budget as is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from qlora_app import console, planner
from qlora_app.architecture import Architecture, load_architecture
from qlora_app.recipe import Recipe


@dataclass(frozen=True)
class ChosenLayout:
    layout: planner.Layout
    reason: str

    def describe(self) -> str:
        l = self.layout
        return (f"layout: batch {l.batch_size} x accumulation {l.grad_accum}, gradient checkpointing "
                f"{'on' if l.gradient_checkpointing else 'off'} ({self.reason})")

    def to_manifest(self) -> dict:
        return {**asdict(self.layout), "reason": self.reason}


def choose_layout(recipe: Recipe, free_bytes: int | None, arch: Architecture | None = None) -> ChosenLayout:
    """The layout for `recipe` with `free_bytes` of GPU memory (None: no GPU to read)."""
    t = recipe.train
    if t.batch_size != "auto":
        return ChosenLayout(planner.Layout(t.batch_size, t.grad_accum, t.gradient_checkpointing), "as the recipe says")
    if free_bytes is None:
        fallback = planner.Layout(t.fallback_batch_size, t.grad_accum, t.gradient_checkpointing)
        return ChosenLayout(fallback, "batch_size auto, no GPU to read: the recipe's fallback layout")
    fixed = recipe.with_section("train", batch_size=t.fallback_batch_size)
    best = planner.fastest_layout(fixed, arch or load_architecture(recipe.model), free_bytes)
    return ChosenLayout(best, f"batch_size auto: the fastest that fits {console.gib(free_bytes)} GiB free, "
                              f"{t.effective_batch} rows per update")


def apply(recipe: Recipe, chosen: ChosenLayout) -> Recipe:
    """The recipe with its layout fixed to `chosen` (what the trainer and the planner's tables take)."""
    l = chosen.layout
    return recipe.with_section("train", batch_size=l.batch_size, grad_accum=l.grad_accum,
                               gradient_checkpointing=l.gradient_checkpointing)


def for_this_machine(recipe: Recipe) -> ChosenLayout:
    """choose_layout with the free memory of this machine's GPU, read through NVML (no CUDA context)."""
    if recipe.train.batch_size != "auto":
        return choose_layout(recipe, None)
    from qlora_app.gpu import query_gpu

    gpu = query_gpu()
    if gpu.status == "unqueryable":
        console.warn(f"cannot read the GPU's free memory ({gpu.reason}): training with the fallback layout")
    return choose_layout(recipe, gpu.free_bytes if gpu.status == "ok" else None)


def from_manifest(recorded: dict) -> ChosenLayout:
    """The layout a run's first session chose: a resumed run keeps it (the data order depends on it)."""
    fields = {k: recorded[k] for k in ("batch_size", "grad_accum", "gradient_checkpointing")}
    return ChosenLayout(planner.Layout(**fields), "kept from the run's first session")
