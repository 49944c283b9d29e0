"""Records to input ids and labels, fast and in process: the tiny model's own tokenizer, and a word-level one
built with the tokenizers library (it adds a BOS and has none of the usual pad tokens) where a case needs one."""

from __future__ import annotations

import pytest

from qlora_app.data.encoding import (
    IGNORE,
    PAD_CANDIDATES,
    Encoded,
    encode,
    encode_chat,
    encode_text,
    load_tokenizer,
    render,
    set_pad_token,
)
from qlora_app.data.sources import Records
from qlora_app.errors import UserError
from qlora_app.recipe.loader import load_recipe

# The tiny model's Llama-3 template with a variable of its own ahead of every conversation.
GREETING_TEMPLATE = (
    "{{ bos_token }}{{ greeting }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
    "{{ m.content | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


@pytest.fixture
def tokenizer():
    return load_tokenizer(load_recipe("tiny"))


def word_tokenizer(unk: str | None = "<unk>", pad: str | None = None):
    """Words hello and world, with <s> added in front of every text and </s> as end-of-sequence."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token=unk,
                                   pad_token=pad)


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def records(rows: list[dict], fmt: str = "chat") -> Records:
    return Records(rows, fmt, "data.jsonl")


def test_the_recipes_chat_template_replaces_the_tokenizers_and_padding_is_on_the_right():
    recipe = load_recipe("tiny")
    tokenizer = load_tokenizer(recipe.with_section("model", chat_template=GREETING_TEMPLATE))
    assert tokenizer.chat_template == GREETING_TEMPLATE and tokenizer.padding_side == "right"
    assert tokenizer.pad_token == "<|pad|>" and load_tokenizer(recipe).chat_template != GREETING_TEMPLATE


@pytest.mark.parametrize(("unk", "pad", "chosen"), [
    ("<unk>", "hello", "hello"),  # a pad of its own, not end-of-sequence: kept
    ("<unk>", "</s>", "<unk>"),  # pad = end-of-sequence and no usual pad token: the unknown token
    ("<unk>", None, "<unk>"),
])
def test_the_pad_is_never_end_of_sequence(unk, pad, chosen):
    tokenizer = word_tokenizer(unk, pad)
    set_pad_token(tokenizer)
    assert tokenizer.pad_token == chosen


@pytest.mark.parametrize("unk", [None, "</s>"])
def test_a_tokenizer_with_nothing_to_pad_with_is_refused(unk):
    tokenizer = word_tokenizer(unk, "</s>")
    with pytest.raises(UserError) as refused:
        set_pad_token(tokenizer)
    assert str(refused.value) == ("the tokenizer has no pad token other than end-of-sequence and no unused token to "
                                  "pad with")


def test_the_first_unused_pad_candidate_is_taken(tokenizer):
    tokenizer.pad_token = tokenizer.eos_token
    set_pad_token(tokenizer)
    vocab = tokenizer.get_vocab()
    assert tokenizer.pad_token == next(token for token in PAD_CANDIDATES if token in vocab)


def test_text_gets_one_bos_and_one_eos():
    tokenizer = word_tokenizer()
    for text in ("hello world", "<s>hello world", "hello world</s>", "<s>hello world</s>"):
        assert encode_text(text, tokenizer) == ([1, 3, 4, 2], [1, 3, 4, 2]), text


def test_the_dataset_holds_input_ids_and_labels():
    dataset = Encoded([[5, 6, 7]], [[IGNORE, 6, 7]], 0, 0, 7).to_dataset()
    assert dataset.to_dict() == {"input_ids": [[5, 6, 7]], "labels": [[IGNORE, 6, 7]]}


def test_chat_data_needs_a_chat_template_and_text_does_not(tokenizer):
    tokenizer.chat_template = None
    with pytest.raises(UserError) as refused:
        encode(records([chat("q", "a")]), tokenizer, 128)
    assert str(refused.value) == ("data.jsonl is chat data but the model's tokenizer has no chat template: set "
                                  "model.chat_template in the recipe")
    assert encode(records([{"text": "hello"}], "text"), tokenizer, 128).input_ids == [encode_text("hello", tokenizer)[0]]


def test_template_variables_reach_the_template(tokenizer):
    tokenizer.chat_template = GREETING_TEMPLATE
    encoded = encode(records([chat("What is the capital of Dateul?", "Neul.")]), tokenizer, 128,
                     {"greeting": "Welcome aboard."})
    assert tokenizer.decode(encoded.input_ids[0]).startswith("<|begin_of_text|>Welcome aboard.<|start_header_id|>")


def test_long_text_is_cut_to_the_limit_and_counted(tokenizer):
    fits = "The capital of Dateul is Neul."
    limit = len(encode_text(fits, tokenizer)[0])
    rows = [{"text": fits + " It is by the sea."}, {"text": fits}, {"text": "Neul " * 40}]
    encoded = encode(records(rows, "text"), tokenizer, limit)
    assert (encoded.truncated, encoded.dropped_too_long) == (2, 0)
    assert [len(ids) for ids in encoded.input_ids] == [limit] * 3 and encoded.labels == encoded.input_ids


def test_long_chats_are_dropped_whole_and_counted_over_every_record(tokenizer):
    short = chat("Capital of Dateul?", "Neul.")
    limit = len(encode_chat(short["messages"], tokenizer, "short")[0])
    long = chat("Capital of Dateul? " * 10, "Neul.")
    encoded = encode(records([long, long, short]), tokenizer, limit)
    assert (encoded.dropped_too_long, encoded.truncated, len(encoded.input_ids)) == (2, 0, 1)
    assert encoded.end_of_turn_id == tokenizer.convert_tokens_to_ids("<|eot_id|>")
    with pytest.raises(UserError) as refused:
        encode(records([long, long]), tokenizer, limit)
    assert str(refused.value) == (f"data.jsonl: all 2 examples are longer than data.max_length={limit} tokens; "
                                  "raise data.max_length")


def test_a_prefix_stable_conversation_is_one_example_ending_at_its_end_of_turn(tokenizer):
    messages = [*chat("Capital of Dateul?", "Neul.")["messages"], *chat("And of Ostra?", "Vell.")["messages"]]
    ids, labels, end = encode_chat(messages, tokenizer, "chat")
    assert tokenizer.decode(ids) == render(tokenizer, messages)
    assert tokenizer.decode([t for t in labels if t != IGNORE]) == "Neul.<|eot_id|>Vell.<|eot_id|>"
    assert end == ids[-1] == tokenizer.convert_tokens_to_ids("<|eot_id|>")


def test_render_is_the_templates_text_with_its_variables(tokenizer):
    tokenizer.chat_template = GREETING_TEMPLATE
    messages = chat("Capital of Dateul?", "Neul.")["messages"][:1]
    assert render(tokenizer, messages, add_generation_prompt=True, greeting="Hi.") == (
        "<|begin_of_text|>Hi.<|start_header_id|>user<|end_header_id|>\n\nCapital of Dateul?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids, _, _ = encode_chat(chat("Capital of Dateul?", "Neul.")["messages"], tokenizer, "chat.jsonl:3",
                            {"greeting": "Hi."})
    assert tokenizer.decode(ids).startswith("<|begin_of_text|>Hi.<|start_header_id|>user")
    tokenizer.chat_template = "{{ raise_exception('no such role') }}"
    with pytest.raises(UserError) as refused:
        render(tokenizer, messages)
    assert str(refused.value) == "the conversation: the chat template rejects this conversation: no such role"
    with pytest.raises(UserError) as refused:
        encode_chat(chat("Capital of Dateul?", "Neul.")["messages"], tokenizer, "chat.jsonl:3")
    assert str(refused.value) == "chat.jsonl:3: the chat template rejects this conversation: no such role"
