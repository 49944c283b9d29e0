"""Tokenizer set-up and the rendering of records into input ids and labels.

Chats are rendered with the tokenizer's chat template (or the recipe's) exactly as a server will render them,
and only the assistant's tokens carry labels: each assistant turn's span is found by rendering the
conversation up to that turn with and without it, and mapping the character span onto tokens through the
tokenizer's offsets (robust to templates that tokenize differently at a boundary). Every assistant span must
end with the template's end-of-turn token, which is labelled, so the tuned model learns to stop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from qlora_app.data.sources import Records
from qlora_app.errors import UserError
from qlora_app.hub import access
from qlora_app.model.loading import model_location
from qlora_app.recipe.schema import Recipe

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

IGNORE = -100
# Unused special tokens that make a safe pad, in order of preference (Llama 3.1, Llama 3, others).
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|reserved_special_token_0|>", "<|pad|>", "<pad>", "[PAD]")


def load_tokenizer(recipe: Recipe) -> PreTrainedTokenizerBase:
    """The tokenizer with the recipe's chat template and a pad token that is not end-of-sequence."""
    from transformers import AutoTokenizer

    spec = recipe.model
    with access.hub_errors(spec.path, spec.revision):
        tokenizer = AutoTokenizer.from_pretrained(
            model_location(spec), revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    if spec.chat_template:
        tokenizer.chat_template = spec.chat_template
    set_pad_token(tokenizer)
    tokenizer.padding_side = "right"
    return tokenizer


def set_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Padding with EOS teaches a model never to stop (its EOS labels get masked): pick an unused token."""
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    vocab = tokenizer.get_vocab()
    for token in PAD_CANDIDATES:
        if token in vocab and vocab[token] != tokenizer.eos_token_id:
            tokenizer.pad_token = token
            return
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
        tokenizer.pad_token = tokenizer.unk_token
        return
    raise UserError("the tokenizer has no pad token other than end-of-sequence and no unused token to pad with")


@dataclass(frozen=True)
class Encoded:
    input_ids: list[list[int]]
    labels: list[list[int]]
    dropped_too_long: int
    truncated: int
    end_of_turn_id: int | None

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids in self.input_ids)

    @property
    def label_tokens(self) -> int:
        return sum(sum(1 for x in labels if x != IGNORE) for labels in self.labels)

    def to_dataset(self) -> Dataset:
        from datasets import Dataset

        return Dataset.from_dict({"input_ids": self.input_ids, "labels": self.labels})


def encode(records: Records, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Encoded:
    if records.format == "chat" and not tokenizer.chat_template:
        raise UserError(f"{records.origin} is chat data but the model's tokenizer has no chat template: "
                        "set model.chat_template in the recipe")
    ids_out, labels_out, dropped, truncated, eot = [], [], 0, 0, None
    for row in records.rows:
        if "messages" in row:
            ids, labels, eot = encode_chat(row["messages"], tokenizer, records.origin)
            if len(ids) > max_length:  # cutting a chat would cut its end-of-turn token: drop it instead
                dropped += 1
                continue
        else:
            ids, labels = encode_text(row["text"], tokenizer)
            if len(ids) > max_length:
                ids, labels, truncated = ids[:max_length], labels[:max_length], truncated + 1
        ids_out.append(ids)
        labels_out.append(labels)
    if not ids_out:
        raise UserError(f"{records.origin}: all {dropped} examples are longer than data.max_length={max_length} "
                        "tokens; raise data.max_length")
    return Encoded(ids_out, labels_out, dropped, truncated, eot)


def encode_chat(messages: list[dict], tokenizer: PreTrainedTokenizerBase, origin: str) -> tuple[list, list, int]:
    full = render(tokenizer, messages)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE] * len(ids)
    special = set(tokenizer.all_special_ids)
    eot = None
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:i], add_generation_prompt=True))
        upto = render(tokenizer, messages[: i + 1])
        if not full.startswith(upto) or start > len(upto):
            raise UserError(f"{origin}: the chat template does not render conversations prefix by prefix, so "
                            "assistant turns cannot be located; use a template that does")
        span = [k for k, (a, b) in enumerate(offsets) if b > start and a < len(upto)]
        ends = [ids[k] for k in span if ids[k] in special]
        if not ends:
            raise UserError(f"{origin}: the chat template ends assistant turns without a special end-of-turn "
                            "token, so the model would never learn to stop; fix model.chat_template")
        eot = ends[-1]
        last = max(k for k in span if ids[k] == eot)
        for k in span:
            if k <= last:
                labels[k] = ids[k]
    return ids, labels, eot


def encode_text(text: str, tokenizer: PreTrainedTokenizerBase) -> tuple[list, list]:
    bos = tokenizer.bos_token
    ids = tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]
    if tokenizer.eos_token_id is not None and ids[-1] != tokenizer.eos_token_id:
        ids.append(tokenizer.eos_token_id)
    return ids, list(ids)


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja raises its own errors, e.g. "roles must alternate"
        raise UserError(f"the chat template rejected a conversation: {str(exc).splitlines()[0]}") from None
