"""The built-in tiny Llama: a real LlamaForCausalLM and fast tokenizer, built locally and deterministically.

It stands in for a hub model in the demo and the tests (no download is possible there). The tokenizer is
byte-level BPE trained on the shipped tiny datasets and mimics Llama 3 Instruct's special tokens and chat
template, including its classic trap: `eos_token` is <|end_of_text|> while chats end with <|eot_id|>.
"""

from __future__ import annotations

import hashlib
import json
import os
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
    corpus = _corpus()
    key = hashlib.sha256(json.dumps([ARCHITECTURES[name], VOCAB_SIZE, SEED, LM_HEAD_STD, corpus]).encode()).hexdigest()[:12]
    target = cache_root() / "builtin" / f"{name}-{key}"
    if (target / "config.json").is_file():
        return target
    with staged_dir(target) as staging:
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


def _corpus() -> list[str]:
    """Every string in the shipped tiny datasets, in a fixed order."""
    texts: list[str] = []
    for path in sorted(DATA_DIR.glob("*.jsonl")):
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
