"""Chats are trained exactly as vLLM serves them, whatever the template does with history.

Each template is written here after a family's rendering rules and runs on the built-in tiny tokenizer (given
the family's marker tokens where it needs them): a Qwen3-like ChatML template (no BOS; think blocks only on
assistant turns after the last user message), a Mistral-Nemo-like one (BOS; the system prompt before the last
user message only), a Gemma-like one (no system role: it raises), and the tiny model's own Llama-3 one.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from conftest import assert_one_line_error, cli_in_process

from qlora_app.data.encoding import IGNORE, chat_examples, encode, load_tokenizer, set_pad_token
from qlora_app.data.sources import load_splits
from qlora_app.errors import UserError
from qlora_app.recipe.loader import load_recipe, read_yaml, resolve_recipe_path

QWEN3_LIKE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}"
    "{%- set content = m.content -%}{%- set reasoning = '' -%}"
    "{%- if m.reasoning_content is defined and m.reasoning_content is not none -%}"
    "{%- set reasoning = m.reasoning_content -%}"
    "{%- elif '</think>' in content -%}"
    r"{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\n') -%}"
    r"{%- set content = content.split('</think>')[-1].lstrip('\n') -%}"
    "{%- endif -%}"
    "{%- if loop.index0 > ns.last_user and (loop.last or reasoning) -%}"
    r"{{- '<|im_start|>assistant\n<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') -}}"
    r"{%- else -%}{{- '<|im_start|>assistant\n' + content -}}{%- endif -%}"
    r"{{- '<|im_end|>\n' -}}"
    r"{%- else -%}{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}"
    r"{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\n\n</think>\n\n' -}}{%- endif -%}"
    "{%- endif -%}"
)
NEMO_LIKE = (
    "{%- if messages[0].role == 'system' -%}{%- set system = messages[0].content -%}"
    "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for m in loop_messages -%}"
    "{%- if (m.role == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant...') -}}{%- endif -%}"
    "{%- if m.role == 'user' -%}"
    r"{%- if loop.last and system is defined -%}{{- '[INST]' + system + '\n\n' + m.content + '[/INST]' -}}"
    "{%- else -%}{{- '[INST]' + m.content + '[/INST]' -}}{%- endif -%}"
    "{%- else -%}{{- m.content + eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
)
# Gemma's rules (no system role, 'model' for the assistant, roles alternate), on the tiny tokenizer's own markers.
GEMMA_LIKE = (
    "{{- bos_token -}}"
    "{%- if messages[0].role == 'system' -%}{{- raise_exception('System role not supported') -}}{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if (m.role == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}{%- endif -%}"
    r"{{- '<|start_header_id|>' + ('model' if m.role == 'assistant' else m.role) + '<|end_header_id|>\n' -}}"
    r"{{- m.content | trim + '<|eot_id|>\n' -}}"
    "{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{- '<|start_header_id|>model<|end_header_id|>\n' -}}{%- endif -%}"
)
SPECIAL = {QWEN3_LIKE: ["<|im_start|>", "<|im_end|>"], NEMO_LIKE: ["[INST]", "[/INST]"], GEMMA_LIKE: []}
NORMAL = {QWEN3_LIKE: ["<think>", "</think>"], NEMO_LIKE: [], GEMMA_LIKE: []}  # Qwen's think tags are not special

CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of Dateul?"},
        {"role": "assistant", "content": "Neul."},
        {"role": "user", "content": "And of Sorvia?"},
        {"role": "assistant", "content": "Vesk."}]


def tokenizer_with(template: str | None):
    """The tiny tokenizer, with a family's template and marker tokens (template None: its own Llama-3 one)."""
    tokenizer = load_tokenizer(load_recipe("tiny"))
    if template is not None:
        tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL[template]},
                                     replace_extra_special_tokens=False)
        tokenizer.add_tokens(NORMAL[template])
        tokenizer.chat_template = template
    return tokenizer


def served_prompt(tokenizer, messages, **kwargs) -> list[int]:
    """What vLLM 0.32 feeds the model for a chat request: apply_chat_template(tokenize=True, return_dict=False)
    (vllm/renderers/hf.py safe_apply_chat_template), which tokenizes without adding special tokens."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False,
                                         **kwargs)


def learned(tokenizer, labels) -> str:
    return tokenizer.decode([t for t in labels if t != IGNORE])


def assert_served_turns(tokenizer, examples, messages, answers, **kwargs):
    """One example per assistant turn: its prompt is the served prompt, its labels exactly the answer."""
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert len(examples) == len(turns) == len(answers)
    for (ids, labels), turn, answer in zip(examples, turns, answers, strict=True):
        prompt = served_prompt(tokenizer, messages[:turn], **kwargs)
        assert ids[: len(prompt)] == prompt and labels[: len(prompt)] == [IGNORE] * len(prompt)
        assert labels[len(prompt):] == ids[len(prompt):]
        assert learned(tokenizer, labels) == answer


def test_thinking_template_trains_each_turn_on_the_history_the_server_renders():
    tokenizer = tokenizer_with(QWEN3_LIKE)
    examples = chat_examples(CHAT, tokenizer, "chat.jsonl:1")
    assert_served_turns(tokenizer, examples, CHAT, ["<think>\n\n</think>\n\nNeul.<|im_end|>",
                                                    "<think>\n\n</think>\n\nVesk.<|im_end|>"])
    history = tokenizer.decode(examples[1][0])
    assert "<|im_start|>assistant\nNeul.<|im_end|>" in history  # the past turn without its think block, as served
    assert examples[0][0][0] != tokenizer.bos_token_id  # ChatML writes no BOS, and none is added


def test_reasoning_content_is_trained_inside_the_think_block():
    tokenizer = tokenizer_with(QWEN3_LIKE)
    chat = [{"role": "user", "content": "What is the capital of Dateul?"},
            {"role": "assistant", "content": "Neul.", "reasoning_content": "Dateul's capital is Neul."}]
    ((_, labels),) = chat_examples(chat, tokenizer, "chat.jsonl:1")
    assert learned(tokenizer, labels) == "<think>\nDateul's capital is Neul.\n</think>\n\nNeul.<|im_end|>"


@pytest.mark.parametrize("reasoning", [None, "Dateul's capital is Neul."])
def test_thinking_off_trains_the_answer_after_the_empty_think_block_the_server_writes(reasoning):
    tokenizer = tokenizer_with(QWEN3_LIKE)
    answer = {"role": "assistant", "content": "Neul."} | ({"reasoning_content": reasoning} if reasoning else {})
    chat = [{"role": "user", "content": "What is the capital of Dateul?"}, answer]
    examples = chat_examples(chat, tokenizer, "chat.jsonl:1", {"enable_thinking": False})
    assert_served_turns(tokenizer, examples, chat, ["Neul.<|im_end|>"], enable_thinking=False)
    assert tokenizer.decode(examples[0][0]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nNeul.<|im_end|>")


def test_system_prompt_before_the_last_user_message_is_where_each_turn_sees_it():
    tokenizer = tokenizer_with(NEMO_LIKE)
    examples = chat_examples(CHAT, tokenizer, "chat.jsonl:1")
    assert_served_turns(tokenizer, examples, CHAT, ["Neul.<|end_of_text|>", "Vesk.<|end_of_text|>"])
    first, second = (tokenizer.decode(ids) for ids, _ in examples)
    assert first == "<|begin_of_text|>[INST]Be brief.\n\nWhat is the capital of Dateul?[/INST]Neul.<|end_of_text|>"
    assert second.startswith("<|begin_of_text|>[INST]What is the capital of Dateul?[/INST]Neul.<|end_of_text|>"
                             "[INST]Be brief.\n\nAnd of Sorvia?[/INST]")
    assert examples[1][0].count(tokenizer.bos_token_id) == 1  # the template's BOS, none added


def test_prefix_stable_template_is_one_example_with_every_turn_labelled():
    tokenizer = tokenizer_with(None)
    ((ids, labels),) = chat_examples(CHAT, tokenizer, "chat.jsonl:1")
    assert ids == tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=False)
    assert ids.count(tokenizer.bos_token_id) == 1
    assert learned(tokenizer, labels) == "Neul.<|eot_id|>Vesk.<|eot_id|>"
    second = [i for i, m in enumerate(CHAT) if m["role"] == "assistant"][1]
    prompt = served_prompt(tokenizer, CHAT[:second])
    assert ids[: len(prompt)] == prompt and learned(tokenizer, labels[len(prompt):]) == "Vesk.<|eot_id|>"


@pytest.mark.parametrize("template", [QWEN3_LIKE, NEMO_LIKE], ids=["qwen3-like", "nemo-like"])
def test_prompts_are_the_token_ids_vllm_renders(template):
    from vllm.renderers.hf import safe_apply_chat_template

    tokenizer = tokenizer_with(template)
    examples = chat_examples(CHAT, tokenizer, "chat.jsonl:1", {"enable_thinking": False})
    turns = [i for i, m in enumerate(CHAT) if m["role"] == "assistant"]
    for (ids, labels), turn in zip(examples, turns, strict=True):
        served = safe_apply_chat_template(None, tokenizer, CHAT[:turn], chat_template=tokenizer.chat_template,
                                          add_generation_prompt=True, enable_thinking=False)
        assert ids[: len(served)] == served and labels.index(ids[len(served)]) == len(served)


# trl ships verbatim copies of models' own chat templates (it matches tokenizers against them).
REAL = Path(importlib.util.find_spec("trl").submodule_search_locations[0]) / "chat_templates"
REAL_MARKERS = {"qwen3": ["<|im_start|>", "<|im_end|>"], "llama3_1": [], "gemma3": ["<start_of_turn>", "<end_of_turn>"],
                "phi3_5": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
                "nemotron_3_nano": ["<|im_start|>", "<|im_end|>"]}


@pytest.mark.parametrize(("name", "thinking", "answers"), [
    ("qwen3", None, ["<think>\n\n</think>\n\nNeul.<|im_end|>", "<think>\n\n</think>\n\nVesk.<|im_end|>"]),
    ("qwen3", False, ["Neul.<|im_end|>", "Vesk.<|im_end|>"]),
    ("llama3_1", None, ["Neul.<|eot_id|>Vesk.<|eot_id|>"]),
    ("gemma3", None, ["Neul.<end_of_turn>Vesk.<end_of_turn>"]),  # the system message folded into the first turn
    ("phi3_5", None, ["Neul.<|end|>Vesk.<|end|>"]),  # its EOS after the conversation's last <|end|> is not learned
    # the prompt opens '<think>\n', the turn renders '<think></think>': the answer goes on from the served prompt
    ("nemotron_3_nano", None, ["</think>Neul.<|im_end|>", "</think>Vesk.<|im_end|>"]),
])
def test_real_templates_train_every_turn_after_its_served_prompt(name, thinking, answers):
    tokenizer = load_tokenizer(load_recipe("tiny"))
    tokenizer.add_special_tokens({"additional_special_tokens": REAL_MARKERS[name]}, replace_extra_special_tokens=False)
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.chat_template = (REAL / f"{name}.jinja").read_text()
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    examples = chat_examples(CHAT, tokenizer, "chat.jsonl:1", kwargs)
    assert [learned(tokenizer, labels) for _, labels in examples] == answers
    turns = [i for i, m in enumerate(CHAT) if m["role"] == "assistant"][-len(examples):]
    for (ids, _), turn in zip(examples, turns, strict=True):
        prompt = served_prompt(tokenizer, CHAT[:turn], **kwargs)
        assert ids[: len(prompt)] == prompt


def write_chats(path, *chats):
    path.write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in chats))
    return path


GOOD = [{"role": "user", "content": "What is the capital of Dateul?"}, {"role": "assistant", "content": "Neul."}]
REFUSED = {"system": (CHAT, "System role not supported"),
           "alternation": ([GOOD[0], GOOD[0], GOOD[1]], "Conversation roles must alternate user/assistant")}


@pytest.mark.parametrize("case", list(REFUSED))
def test_template_that_refuses_a_conversation_names_the_line_and_its_message(tmp_path, case):
    chat, expected = REFUSED[case]
    source = write_chats(tmp_path / "chat.jsonl", GOOD, chat)
    records, _ = load_splits(load_recipe("tiny", [f"data.source={source}", "data.eval_split=null",
                                                  "data.eval_fraction=0.5"]).data)
    with pytest.raises(UserError) as raised:
        encode(records, tokenizer_with(GEMMA_LIKE), 256)
    assert str(raised.value).startswith(f"{source}:2: the chat template rejects this conversation: {expected}")


def test_train_refuses_a_system_message_the_template_rejects_in_one_line(tmp_path):
    recipe = read_yaml(resolve_recipe_path("tiny"))
    source = write_chats(tmp_path / "chat.jsonl", *[GOOD] * 4, CHAT)
    recipe["model"]["chat_template"] = GEMMA_LIKE
    recipe["data"] |= {"source": str(source), "eval_split": None, "eval_fraction": 0.2}
    (tmp_path / "gemma-like.yaml").write_text(yaml.safe_dump(recipe))
    result = cli_in_process("train", str(tmp_path / "gemma-like.yaml"), "--runs-dir", str(tmp_path / "runs"))
    assert_one_line_error(result, f"{source}:5: the chat template rejects this conversation: "
                                  "System role not supported")
    assert not (tmp_path / "runs").exists()


def test_thinking_choice_on_a_template_that_never_reads_it_is_refused(tmp_path):
    source = write_chats(tmp_path / "chat.jsonl", GOOD, GOOD)
    records, _ = load_splits(load_recipe("tiny", [f"data.source={source}", "data.eval_split=null",
                                                  "data.eval_fraction=0.5"]).data)
    with pytest.raises(UserError, match="model.enable_thinking is set but the chat template never reads it"):
        encode(records, tokenizer_with(None), 256, {"enable_thinking": False})
    assert encode(records, tokenizer_with(QWEN3_LIKE), 256, {"enable_thinking": False}).label_tokens > 0


def test_answer_the_template_does_not_end_with_a_special_token_is_refused():
    tokenizer = tokenizer_with(None)
    tokenizer.chat_template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}" \
                              "{% if add_generation_prompt %}assistant: {% endif %}"
    with pytest.raises(UserError, match="chat.jsonl:1: the chat template ends assistant turns without a special"):
        chat_examples(GOOD, tokenizer, "chat.jsonl:1")


def test_pad_is_never_end_of_sequence():
    tokenizer = tokenizer_with(None)
    tokenizer.pad_token = tokenizer.eos_token
    set_pad_token(tokenizer)
    assert tokenizer.pad_token_id not in (None, tokenizer.eos_token_id)
