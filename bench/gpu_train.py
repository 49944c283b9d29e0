"""The train stage itself on a Llama-3-8B-shaped model: peak GPU memory and tokens/s, as users rent GPUs by.

No weights or data can be downloaded where this runs, so it builds what it needs:
- the llama3-8b recipe's exact architecture (128,256-token vocabulary included) with random weights;
- the built-in tiny tokenizer and its Llama-3-style chat template (its ids are a subset of the vocabulary:
  compute and memory depend on the model's shape, not on which token ids appear);
- synthetic chats of mixed length (40 to 900 tokens), so packing has real work to do.
Then it runs `qlora-app train llama3-8b` with the recipe's own settings and a step limit, and prints the
manifest's figures:

    python bench/gpu_train.py --steps 20

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="llama3-8b")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qlora-bench-train"))
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/qlora-bench-model"),
                        help="where the random model is built (shared with bench/gpu_memory.py)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    from gpu_memory import build_random_model

    from qlora_app.recipe_loader import load_recipe
    from qlora_app.tiny_model import materialize

    recipe = load_recipe(args.recipe)
    model_dir = args.model_dir
    build_random_model(recipe, model_dir)
    tiny = materialize("builtin:tiny-llama")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny / name, model_dir / name)
    args.workdir.mkdir(parents=True, exist_ok=True)
    data = args.workdir / "chats.jsonl"
    synthetic_chats(data, args.examples)
    runs = args.workdir / "runs"
    sets = [f"model.path={model_dir}", f"data.source={data}", "data.format=messages", "data.eval_split=null",
            "data.eval_fraction=0.02", f"train.max_steps={args.steps}", f"train.eval_steps={args.steps}",
            f"train.save_steps={args.steps}", "train.log_steps=5", *args.overrides]
    command = [sys.executable, "-m", "qlora_app", "train", args.recipe, "--runs-dir", str(runs)]
    for item in sets:
        command += ["--set", item]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=REPO)
    manifest = json.loads((runs / recipe.name / "latest" / "manifest.json").read_text())
    print(json.dumps({k: manifest[k] for k in ("device", "versions", "data", "training", "losses")}, indent=1))


if __name__ == "__main__":
    main()
