"""Training data: detect the format of the records read (qlora_app/data/reading.py), validate every one, normalize.

Runs before any weights load, so a bad file costs seconds, not a model download. Every record becomes one of
two shapes: {"messages": [{"role", "content"}, ...]} for chat-like data (messages, ShareGPT, Alpaca,
prompt/completion) or {"text": str} for plain text. Errors name the file and line (or record) and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qlora_app.data.reading import is_local, read_source
from qlora_app.errors import UserError
from qlora_app.recipe.schema import PREFERENCE_FORMATS, DataSpec

FORMAT_COLUMNS = {  # detection order matters: the first whose columns are all present wins
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Records:
    """Normalized records of one split, with where they came from (for errors and the manifest)."""

    rows: list[dict[str, Any]]
    format: str
    origin: str
    locations: tuple[str, ...] = field(default=(), compare=False)  # 'file:line' of each row, for errors

    def where(self, index: int) -> str:
        return self.locations[index] if index < len(self.locations) else f"{self.origin} record {index + 1}"

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for row in self.rows:
            digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
        return digest.hexdigest()


def load_splits(spec: DataSpec) -> tuple[Records, Records]:
    """(train, eval) records, validated and normalized."""
    return load_with(spec, lambda raw, origin: normalize(raw, detect_format(spec.format, raw, origin), origin))


def load_with(spec: DataSpec, convert: Callable[[list[tuple[str, dict]], str], Records]) -> tuple[Records, Records]:
    """(train, eval) records, each split read and turned into Records by `convert(raw rows, origin)`: the
    eval split when one is named (a split of the source, or a local file), else a held-out fraction of train."""
    train = convert(*read_source(spec.source, spec.split))
    if spec.eval_split:
        return train, convert(*(read_source(spec.source, spec.eval_split) if not is_local(spec.eval_split)
                                else read_source(spec.eval_split, "train")))
    return split_off_eval(train, spec.eval_fraction)


def split_off_eval(records: Records, fraction: float) -> tuple[Records, Records]:
    """Hold out a deterministic `fraction` of the records (at least one)."""
    import random

    order = list(range(len(records.rows)))
    random.Random(0).shuffle(order)
    n_eval = max(1, round(fraction * len(order)))
    if n_eval >= len(order):
        raise UserError(f"{records.origin}: {len(order)} examples are too few to hold out {fraction:.0%} for eval")
    held = set(order[:n_eval])
    keep = [i for i in range(len(order)) if i not in held]
    out = [i for i in range(len(order)) if i in held]
    return (subset(records, keep, records.origin), subset(records, out, f"{records.origin} (held-out {fraction:.0%})"))


def subset(records: Records, indices: list[int], origin: str) -> Records:
    return Records([records.rows[i] for i in indices], records.format, origin,
                   tuple(records.where(i) for i in indices))


def detect_format(wanted: str, rows: list[tuple[str, dict]], origin: str) -> str:
    columns = list(rows[0][1])
    if wanted in PREFERENCE_FORMATS:
        raise UserError(f"{origin}: data.format '{wanted}' is preference data, which supervised fine-tuning cannot "
                        "learn from: set train.method: dpo (or orpo)")
    if wanted != "auto":
        return require_columns(wanted, FORMAT_COLUMNS[wanted], columns, origin)
    for fmt, needed in FORMAT_COLUMNS.items():
        if all(c in columns for c in needed):
            return fmt
    if "chosen" in columns and "rejected" in columns:
        raise UserError(f"{origin}: this looks like preference data (columns {', '.join(columns)}): set "
                        "train.method: dpo (or orpo)")
    expected = "; ".join(f"{fmt}: {'+'.join(cols)}" for fmt, cols in FORMAT_COLUMNS.items())
    raise UserError(f"{origin}: no known data format in columns {', '.join(columns)} (expected {expected})")


def require_columns(fmt: str, needed: tuple[str, ...], columns: list[str], origin: str) -> str:
    """The format a recipe names explicitly, once its columns are known to be there."""
    missing = [c for c in needed if c not in columns]
    if missing:
        raise UserError(f"{origin}: format '{fmt}' needs column(s) {', '.join(missing)}; columns found: "
                        f"{', '.join(columns)}")
    return fmt


def normalize(rows: list[tuple[str, dict]], fmt: str, origin: str) -> Records:
    convert = CONVERTERS[fmt]
    out, locations = [], []
    for where, record in rows:
        for column in FORMAT_COLUMNS[fmt]:
            if column not in record:
                raise UserError(f"{where}: missing column '{column}' (columns found: {', '.join(record)})")
        try:
            out.append(convert(record))
        except (TypeError, ValueError, KeyError) as exc:
            raise UserError(f"{where}: {exc}") from None
        locations.append(where)
    return Records(out, "text" if fmt == "text" else "chat", origin, tuple(locations))


def _from_messages(record: dict) -> dict:
    return {"messages": _check_turns(record["messages"], role_key="role", content_key="content")}


def _from_sharegpt(record: dict) -> dict:
    turns = record["conversations"]
    if not isinstance(turns, list):
        raise TypeError("'conversations' must be a list of {from, value} turns")
    mapped = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError(f"conversations[{i}] must have 'from' and 'value'")
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise ValueError(f"conversations[{i}]: unknown speaker '{turn['from']}'")
        mapped.append({"role": role, "content": turn["value"]})
    return {"messages": _check_turns(mapped, "role", "content")}


def _from_alpaca(record: dict) -> dict:
    instruction, extra, output = record["instruction"], record.get("input") or "", record["output"]
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    return {"messages": _check_turns([{"role": "user", "content": prompt},
                                      {"role": "assistant", "content": output}], "role", "content")}


def _from_prompt_completion(record: dict) -> dict:
    return {"messages": _check_turns([{"role": "user", "content": record["prompt"]},
                                      {"role": "assistant", "content": record["completion"]}], "role", "content")}


def _from_text(record: dict) -> dict:
    text = record["text"]
    if not isinstance(text, str) or not text.strip():
        raise ValueError("'text' must be a non-empty string")
    return {"text": text}


def _check_turns(turns: Any, role_key: str, content_key: str) -> list[dict]:
    clean = check_messages(turns, role_key, content_key)
    if not any(t["role"] == "assistant" for t in clean):
        raise ValueError("no assistant turn to learn from")
    return clean


def check_messages(turns: Any, role_key: str = "role", content_key: str = "content",
                   name: str = "messages") -> list[dict]:
    """The turns as {role, content[, reasoning_content]}, each with a known role and non-empty text."""
    if not isinstance(turns, list) or not turns:
        raise TypeError(f"{name} must be a non-empty list of {{role, content}} turns")
    clean = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            raise ValueError(f"turn {i} must have '{role_key}' and '{content_key}'")
        if turn[role_key] not in ROLES:
            raise ValueError(f"turn {i}: role '{turn[role_key]}' is not one of {', '.join(ROLES)}")
        if not isinstance(turn[content_key], str) or not turn[content_key].strip():
            raise ValueError(f"turn {i} ({turn[role_key]}): content must be a non-empty string")
        clean.append({"role": turn[role_key], "content": turn[content_key], **_reasoning(turn, i)})
    return clean


def _reasoning(turn: dict, i: int) -> dict:
    """An assistant turn's reasoning ('reasoning_content', or vLLM's newer name 'reasoning'), kept for the template."""
    text = turn.get("reasoning_content", turn.get("reasoning"))
    if text is None:
        return {}
    if turn.get("role") != "assistant" or not isinstance(text, str):
        raise ValueError(f"turn {i}: reasoning_content belongs on an assistant turn and must be a string")
    return {"reasoning_content": text}


CONVERTERS: dict[str, Callable[[dict], dict]] = {
    "messages": _from_messages, "sharegpt": _from_sharegpt, "alpaca": _from_alpaca,
    "prompt_completion": _from_prompt_completion, "text": _from_text,
}

