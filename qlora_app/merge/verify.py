"""Checks a merge against what was trained, on the run's held-out examples.

Before merging, the adapter's held-out loss on every base it could be merged into: the 4-bit base it was trained
on (the reference), the original 16-bit weights, and dequant(NF4) of them. `auto` merges into the base whose loss
is closest to the reference. After merging, the merged model against the unmerged base + adapter it should
equal (the largest logit difference; beyond tolerance the merge itself is wrong and the stage fails). A
preference-tuned adapter (dpo/orpo) is also scored on its held-out pairs: how often the adapter as trained and
the merged model prefer the chosen answer, the two compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qlora_app.recipe.schema import Recipe

if TYPE_CHECKING:
    from qlora_app.data.preference import EncodedPairs, PairScores

MAX_EXAMPLES = 32
LOGIT_TOLERANCE = 0.05  # relative to the largest logit magnitude; bf16 rounding stays far below
PREFERENCE_TOLERANCE = 0.05  # held-out preference accuracy, merged vs the adapter as trained


@dataclass(frozen=True)
class AdapterLosses:
    """Held-out loss of the unmerged adapter on each base."""

    examples: int
    on_4bit: float | None  # as trained; None for plain LoRA, trained on the original weights
    on_original: float
    on_dequantized: float | None  # None for plain LoRA
    preference: PairScores | None = None  # the adapter as trained on the held-out pairs (dpo/orpo only)

    def closest_to_trained(self) -> tuple[str, str]:
        """(base weights, why) for merge.base_weights=auto."""
        if self.on_4bit is None or self.on_dequantized is None:
            return "original", "the adapter was trained on the original 16-bit weights"
        gaps = {"original": abs(self.on_original - self.on_4bit), "dequantized": abs(self.on_dequantized - self.on_4bit)}
        best = min(gaps, key=gaps.get)
        loss = self.on_original if best == "original" else self.on_dequantized
        return best, (f"its held-out loss with the adapter ({loss:.4f}) is closest to the adapter on the 4-bit "
                      f"base it was trained on ({self.on_4bit:.4f})")


@dataclass(frozen=True)
class MergedCheck:
    base_weights: str
    max_logit_diff: float
    relative_logit_diff: float
    loss_merged: float
    preference: PairScores | None = None  # the merged model on the held-out pairs (dpo/orpo only)


def preference_warning(trained: PairScores | None, merged: PairScores | None) -> str | None:
    """A warning when the merged model prefers the chosen answers much more or less often than the adapter."""
    if trained is None or merged is None or abs(merged.accuracy - trained.accuracy) <= PREFERENCE_TOLERANCE + 1e-9:
        return None
    return (f"the merged model prefers the chosen answer on {merged.accuracy:.0%} of {merged.pairs} held-out "
            f"pairs, the adapter as trained on {trained.accuracy:.0%}: more than {PREFERENCE_TOLERANCE * 100:.0f} "
            "points apart, so it ranks answers somewhat differently from the model that was trained")


def heldout_examples(recipe: Recipe, tokenizer) -> list[tuple[list[int], list[int]]]:
    """The held-out conversations (a preference pair's prompt + chosen answer) as (ids, labels)."""
    from qlora_app.data.encoding import encode
    from qlora_app.data.splits import heldout_chats

    encoded = encode(heldout_chats(recipe), tokenizer, recipe.data.max_length, recipe.model.template_kwargs)
    return list(zip(encoded.input_ids, encoded.labels))[:MAX_EXAMPLES]


def heldout_pairs(recipe: Recipe, tokenizer) -> EncodedPairs | None:
    """The held-out preference pairs, encoded; None for a supervised (sft) recipe."""
    if recipe.train.method == "sft":
        return None
    from qlora_app.data.preference import encode_pairs, load_pairs

    return encode_pairs(load_pairs(recipe.data)[1], tokenizer, recipe.data.max_length, recipe.model.template_kwargs)


def adapter_tokenizer(adapter: Path):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per small load, several times over, would bury the report
    return AutoTokenizer.from_pretrained(adapter)


def load_examples(recipe: Recipe, adapter: Path):
    return heldout_examples(recipe, adapter_tokenizer(adapter))


def adapter_losses(recipe: Recipe, adapter: Path, source: Path) -> AdapterLosses:
    """Held-out losses of the adapter on every base; held-out preference scores of the adapter as trained."""
    examples, pairs = load_examples(recipe, adapter), heldout_pairs(recipe, adapter_tokenizer(adapter))
    on_4bit = on_dequantized = preference = None
    if recipe.quantization.enabled:
        on_4bit, preference = measure(adapter_on_4bit(recipe, adapter), examples, pairs)
        on_dequantized = mean_loss(unmerged(recipe, adapter, source, "dequantized"), examples)
    on_original, on_16bit = measure(unmerged(recipe, adapter, source, "original"), examples,
                                    None if recipe.quantization.enabled else pairs)
    return AdapterLosses(len(examples), on_4bit, on_original, on_dequantized, preference or on_16bit)


def measure(model, examples, pairs: EncodedPairs | None) -> tuple[float, PairScores | None]:
    """(held-out loss, held-out preference scores when there are pairs)."""
    from qlora_app.data.preference import score_pairs

    return mean_loss(model, examples), score_pairs(model, pairs, MAX_EXAMPLES) if pairs is not None else None


def compare_merged(recipe: Recipe, adapter: Path, merged: Path, source: Path, base_weights: str) -> MergedCheck:
    """The merged model against base + adapter, the base being of the kind that was merged into."""
    import torch
    from transformers import AutoModelForCausalLM

    if base_weights not in ("original", "dequantized") or (base_weights == "dequantized"
                                                           and not recipe.quantization.enabled):
        raise ValueError(f"cannot check a merge into {base_weights!r} base weights for a {recipe.method} recipe")
    examples, pairs = load_examples(recipe, adapter), heldout_pairs(recipe, adapter_tokenizer(adapter))
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=getattr(torch, recipe.merge.dtype)).eval()
    reference = unmerged(recipe, adapter, source, base_weights)
    diff, scale = logit_difference(model, reference, examples)
    return MergedCheck(base_weights, diff, diff / max(scale, 1e-6), *measure(model, examples, pairs))


def unmerged(recipe: Recipe, adapter: Path, source: Path, base_weights: str):
    """The 16-bit base (rounded through NF4 for 'dequantized') with the adapter on top, unmerged."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, recipe.merge.dtype)).eval()
    if base_weights == "dequantized":
        dequantize(base, recipe, source)
    return PeftModel.from_pretrained(base, adapter).eval()


def dequantize(model, recipe: Recipe, source: Path) -> None:
    """Every weight bitsandbytes quantized in training replaced by dequant(quant(W)): the base the adapter saw."""
    import torch

    from qlora_app.model.loading import nf4_round_trip, quantized_weight_names

    names = quantized_weight_names(recipe, source)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in names:
                param.copy_(nf4_round_trip(param.data, recipe))


def adapter_on_4bit(recipe: Recipe, adapter: Path):
    from peft import PeftModel

    from qlora_app.model.loading import load_base

    return PeftModel.from_pretrained(load_base(recipe), adapter).eval()


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
