"""Training on packed rows on CPU: per-example sdpa against sdpa's dense block-diagonal mask, forward + backward.

A Llama-shaped model (hidden 1024, 16 heads / 4 KV heads, 2 layers, 32k vocabulary, random weights) with LoRA
adapters on every projection (r 16, the base frozen, as qlora-app trains) runs training steps on a packed
padding-free batch of 8 x 1024 tokens: one 8,192-token row of examples of 64 to 1024 tokens told apart by
position_ids and cu_seq_lens, exactly as trl's padding-free collator builds it. A step is the forward with the
loss (output head included) and the backward; the optimizer's update is the same for both paths and left out.

- per example: qlora_app/train/per_example.py, what `train.attention: auto` trains with on CPU: sdpa called on
  each example, causal, so the work is the sum of the examples' squares.
- sdpa (dense mask): transformers' sdpa, which gets a (rows x rows) block-diagonal mask and computes every pair.
  (flex attention would also attend per example, but torch 2.13 has no flex backward on CPU.)

The two paths alternate on the same weights and the same row, one step each per round, after one warm-up step
each that also checks they agree (loss and adapter gradients); the median of the per-round ratios is reported,
so load from other processes on the machine hits both alike.

    python bench/attention_cpu.py --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qlora_app.train.per_example import register  # noqa: E402

PATHS = {"per example": register(), "sdpa (dense mask)": "sdpa"}


def build_model(layers: int, hidden: int):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32_000, hidden_size=hidden, intermediate_size=int(2.75 * hidden),
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256,
                         max_position_embeddings=8192)
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, init_lora_weights=False, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return get_peft_model(model, lora).train()


def packed_row(rows: int, length: int, seed: int = 0) -> dict:
    """rows x length tokens of examples between 64 and `length` tokens, packed like trl's padding-free collator."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rng = torch.Generator().manual_seed(seed)
    total, examples = rows * length, []
    while total > 0:
        n = min(total, int(torch.randint(64, length + 1, (1,), generator=rng)))
        examples.append({"input_ids": torch.randint(0, 32_000, (n,), generator=rng).tolist()})
        total -= n
    return {**DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples), "use_cache": False}


def train_step(model, batch, implementation: str) -> tuple[float, torch.Tensor, dict]:
    """Seconds for forward (with the loss) + backward; the loss and the adapters' gradients."""
    model.base_model.model.set_attn_implementation(implementation)
    start = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    seconds = time.perf_counter() - start
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return seconds, loss.detach(), grads


def check_agreement(model, batch) -> str:
    """Warm-up step of each path; how far apart their losses and gradients are."""
    (_, loss_a, grads_a), (_, loss_b, grads_b) = (train_step(model, batch, impl) for impl in PATHS.values())
    worst = max(((grads_a[n] - grads_b[n]).abs().max() / grads_b[n].abs().max()).item() for n in grads_b)
    return f"|loss difference| {abs(loss_a - loss_b).item():.2e}, worst relative gradient difference {worst:.2e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1024)
    args = parser.parse_args()

    model = build_model(args.layers, args.hidden)
    batch = packed_row(args.rows, args.length)
    tokens = batch["input_ids"].numel()
    examples = len(batch["cu_seq_lens_q"]) - 1
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.layers} layers, hidden {args.hidden}, "
          f"LoRA r16 on every projection; one packed row of {tokens} tokens ({examples} examples)", flush=True)
    print(f"per example vs dense mask: {check_agreement(model, batch)}", flush=True)
    seconds = {name: [] for name in PATHS}
    for _ in range(args.rounds):
        for name, impl in PATHS.items():
            seconds[name].append(train_step(model, batch, impl)[0])
        print("  " + ", ".join(f"{n}: {tokens / s[-1]:,.0f} tok/s" for n, s in seconds.items()), flush=True)
    ratios = [d / p for p, d in zip(seconds["per example"], seconds["sdpa (dense mask)"])]
    for name, values in seconds.items():
        print(f"{name:>18}: median {tokens / statistics.median(values):,.0f} tokens/s (forward + backward)")
    print(f"per-example / dense-mask sdpa tokens/s, median of {args.rounds} rounds: {statistics.median(ratios):.2f}x "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f})")


if __name__ == "__main__":
    main()
