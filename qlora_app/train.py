"""The train stage: QLoRA supervised fine-tuning of a recipe into a run directory.

Order matters: the recipe, the tokenizer and every data record are checked before a single weight loads.
Then the base loads in 4-bit (or 16-bit for plain LoRA), LoRA wraps it, and trl's SFTTrainer trains on
pre-tokenized, assistant-only-labelled examples, packed without cross-contamination (padding-free batches with
per-example positions). The run directory receives the adapter with its tokenizer, metrics, a loss curve and a
manifest; checkpoints make a killed run resumable.
"""

from __future__ import annotations

import errno
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from qlora_app import console, layout
from qlora_app.data import Records, load_splits
from qlora_app.encoding import Encoded, encode, load_tokenizer
from qlora_app.errors import UserError
from qlora_app.recipe import Recipe
from qlora_app.run_dir import RunDir, checkpoint_step, latest_run, utc_timestamp, write_json_atomic

PAGED_OR_8BIT = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit")


class TrainingInterrupted(UserError):
    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


@dataclass(frozen=True)
class PreparedData:
    train: Encoded
    eval: Encoded
    train_records: Records
    eval_records: Records


def prepare_data(recipe: Recipe, tokenizer) -> PreparedData:
    train_records, eval_records = load_splits(recipe.data)
    train = encode(train_records, tokenizer, recipe.data.max_length)
    held_out = encode(eval_records, tokenizer, recipe.data.max_length)
    return PreparedData(train, held_out, train_records, eval_records)


def find_resumable(recipe: Recipe, root: Path, resume: str) -> tuple[RunDir, Path | None]:
    """The run to continue and the checkpoint to continue from (None: from the start)."""
    run = latest_run(recipe.name, root) if resume == "latest" else RunDir(Path(resume))
    if run is None or not run.recipe_file.is_file():
        raise UserError(f"nothing to resume: no run of recipe '{recipe.name}' under {root}")
    if run.finished:
        raise UserError(f"run {run.path} already finished; start a new one without --resume")
    if run.recipe().training_fields() != recipe.training_fields():
        raise UserError(f"run {run.path} was started with a different recipe; resume it without --set, "
                        "or start a new run")
    for broken in run.incomplete_checkpoints():
        console.err.print(f"[yellow]warning:[/] skipping {broken.name}: it was not completely written "
                          "(the process died while saving); removing it")
        shutil.rmtree(broken)
    complete = run.complete_checkpoints()
    if not complete:
        console.note(f"{run.path} has no complete checkpoint yet: training it from the start")
        return run, None
    console.note(f"resuming from {complete[-1].name}")
    run.rewind_metrics(checkpoint_step(complete[-1]))
    return run, complete[-1]


def train(recipe: Recipe, root: Path, resume: str | None = None) -> RunDir:
    started = time.time()
    run, checkpoint = find_resumable(recipe, root, resume) if resume else (None, None)
    tokenizer = load_tokenizer(recipe)
    data = prepare_data(recipe, tokenizer)
    print_data_summary(recipe, data)
    run = run or RunDir.create(recipe, root)  # only once the data is known to be good
    console.note(f"run directory: {run.path}")
    manifest = run.read_manifest() or initial_manifest(recipe, run, data, tokenizer)
    manifest["status"] = "running"
    chosen = layout.from_manifest(manifest["layout"]) if "layout" in manifest else layout.for_this_machine(recipe)
    console.note(chosen.describe())
    manifest["layout"] = chosen.to_manifest()
    write_json_atomic(run.manifest, manifest)

    trainer, stopper = build_trainer(layout.apply(recipe, chosen), run, data, tokenizer)
    if checkpoint is None:
        manifest["losses"]["base_eval_loss"] = trainer.evaluate()["eval_loss"]
    stopper.install()
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise UserError(f"disk full while training into {run.path}: free space and resume with --resume "
                            "(the last complete checkpoint is intact)") from None
        raise
    finally:
        stopper.uninstall()
    if stopper.received is not None:
        manifest["status"] = "interrupted"
        write_json_atomic(run.manifest, manifest)
        last = run.complete_checkpoints()
        raise TrainingInterrupted(
            f"training stopped by {signal.Signals(stopper.received).name} at step "
            f"{trainer.state.global_step}; {last[-1].name if last else 'no checkpoint'} saved in {run.checkpoints}; "
            f"continue with: qlora-app train {recipe.name} --resume", stopper.received)

    from qlora_app import train_outputs

    final_eval = trainer.evaluate()["eval_loss"]
    train_outputs.save_adapter(trainer.model, tokenizer, recipe, run, data.train.end_of_turn_id)
    train_outputs.finish(run, manifest, trainer, final_eval, time.time() - started, data)
    return run


def build_trainer(recipe: Recipe, run: RunDir, data: PreparedData, tokenizer):
    import os

    import datasets
    from peft import get_peft_model
    from transformers import PrinterCallback, set_seed
    from trl import SFTTrainer

    from qlora_app import attention
    from qlora_app.callbacks import CheckpointMarker, GracefulStop, MetricsLog, ProgressBar
    from qlora_app.model_loading import load_base, lora_config, prepare_for_training
    from qlora_app.throughput import StepTimer

    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run.tensorboard)
    datasets.disable_progress_bars()  # packing a dataset takes a moment; its bars would only clutter
    set_seed(recipe.train.seed)  # before LoRA's random init, so a resumed run starts from the same adapter
    model = load_base(recipe, attention.resolve(recipe.train.attention).implementation)
    prepare_for_training(model, recipe)
    model = get_peft_model(model, lora_config(recipe))
    stopper = GracefulStop()
    trainer = SFTTrainer(
        model=model,
        args=sft_config(recipe, run),
        train_dataset=data.train.to_dataset(),
        eval_dataset=data.eval.to_dataset(),
        processing_class=tokenizer,
        callbacks=[MetricsLog(run.metrics), CheckpointMarker(), stopper, StepTimer()],
    )
    # trl casts the adapters of a quantized model to bf16 (the QLoRA paper's choice). Keep them fp32, peft's
    # default: Adam's small updates survive, and a resumed run (peft reloads adapters in fp32) continues with
    # exactly the precision it started with. Costs 4 bytes instead of 2 per trainable parameter.
    for param in trainer.model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    trainer.remove_callback(PrinterCallback)  # the progress bar and metrics.jsonl show what it would print
    trainer.add_callback(ProgressBar(tokens_per_step(trainer, recipe)))
    return trainer, stopper


def sft_config(recipe: Recipe, run: RunDir):
    import torch
    from trl import SFTConfig

    t, d = recipe.train, recipe.data
    cuda = torch.cuda.is_available()
    optimizer = t.optimizer
    if not cuda and optimizer in PAGED_OR_8BIT:
        console.note(f"no CUDA device: using adamw_torch instead of {optimizer} (paged and 8-bit optimizers "
                     "need a GPU)")
        optimizer = "adamw_torch"
    compute = recipe.quantization.compute_dtype if recipe.quantization.enabled else recipe.model.dtype
    return SFTConfig(
        output_dir=str(run.checkpoints),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a fraction of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=optimizer,
        bf16=compute == "bfloat16",
        fp16=compute == "float16" and cuda,
        gradient_checkpointing=False,  # prepare_for_training already set it up as the recipe says
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.log_steps,
        eval_strategy="steps",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        report_to=list(t.report_to),
        max_length=d.max_length,
        packing=d.packing,
        packing_strategy="bfd",
        padding_free=d.packing,
        # trl shuffles the packed sequences once with the seed; visiting them in that order every epoch makes
        # the data order a pure function of the step, so a resumed run sees exactly what it would have seen.
        shuffle_dataset=True,
        train_sampling_strategy="sequential",
        disable_tqdm=True,
        # The loss is only read at log steps: checking it for nan/inf at every micro-step is a host-device sync.
        logging_nan_inf_filter=False,
        # Batches are pre-tokenized rows that collate in microseconds: a worker process would cost more than it
        # hides. Pinned memory lets the copy to the GPU run asynchronously.
        dataloader_num_workers=0,
        dataloader_pin_memory=cuda,
        accelerator_config={"non_blocking": cuda},
        use_cpu=not cuda,
    )


def tokens_per_step(trainer, recipe: Recipe) -> float:
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    return sum(lengths) / len(lengths) * recipe.train.batch_size * recipe.train.grad_accum


def initial_manifest(recipe: Recipe, run: RunDir, data: PreparedData, tokenizer) -> dict:
    from qlora_app.train_outputs import environment

    eot = data.train.end_of_turn_id
    return {
        "status": "running",
        "recipe": recipe.name,
        "run_id": run.path.name,
        "created": utc_timestamp(),
        **environment(),
        "model": {"path": recipe.model.path, "revision": recipe.model.revision, "method": recipe.method},
        "data": {
            "source": recipe.data.source,
            "format": data.train_records.format,
            "train_examples": len(data.train.input_ids),
            "eval_examples": len(data.eval.input_ids),
            "dropped_too_long": data.train.dropped_too_long + data.eval.dropped_too_long,
            "truncated": data.train.truncated + data.eval.truncated,
            "train_tokens": data.train.tokens,
            "train_label_tokens": data.train.label_tokens,
            "fingerprint": data.train_records.fingerprint,
            "eval_fingerprint": data.eval_records.fingerprint,
        },
        "chat": {
            "end_of_turn_id": eot,
            "end_of_turn_token": tokenizer.convert_ids_to_tokens(eot) if eot is not None else None,
            "pad_token": tokenizer.pad_token,
        },
        "losses": {},
    }


def print_data_summary(recipe: Recipe, data: PreparedData) -> None:
    dropped = data.train.dropped_too_long + data.eval.dropped_too_long
    truncated = data.train.truncated + data.eval.truncated
    console.note(
        f"data: {len(data.train.input_ids)} train / {len(data.eval.input_ids)} eval examples "
        f"({data.train_records.format}), {data.train.tokens:,} train tokens of which {data.train.label_tokens:,} "
        f"are learned")
    if dropped or truncated:
        console.err.print(f"[yellow]warning:[/] {dropped} examples longer than data.max_length="
                          f"{recipe.data.max_length} were dropped, {truncated} truncated")
