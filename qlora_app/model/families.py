"""The model families qlora-app has checked end to end, per config.json `model_type`: what the planner needs to
count a layer (fused projections, extra norms) and what vLLM applies LoRA to when it serves an adapter.

A family is listed here only once a tiny model of it has been trained, merged and served by vLLM in the tests
(tests/model/test_families.py); any other model_type is refused at plan/show/train time, before a weight loads.
Adding one is described in docs/families.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qlora_app.errors import UserError

SEPARATE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str
    architecture: str  # the transformers and vLLM class name
    projections: tuple[str, ...]  # the decoder layer's linear layers: peft's and vLLM's LoRA targets alike
    norms_per_layer: int = 2  # RMSNorms of hidden size in one decoder layer
    qk_norm: bool = False  # RMSNorms of head size on queries and keys (Qwen3, Gemma 3)
    tiny: str = ""  # the built-in tiny model that covers it in the tests

    @property
    def fused(self) -> bool:
        return "qkv_proj" in self.projections


FAMILIES = (
    Family("Llama (2, 3, 3.1, 3.3)", "llama", "LlamaForCausalLM", SEPARATE, tiny="tiny-llama"),
    Family("Mistral (7B, Nemo, Ministral)", "mistral", "MistralForCausalLM", SEPARATE, tiny="tiny-mistral"),
    Family("Qwen3", "qwen3", "Qwen3ForCausalLM", SEPARATE, qk_norm=True, tiny="tiny-qwen3"),
    Family("Gemma 3 (text)", "gemma3_text", "Gemma3ForCausalLM", SEPARATE, norms_per_layer=4, qk_norm=True,
           tiny="tiny-gemma3"),
    Family("Phi-3, Phi-4", "phi3", "Phi3ForCausalLM", FUSED, tiny="tiny-phi3"),
)
BY_TYPE = {family.model_type: family for family in FAMILIES}

# Gemma 3 4B-27B: the text model nested in text_config beside a SigLIP vision tower. Its checkpoint names
# (language_model.model.layers...) are not the names transformers loads them under, which the streaming merge
# relies on, and peft's default targets would adapt the vision tower's projections too.
MULTIMODAL = {
    "gemma3": "multimodal Gemma 3 (4B-27B: a vision tower beside the text model) cannot be merged by name; "
              "use a text-only Gemma 3 (model_type gemma3_text, e.g. google/gemma-3-1b-it)",
}


def supported() -> str:
    return ", ".join(f"{f.name} ({f.model_type})" for f in FAMILIES)


def family_of(config: dict[str, Any], source: str = "config.json") -> Family:
    """The family of a config.json, or a one-line refusal naming the supported ones."""
    model_type = config.get("model_type")
    if model_type in MULTIMODAL:
        raise UserError(f"{source}: model_type {model_type!r}: {MULTIMODAL[model_type]}")
    if model_type not in BY_TYPE:
        raise UserError(f"{source}: model_type {model_type!r} is not supported; supported families: {supported()}")
    return BY_TYPE[model_type]


def check_targets(family: Family, targets: tuple[str, ...]) -> None:
    """LoRA target modules that this family's decoder layers have (peft would fail after loading weights)."""
    other = [t for t in targets if t not in family.projections and t != "all-linear"]
    if other:
        raise UserError(f"lora.target_modules: {family.name} ({family.model_type}) models have no projection named "
                        f"{', '.join(other)}; they have {', '.join(family.projections)} (or give all-linear)")
