"""Checks a merged model against what was trained, on the run's held-out examples, before merge succeeds.

- merged vs bf16 base + adapter (peft, unmerged): the largest logit difference; beyond tolerance the merge
  itself is wrong and the stage fails;
- held-out loss of: the adapter on the 4-bit base it was trained on, the adapter on the original 16-bit base,
  the adapter on dequant(NF4) base weights, and the merged model, so a user can choose --base-weights with data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from qlora_app.recipe import Recipe

MAX_EXAMPLES = 32
LOGIT_TOLERANCE = 0.05  # relative to the largest logit magnitude; bf16 rounding stays far below


@dataclass(frozen=True)
class Verification:
    examples: int
    max_logit_diff: float
    relative_logit_diff: float
    loss_adapter_on_4bit: float | None
    loss_adapter_on_original: float
    loss_adapter_on_dequantized: float | None
    loss_merged: float

    def as_dict(self) -> dict:
        return asdict(self)


def heldout_examples(recipe: Recipe, tokenizer) -> list[tuple[list[int], list[int]]]:
    from qlora_app.data import load_splits
    from qlora_app.encoding import encode

    _, held_out = load_splits(recipe.data)
    encoded = encode(held_out, tokenizer, recipe.data.max_length)
    return list(zip(encoded.input_ids, encoded.labels))[:MAX_EXAMPLES]


def verify(recipe: Recipe, adapter: Path, merged: Path, source: Path, mode: str) -> Verification:
    """Held-out losses of every way to use the adapter, and the merged model against the unmerged one it
    should equal: base weights of the same kind (`mode`) + adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per small load, four times over, would bury the report
    examples = heldout_examples(recipe, AutoTokenizer.from_pretrained(adapter))
    dtype = getattr(torch, recipe.merge.dtype)
    merged_model = AutoModelForCausalLM.from_pretrained(merged, dtype=dtype).eval()
    loss_merged = mean_loss(merged_model, examples)
    losses, diff, scale = {}, 0.0, 1.0
    kinds = ("original", "dequantized") if recipe.quantization.enabled else ("original",)
    for kind in kinds:
        base = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).eval()
        if kind == "dequantized":
            dequantize_targets(base, recipe)
        unmerged = PeftModel.from_pretrained(base, adapter).eval()
        losses[kind] = mean_loss(unmerged, examples)
        if kind == mode:
            diff, scale = logit_difference(merged_model, unmerged, examples)
        del unmerged, base
    return Verification(len(examples), diff, diff / max(scale, 1e-6), loss_on_4bit(recipe, adapter, examples),
                        losses["original"], losses.get("dequantized"), loss_merged)


def dequantize_targets(model, recipe: Recipe) -> None:
    """Replace every adapted weight by dequant(quant(W)): the base as the adapter saw it in training."""
    import torch

    from qlora_app.merge import nf4_round_trip

    targets = tuple(recipe.lora.target_modules)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.split(".")[-1] in targets and hasattr(module, "weight"):
                module.weight.copy_(nf4_round_trip(module.weight.data, recipe))


def loss_on_4bit(recipe: Recipe, adapter: Path, examples) -> float | None:
    if not recipe.quantization.enabled:
        return None
    from peft import PeftModel

    from qlora_app.model_loading import load_base

    return mean_loss(PeftModel.from_pretrained(load_base(recipe), adapter).eval(), examples)


def mean_loss(model, examples) -> float:
    """Token-weighted mean loss over the learned (labelled) tokens of the examples."""
    import torch

    total = tokens = 0.0
    with torch.no_grad():
        for ids, labels in examples:
            inputs = torch.tensor([ids], device=model.device)
            target = torch.tensor([labels], device=model.device)
            count = int((target[:, 1:] != -100).sum())
            if count:
                total += float(model(input_ids=inputs, labels=target).loss) * count
                tokens += count
    return total / tokens


def logit_difference(a, b, examples) -> tuple[float, float]:
    """(largest absolute logit difference, largest absolute logit) over the examples."""
    import torch

    diff = scale = 0.0
    with torch.no_grad():
        for ids, _ in examples:
            inputs = torch.tensor([ids], device=a.device)
            la, lb = a(input_ids=inputs).logits.float(), b(input_ids=inputs).logits.float()
            diff = max(diff, float((la - lb).abs().max()))
            scale = max(scale, float(lb.abs().max()))
    return diff, scale
