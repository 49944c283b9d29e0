"""The merge stage: a trained run's adapter folded into a standard 16-bit Hugging Face model.

Never into the 4-bit model: the base checkpoint is streamed shard by shard from its safetensors files, each
targeted weight gets scaling x B x A added (in fp32, rounded once, as peft's merge_and_unload does), and the
shard is written out, so peak memory is about one shard plus the adapter rather than the whole model. The
result lands in run/merged atomically, with the training tokenizer, its chat template, a generation config
that stops at the template's end-of-turn token, and a model card.
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from qlora_app import console
from qlora_app.errors import UserError
from qlora_app.hub import access
from qlora_app.machine.atomic import clean_stale, staged_dir, write_json_atomic, write_text_atomic
from qlora_app.merge.safetensors_stream import DTYPES, StreamWriter, entries, iter_tensors, read_header
from qlora_app.merge.verify import (
    LOGIT_TOLERANCE,
    AdapterLosses,
    MergedCheck,
    adapter_losses,
    compare_merged,
    preference_warning,
)
from qlora_app.model import tiny
from qlora_app.model.loading import nf4_round_trip, quantized_weight_names
from qlora_app.recipe.schema import MergeSpec, Recipe, lora_scaling
from qlora_app.run.directory import RunDir

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "generation_config.json")
ADAPTER_PREFIX = "base_model.model."
FLOAT_DTYPES = ("bfloat16", "float16", "float32", "float64")


@dataclass(frozen=True)
class Delta:
    lora_a: object  # torch.Tensor (r, in)
    lora_b: object  # torch.Tensor (out, r)


def merge(run: RunDir, settings: MergeSpec | None = None, verify: bool = True) -> Path:
    """Merge with `settings` (default: the run's own merge section) into run/merged."""
    started = time.time()
    recipe = run.recipe()
    recipe = recipe.model_copy(update={"merge": settings}) if settings else recipe
    check_run(run, recipe)
    config = json.loads((run.adapter / "adapter_config.json").read_text())
    deltas = load_deltas(run.adapter)
    scaling = lora_scaling(config["lora_alpha"], config["r"], bool(config.get("use_rslora")))
    source = base_checkpoint(recipe)
    shards = shard_files(source)
    check_fit(deltas, source, shards)
    check_disk(source, shards, run.path)
    losses = adapter_losses(recipe, run.adapter, source) if verify else None
    mode, why = choose_base_weights(recipe, losses)
    rounded = quantized_weight_names(recipe, source) if mode == "dequantized" else frozenset()
    clean_stale(run.path, "merged")
    with staged_dir(run.merged) as staging:
        for shard in console_progress(shards):
            merge_shard(source / shard, staging / shard, deltas, scaling, recipe.merge.dtype, rounded, recipe)
        write_companions(source, staging, run, recipe)
        report = {"adapter_sha256": adapter_fingerprint(run), "settings": recipe.merge.model_dump(),
                  "base_weights": mode, "base_weights_reason": why, "verified": verify, "shards": len(shards),
                  "merged_weights": len(deltas), "nf4_rounded_weights": len(rounded),
                  "merge_seconds": round(time.time() - started, 1),
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        if verify:
            report["verification"] = check_merged(recipe, run, staging, source, losses, mode, why)
        write_json_atomic(staging / "merge_report.json", report)
        write_text_atomic(staging / "README.md", card(run, staging))
    console.note(f"merged model: {run.merged} ({len(deltas)} weights merged into {mode} base weights)")
    return run.merged


def merge_settings(run: RunDir, overrides: tuple[str, ...], base_weights: str | None) -> MergeSpec:
    """The run's merge settings with the user's merge.* overrides (and --base-weights) applied."""
    from qlora_app.recipe.loader import load_recipe

    others = [o for o in overrides if not o.startswith("merge.")]
    if others:
        raise UserError(f"merge takes only merge.* settings (got {others[0]!r}): the rest of the recipe is the "
                        "run's own")
    overrides = (*overrides, f"merge.base_weights={base_weights}") if base_weights else overrides
    return load_recipe(str(run.recipe_file), overrides).merge


def choose_base_weights(recipe: Recipe, losses: AdapterLosses | None) -> tuple[str, str]:
    """(base weights to merge into, why) for merge.base_weights, auto resolved with the held-out losses."""
    wanted = recipe.merge.base_weights
    if wanted != "auto":
        return wanted, f"merge.base_weights={wanted}"
    if not recipe.quantization.enabled:
        return "original", "the adapter was trained on the original 16-bit weights"
    if losses is None:
        return "dequantized", "the weights the adapter was trained on (no held-out check: --no-verify)"
    return losses.closest_to_trained()


def is_current(run: RunDir, settings: MergeSpec | None = None, verified: bool = False) -> bool:
    """run/merged was made from the adapter as it is now, with these merge settings (None: whichever), and
    checked against base + adapter when the caller would have checked it (`verified`)."""
    if not run.merge_report.is_file() or not (run.adapter / "adapter_model.safetensors").is_file():
        return False
    made = json.loads(run.merge_report.read_text())
    same_settings = settings is None or made.get("settings") == settings.model_dump()
    checked = not verified or "verification" in made  # merge --no-verify records no verification
    return same_settings and checked and made.get("adapter_sha256") == adapter_fingerprint(run)


def adapter_fingerprint(run: RunDir) -> str:
    """Which adapter a merged model came from: the pipeline re-merges when it changes."""
    import hashlib

    with open(run.adapter / "adapter_model.safetensors", "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_merged(recipe: Recipe, run: RunDir, staging: Path, source: Path, losses: AdapterLosses, mode: str,
                 why: str) -> dict:
    check = compare_merged(recipe, run.adapter, staging, source, mode)
    print_verification(losses, check, why)
    if check.relative_logit_diff > LOGIT_TOLERANCE:
        raise UserError(f"the merged model diverges from base + adapter (largest logit difference "
                        f"{check.max_logit_diff:.3f}, {check.relative_logit_diff:.1%} of the logit scale); "
                        "nothing was written")
    trained = losses.on_4bit
    if trained is not None and check.loss_merged > trained * (1 + recipe.merge.max_loss_increase):
        console.warn(f"the merged model's held-out loss ({check.loss_merged:.4f}) is more than "
                     f"{recipe.merge.max_loss_increase:.1%} above the adapter on its 4-bit base ({trained:.4f}): "
                     "it answers somewhat differently from the model that was trained")
    if warning := preference_warning(losses.preference, check.preference):
        console.warn(warning)
    return {"examples": losses.examples, "max_logit_diff": check.max_logit_diff,
            "relative_logit_diff": check.relative_logit_diff, "loss_adapter_on_4bit": losses.on_4bit,
            "loss_adapter_on_original": losses.on_original, "loss_adapter_on_dequantized": losses.on_dequantized,
            "loss_merged": check.loss_merged, **preference_record(losses, check)}


def preference_record(losses: AdapterLosses, check: MergedCheck) -> dict:
    """The held-out preference scores of the adapter as trained and of the merged model (dpo/orpo runs)."""
    if losses.preference is None or check.preference is None:
        return {}
    return {"preference_pairs": check.preference.pairs, "preference_accuracy_adapter": losses.preference.accuracy,
            "preference_accuracy_merged": check.preference.accuracy,
            "preference_margin_adapter": losses.preference.margin, "preference_margin_merged": check.preference.margin,
            "preference_warning": preference_warning(losses.preference, check.preference)}


def print_verification(losses: AdapterLosses, check: MergedCheck, why: str) -> None:
    from rich.table import Table

    table = Table(title=f"merge check on {losses.examples} held-out examples", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    rows = [("held-out loss: adapter on the 4-bit base (as trained)", fmt(losses.on_4bit)),
            ("held-out loss: adapter on the original 16-bit base", fmt(losses.on_original)),
            ("held-out loss: adapter on dequantized NF4 weights", fmt(losses.on_dequantized)),
            ("merged into", f"{check.base_weights} base weights"),
            ("held-out loss: merged model", fmt(check.loss_merged)),
            ("largest logit difference, merged vs base + adapter", f"{check.max_logit_diff:.4f}")]
    if losses.preference is not None and check.preference is not None:
        rows += [(f"held-out preference accuracy ({check.preference.pairs} pairs): adapter as trained",
                  f"{losses.preference.accuracy:.1%}"),
                 ("held-out preference accuracy: merged model", f"{check.preference.accuracy:.1%}")]
    for row in rows:
        table.add_row(*row)
    table.caption = f"{check.base_weights}: {why}"
    console.out.print(table)


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def check_run(run: RunDir, recipe: Recipe) -> None:
    if recipe.merge.base_weights == "dequantized" and not recipe.quantization.enabled:
        raise UserError(f"{run.path} trained plain LoRA on 16-bit weights: merging into NF4-rounded "
                        "(dequantized) weights would change the base it learned on; use original or auto")
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
    if tiny.is_builtin(spec.path):
        return tiny.materialize(spec.path)
    if Path(spec.path).is_dir():
        return Path(spec.path)
    from huggingface_hub import snapshot_download

    with access.hub_errors(spec.path, spec.revision):
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


def merge_shard(src: Path, dst: Path, deltas: dict[str, Delta], scaling: float, dtype_name: str,
                rounded: frozenset[str], recipe: Recipe) -> None:
    """Stream one shard: read a tensor, round it through NF4 if it is in `rounded`, merge it if adapted, write
    it, forget it."""
    import torch

    dtype = getattr(torch, dtype_name)
    header, _ = read_header(src)
    layout = [(name, dtype if DTYPES[info["dtype"]] in FLOAT_DTYPES else getattr(torch, DTYPES[info["dtype"]]),
               tuple(info["shape"]))
              for name, info in entries(header)]
    with StreamWriter(dst, layout) as writer:
        for name, tensor in iter_tensors(src):
            weight = tensor.to(dtype) if tensor.is_floating_point() else tensor
            if name in rounded:
                weight = nf4_round_trip(weight, recipe)
            delta = deltas.get(name)
            if delta is not None:
                update = (delta.lora_b.float() @ delta.lora_a.float()) * scaling
                weight = (weight.float() + update).to(dtype)
            writer.write(name, weight)


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
    keep_stop_and_pad(staging)


def keep_stop_and_pad(folder: Path) -> None:
    """The merged model stops where its chat template ends a turn (vLLM stops at generation_config's eos ids), and
    pads with the training tokenizer's pad, never an eos id (config.json of many bases says pad = eos)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    generation = json.loads((folder / "generation_config.json").read_text())
    eos = generation.get("eos_token_id")
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    eos += [i for i in (end_of_turn_id(tokenizer), tokenizer.eos_token_id) if i is not None and i not in eos]
    pad = tokenizer.pad_token_id
    if pad is None or pad in eos:
        raise UserError(f"the training tokenizer pads with an end-of-sequence token ({pad}): train the run again "
                        "with this version of qlora-app")
    write_json_atomic(folder / "generation_config.json", {**generation, "eos_token_id": eos, "pad_token_id": pad})
    config = json.loads((folder / "config.json").read_text())
    write_json_atomic(folder / "config.json", {**config, "pad_token_id": pad})


def end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template puts right after an assistant's answer (None without a template)."""
    if not tokenizer.chat_template:
        return None
    answer = "ok"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": answer}],
                                         tokenize=False)
    end = text.rfind(answer) + len(answer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    special = set(tokenizer.all_special_ids)
    return next((i for i, (a, _) in zip(enc["input_ids"], enc["offset_mapping"]) if a >= end and i in special), None)


def card(run: RunDir, staging: Path) -> str:
    """The merged folder's card, naming the folder where it will be published."""
    from qlora_app.hub.card import CardFacts, base_license, render

    facts = CardFacts("merged", str(run.merged), base_license(run.recipe(), fetch=False), staging)
    return render(run, facts)


def console_progress(items: list[str]):
    from rich.progress import track

    return track(items, description="merge", console=console.err, transient=True)
