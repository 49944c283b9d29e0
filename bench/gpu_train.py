"""The train stage itself on a Llama-3-8B-shaped model: peak GPU memory and tokens/s, as users rent GPUs by.

No weights or data can be downloaded where this runs, so it builds what it needs:
- the llama3-8b recipe's exact architecture (128,256-token vocabulary included) with random weights;
- the built-in tiny tokenizer and its Llama-3-style chat template (its ids are a subset of the vocabulary:
  compute and memory depend on the model's shape, not on which token ids appear);
- synthetic chats of mixed length (40 to 900 tokens), so packing has real work to do.
Then it runs `qlora-app train llama3-8b` with the recipe's own settings and a step limit, and prints the
manifest's figures:

    python bench/gpu_train.py --steps 20
    python bench/gpu_train.py --compare --steps 40   # before issue 10 vs now, same data, one run

Needs a CUDA GPU. Results: docs/gpu-measurements.md.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))


def synthetic_chats(path: Path, count: int, seed: int = 0) -> None:
    words = (REPO / "data" / "tiny" / "capitals.jsonl").read_text().replace('"', " ").split()
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(count):
            answer_words = int(rng.lognormvariate(5.0, 0.7))  # median about 150 words, long tail
            answer = " ".join(rng.choice(words) for _ in range(max(20, min(answer_words, 600))))
            question = " ".join(rng.choice(words) for _ in range(rng.randint(5, 60)))
            f.write(json.dumps({"messages": [{"role": "user", "content": question},
                                             {"role": "assistant", "content": answer}]}) + "\n")


# bf16 dense matmul throughput that the MFU figures divide by (what a large bf16 matmul reaches, not the datasheet)
PEAK_FLOPS = {"H100": 790e12, "H200": 790e12}
DEFAULT_PEAK = 790e12
# What the train stage ran before issue 10 (sdpa, the fixed 4 x 4 layout) against the recipe as shipped now.
VARIANTS = {"before": ["train.attention=sdpa", "train.batch_size=4"], "now": []}


def peak_flops() -> tuple[float, str]:
    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    for key, flops in PEAK_FLOPS.items():
        if key in name:
            return flops, name
    return DEFAULT_PEAK, f"{name} (unknown: H100 peak assumed)"


def train_once(args, model_dir: Path, data: Path, runs: Path, extra: list[str]) -> tuple[dict, list[dict]]:
    sets = [f"model.path={model_dir}", f"data.source={data}", "data.format=messages", "data.eval_split=null",
            "data.eval_fraction=0.02", f"train.max_steps={args.steps}", f"train.eval_steps={args.steps}",
            f"train.save_steps={args.steps}", f"train.log_steps={args.log_steps}", *extra, *args.overrides]
    command = [sys.executable, "-m", "qlora_app", "train", args.recipe, "--runs-dir", str(runs)]
    for item in sets:
        command += ["--set", item]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=REPO)
    run = runs / args.recipe / "latest"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return json.loads((run / "manifest.json").read_text()), metrics


def print_comparison(results: dict, params: int) -> None:
    peak, device = peak_flops()
    print(f"\n{device}; MFU = tokens/s x 4 x {params / 1e9:.2f}B / {peak / 1e12:.0f} TFLOP/s")
    for name, (manifest, metrics) in results.items():
        t, layout = manifest["training"], manifest["layout"]
        steady = t.get("steady_tokens_per_second") or 0
        print(f"{name:>7}: layout {layout['batch_size']} x {layout['grad_accum']}"
              f" ckpt {layout['gradient_checkpointing']}"
              f" | steady {steady:,.0f} tok/s (MFU {steady * 4 * params / peak:.1%})"
              f" | stage {t['stage_tokens_per_second']:,.0f} tok/s"
              f" | peak {t.get('gpu_device_peak_bytes', 0) / 2**30:.2f} GiB")
        losses = [m["loss"] for m in metrics if "loss" in m][:20]
        print("         first losses: " + " ".join(f"{loss:.4f}" for loss in losses))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="llama3-8b")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--log-steps", type=int, default=5)
    parser.add_argument("--compare", action="store_true",
                        help="train twice on the same data: before issue 10 (sdpa, batch 4 x 4) and as shipped now "
                             "(attention auto, batch_size auto); prints tokens/s, MFU, peak memory, first 20 losses")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qlora-bench-train"))
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/qlora-bench-model"),
                        help="where the random model is built (shared with bench/gpu_memory.py)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    if args.compare:
        args.log_steps = 1  # every step's loss, to compare the first 20

    from gpu_memory import build_random_model

    from qlora_app.model.architecture import load_architecture
    from qlora_app.model.tiny import materialize
    from qlora_app.recipe.loader import load_recipe

    recipe = load_recipe(args.recipe)
    model_dir = args.model_dir
    build_random_model(recipe, model_dir)
    tiny = materialize("builtin:tiny-llama")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny / name, model_dir / name)
    args.workdir.mkdir(parents=True, exist_ok=True)
    data = args.workdir / "chats.jsonl"
    synthetic_chats(data, args.examples)
    variants = VARIANTS if args.compare else {"recipe": []}
    results = {name: train_once(args, model_dir, data, args.workdir / f"runs-{name}", extra)
               for name, extra in variants.items()}
    if not args.compare:
        manifest = results["recipe"][0]
        print(json.dumps({k: manifest[k] for k in ("device", "versions", "data", "training", "losses")}, indent=1))
        return
    print_comparison(results, load_architecture(recipe.model).total_params)


if __name__ == "__main__":
    main()
