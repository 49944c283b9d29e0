"""The merge stage: a trained run's adapter folded into a standard 16-bit Hugging Face model.

Never into the 4-bit model: the base checkpoint is streamed shard by shard from its safetensors files, each
targeted weight gets scaling x B x A added (in fp32, rounded once, as peft's merge_and_unload does), and the
shard is written out, so peak memory is about one shard plus the adapter rather than the whole model. The
result lands in run/merged atomically, with the training tokenizer, its chat template, a generation config
that stops at the template's end-of-turn token, and a model card.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from qlora_app import console, hub, tiny_model
from qlora_app.errors import UserError
from qlora_app.recipe import Recipe
from qlora_app.run_dir import RunDir, write_json_atomic, write_text_atomic
from qlora_app.safetensors_stream import DTYPES, StreamWriter, entries, iter_tensors, read_header

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "generation_config.json")
ADAPTER_PREFIX = "base_model.model."
FLOAT_DTYPES = ("bfloat16", "float16", "float32", "float64")


@dataclass(frozen=True)
class Delta:
    lora_a: object  # torch.Tensor (r, in)
    lora_b: object  # torch.Tensor (out, r)


def merge(run: RunDir, base_weights: str | None = None, verify: bool = True) -> Path:
    started = time.time()
    recipe = run.recipe()
    mode = base_weights or recipe.merge.base_weights
    check_run(run)
    config = json.loads((run.adapter / "adapter_config.json").read_text())
    deltas = load_deltas(run.adapter)
    scaling = config["lora_alpha"] / (config["r"] ** 0.5 if config.get("use_rslora") else config["r"])
    source = base_checkpoint(recipe)
    shards = shard_files(source)
    check_fit(deltas, source, shards)
    check_disk(source, shards, run.path)
    clean_stale_staging(run.path)
    staging = Path(tempfile.mkdtemp(prefix=".merged-", dir=run.path))
    try:
        for shard in console_progress(shards):
            merge_shard(source / shard, staging / shard, deltas, scaling, recipe, mode)
        write_companions(source, staging, run, recipe)
        report = {"adapter_sha256": adapter_fingerprint(run), "base_weights": mode, "shards": len(shards),
                  "merged_weights": len(deltas),
                  "merge_seconds": round(time.time() - started, 1),
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        if verify:
            report["verification"] = check_merged(recipe, run, staging, source, mode)
        write_json_atomic(staging / "merge_report.json", report)
        write_text_atomic(staging / "README.md", card(run, staging))
        staging.chmod(0o755)
        publish(staging, run.path / "merged")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    console.note(f"merged model: {run.path / 'merged'} ({len(deltas)} weights merged, {mode} base weights)")
    return run.path / "merged"


def adapter_fingerprint(run: RunDir) -> str:
    """Which adapter a merged model came from: the pipeline re-merges when it changes."""
    import hashlib

    with open(run.adapter / "adapter_model.safetensors", "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_merged(recipe: Recipe, run: RunDir, staging: Path, source: Path, mode: str) -> dict:
    from qlora_app.merge_verify import LOGIT_TOLERANCE, verify

    result = verify(recipe, run.adapter, staging, source, mode)
    print_verification(result, mode)
    if result.relative_logit_diff > LOGIT_TOLERANCE:
        raise UserError(f"the merged model diverges from base + adapter (largest logit difference "
                        f"{result.max_logit_diff:.3f}, {result.relative_logit_diff:.1%} of the logit scale); "
                        "nothing was written")
    trained = result.loss_adapter_on_4bit
    if trained is not None and result.loss_merged > trained * (1 + recipe.merge.max_loss_increase):
        other = "dequantized" if mode == "original" else "original"
        console.err.print(f"[yellow]warning:[/] the merged model's held-out loss ({result.loss_merged:.4f}) is "
                          f"more than {recipe.merge.max_loss_increase:.1%} above the adapter on its 4-bit base "
                          f"({trained:.4f}); compare --base-weights {other}")
    return result.as_dict()


def print_verification(result, mode: str) -> None:
    from rich.table import Table

    table = Table(title=f"merge check on {result.examples} held-out examples", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    rows = [("largest logit difference, merged vs base + adapter", f"{result.max_logit_diff:.4f}"),
            ("held-out loss: adapter on the 4-bit base (as trained)", fmt(result.loss_adapter_on_4bit)),
            ("held-out loss: adapter on the original 16-bit base", fmt(result.loss_adapter_on_original)),
            ("held-out loss: adapter on dequantized NF4 weights", fmt(result.loss_adapter_on_dequantized)),
            (f"held-out loss: merged model ({mode} base weights)", fmt(result.loss_merged))]
    for row in rows:
        table.add_row(*row)
    console.out.print(table)


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def check_run(run: RunDir) -> None:
    missing = [name for name in ADAPTER_FILES if not (run.adapter / name).is_file()]
    if missing:
        raise UserError(f"{run.path} has no complete adapter (missing {', '.join(missing)}): train it first "
                        f"with: qlora-app train {run.path.parent.name}")
    if not (run.adapter / "tokenizer_config.json").is_file():
        raise UserError(f"{run.adapter} has no tokenizer: the run is incomplete; train it again")


def load_deltas(adapter: Path) -> dict[str, Delta]:
    """Base weight name -> (A, B), from peft's adapter file."""
    from safetensors.torch import load_file

    tensors = load_file(adapter / "adapter_model.safetensors")
    deltas = {}
    for key, a in tensors.items():
        if ".lora_A." not in key:
            if ".lora_B." not in key:
                raise UserError(f"{adapter}: the adapter holds '{key}', which a LoRA merge cannot fold in "
                                "(modules_to_save or another tuner)")
            continue
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        base_key = key.removeprefix(ADAPTER_PREFIX).replace(".lora_A.weight", ".weight")
        deltas[base_key] = Delta(a, b)
    return deltas


def base_checkpoint(recipe: Recipe) -> Path:
    """A local folder with the base model's safetensors files (downloaded from the Hub if needed)."""
    spec = recipe.model
    if tiny_model.is_builtin(spec.path):
        return tiny_model.materialize(spec.path)
    if Path(spec.path).is_dir():
        return Path(spec.path)
    from huggingface_hub import snapshot_download

    with hub.hub_errors(spec.path, spec.revision):
        return Path(snapshot_download(spec.path, revision=spec.revision,
                                      allow_patterns=["*.safetensors", "*.json", "tokenizer*"]))


def shard_files(source: Path) -> list[str]:
    index = source / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (source / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise UserError(f"{source} has no safetensors weights (model.safetensors or an index); "
                    "only safetensors checkpoints are merged")


def check_fit(deltas: dict[str, Delta], source: Path, shards: list[str]) -> None:
    from safetensors import safe_open

    shapes = {}
    for shard in shards:
        with safe_open(source / shard, "pt") as f:
            shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
    for key, delta in deltas.items():
        expected = (delta.lora_b.shape[0], delta.lora_a.shape[1])
        if key not in shapes:
            raise UserError(f"the adapter does not fit the base model: it adapts '{key}', which the base lacks")
        if shapes[key] != expected:
            raise UserError(f"the adapter does not fit the base model: '{key}' is {shapes[key]} in the base, "
                            f"the adapter expects {expected}")


def check_disk(source: Path, shards: list[str], target: Path) -> None:
    needed = int(sum((source / s).stat().st_size for s in shards) * 1.05)
    free = shutil.disk_usage(target).free
    if needed > free:
        raise UserError(f"merging needs about {needed / 1e9:.1f} GB free in {target}, only {free / 1e9:.1f} GB "
                        "is available")


def merge_shard(src: Path, dst: Path, deltas: dict[str, Delta], scaling: float, recipe: Recipe, mode: str) -> None:
    """Stream one shard: read a tensor, merge it if adapted, write it, forget it."""
    import torch

    dtype = getattr(torch, recipe.merge.dtype)
    header, _ = read_header(src)
    layout = [(name, dtype if DTYPES[info["dtype"]] in FLOAT_DTYPES else getattr(torch, DTYPES[info["dtype"]]),
               tuple(info["shape"]))
              for name, info in entries(header)]
    with StreamWriter(dst, layout) as writer:
        for name, tensor in iter_tensors(src):
            weight = tensor.to(dtype) if tensor.is_floating_point() else tensor
            delta = deltas.get(name)
            if delta is not None:
                if mode == "dequantized":
                    weight = nf4_round_trip(weight, recipe)
                update = (delta.lora_b.float() @ delta.lora_a.float()) * scaling
                weight = (weight.float() + update).to(dtype)
            writer.write(name, weight)


def nf4_round_trip(weight, recipe: Recipe):
    """The weight as the adapter saw it during training: dequant(quant(W)) with the recipe's settings."""
    import bitsandbytes.functional as bnbf

    q = recipe.quantization
    packed, state = bnbf.quantize_4bit(weight, quant_type=q.quant_type, compress_statistics=q.double_quant)
    return bnbf.dequantize_4bit(packed, state).to(weight.dtype)


def write_companions(source: Path, staging: Path, run: RunDir, recipe: Recipe) -> None:
    """config; tokenizer, chat template and the generation config that stops at end-of-turn, from training."""
    config = json.loads((source / "config.json").read_text())
    config["torch_dtype"] = config["dtype"] = recipe.merge.dtype
    write_json_atomic(staging / "config.json", config)
    index = source / "model.safetensors.index.json"
    if index.is_file():
        shutil.copy(index, staging / index.name)
    for path in run.adapter.iterdir():
        if path.is_file() and not path.name.startswith("adapter_") and path.name != "README.md":
            shutil.copy(path, staging / path.name)


def card(run: RunDir, staging: Path) -> str:
    """The merged folder's card, naming the folder where it will be published."""
    from qlora_app.model_card import CardFacts, base_license, render

    facts = CardFacts("merged", str(run.path / "merged"), base_license(run.recipe(), fetch=False), staging)
    return render(run, facts)


def clean_stale_staging(parent: Path) -> None:
    """Folders left by a merge that was killed: never a model, always safe to remove."""
    for stale in parent.glob(".merged-*"):
        shutil.rmtree(stale, ignore_errors=True)


def publish(staging: Path, target: Path) -> None:
    """Swap staging into target with renames: a reader sees the old model or the new one, never half of one."""
    old = None
    if target.exists():
        old = target.with_name(f".merged-old-{os.getpid()}")
        target.rename(old)
    staging.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def console_progress(items: list[str]):
    from rich.progress import track

    return track(items, description="merge", console=console.err, transient=True)
