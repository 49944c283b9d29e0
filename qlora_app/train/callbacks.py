"""Trainer callbacks: a progress bar, a metrics log, checkpoint completion markers, and a clean stop on signals.

Under torchrun every rank runs them; rank 0 alone writes files."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import TrainerCallback

from qlora_app.console import err
from qlora_app.run.directory import COMPLETE_MARKER, RunDir
from qlora_app.train.distributed import barrier, max_over_ranks


class ProgressBar(TrainerCallback):
    """One rich bar: step, loss, eval loss, (dpo / orpo: reward margin and accuracy), tokens/s, elapsed and
    remaining time."""

    def __init__(self, tokens_per_step: float):
        self.tokens_per_step = tokens_per_step
        self.progress: Progress | None = None
        self.task = None
        self.loss = self.eval_loss = float("nan")
        self.rewards = ""
        self.start_time = self.start_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=err, transient=False)
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step, stats="")
        self.start_time, self.start_step = time.perf_counter(), state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        steps = state.global_step - self.start_step
        rate = steps * self.tokens_per_step / max(time.perf_counter() - self.start_time, 1e-9)
        self.progress.update(self.task, completed=state.global_step,
                             stats=f"loss {_fmt(self.loss)}  eval {_fmt(self.eval_loss)}{self.rewards}  "
                                   f"{rate:,.0f} tok/s")

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        self.loss = logs.get("loss", self.loss)
        self.eval_loss = logs.get("eval_loss", self.eval_loss)
        if "rewards/margins" in logs:  # trl's DPO and ORPO log them with the loss
            self.rewards = f"  margin {logs['rewards/margins']:.3f} acc {logs.get('rewards/accuracies', 0):.0%}"

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress:
            self.progress.stop()


def _fmt(value: float) -> str:
    return "-" if value != value else f"{value:.4f}"  # nan until the first log


class MetricsLog(TrainerCallback):
    """Appends every log record to metrics.jsonl (a resumed run continues the same file)."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:
            return
        record = {"step": state.global_step, "epoch": state.epoch, "time": time.time(), **(logs or {})}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


class CheckpointMarker(TrainerCallback):
    """Marks a checkpoint complete once the Trainer has written all of it, so a crash mid-save is detectable;
    from its first complete checkpoint on, the run is the one `latest` points to."""

    def __init__(self, run: RunDir):
        self.run = run

    def on_save(self, args, state, control, **kwargs):
        checkpoint = self.run.checkpoints / f"checkpoint-{state.global_step}"
        barrier()  # every rank has written its part (its RNG state) before the checkpoint counts as complete
        if state.is_world_process_zero and checkpoint.is_dir():
            (checkpoint / COMPLETE_MARKER).write_text(f"{state.global_step}\n")
            self.run.mark_latest()


class GracefulStop(TrainerCallback):
    """SIGINT/SIGTERM: finish the current step, save a checkpoint, stop. A second signal stops at once."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        err.print(f"[yellow]{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping "
                  "(resume with --resume)[/]")

    def on_step_end(self, args, state, control, **kwargs):
        # Ranks stop at the same step, whichever of them got the signal: one that stopped alone would leave
        # the others waiting for it in the next all-reduce.
        signum = max_over_ranks(self.received or 0)
        if signum:
            self.received = self.received or signum
            control.should_save = True
            control.should_training_stop = True
