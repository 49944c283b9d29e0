"""Ours vs the reference articles' training setup: useful tokens per second and held-out loss, one run.

Both train the same Llama-shaped model (random weights, a realistic aspect: hidden 2048, 4 layers, GQA 16/4,
32k vocabulary) in 4-bit with the same LoRA, optimizer and learning rate, for one epoch of the same
mixed-length synthetic chats, and are evaluated on the same held-out chats:

- reference: trl's SFTTrainer as the articles use it: no packing, each batch padded to its longest example,
  length-grouped sampling, batch 4 x accumulation 4, gradient checkpointing on;
- ours: `qlora-app train` (padding-free packing of examples into 1024-token rows, no cross-attention between
  them), as many tokens per optimizer step as the reference (so the same number of updates), and the layout
  the memory planner picks for a 24 GiB card: no gradient checkpointing when at least 4 rows fit without it,
  and the largest batch that fits.

    python bench/packing.py            # needs a CUDA GPU; prints a table and writes packing.json

Useful tokens are the dataset's own tokens; padding computed by the reference does not count.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

SHAPE = dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=4,
             num_attention_heads=16, num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096,
             rms_norm_eps=1e-5, tie_word_embeddings=False)
EXAMPLES_PER_STEP = 16  # the reference's batch 4 x accumulation 4


def build_model(workdir: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora_app.model.tiny import materialize

    path = workdir / "model"
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**SHAPE), dtype=torch.bfloat16)
        model.save_pretrained(path)
        tiny = materialize("builtin:tiny-llama")
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copy(tiny / name, path / name)
    return path


def base_recipe(model: Path, data: Path, overrides: list[str]):
    from qlora_app.recipe.loader import load_recipe

    return load_recipe("llama3-8b", [
        f"model.path={model}", f"data.source={data}", "data.format=messages", "data.eval_split=null",
        "data.eval_fraction=0.03", "train.epochs=1", "train.lr_scheduler=constant", "train.eval_steps=100000",
        "train.save_steps=100000", "train.log_steps=10", "train.report_to=[]", *overrides])


def run_reference(recipe, workdir: Path) -> dict:
    """The articles' setup, with trl directly: padded batches, length grouping, checkpointing."""
    import torch
    from peft import get_peft_model
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from qlora_app.data.encoding import load_tokenizer
    from qlora_app.model.loading import load_base, lora_config, prepare_for_training
    from qlora_app.train.stage import prepare_data

    tokenizer = load_tokenizer(recipe)
    data = prepare_data(recipe, tokenizer)
    set_seed(recipe.train.seed)
    model = load_base(recipe)
    prepare_for_training(model, recipe)  # gradient checkpointing on, as the recipe says
    model = get_peft_model(model, lora_config(recipe))
    train_set = data.train.to_dataset()
    config = SFTConfig(
        output_dir=str(workdir / "reference"), num_train_epochs=1, per_device_train_batch_size=4,
        per_device_eval_batch_size=4, gradient_accumulation_steps=EXAMPLES_PER_STEP // 4,
        learning_rate=recipe.train.lr, lr_scheduler_type="constant", optim="paged_adamw_32bit", bf16=True,
        max_grad_norm=recipe.train.max_grad_norm, weight_decay=recipe.train.weight_decay,
        max_length=recipe.data.max_length, packing=False, padding_free=False,
        train_sampling_strategy="group_by_length", gradient_checkpointing=False, logging_steps=10,
        eval_strategy="no", save_strategy="no", report_to=[], seed=recipe.train.seed, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=config, train_dataset=train_set, eval_dataset=data.eval.to_dataset(),
                         processing_class=tokenizer)
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    computed = padded_tokens(trainer)
    return {"seconds": seconds, "useful_tokens": data.train.tokens, "computed_tokens": computed,
            "eval_loss": trainer.evaluate()["eval_loss"], "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
            "batch": 4, "grad_accum": EXAMPLES_PER_STEP // 4, "steps": trainer.state.global_step,
            "gradient_checkpointing": True}


def padded_tokens(trainer) -> int:
    """Tokens the reference actually computed, padding included: sum over its batches of batch x longest."""
    total = 0
    for batch in trainer.get_train_dataloader():
        total += batch["input_ids"].numel()
    return total


def mean_example_tokens(recipe) -> float:
    from qlora_app.data.encoding import load_tokenizer
    from qlora_app.train.stage import prepare_data

    encoded = prepare_data(recipe, load_tokenizer(recipe)).train
    return encoded.tokens / len(encoded.input_ids)


def run_ours(recipe, workdir: Path, budget_gib: float) -> dict:
    import torch

    from qlora_app.model.architecture import load_architecture

    # The same tokens per optimizer step as the reference (its 16 examples fill about this many packed rows),
    # so both make the same number of updates per epoch: the tokens per update are a hyperparameter, not a
    # speed knob.
    from qlora_app.plan import planner
    from qlora_app.run.directory import RunDir
    from qlora_app.train.stage import train

    rows_per_step = max(1, round(EXAMPLES_PER_STEP * mean_example_tokens(recipe) / recipe.data.max_length))
    layout = planner.fastest_layout(recipe, load_architecture(recipe.model), int(budget_gib * planner.GiB),
                                    rows_per_step)
    batch, accum, checkpointing = layout.batch_size, layout.grad_accum, layout.gradient_checkpointing
    ours = recipe.with_section("train", batch_size=batch, grad_accum=accum, gradient_checkpointing=checkpointing)
    torch.cuda.reset_peak_memory_stats()
    run = train(ours, workdir / "runs")
    manifest = RunDir(run.path).read_manifest()
    return {"seconds": manifest["training"]["train_seconds"], "useful_tokens": manifest["data"]["train_tokens"],
            "computed_tokens": manifest["data"]["train_tokens"], "eval_loss": manifest["losses"]["final_eval_loss"],
            "peak_reserved_gib": manifest["training"]["gpu_peak_reserved_bytes"] / 2**30, "batch": batch,
            "grad_accum": accum, "steps": manifest["training"]["steps"], "gradient_checkpointing": checkpointing}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=3000)
    parser.add_argument("--budget", type=float, default=24.0, help="GPU memory (GiB) the planner plans for")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qlora-bench-packing"))
    parser.add_argument("--out", type=Path, default=Path("packing.json"))
    args = parser.parse_args()

    from gpu_train import synthetic_chats

    args.workdir.mkdir(parents=True, exist_ok=True)
    model = build_model(args.workdir)
    data = args.workdir / "chats.jsonl"
    synthetic_chats(data, args.examples)
    recipe = base_recipe(model, data, [])
    results = {"reference": run_reference(recipe, args.workdir), "ours": run_ours(recipe, args.workdir, args.budget)}
    for name, r in results.items():
        r["useful_tokens_per_second"] = r["useful_tokens"] / r["seconds"]
        r["non_pad_fraction"] = r["useful_tokens"] / r["computed_tokens"]
    ratio = results["ours"]["useful_tokens_per_second"] / results["reference"]["useful_tokens_per_second"]
    results["speedup"] = ratio
    args.out.write_text(json.dumps(results, indent=1))
    print(f"{'setup':<10} {'batch':>5} {'accum':>5} {'steps':>5} {'ckpt':>5} {'non-pad':>8} {'useful tok/s':>13} "
          f"{'held-out loss':>14} {'peak GiB':>9}")
    for name in ("reference", "ours"):
        r = results[name]
        print(f"{name:<10} {r['batch']:>5} {r['grad_accum']:>5} {r['steps']:>5} {r['gradient_checkpointing']!s:>5} "
              f"{r['non_pad_fraction']:>8.3f} "
              f"{r['useful_tokens_per_second']:>13,.0f} {r['eval_loss']:>14.4f} {r['peak_reserved_gib']:>9.2f}")
    print(f"useful tokens/s, ours over reference: {ratio:.2f}x")


if __name__ == "__main__":
    main()
