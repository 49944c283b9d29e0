"""The built-in tiny models: real transformers models and fast tokenizers, built locally and deterministically.

They stand in for hub models in the demo and the tests (no download is possible there). Each tokenizer is
byte-level BPE trained on the shipped tiny datasets. tiny-llama mimics Llama 3 Instruct's special tokens and
chat template, including its classic trap: `eos_token` is <|end_of_text|> while chats end with <|eot_id|>.
The other families' tiny models (FAMILY_MODELS) mimic their family's tokens and template rules in the same way:
Qwen3's ChatML with <think> blocks and no BOS, Mistral's [INST] with BOS and no pad token, Gemma 3's `model`
role without a system role and <end_of_turn>, Phi-3's <|user|>/<|assistant|>/<|end|> tags with pad = eos.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from qlora_app.machine.atomic import staged_dir

BUILTIN_PREFIX = "builtin:"
DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "tiny"

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>", "<|pad|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim }}<|eot_id|>{% endgeneration %}"
    "{% else %}{{ message['content'] | trim }}<|eot_id|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
ARCHITECTURES = {
    "tiny-llama": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
                       rope_theta=10000.0, tie_word_embeddings=False),
}
VOCAB_SIZE = 1024
SEED = 0
LM_HEAD_STD = 0.5
# tiny-llama's tokenizer is trained on these files only, so that adding a dataset leaves it bit-identical.
LLAMA_CORPUS = ("capitals-eval.jsonl", "capitals.jsonl", "creatures.jsonl")
FAMILY_BUILD = 2  # raise when _build_family changes, so cached tiny models are rebuilt

QWEN3_TEMPLATE = (
    "{%- set ns = namespace(last_query=-1) %}{%- for message in messages %}"
    "{%- if message.role == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' or message.role == 'user' %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}"
    "{%- elif message.role == 'assistant' %}{%- set content = message.content %}"
    "{%- set reasoning = message.reasoning_content if message.reasoning_content is string else '' %}"
    "{%- if '</think>' in content %}{%- set reasoning = content.split('</think>')[0].split('<think>')[-1] %}"
    "{%- set content = content.split('</think>')[-1] %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query %}"
    "{{- '<|im_start|>assistant\n<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}"
    "{%- else %}{{- '<|im_start|>assistant\n' + content.lstrip('\n') }}{%- endif %}"
    "{{- '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST]' + message['content'] + '[/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported') }}{% endif %}{% endfor %}"
)
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + ((first_user_prefix if loop.first else '') + message['content']) | trim "
    "+ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] in ['system', 'user', 'assistant'] %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
SMALL = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=512)


@dataclass(frozen=True)
class TinyFamily:
    """A tiny model of one family: its transformers classes, shape, tokens and chat template."""

    config_class: str
    model_class: str
    shape: dict
    tokens: dict  # bos_token, eos_token, pad_token, unk_token as the family's tokenizer sets them (or absent)
    specials: tuple[str, ...]  # further special tokens (the template's markers)
    template: str
    add_bos: bool  # the tokenizer prepends BOS when asked for special tokens (as Llama-2-style tokenizers do)


FAMILY_MODELS = {
    "tiny-qwen3": TinyFamily(
        "Qwen3Config", "Qwen3ForCausalLM", {**SMALL, "num_key_value_heads": 2, "head_dim": 64,
                                            "tie_word_embeddings": True, "rms_norm_eps": 1e-6},
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        ("<|im_start|>", "<think>", "</think>"), QWEN3_TEMPLATE, add_bos=False),
    "tiny-mistral": TinyFamily(
        "MistralConfig", "MistralForCausalLM", {**SMALL, "num_key_value_heads": 2, "head_dim": 64,
                                                "sliding_window": None, "tie_word_embeddings": False},
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
        ("[INST]", "[/INST]"), MISTRAL_TEMPLATE, add_bos=True),
    "tiny-gemma3": TinyFamily(
        "Gemma3TextConfig", "Gemma3ForCausalLM", {**SMALL, "num_key_value_heads": 1, "head_dim": 32,
                                                  "query_pre_attn_scalar": 32, "sliding_window": 16,
                                                  "layer_types": ["sliding_attention", "full_attention"],
                                                  "tie_word_embeddings": True},
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"},
        ("<start_of_turn>", "<end_of_turn>"), GEMMA3_TEMPLATE, add_bos=True),
    "tiny-phi3": TinyFamily(
        "Phi3Config", "Phi3ForCausalLM", {**SMALL, "num_key_value_heads": 2, "tie_word_embeddings": False,
                                          "original_max_position_embeddings": 512},
        {"bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>"},
        ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), PHI3_TEMPLATE, add_bos=False),
}
for _name, _family in FAMILY_MODELS.items():
    ARCHITECTURES[_name] = _family.shape


def is_builtin(path: str) -> bool:
    return path.startswith(BUILTIN_PREFIX)


def builtin_name(path: str) -> str:
    from qlora_app.errors import UserError

    name = path.removeprefix(BUILTIN_PREFIX)
    if name not in ARCHITECTURES:
        raise UserError(f"unknown built-in model '{name}'; built-in models: {', '.join(ARCHITECTURES)}")
    return name


def cache_root() -> Path:
    return Path(os.environ.get("QLORA_CACHE_DIR", Path.home() / ".cache" / "qlora-app"))


def materialize(path: str) -> Path:
    """Return the directory of a built-in model, building it on first use (atomically)."""
    name = builtin_name(path)
    family = FAMILY_MODELS.get(name)
    corpus = _corpus(None if family else LLAMA_CORPUS)
    facts = [ARCHITECTURES[name], VOCAB_SIZE, SEED, LM_HEAD_STD, corpus]
    facts += [FAMILY_BUILD, family.config_class, family.tokens, family.specials, family.template,
              family.add_bos] if family else []
    key = hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:12]
    target = cache_root() / "builtin" / f"{name}-{key}"
    if (target / "config.json").is_file():
        return target
    with staged_dir(target) as staging:
        if family:
            _build_family(family, corpus, staging)
        else:
            _build(name, corpus, staging)
    return target


def _build(name: str, corpus: list[str], out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = build_tokenizer(corpus)
    tokenizer.save_pretrained(out)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **ARCHITECTURES[name],
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    # A trained model's output head spans a wide range of logits; a freshly initialised one (std 0.02) cannot
    # express a confident prediction behind a fixed final norm, so no adapter could make it memorize anything.
    with torch.no_grad():
        model.lm_head.weight.normal_(std=LM_HEAD_STD)
    model = model.to(torch.bfloat16)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out, safe_serialization=True)


def _build_family(family: TinyFamily, corpus: list[str], out: Path) -> None:
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = build_family_tokenizer(family, corpus)
    tokenizer.save_pretrained(out)
    config = getattr(transformers, family.config_class)(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **family.shape)
    torch.manual_seed(SEED)
    model = getattr(transformers, family.model_class)(config)
    with torch.no_grad():  # see _build: a head able to express confident predictions
        if config.tie_word_embeddings:
            widen_final_norm(model, LM_HEAD_STD / config.initializer_range)
        else:
            model.lm_head.weight.normal_(std=LM_HEAD_STD)
    model = model.to(torch.bfloat16)
    model.generation_config.eos_token_id = tokenizer.eos_token_id  # the tokenizer's eos only, as hub bases often do
    model.save_pretrained(out, safe_serialization=True)


def widen_final_norm(model, gain: float) -> None:
    """The same logit range for a model whose head is its embedding matrix: a wide head would make embeddings
    that drown every layer's output (the model would predict its input token), so the final norm's gain widens
    instead. Gemma's norms scale by (1 + weight)."""
    norm = model.model.norm
    norm.weight.fill_(gain - 1 if type(model).__name__.startswith("Gemma") else gain)


def build_family_tokenizer(family: TinyFamily, corpus: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys([*family.tokens.values(), *family.specials]))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(corpus, trainer=trainer)
    if family.add_bos:
        bos = family.tokens["bos_token"]
        bpe.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, bpe.token_to_id(bos))])
    else:
        bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, **family.tokens, additional_special_tokens=list(family.specials),
        chat_template=family.template, model_max_length=family.shape["max_position_embeddings"])


def build_tokenizer(corpus: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=ARCHITECTURES["tiny-llama"]["max_position_embeddings"],
    )


def _corpus(names: tuple[str, ...] | None = None) -> list[str]:
    """Every string in the shipped tiny datasets (or in the files `names`), in a fixed order."""
    texts: list[str] = []
    for path in sorted(DATA_DIR / name for name in names) if names else sorted(DATA_DIR.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                texts.extend(_strings(json.loads(line)))
    return texts


def _strings(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for key in sorted(node) for s in _strings(node[key])]
    if isinstance(node, list):
        return [s for item in node for s in _strings(item)]
    return []
