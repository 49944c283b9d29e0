"""Peak GPU memory and step throughput of QLoRA training, measured beside the planner's estimate.

Builds a model of a recipe's exact architecture with random weights (nothing to download), saves it, loads it
the way the train stage does (bitsandbytes 4-bit, fp32 norms, gradient checkpointing, peft LoRA), and runs
optimizer steps with the recipe's optimizer at several (batch, sequence length) points:

    python bench/gpu_memory.py --recipe llama3-8b --points 1x1024,4x1024,8x1024,2x2048 --no-ckpt 1x1024

Needs a CUDA GPU. Prints a table and writes JSON (--out). Results: docs/gpu-measurements.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

from qlora_app.model.architecture import SHIPPED_DIR, Architecture, load_architecture
from qlora_app.model.loading import load_base, lora_config, prepare_for_training
from qlora_app.plan import planner
from qlora_app.recipe.loader import load_recipe

GiB = 2**30


def build_random_model(recipe, workdir: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    if (workdir / "config.json").is_file():
        return
    config = AutoConfig.for_model(**json.loads((SHIPPED_DIR / (recipe.model.path.replace("/", "--") + ".json")).read_text()))
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(workdir, safe_serialization=True)
    del model
    torch.cuda.empty_cache()


def make_optimizer(recipe, params):
    import bitsandbytes as bnb

    t = recipe.train
    kinds = {
        "paged_adamw_32bit": lambda: bnb.optim.PagedAdamW32bit(params, lr=t.lr, weight_decay=t.weight_decay),
        "paged_adamw_8bit": lambda: bnb.optim.PagedAdamW8bit(params, lr=t.lr, weight_decay=t.weight_decay),
        "adamw_8bit": lambda: bnb.optim.AdamW8bit(params, lr=t.lr, weight_decay=t.weight_decay),
        "adamw_torch": lambda: torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay),
    }
    return kinds[t.optimizer]()


def measure(model, optimizer, vocab: int, batch: int, seq: int, fused: bool, steps: int = 3) -> dict:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        ids = torch.randint(0, vocab, (batch, seq), device="cuda")
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            # fused: trl's tiled LM head, as the train stage's SFTTrainer runs it (no full logits tensor)
            loss = model(input_ids=ids, labels=ids, **({"fused_lm_head": True} if fused else {})).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    free, total = torch.cuda.mem_get_info()
    step = sum(times[1:]) / max(1, len(times) - 1)
    return {
        "peak_allocated": torch.cuda.max_memory_allocated(),
        "peak_reserved": torch.cuda.max_memory_reserved(),
        "context": (total - free) - torch.cuda.memory_reserved(),
        "step_seconds": step,
        "tokens_per_second": batch * seq / step,
    }


def parse_points(text: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in item.split("x")) for item in text.split(",") if item]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="llama3-8b")
    parser.add_argument("--points", default="1x1024,4x1024,8x1024,2x2048", help="BATCHxSEQ,... with checkpointing")
    parser.add_argument("--no-ckpt", default="1x1024", help="BATCHxSEQ,... without gradient checkpointing")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qlora-bench-model"))
    parser.add_argument("--out", type=Path, default=Path("gpu_memory.json"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--loss", choices=["fused", "hf"], default="fused",
                        help="fused: trl's tiled LM head and loss, as training runs it; hf: the model's own loss")
    args = parser.parse_args()

    recipe = load_recipe(args.recipe, args.overrides)
    arch: Architecture = load_architecture(recipe.model)
    build_random_model(recipe, args.workdir)
    local = recipe.with_section("model", path=str(args.workdir))
    from peft import get_peft_model

    model = load_base(local)
    prepare_for_training(model, local)
    if args.loss == "fused":
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # what SFTTrainer asks for
    model = get_peft_model(model, lora_config(local))
    model.train()  # gradient checkpointing only acts in training mode, as under the Trainer
    optimizer = make_optimizer(local, [p for p in model.parameters() if p.requires_grad])
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "recipe": recipe.name,
               "loss": args.loss,
               "after_load_allocated": torch.cuda.memory_allocated(), "points": []}
    plan_for = [(b, s, True) for b, s in parse_points(args.points)] + [(b, s, False) for b, s in parse_points(args.no_ckpt)]
    for batch, seq, ckpt in plan_for:
        if ckpt:
            model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.base_model.model.gradient_checkpointing_disable()
        estimate = planner.plan(recipe, arch, batch_size=batch, seq_len=seq, gradient_checkpointing=ckpt)
        try:
            measured = measure(model, optimizer, arch.vocab, batch, seq, args.loss == "fused")
        except torch.OutOfMemoryError:
            measured = {"oom": True}
        point = {"batch": batch, "seq": seq, "checkpointing": ckpt, "planned_total": estimate.total,
                 "planned": dict(estimate.rows()), **measured}
        results["points"].append(point)
        if "oom" in measured:  # outside the except block, so the traceback no longer pins the activations
            optimizer.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
            print(f"{batch}x{seq} ckpt={ckpt}: OOM (planned {estimate.total / GiB:.2f} GiB)", flush=True)
            continue
        device_total = measured["peak_reserved"] + measured["context"]
        print(f"{batch}x{seq} ckpt={ckpt}: planned {estimate.total / GiB:.2f} GiB | peak allocated "
              f"{measured['peak_allocated'] / GiB:.2f}, reserved {measured['peak_reserved'] / GiB:.2f}, "
              f"+context {device_total / GiB:.2f} GiB | {measured['tokens_per_second']:.0f} tok/s", flush=True)
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
