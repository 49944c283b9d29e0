"""The `plan` and `recipes` commands' tables and verdicts, built from the planner's numbers."""

from __future__ import annotations

from rich.table import Table

from qlora_app.console import gib, out
from qlora_app.errors import UserError
from qlora_app.model.architecture import Architecture, check_recipe, load_architecture
from qlora_app.plan import layout, planner
from qlora_app.recipe.loader import list_recipes, load_recipe
from qlora_app.recipe.schema import Recipe

GiB = planner.GiB
SHORT_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def describe_method(recipe: Recipe) -> str:
    q = recipe.quantization
    objective = f", {recipe.train.method.upper()}" if recipe.train.preference else ""
    if not q.enabled:
        return f"LoRA ({SHORT_DTYPE[recipe.model.dtype]} base){objective}"
    return f"QLoRA {q.quant_type.upper()}{'+DQ' if q.double_quant else ''}{objective}"


def print_plan(recipe: Recipe, gpu_gib: float, compare: bool = False, gpus: int = 1) -> planner.MemoryPlan:
    layout.per_rank_grad_accum(recipe.train.grad_accum, gpus)  # what train --gpus refuses, plan refuses alike
    arch = check_recipe(recipe)
    budget = int(gpu_gib * GiB)
    if recipe.train.batch_size == "auto":  # plan what train would run on a card with this much free memory
        chosen = layout.choose_layout(recipe, budget, arch, ranks=gpus)
        out.print(chosen.describe())
        recipe = layout.apply(recipe, chosen)
    result = planner.plan(recipe, arch, ranks=gpus)
    t = recipe.train
    out.print(
        f"[bold]{recipe.name}[/]: {describe_method(recipe)}, LoRA r={recipe.lora.r} on "
        f"{len(planner.lora_targets(recipe, arch))} projections ({result.trainable_params / 1e6:.1f}M trainable), "
        f"batch {result.batch_size}{' pairs (2 sequences each)' if result.sequences_per_row == 2 else ''} x seq "
        f"{result.seq_len}, gradient checkpointing "
        f"{'on' if t.gradient_checkpointing else 'off'}, {t.optimizer}"
    )
    on = f", per GPU of {gpus} ({recipe.train.distributed.upper()})" if gpus > 1 else ""
    table = Table(title=f"Estimated peak GPU memory ({arch.total_params / 1e9:.2f}B-parameter base{on})")
    table.add_column("component")
    table.add_column("GiB", justify="right")
    for label, value in result.rows():
        table.add_row(label, gib(value))
    table.add_row("[bold]total[/]", f"[bold]{gib(result.total)}[/]")
    no_ckpt = planner.plan(recipe, arch, gradient_checkpointing=not t.gradient_checkpointing, ranks=gpus)
    table.caption = (
        f"with gradient checkpointing {'off' if t.gradient_checkpointing else 'on'}: "
        f"activations {gib(no_ckpt.activations)} GiB, total {gib(no_ckpt.total)} GiB"
    )
    out.print(table)
    out.print(verdict(recipe, arch, result, budget, gpu_gib, gpus))
    out.print(gpus_verdict(recipe, arch, budget, gpu_gib))
    if gpus == 1:
        out.print(recommendation(recipe, arch, budget, gpu_gib))
    if compare:
        print_comparison(recipe, arch, budget, gpu_gib)
    return result


def verdict(recipe: Recipe, arch: Architecture, result: planner.MemoryPlan, budget: int, gpu_gib: float,
            gpus: int = 1) -> str:
    batch = planner.largest_batch(recipe, arch, budget, ranks=gpus)
    seq = planner.largest_seq_len(recipe, arch, budget, ranks=gpus)
    limits = (f"largest batch at seq {result.seq_len}: {batch}; "
              f"largest seq at batch {result.batch_size}: {seq}")
    if result.total <= budget:
        return f"[bold green]fits[/] in {gpu_gib:g} GiB ({gib(budget - result.total)} GiB to spare); {limits}"
    return f"[bold red]does not fit[/] in {gpu_gib:g} GiB (over by {gib(result.total - budget)} GiB); {limits}"


def gpus_verdict(recipe: Recipe, arch: Architecture, budget: int, gpu_gib: float) -> str:
    needed = planner.gpus_needed(recipe, arch, budget)
    if recipe.train.distributed == "ddp":
        return ("data parallel (train.distributed: ddp): every GPU holds the whole model, so more GPUs add speed, "
                f"not room{'' if needed else '; to train it on several cards set train.distributed=fsdp'}")
    if needed is None:
        return f"FSDP: does not fit on any number of {gpu_gib:g} GiB GPUs (up to 64) at this batch and length"
    accum = recipe.train.grad_accum
    split = next((n for n in range(needed, accum + 1) if accum % n == 0), None)
    return (f"FSDP: needs {needed} GPU{'s' if needed > 1 else ''} of {gpu_gib:g} GiB; with train.grad_accum={accum}: "
            + (f"train --gpus {split}" if split else f"raise train.grad_accum to a multiple of {needed} first"))


def recommendation(recipe: Recipe, arch: Architecture, budget: int, gpu_gib: float) -> str:
    t = recipe.train
    best = planner.fastest_layout(recipe, arch, budget)
    current = (t.batch_size, t.grad_accum, t.gradient_checkpointing)
    if (best.batch_size, best.grad_accum, best.gradient_checkpointing) == current:
        return f"layout: batch {t.batch_size} x accumulation {t.grad_accum} is already the fastest for {gpu_gib:g} GiB"
    sets = (f"--set train.batch_size={best.batch_size} --set train.grad_accum={best.grad_accum} "
            f"--set train.gradient_checkpointing={str(best.gradient_checkpointing).lower()}")
    return (f"faster on {gpu_gib:g} GiB with the same tokens per update: batch {best.batch_size} x accumulation "
            f"{best.grad_accum}, gradient checkpointing {'on' if best.gradient_checkpointing else 'off'} ({sets})")


def out_of_memory_advice(recipe: Recipe, free_bytes: int | None) -> str:
    """The one line a CUDA out-of-memory error becomes: the planner's fastest layout of the recipe's rows per
    update in the memory that was free, or the sequence length that fits when not even one row does."""
    t, seq = recipe.train, recipe.data.max_length
    head = f"out of GPU memory at batch {t.batch_size} x {seq} tokens"
    if not free_bytes:
        return f"{head}: lower train.batch_size or data.max_length (qlora-app plan {recipe.name} shows what fits)"
    arch = load_architecture(recipe.model)
    budget = int(free_bytes)
    checkpointed = recipe.with_section("train", gradient_checkpointing=True)
    if planner.largest_batch(checkpointed, arch, budget) < 1:
        longest = planner.largest_seq_len(checkpointed, arch, budget)
        fits = f"--set data.max_length={longest}" if longest else "a GPU with more memory"
        return f"{head}: with the {gib(budget)} GiB that were free, not even one row of {seq} tokens fits; try {fits}"
    best = planner.fastest_layout(recipe, arch, budget)
    sets = (f"--set train.batch_size={best.batch_size} --set train.grad_accum={best.grad_accum} "
            f"--set train.gradient_checkpointing={str(best.gradient_checkpointing).lower()}")
    return (f"{head}: with the {gib(budget)} GiB that were free, the plan fits batch {best.batch_size} x "
            f"accumulation {best.grad_accum} at {seq} tokens, the same {t.effective_batch} rows per update; try "
            f"{sets}")


def print_comparison(recipe: Recipe, arch: Architecture, budget: int, gpu_gib: float) -> None:
    lora = planner.as_lora(recipe)
    qlora = recipe.with_section("quantization", enabled=True)
    table = Table(title=f"LoRA vs QLoRA for {recipe.name} on {gpu_gib:g} GiB")
    table.add_column("")
    table.add_column(describe_method(lora), justify="right")
    table.add_column(describe_method(qlora), justify="right")
    plans = [planner.plan(r, arch) for r in (lora, qlora)]
    table.add_row("base weights (GiB)", *(gib(p.base_weights) for p in plans))
    table.add_row(f"peak at batch {recipe.train.batch_size} (GiB)", *(gib(p.total) for p in plans))
    table.add_row(
        f"largest batch at seq {recipe.data.max_length}",
        *(str(planner.largest_batch(r, arch, budget)) for r in (lora, qlora)),
    )
    table.add_row("fits as configured", *("yes" if p.total <= budget else "no" for p in plans))
    out.print(table)


def print_recipes(gpu_gib: float) -> None:
    table = Table(title=f"Recipes (peak VRAM from the planner, batch_size auto at its fallback batch; fits = within "
                        f"{gpu_gib:g} GiB)")
    for column in ("recipe", "model", "method", "VRAM GiB", "fits"):
        table.add_column(column, justify="right" if column == "VRAM GiB" else "left", no_wrap=True)
    about = Table.grid(padding=(0, 2))
    for name in list_recipes():
        try:
            recipe = load_recipe(name)
            total = planner.plan(recipe, load_architecture(recipe.model)).total
            table.add_row(name, recipe.model.path, describe_method(recipe), gib(total),
                          "yes" if total <= gpu_gib * GiB else "no")
            about.add_row(f"[bold]{name}[/]", recipe.description)
        except UserError as exc:
            table.add_row(name, f"[red]invalid: {exc}[/]", "", "", "")
    out.print(table)
    out.print(about)
