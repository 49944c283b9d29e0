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
from qlora_app.recipe.schema import ModelSpec

SHIPPED_DIR = Path(__file__).resolve().parent / "architectures"
SUPPORTED_TYPES = ("llama", "mistral")


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

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str = "config.json") -> Architecture:
        if config.get("model_type") not in SUPPORTED_TYPES:
            raise UserError(
                f"{source}: model_type {config.get('model_type')!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_TYPES)}"
            )
        heads = config["num_attention_heads"]
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
        )

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each projection in one decoder layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, f = self.hidden, self.intermediate
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
        return (2 * self.layers + 1) * self.hidden

    @property
    def total_params(self) -> int:
        heads = 1 if self.tied_embeddings else 2
        return self.layers * self.layer_linear_params + heads * self.embedding_params + self.norm_params


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
