"""Peak RAM and time of our streaming merge against the usual path, in one run, on CPU.

The usual path loads the whole bf16 base with transformers, wraps it with peft, calls merge_and_unload and
saves; ours (`qlora_app.merge.stage.merge_shard`) reads, merges and writes one safetensors shard at a time. Both
merge the same random LoRA adapter (r=64 on all projections) into the same random Llama-shaped bf16 model
of about 1.5 GB saved in 500 MB shards. Each path runs in its own process, so peak RSS is its own.

    python bench/merge_memory.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=12, num_attention_heads=16,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)


def prepare(workdir: Path) -> tuple[Path, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    base, adapter = workdir / "base", workdir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**SHAPE)).to(torch.bfloat16)
        model.save_pretrained(base, max_shard_size="500MB")
        peft_model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, target_modules="all-linear"))
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.01)  # B starts at zero; make the merge do real work
        peft_model.save_pretrained(adapter)
    return base, adapter


def ours(base: Path, adapter: Path, out: Path) -> None:
    from qlora_app.merge.stage import load_deltas, merge_shard, shard_files
    from qlora_app.recipe.loader import load_recipe

    recipe = load_recipe("llama3-8b")  # merge.dtype bfloat16; the base weights come from `base`
    config = json.loads((adapter / "adapter_config.json").read_text())
    deltas = load_deltas(adapter)
    out.mkdir(parents=True, exist_ok=True)
    for shard in shard_files(base):
        merge_shard(base / shard, out / shard, deltas, config["lora_alpha"] / config["r"], recipe, "original")


def usual(base: Path, adapter: Path, out: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out, max_shard_size="500MB")


def peak_rss() -> int:
    """VmHWM: this process image's peak RSS (ru_maxrss would include the parent's, inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(path_name: str, base: Path, adapter: Path, out: Path) -> None:
    start = time.perf_counter()
    {"ours": ours, "usual": usual}[path_name](base, adapter, out)
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_bytes": peak_rss()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qlora-bench-merge"))
    parser.add_argument("--child", choices=["ours", "usual"])
    args = parser.parse_args()
    base, adapter = args.workdir / "base", args.workdir / "adapter"
    if args.child:
        child(args.child, base, adapter, args.workdir / f"out-{args.child}")
        return
    prepare(args.workdir)
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    results = {}
    for name in ("usual", "ours"):
        done = subprocess.run([sys.executable, __file__, "--workdir", str(args.workdir), "--child", name],
                              capture_output=True, text=True, check=True)
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    results["model_bytes"] = size
    results["memory_ratio"] = results["ours"]["peak_rss_bytes"] / results["usual"]["peak_rss_bytes"]
    results["time_ratio"] = results["ours"]["seconds"] / results["usual"]["seconds"]
    print(json.dumps(results, indent=1))
    print(f"model {size / 1e9:.2f} GB | usual: {results['usual']['peak_rss_bytes'] / 1e9:.2f} GB peak, "
          f"{results['usual']['seconds']:.1f} s | ours: {results['ours']['peak_rss_bytes'] / 1e9:.2f} GB peak, "
          f"{results['ours']['seconds']:.1f} s | memory {results['memory_ratio']:.2f}x, time {results['time_ratio']:.2f}x")


if __name__ == "__main__":
    main()
