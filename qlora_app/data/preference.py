"""Preference pairs for DPO and ORPO: read, detect the layout, validate, normalize, encode and score.

Three layouts are read (data.format auto tells them apart by the first record):
  preference                prompt, chosen, rejected: strings
  preference_conversations  chosen, rejected: whole conversations sharing every message but the last, the
                            assistant's answer (UltraFeedback-binarized; its other columns are ignored)
  preference_messages       prompt: the shared conversation (a message list, or a string: one user turn);
                            chosen, rejected: one assistant message each (trl's conversational layout) or strings
Every pair becomes {"prompt": [messages ending with a user turn], "chosen": str, "rejected": str}. Each answer
is encoded as the server will see it (qlora_app/data/turns.py): the prompt vLLM renders before the assistant
turn, and the answer's tokens through the end-of-turn token, so what is preferred is what the server says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qlora_app.data import turns as chat_turns
from qlora_app.data.encoding import IGNORE, Encoded
from qlora_app.data.sources import Records, check_messages, load_with, require_columns
from qlora_app.errors import UserError
from qlora_app.recipe.schema import PREFERENCE_FORMATS, DataSpec

if TYPE_CHECKING:
    from datasets import Dataset

COLUMNS = {"preference": ("prompt", "chosen", "rejected"), "preference_conversations": ("chosen", "rejected"),
           "preference_messages": ("prompt", "chosen", "rejected")}
EXPECTED = ("prompt, chosen and rejected strings (preference); chosen and rejected conversations "
            "(preference_conversations); or a message-list prompt with chosen and rejected answers "
            "(preference_messages)")


def load_pairs(spec: DataSpec) -> tuple[Records, Records]:
    """(train, held-out) preference pairs, validated and normalized."""
    return load_with(spec, lambda raw, origin: normalize_pairs(raw, detect_layout(spec.format, raw, origin), origin))


def detect_layout(wanted: str, rows: list[tuple[str, dict]], origin: str) -> str:
    record = rows[0][1]
    columns = ", ".join(record)
    if wanted not in ("auto", *PREFERENCE_FORMATS):
        raise UserError(f"{origin}: data.format '{wanted}' is not preference data, which train.method dpo/orpo "
                        f"needs: set data.format to auto or one of {', '.join(PREFERENCE_FORMATS)}")
    if wanted != "auto":
        return require_columns(wanted, COLUMNS[wanted], list(record), origin)
    if "chosen" not in record or "rejected" not in record:
        raise UserError(f"{origin}: no preference pairs in columns {columns} (expected {EXPECTED})")
    if isinstance(record["chosen"], list) and len(record["chosen"]) > 1:
        return "preference_conversations"
    if "prompt" not in record:
        raise UserError(f"{origin}: chosen and rejected without a prompt column (columns found: {columns}; "
                        f"expected {EXPECTED})")
    return "preference" if all(isinstance(record[c], str) for c in COLUMNS["preference"]) else "preference_messages"


def normalize_pairs(rows: list[tuple[str, dict]], layout: str, origin: str) -> Records:
    convert = CONVERTERS[layout]
    out = []
    for where, record in rows:
        missing = [c for c in COLUMNS[layout] if c not in record]
        if missing:
            raise UserError(f"{where}: missing column '{missing[0]}' (columns found: {', '.join(record)})")
        try:
            out.append(checked(convert(record)))
        except (TypeError, ValueError) as exc:
            raise UserError(f"{where}: {exc}") from None
    return Records(out, layout, origin, tuple(where for where, _ in rows))


def checked(pair: dict) -> dict:
    if pair["prompt"][-1]["role"] != "user":
        raise ValueError(f"the prompt's last turn is the {pair['prompt'][-1]['role']}'s; it must be the user "
                         "turn the answers reply to")
    if pair["chosen"].strip() == pair["rejected"].strip():
        raise ValueError("chosen and rejected are the same answer: there is nothing to prefer")
    return pair


def _from_strings(record: dict) -> dict:
    return {"prompt": [{"role": "user", "content": text(record["prompt"], "prompt")}],
            "chosen": text(record["chosen"], "chosen"), "rejected": text(record["rejected"], "rejected")}


def _from_conversations(record: dict) -> dict:
    chosen, rejected = (conversation(record[c], c) for c in ("chosen", "rejected"))
    if chosen[:-1] != rejected[:-1]:
        raise ValueError("chosen and rejected do not share the same prompt messages (all but their last, the "
                         "answer, must be equal)")
    return {"prompt": chosen[:-1], "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]}


def _from_messages(record: dict) -> dict:
    prompt = record["prompt"]
    prompt = [{"role": "user", "content": text(prompt, "prompt")}] if isinstance(prompt, str) \
        else messages(prompt, "prompt")
    return {"prompt": prompt, "chosen": answer(record["chosen"], "chosen"),
            "rejected": answer(record["rejected"], "rejected")}


def text(value: Any, column: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"'{column}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"'{column}' is empty")
    return value


def messages(value: Any, column: str) -> list[dict]:
    if isinstance(value, list) and not value:
        raise ValueError(f"'{column}' is empty")
    try:
        return check_messages(value, name=f"'{column}'")
    except ValueError as exc:
        raise ValueError(f"'{column}' {exc}") from None


def conversation(value: Any, column: str) -> list[dict]:
    """A whole conversation whose last message is the assistant's answer after at least one prompt message."""
    turns = messages(value, column)
    if turns[-1]["role"] != "assistant" or len(turns) < 2:
        raise ValueError(f"'{column}' must end with the assistant's answer after the prompt messages")
    return turns


def answer(value: Any, column: str) -> str:
    """A string, or one assistant message."""
    if isinstance(value, str):
        return text(value, column)
    if not isinstance(value, list):
        raise TypeError(f"'{column}' must be a string or a list with one assistant message, got "
                        f"{type(value).__name__}")
    turns = messages(value, column)
    if len(turns) != 1 or turns[0]["role"] != "assistant":
        raise ValueError(f"'{column}' must hold exactly one assistant message (the answer), got "
                         f"{', '.join(t['role'] for t in turns)}")
    return turns[0]["content"]


CONVERTERS = {"preference": _from_strings, "preference_conversations": _from_conversations,
              "preference_messages": _from_messages}


def chosen_chats(records: Records) -> Records:
    """The pairs as chat records (prompt + the chosen answer), for code that wants held-out conversations."""
    rows = [{"messages": [*row["prompt"], {"role": "assistant", "content": row["chosen"]}]} for row in records.rows]
    return Records(rows, "chat", records.origin, records.locations)


@dataclass(frozen=True)
class EncodedPairs:
    prompt_ids: list[list[int]]  # what the server renders before the answer
    chosen_ids: list[list[int]]  # each answer through its end-of-turn token
    rejected_ids: list[list[int]]
    dropped_too_long: int
    end_of_turn_id: int | None

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @property
    def tokens(self) -> int:
        return sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(self.prompt_ids, self.chosen_ids, self.rejected_ids))

    @property
    def label_tokens(self) -> int:
        return sum(len(c) + len(r) for c, r in zip(self.chosen_ids, self.rejected_ids))

    def to_dataset(self) -> Dataset:
        from datasets import Dataset

        return Dataset.from_dict({"prompt_ids": self.prompt_ids, "chosen_ids": self.chosen_ids,
                                  "rejected_ids": self.rejected_ids})

    def as_sft(self) -> Encoded:
        """Prompt + chosen with labels on the chosen answer only: held-out loss code works unchanged."""
        return Encoded([p + c for p, c in zip(self.prompt_ids, self.chosen_ids)],
                       [[IGNORE] * len(p) + c for p, c in zip(self.prompt_ids, self.chosen_ids)],
                       self.dropped_too_long, 0, self.end_of_turn_id)


def encode_pairs(records: Records, tokenizer, max_length: int,
                 template_kwargs: dict[str, Any] | None = None) -> EncodedPairs:
    """Every pair's prompt and answers as the server renders them; pairs longer than max_length are dropped
    (cutting one would cut its end-of-turn token)."""
    if not tokenizer.chat_template:
        raise UserError(f"{records.origin} is preference data (chats) but the model's tokenizer has no chat "
                        "template: set model.chat_template in the recipe")
    if template_kwargs:
        chat_turns.check_template_kwargs(tokenizer, template_kwargs)
    kept = []
    for index, row in enumerate(records.rows):
        prompt, chosen, rejected = encode_pair(row, tokenizer, records.where(index), template_kwargs or {})
        if len(prompt) + max(len(chosen), len(rejected)) <= max_length:
            kept.append((prompt, chosen, rejected))
    dropped = len(records.rows) - len(kept)
    if not kept:
        raise UserError(f"{records.origin}: all {dropped} preference pairs are longer than data.max_length="
                        f"{max_length} tokens; raise data.max_length")
    prompts, chosens, rejecteds = (list(column) for column in zip(*kept))
    return EncodedPairs(prompts, chosens, rejecteds, dropped, chosens[-1][-1])


def encode_pair(row: dict, tokenizer, where: str, kwargs: dict) -> tuple[list[int], list[int], list[int]]:
    prompt = row["prompt"]
    chosen, rejected = (chat_turns.one_turn([*prompt, {"role": "assistant", "content": row[side]}], len(prompt),
                                            tokenizer, where, kwargs) for side in ("chosen", "rejected"))
    if chosen.prompt != rejected.prompt:
        raise UserError(f"{where}: the chat template renders the prompt differently before the chosen and the "
                        "rejected answer, so the two cannot be compared on one prompt")
    return chosen.prompt, chosen.answer, rejected.answer


@dataclass(frozen=True)
class PairScores:
    accuracy: float  # share of pairs whose chosen answer is more likely than the rejected one
    margin: float  # mean of log p(chosen) - log p(rejected), summed over each answer's tokens
    pairs: int


def score_pairs(model, pairs: EncodedPairs, limit: int = 64) -> PairScores:
    """How the model ranks the first `limit` pairs, by the summed log-probabilities of each answer's tokens given
    the prompt (teacher forcing); a plain or a peft model (adapter on), on its own device, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        gaps = [chosen - rejected for chosen, rejected in
                (pair_logprobs(model, *pair) for pair in list(zip(pairs.prompt_ids, pairs.chosen_ids,
                                                                   pairs.rejected_ids))[:limit])]
    finally:
        model.train(was_training)
    return PairScores(sum(g > 0 for g in gaps) / len(gaps), sum(gaps) / len(gaps), len(gaps))


def pair_logprobs(model, prompt: list[int], chosen: list[int], rejected: list[int]) -> tuple[float, float]:
    """(log p(chosen | prompt), log p(rejected | prompt)) from one right-padded batch of the two."""
    import torch

    answers = (chosen, rejected)
    width = len(prompt) + max(map(len, answers))
    ids = torch.tensor([prompt + a + [0] * (width - len(prompt) - len(a)) for a in answers], device=model.device)
    mask = torch.tensor([[1] * (len(prompt) + len(a)) + [0] * (width - len(prompt) - len(a)) for a in answers],
                        device=model.device)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    start = len(prompt) - 1  # the logits at position t predict token t + 1
    sums = []
    for row, a in enumerate(answers):
        logp = torch.log_softmax(logits[row, start: start + len(a)].float(), dim=-1)
        sums.append(float(logp.gather(-1, ids[row, start + 1: start + 1 + len(a), None]).sum()))
    return sums[0], sums[1]
