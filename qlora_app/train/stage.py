"""The train stage: QLoRA supervised fine-tuning of a recipe into a run directory.

Order matters: the recipe, the tokenizer and every data record are checked before a single weight loads.
Then the base loads in 4-bit (or 16-bit for plain LoRA), LoRA wraps it, and trl's SFTTrainer trains on
pre-tokenized, assistant-only-labelled examples, packed without cross-contamination (padding-free batches with
per-example positions). The run directory receives the adapter with its tokenizer, metrics, a loss curve and a
manifest; checkpoints make a killed run resumable.
"""

from __future__ import annotations

import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from qlora_app import console
from qlora_app.data.encoding import Encoded, encode, load_tokenizer
from qlora_app.data.sources import Records, load_splits
from qlora_app.errors import UserError
from qlora_app.machine.atomic import write_json_atomic
from qlora_app.machine.disk_full import is_disk_full
from qlora_app.machine.doctor import check_driver
from qlora_app.machine.gpu import query_gpu
from qlora_app.model.architecture import check_recipe, load_architecture
from qlora_app.plan import layout
from qlora_app.plan.report import out_of_memory_advice
from qlora_app.recipe.schema import Recipe
from qlora_app.run.directory import RunDir, checkpoint_step, latest_run, utc_timestamp
from qlora_app.train import distributed

PAGED_OR_8BIT = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit")


class TrainingInterrupted(UserError):
    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


@dataclass(frozen=True)
class PreparedData:
    train: Encoded  # or, for dpo / orpo, qlora_app.data.preference.EncodedPairs
    eval: Encoded
    train_records: Records
    eval_records: Records

    @property
    def examples(self) -> tuple[int, int]:
        """(train, eval) examples: sequences for SFT, chosen/rejected pairs for preference tuning."""
        return examples(self.train), examples(self.eval)


def examples(encoded) -> int:
    return len(encoded.input_ids) if hasattr(encoded, "input_ids") else len(encoded)


def prepare_data(recipe: Recipe, tokenizer) -> PreparedData:
    """Records of the method's shape (demonstrations for sft, chosen/rejected pairs for dpo/orpo), encoded."""
    if recipe.train.preference:
        from qlora_app.data.preference import encode_pairs as encoder
        from qlora_app.data.preference import load_pairs as loader
    else:
        loader, encoder = load_splits, encode
    train_records, eval_records = loader(recipe.data)
    kwargs = recipe.model.template_kwargs
    train = encoder(train_records, tokenizer, recipe.data.max_length, kwargs)
    held_out = encoder(eval_records, tokenizer, recipe.data.max_length, kwargs)
    return PreparedData(train, held_out, train_records, eval_records)


def find_resumable(recipe: Recipe, root: Path, resume: str, ranks: int = 1) -> RunDir:
    """The run to continue: the latest of the recipe, or the one named; it must not have finished and must have
    been started with the same training settings on as many ranks."""
    run = run_to_resume(recipe.name, root, resume)
    if run.recipe().training_fields() != recipe.training_fields():
        raise UserError(f"run {run.path} was started with a different recipe; resume it without --set, "
                        "or start a new run")
    check_same_ranks(run, ranks)
    return run


def run_to_resume(name: str, root: Path, resume: str) -> RunDir:
    """The latest run of recipe `name` (resume: latest), or the run named; one that has not finished."""
    run = latest_run(name, root) if resume == "latest" else RunDir(Path(resume))
    if run is None or not run.recipe_file.is_file():
        raise UserError(f"nothing to resume: no run of recipe '{name}' under {root}")
    if run.finished:
        raise UserError(f"run {run.path} already finished; start a new one without --resume")
    return run


def resume_point(run: RunDir) -> Path | None:
    """The newest complete checkpoint (None: train from the start), the run's logs cut back to it."""
    for broken in run.incomplete_checkpoints():
        console.warn(f"skipping {broken.name}: it was not completely written (the process died while saving); "
                     "removing it")
        shutil.rmtree(broken)
    complete = run.complete_checkpoints()
    if not complete:
        console.note(f"{run.path} has no complete checkpoint yet: training it from the start")
        run.rewind_metrics(-1)  # what the lost attempt logged would be logged again
        shutil.rmtree(run.tensorboard, ignore_errors=True)
        return None
    console.note(f"resuming from {complete[-1].name}")
    run.rewind_metrics(checkpoint_step(complete[-1]))
    return complete[-1]


def check_same_data(run: RunDir, data: PreparedData) -> None:
    """A resumed run must see the data it started on: two datasets mixed in one run would be a silent mess."""
    now = (data.train_records.fingerprint, data.eval_records.fingerprint)
    if run.data_fingerprints() not in (now, (None, None)):
        raise UserError(f"the data of {run.path} changed since it started ({run.recipe().data.source} holds "
                        "other records now): resuming would mix two datasets; start a new run without --resume")


def check_report_to(recipe: Recipe) -> None:
    import importlib.util

    for name in recipe.train.report_to:
        if importlib.util.find_spec(name) is None:
            raise UserError(f"train.report_to includes {name}, but the {name} package is not installed: "
                            f"pip install {name}, or drop it with --set 'train.report_to=[tensorboard]'")


def check_same_ranks(run: RunDir, ranks: int) -> None:
    manifest = run.read_manifest()
    before = manifest.get("ranks", 1)
    if before != ranks:
        flags = distributed.launch_flags(before, manifest.get("ranks_per_node", before)) or " --gpus 1"
        raise UserError(f"run {run.path} was trained on {before} rank(s): resume it with{flags}; its "
                        f"checkpoints hold one random state per rank, so {ranks} rank(s) would not continue "
                        "exactly the same run (start a new run to use another number of GPUs)")


def train(recipe: Recipe, root: Path, resume: str | None = None) -> RunDir:
    started = time.time()
    run, checkpoint, data, tokenizer = prepare_run(recipe, root, resume)
    return train_in(recipe, run, checkpoint, data, tokenizer, started, layout.for_run(recipe, run))


def prepare_run(recipe: Recipe, root: Path, resume: str | None, ranks: int = 1):
    """Everything checked before weights load; the run directory, created once the data is known to be good."""
    check_driver()
    check_report_to(recipe)
    if recipe.train.preference and not resume:
        from qlora_app.train.preference import resolve_init_run

        resolve_init_run(recipe, root)  # a finished run of the same model and LoRA shape, before anything loads
    load_architecture(recipe.model)  # a supported family, else one line naming those that are
    check_recipe(recipe)  # LoRA on the family's projections (vLLM serves adapters on them; peft drops a typo)
    run = find_resumable(recipe, root, resume, ranks) if resume else None
    if recipe.train.preference and run is not None:
        from qlora_app.train.preference import init_run_of

        init_run_of(recipe, run)  # the run it continues is still there
    tokenizer = load_tokenizer(recipe)
    data = prepare_data(recipe, tokenizer)
    if run is not None:
        check_same_data(run, data)
    checkpoint = resume_point(run) if run is not None else None
    print_data_summary(recipe, data)
    run = run or RunDir.create(recipe, root)  # only once the data is known to be good
    console.note(f"run directory: {run.path}")
    return run, checkpoint, data, tokenizer


def train_in(recipe: Recipe, run: RunDir, checkpoint: Path | None, data: PreparedData, tokenizer,
             started: float, chosen: layout.ChosenLayout) -> RunDir:
    """Train into an existing run directory with the layout chosen for it. Under torchrun every rank runs this
    (with the launcher's layout); rank 0 alone writes."""
    main, ranks = distributed.is_main(), distributed.world_size()
    free_gpu = query_gpu().free_bytes  # before our own weights take any
    manifest = run.read_manifest() or initial_manifest(recipe, run, data, tokenizer)
    console.note(chosen.describe())
    manifest.update(status="running", ranks=ranks, ranks_per_node=distributed.local_world_size(),
                    layout=chosen.to_manifest())
    if main:
        write_json_atomic(run.manifest, manifest)

    recipe = layout.apply(recipe, chosen)
    trainer, stopper = build_trainer(recipe, run, data, tokenizer)
    manifest["attention"] = trainer.model.config._attn_implementation  # what the model runs, fallbacks included
    # The base's held-out loss, measured by train() itself: an evaluate() before train() would leave accelerate
    # believing the model prepared, and it would then not wrap it in DDP (ranks would never sync gradients).
    # DPO's policy starts equal to its reference: its held-out loss at step 0 is log 2, nothing measured.
    trainer.args.eval_on_start = checkpoint is None and recipe.train.method != "dpo"
    import torch

    stopper.install()
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except torch.OutOfMemoryError:
        raise UserError(out_of_memory_advice(recipe, free_gpu)) from None
    except Exception as exc:
        if is_disk_full(exc, run.path):
            raise disk_full_error(run) from None
        raise
    finally:
        stopper.uninstall()
    if checkpoint is None:
        first = next((h for h in trainer.state.log_history if "eval_loss" in h), {})
        measured_at_start = trainer.args.eval_on_start and first.get("step") == 0
        manifest["losses"]["base_eval_loss"] = first["eval_loss"] if measured_at_start else None
    if stopper.received is not None:
        manifest["status"] = "interrupted"
        if main:
            write_json_atomic(run.manifest, manifest)
        distributed.barrier()  # no rank leaves (and gets its peers killed) before rank 0 has written
        last = run.complete_checkpoints()
        again = f"qlora-app train {recipe.name} --resume" + distributed.launch_flags(ranks,
                                                                                   distributed.local_world_size())
        raise TrainingInterrupted(
            f"training stopped by {signal.Signals(stopper.received).name} at step "
            f"{trainer.state.global_step}; {last[-1].name if last else 'no checkpoint'} saved in {run.checkpoints}; "
            f"continue with: {again}", stopper.received)

    from qlora_app.train import outputs

    final_eval = trainer.evaluate()["eval_loss"]
    if recipe.train.preference:
        from qlora_app.train import preference

        manifest["preference"] = preference.held_out_scores(trainer, data.eval)
        preference.drop_reference_adapter(trainer.accelerator.unwrap_model(trainer.model))
    if main:
        outputs.save_adapter(trainer.model, tokenizer, recipe, run, data.train.end_of_turn_id)
        outputs.finish(run, manifest, trainer, final_eval, time.time() - started, data)
    return run


def disk_full_error(run: RunDir) -> UserError:
    complete = run.complete_checkpoints()
    kept = f"{complete[-1].name} is intact" if complete else "no checkpoint was complete yet: it starts over"
    return UserError(f"disk full while training into {run.path}: free space and resume with --resume ({kept})")


def build_trainer(recipe: Recipe, run: RunDir, data: PreparedData, tokenizer):
    import os

    import datasets
    from transformers import PrinterCallback, set_seed

    from qlora_app.model.loading import load_base, prepare_for_training
    from qlora_app.train import attention
    from qlora_app.train.callbacks import CheckpointMarker, GracefulStop, MetricsLog, ProgressBar
    from qlora_app.train.throughput import StepTimer

    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run.tensorboard)
    datasets.disable_progress_bars()  # packing a dataset takes a moment; its bars would only clutter
    args = trainer_config(recipe, run)  # before loading: under FSDP it decides that only rank 0 reads the weights
    set_seed(recipe.train.seed)  # before LoRA's random init, so a resumed run starts from the same adapter
    model = load_base(recipe, attention.resolve(recipe.train.attention).implementation)
    prepare_for_training(model, recipe)
    stopper = GracefulStop()
    callbacks = [MetricsLog(run.metrics), CheckpointMarker(run), stopper, StepTimer()]
    if recipe.train.preference:
        from qlora_app.train import preference

        trainer = preference.build(recipe, model, preference.init_run_of(recipe, run), args, data, tokenizer,
                                   callbacks)
    else:
        trainer = sft_trainer(recipe, model, args, data, tokenizer, callbacks)
    # trl casts the adapters of a quantized model to bf16 (the QLoRA paper's choice). Keep them fp32, peft's
    # default: Adam's small updates survive, and a resumed run (peft reloads adapters in fp32) continues with
    # exactly the precision it started with. Costs 4 bytes instead of 2 per trainable parameter.
    for param in trainer.model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    trainer.remove_callback(PrinterCallback)  # the progress bar and metrics.jsonl show what it would print
    if distributed.is_main():
        trainer.add_callback(ProgressBar(tokens_per_step(trainer, recipe)))
    return trainer, stopper


def trainer_config(recipe: Recipe, run: RunDir):
    """trl's config for the recipe's method: SFTConfig, DPOConfig or ORPOConfig over the shared arguments."""
    common = training_arguments(recipe, run)
    if recipe.train.preference:
        from qlora_app.train import preference

        return preference.config(recipe, common)
    return sft_config(recipe, common)


def sft_trainer(recipe: Recipe, model, args, data: PreparedData, tokenizer, callbacks: list):
    from peft import get_peft_model
    from trl import SFTTrainer

    from qlora_app.model.loading import lora_config

    return SFTTrainer(model=get_peft_model(model, lora_config(recipe)), args=args,
                      train_dataset=data.train.to_dataset(), eval_dataset=data.eval.to_dataset(),
                      processing_class=tokenizer, callbacks=callbacks)


def sft_config(recipe: Recipe, common: dict):
    from trl import SFTConfig

    d = recipe.data
    return SFTConfig(
        **common,
        max_length=d.max_length,
        packing=d.packing,
        packing_strategy="bfd",
        padding_free=d.packing,
        # trl shuffles the packed sequences once with the seed; visiting them in that order every epoch makes
        # the data order a pure function of the step, so a resumed run sees exactly what it would have seen.
        shuffle_dataset=True,
        train_sampling_strategy="sequential",
    )


def training_arguments(recipe: Recipe, run: RunDir) -> dict:
    """The Trainer's arguments every method shares (trl's SFT, DPO and ORPO configs take them all)."""
    import torch

    t = recipe.train
    cuda = torch.cuda.is_available()
    optimizer = t.optimizer
    if not cuda and optimizer in PAGED_OR_8BIT:
        console.note(f"no CUDA device: using adamw_torch instead of {optimizer} (paged and 8-bit optimizers "
                     "need a GPU)")
        optimizer = "adamw_torch"
    compute = recipe.quantization.compute_dtype if recipe.quantization.enabled else recipe.model.dtype
    return dict(
        output_dir=str(run.checkpoints),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=layout.per_rank_grad_accum(t.grad_accum, distributed.world_size()),
        learning_rate=t.lr,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a fraction of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=optimizer,
        bf16=compute == "bfloat16",
        fp16=compute == "float16" and cuda,
        gradient_checkpointing=False,  # prepare_for_training already set it up as the recipe says
        ddp_find_unused_parameters=False,  # every adapter takes part in every forward pass
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.log_steps,
        eval_strategy="steps",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        report_to=list(t.report_to),
        disable_tqdm=True,
        # The loss is only read at log steps: checking it for nan/inf at every micro-step is a host-device sync.
        logging_nan_inf_filter=False,
        # Batches are pre-tokenized rows that collate in microseconds: a worker process would cost more than it
        # hides. Pinned memory lets the copy to the GPU run asynchronously.
        dataloader_num_workers=0,
        dataloader_pin_memory=cuda,
        accelerator_config={"non_blocking": cuda},
        use_cpu=not cuda,
        **distributed.fsdp_args(recipe),
    )


def tokens_per_step(trainer, recipe: Recipe) -> float:
    from qlora_app.train.outputs import sequences_of_rows

    lengths = [sum(row) for row in sequences_of_rows(trainer.train_dataset)]
    return sum(lengths) / len(lengths) * recipe.train.batch_size * recipe.train.grad_accum


def initial_manifest(recipe: Recipe, run: RunDir, data: PreparedData, tokenizer) -> dict:
    from qlora_app.train.outputs import environment

    eot = data.train.end_of_turn_id
    return {
        "status": "running",
        "recipe": recipe.name,
        "run_id": run.path.name,
        "created": utc_timestamp(),
        **environment(),
        "model": {"path": recipe.model.path, "revision": recipe.model.revision, "method": recipe.method},
        **training_method(recipe, run),
        "data": {
            "source": recipe.data.source,
            "format": data.train_records.format,
            "train_examples": data.examples[0],
            "eval_examples": data.examples[1],
            "dropped_too_long": data.train.dropped_too_long + data.eval.dropped_too_long,
            "truncated": truncated(data),
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


def training_method(recipe: Recipe, run: RunDir) -> dict:
    """train.method with its settings and, for preference tuning, the run it continues."""
    t = recipe.train
    if not t.preference:
        return {"training_method": {"method": "sft"}}
    from qlora_app.train.preference import chain, init_run_of

    settings = {"method": t.method, "beta": t.preference_beta,
                "loss_type": t.preference_loss if t.method == "dpo" else None}
    return {"training_method": settings, "chain": chain(init_run_of(recipe, run))}


def truncated(data: PreparedData) -> int:
    return getattr(data.train, "truncated", 0) + getattr(data.eval, "truncated", 0)  # pairs are dropped, never cut


def print_data_summary(recipe: Recipe, data: PreparedData) -> None:
    dropped = data.train.dropped_too_long + data.eval.dropped_too_long
    cut = truncated(data)
    train_n, eval_n = data.examples
    what = "pairs" if recipe.train.preference else "examples"
    console.note(
        f"data: {train_n} train / {eval_n} eval {what} ({data.train_records.format}), {data.train.tokens:,} train "
        f"tokens of which {data.train.label_tokens:,} are learned")
    if dropped or cut:
        console.warn(f"{dropped} {what} longer than data.max_length={recipe.data.max_length} were dropped, "
                     f"{cut} truncated")
