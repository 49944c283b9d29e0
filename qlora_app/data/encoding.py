"""Tokenizer set-up and the rendering of records into input ids and labels.

Chats are trained exactly as a server will render them (qlora_app/data/turns.py): each assistant turn on the
tokens vLLM puts before it, with labels only on that turn's answer and its end-of-turn token, so the tuned
model learns to stop. When every turn's prompt and answer are a prefix of the last turn's (the template renders
history as it rendered the turn), the conversation is one example with every assistant turn labelled; when the
template renders history differently (Qwen3 drops past think blocks; Mistral-Nemo moves the system prompt to
the last user message), each assistant turn is an example of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qlora_app.data import turns as chat_turns
from qlora_app.data.sources import Records
from qlora_app.data.turns import Turn, assistant_turns
from qlora_app.errors import UserError
from qlora_app.hub import access
from qlora_app.model.loading import model_location
from qlora_app.recipe.schema import Recipe

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

IGNORE = -100
# Unused special tokens that make a safe pad, in order of preference (Llama 3.1, Llama 3, others, then Qwen's base
# models, whose pad is their EOS <|endoftext|>).
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|reserved_special_token_0|>", "<|pad|>", "<pad>", "[PAD]",
                  "<|fim_pad|>", "<|vision_pad|>")
Example = tuple[list[int], list[int]]  # (input ids, labels)


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


def encode(records: Records, tokenizer: PreTrainedTokenizerBase, max_length: int,
           template_kwargs: dict[str, Any] | None = None) -> Encoded:
    """Examples of every record; template_kwargs (the recipe's model.template_kwargs) reach the chat template."""
    if records.format == "chat" and not tokenizer.chat_template:
        raise UserError(f"{records.origin} is chat data but the model's tokenizer has no chat template: "
                        "set model.chat_template in the recipe")
    if records.format == "chat" and template_kwargs:
        chat_turns.check_template_kwargs(tokenizer, template_kwargs)
    ids_out, labels_out, dropped, truncated, eot = [], [], 0, 0, None
    for index, row in enumerate(records.rows):
        if "messages" in row:
            examples = chat_examples(row["messages"], tokenizer, records.where(index), template_kwargs)
            eot = examples[-1][0][-1]
            kept = [(ids, labels) for ids, labels in examples if len(ids) <= max_length]
            dropped += len(examples) - len(kept)  # cutting a chat would cut its end-of-turn token: drop it instead
        else:
            ids, labels = encode_text(row["text"], tokenizer)
            if len(ids) > max_length:
                ids, labels, truncated = ids[:max_length], labels[:max_length], truncated + 1
            kept = [(ids, labels)]
        ids_out += [ids for ids, _ in kept]
        labels_out += [labels for _, labels in kept]
    if not ids_out:
        raise UserError(f"{records.origin}: all {dropped} examples are longer than data.max_length={max_length} "
                        "tokens; raise data.max_length")
    return Encoded(ids_out, labels_out, dropped, truncated, eot)


def chat_examples(messages: list[dict], tokenizer: PreTrainedTokenizerBase, where: str,
                  template_kwargs: dict[str, Any] | None = None) -> list[Example]:
    """A conversation's examples: one if the template renders it prefix by prefix, else one per assistant turn."""
    turns = assistant_turns(messages, tokenizer, where, template_kwargs)
    whole = turns[-1].ids
    if all(whole[: len(t.ids)] == t.ids for t in turns):
        return [(whole, labelled(whole, turns))]
    return [(t.ids, labelled(t.ids, [t])) for t in turns]


def labelled(ids: list[int], turns: list[Turn]) -> list[int]:
    labels = [IGNORE] * len(ids)
    for turn in turns:
        start = len(turn.prompt)
        labels[start: start + len(turn.answer)] = turn.answer
    return labels


def encode_chat(messages: list[dict], tokenizer: PreTrainedTokenizerBase, origin: str,
                template_kwargs: dict[str, Any] | None = None) -> tuple[list, list, int]:
    """(ids, labels, end-of-turn id) of the conversation's last example: the whole conversation when the
    template renders it prefix by prefix, else its last assistant turn."""
    ids, labels = chat_examples(messages, tokenizer, origin, template_kwargs)[-1]
    return ids, labels, ids[-1]


def encode_text(text: str, tokenizer: PreTrainedTokenizerBase) -> tuple[list, list]:
    bos = tokenizer.bos_token
    ids = tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]
    if tokenizer.eos_token_id is not None and ids[-1] != tokenizer.eos_token_id:
        ids.append(tokenizer.eos_token_id)
    return ids, list(ids)


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool = False,
           where: str = "the conversation", **template_kwargs) -> str:
    return chat_turns.render(tokenizer, messages, where, add_generation_prompt, **template_kwargs)
