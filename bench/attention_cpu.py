"""Packed rows on CPU: flex attention (per-example block-sparse mask) against sdpa's dense block-diagonal mask.

A Llama-shaped model's decoder (hidden 1024, 16 heads / 4 KV heads, 2 layers, random weights) runs a packed
padding-free batch of 8 x 1024 tokens, i.e. one 8,192-token row of examples of mixed length told apart by
position_ids, exactly as trl's padding-free collator builds it. The two attention paths alternate on the same
weights and the same row; the median of the per-round ratios is reported, so load from other processes on the
machine hits both alike.

Forward passes only: torch 2.13 has no flex_attention backward on CPU (the script shows the error), which is
why the train stage uses sdpa on CPU and flex/flash only on CUDA (qlora_app/train/attention.py).

    python bench/attention_cpu.py --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

PATHS = {"flex": "flex_attention", "sdpa (dense mask)": "sdpa"}


def build_model(layers: int, hidden: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32_000, hidden_size=hidden, intermediate_size=int(2.75 * hidden),
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256,
                         max_position_embeddings=8192)
    return LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()


def packed_row(rows: int, length: int, seed: int = 0) -> dict:
    """rows x length tokens of examples between 64 and 1024 tokens, packed like trl's padding-free collator."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rng = torch.Generator().manual_seed(seed)
    total, examples = rows * length, []
    while total > 0:
        n = min(total, int(torch.randint(64, length + 1, (1,), generator=rng)))
        examples.append({"input_ids": torch.randint(0, 32_000, (n,), generator=rng).tolist()})
        total -= n
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    batch.pop("labels")
    return {**batch, "use_cache": False}


def forward_seconds(model, batch) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model.model(**batch)  # the decoder layers; the output head is the same work for both paths
    return time.perf_counter() - start


def flex_backward_error(model, batch) -> str:
    model.set_attn_implementation("flex_attention")
    try:
        model.model.embed_tokens.weight.requires_grad_(True)
        model(**batch).logits.sum().backward()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        model.zero_grad(set_to_none=True)
    return "none: flex backward ran on CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1024)
    args = parser.parse_args()

    model = build_model(args.layers, args.hidden)
    batch = packed_row(args.rows, args.length)
    tokens = batch["input_ids"].numel()
    examples = int((batch["position_ids"] == 0).sum())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.layers} layers, hidden {args.hidden}; "
          f"one packed row of {tokens} tokens ({examples} examples)", flush=True)
    hidden = {}
    for name, impl in PATHS.items():  # warm-up: flex compiles here; both paths check they agree
        model.set_attn_implementation(impl)
        forward_seconds(model, batch)
        with torch.no_grad():
            hidden[name] = model.model(**batch).last_hidden_state
    difference = (hidden["flex"] - hidden["sdpa (dense mask)"]).abs().max().item()
    print(f"max |hidden state difference| flex vs sdpa: {difference:.2e}", flush=True)
    seconds = {name: [] for name in PATHS}
    for _ in range(args.rounds):
        for name, impl in PATHS.items():
            model.set_attn_implementation(impl)
            seconds[name].append(forward_seconds(model, batch))
        print("  " + ", ".join(f"{n}: {tokens / s[-1]:,.0f} tok/s" for n, s in seconds.items()), flush=True)
    ratios = [d / f for f, d in zip(seconds["flex"], seconds["sdpa (dense mask)"])]
    for name, values in seconds.items():
        print(f"{name:>18}: median {tokens / statistics.median(values):,.0f} tokens/s (forward)")
    print(f"flex / dense-mask sdpa tokens/s, median of {args.rounds} rounds: {statistics.median(ratios):.2f}x "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f})")
    print(f"forward+backward with flex on CPU: {flex_backward_error(model, batch)}")


if __name__ == "__main__":
    main()
