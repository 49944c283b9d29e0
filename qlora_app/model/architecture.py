"""A model's shape, from its config.json alone: what the planner needs, without loading a weight.

Sources, in order: a built-in model, a local directory's config.json, the figures shipped for the
recipes' hub models (so `plan` works offline), and finally config.json fetched from the hub.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_app.errors import UserError
from qlora_app.hub import access
from qlora_app.model import tiny
from qlora_app.model.families import BY_TYPE, Family, check_targets, family_of
from qlora_app.recipe.schema import ModelSpec, Recipe

SHIPPED_DIR = Path(__file__).resolve().parent / "architectures"
SUPPORTED_TYPES = tuple(BY_TYPE)


@dataclass(frozen=True)
class Architecture:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    max_positions: int
    model_type: str = "llama"
    sliding_window: int | None = None  # tokens a sliding-window layer attends to
    sliding_layers: int = 0  # how many layers slide (Gemma 3: 5 of every 6)

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str = "config.json") -> Architecture:
        family = family_of(config, source)
        heads = config["num_attention_heads"]
        window, sliding = sliding_layers(config)
        return cls(
            hidden=config["hidden_size"],
            intermediate=config["intermediate_size"],
            layers=config["num_hidden_layers"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            vocab=config["vocab_size"],
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            max_positions=config.get("max_position_embeddings", 4096),
            model_type=family.model_type,
            sliding_window=window,
            sliding_layers=sliding,
        )

    @property
    def family(self) -> Family:
        return BY_TYPE[self.model_type]

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each projection in one decoder layer (Phi-3's fused ones fused)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, f = self.hidden, self.intermediate
        if self.family.fused:
            return {"qkv_proj": (h, q + 2 * kv), "o_proj": (q, h), "gate_up_proj": (h, 2 * f), "down_proj": (f, h)}
        return {
            "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h),
        }

    @property
    def layer_linear_params(self) -> int:
        return sum(i * o for i, o in self.linear_shapes().values())

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def norm_params(self) -> int:
        family = self.family
        qk = 2 * self.head_dim if family.qk_norm else 0
        return (family.norms_per_layer * self.layers + 1) * self.hidden + self.layers * qk

    @property
    def total_params(self) -> int:
        heads = 1 if self.tied_embeddings else 2
        return self.layers * self.layer_linear_params + heads * self.embedding_params + self.norm_params


def sliding_layers(config: dict[str, Any]) -> tuple[int | None, int]:
    """(window, number of sliding-window layers): from layer_types, or Gemma 3's sliding_window_pattern (every
    pattern-th layer attends fully), or Mistral's single window over every layer."""
    window = config.get("sliding_window")
    if not window:
        return None, 0
    types = config.get("layer_types")
    if types:
        return window, sum(t == "sliding_attention" for t in types)
    layers = config["num_hidden_layers"]
    pattern = config.get("sliding_window_pattern") or (6 if config.get("model_type") == "gemma3_text" else None)
    if pattern:
        return window, sum(1 for i in range(layers) if (i + 1) % pattern)
    return window, layers if config.get("use_sliding_window", True) else 0


def check_recipe(recipe: Recipe, offline_only: bool = False) -> Architecture | None:
    """The recipe's model is of a supported family and its LoRA targets are that family's projections: refused in
    one line before any weight loads. offline_only: check only when config.json is at hand without the Hub."""
    if offline_only and not known_offline(recipe.model):
        return None
    arch = load_architecture(recipe.model)
    check_targets(arch.family, recipe.lora.target_modules)
    return arch


def known_offline(model: ModelSpec) -> bool:
    return (tiny.is_builtin(model.path) or Path(model.path).is_dir()
            or (SHIPPED_DIR / (model.path.replace("/", "--") + ".json")).is_file())


def load_architecture(model: ModelSpec) -> Architecture:
    if tiny.is_builtin(model.path):
        return _from_file(tiny.materialize(model.path) / "config.json")
    local = Path(model.path)
    if local.is_dir():
        config = local / "config.json"
        if not config.is_file():
            raise UserError(f"model directory {local} has no config.json")
        return _from_file(config)
    shipped = SHIPPED_DIR / (model.path.replace("/", "--") + ".json")
    if shipped.is_file():
        return _from_file(shipped)
    return _from_file(access.fetch_file(model.path, "config.json", model.revision))


def _from_file(path: Path) -> Architecture:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    try:
        return Architecture.from_config(config, source=str(path))
    except KeyError as exc:
        raise UserError(f"{path}: missing key {exc} needed to plan memory") from None
