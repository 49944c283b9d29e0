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

from qlora_app import console
from qlora_app.errors import UserError
from qlora_app.model.architecture import Architecture, load_architecture
from qlora_app.plan import planner
from qlora_app.recipe.schema import Recipe
from qlora_app.run.directory import RunDir


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


def choose_layout(recipe: Recipe, free_bytes: int | None, arch: Architecture | None = None,
                  ranks: int = 1) -> ChosenLayout:
    """The layout for `recipe` with `free_bytes` of memory per GPU (None: no GPU to read), `ranks` GPUs in all."""
    t = recipe.train
    if t.batch_size != "auto":
        return ChosenLayout(planner.Layout(t.batch_size, t.grad_accum, t.gradient_checkpointing), "as the recipe says")
    if free_bytes is None:
        fallback = planner.Layout(t.fallback_batch_size, t.grad_accum, t.gradient_checkpointing)
        return ChosenLayout(fallback, "batch_size auto, no GPU to read: the recipe's fallback layout")
    fixed = recipe.with_section("train", batch_size=t.fallback_batch_size)
    best = planner.fastest_layout(fixed, arch or load_architecture(recipe.model), free_bytes, ranks=ranks)
    return ChosenLayout(best, f"batch_size auto: the fastest that fits {console.gib(free_bytes)} GiB free, "
                              f"{t.effective_batch} rows per update")


def apply(recipe: Recipe, chosen: ChosenLayout) -> Recipe:
    """The recipe with its layout fixed to `chosen` (what the trainer and the planner's tables take)."""
    l = chosen.layout
    return recipe.with_section("train", batch_size=l.batch_size, grad_accum=l.grad_accum,
                               gradient_checkpointing=l.gradient_checkpointing)


def for_this_machine(recipe: Recipe, gpus: int = 1, ranks: int = 1) -> ChosenLayout:
    """choose_layout with the free memory of this machine's first `gpus` GPUs (the least of them), read
    through NVML (no CUDA context); `ranks` GPUs train together in all."""
    if recipe.train.batch_size != "auto":
        return choose_layout(recipe, None)
    from qlora_app.machine.gpu import local_device, query_gpu

    found = [query_gpu(local_device(i)) for i in range(gpus)]
    broken = next((gpu for gpu in found if gpu.status == "unqueryable"), None)
    if broken:
        console.warn(f"cannot read the GPU's free memory ({broken.reason}): training with the fallback layout")
    free = None if broken or any(gpu.status != "ok" for gpu in found) else min(gpu.free_bytes for gpu in found)
    return choose_layout(recipe, free, ranks=ranks)


def for_run(recipe: Recipe, run: RunDir, gpus: int = 1, ranks: int = 1) -> ChosenLayout:
    """The layout `run` trains with: the one its first session chose (the data order depends on it), else
    the one for this machine."""
    recorded = run.read_manifest().get("layout")
    return from_manifest(recorded) if recorded else for_this_machine(recipe, gpus, ranks)


def from_manifest(recorded: dict, reason: str = "kept from the run's first session") -> ChosenLayout:
    """The layout as the manifest records it: a resumed run keeps its first session's (the data order depends
    on it)."""
    fields = {k: recorded[k] for k in ("batch_size", "grad_accum", "gradient_checkpointing")}
    return ChosenLayout(planner.Layout(**fields), reason)


def per_rank_grad_accum(grad_accum: int, world_size: int) -> int:
    """Gradient accumulation per rank that keeps the recipe's examples per optimizer update."""
    if grad_accum % world_size:
        raise UserError(f"train.grad_accum={grad_accum} cannot be split over {world_size} ranks, so the "
                        f"recipe's {grad_accum} batches per update cannot be kept: set train.grad_accum to a "
                        f"multiple of {world_size} (and train.batch_size to match), or use fewer GPUs")
    return grad_accum // world_size
