"""`train --gpus N`: check once, create the run directory once, then start N ranks with torchrun.

The launcher runs torchrun's agent in this process (torch.distributed.run, from the argument list that
qlora_app.train.distributed builds), so a failure comes back as torch's ChildFailedError and is reported as the
failing rank's one line, and a SIGTERM/SIGINT reaches every rank exactly once (the agent forwards it; the
ranks are in sessions of their own, so a terminal's Ctrl-C does not reach them twice).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

from qlora_app import console
from qlora_app.errors import UserError
from qlora_app.plan import layout
from qlora_app.plan.layout import per_rank_grad_accum
from qlora_app.recipe.schema import Recipe
from qlora_app.run.directory import RunDir
from qlora_app.train.distributed import Nodes, node_command, torchrun_args


class RankFailed(UserError):
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def train_stage(recipe: Recipe, root: Path, resume: str | None, gpus: str, nodes: Nodes,
                as_started: bool = False) -> RunDir:
    """One GPU (the default): train in this process. More: through torchrun. as_started (--resume without
    --set): continue with the recipe the run was started with, whatever was overridden then."""
    nodes.check()
    count = gpu_count(gpus, visible_gpus())
    if resume and as_started:
        from qlora_app.train.stage import run_to_resume

        recipe = run_to_resume(recipe.name, root, resume).recipe()
    if count == 1 and nodes.count == 1:
        from qlora_app.train.stage import train

        return train(recipe, root, resume)
    return train_on_gpus(recipe, root, resume, count, nodes)


def cuda_present() -> bool:
    import torch

    return torch.cuda.is_available()


def visible_gpus() -> int | None:
    """CUDA devices this process sees; None without CUDA (ranks then train on CPU with gloo)."""
    import torch

    return torch.cuda.device_count() if cuda_present() else None


def gpu_count(gpus: str, visible: int | None) -> int:
    """The ranks --gpus asks for on this machine, checked against the `visible` GPUs (None: no CUDA)."""
    if gpus == "all":
        if not visible:
            raise UserError("--gpus all: no CUDA device is visible here; give a number instead (on CPU, that "
                            "many processes train with gloo)")
        return visible
    # str.isdigit() also accepts '²' and other digits int() refuses: only ASCII digits are a count
    if not (gpus.isascii() and gpus.isdigit()) or int(gpus) < 1:
        raise UserError(f"--gpus {gpus}: give a number of GPUs (1 or more) or 'all'")
    if visible is not None and int(gpus) > visible:
        raise UserError(f"--gpus {gpus}: only {visible} GPUs are visible here (CUDA_VISIBLE_DEVICES, nvidia-smi); "
                        f"give at most {visible}, or 'all'")
    return int(gpus)


def train_on_gpus(recipe: Recipe, root: Path, resume: str | None, gpus: int, nodes: Nodes) -> RunDir:
    from qlora_app.train.stage import prepare_run

    ranks = gpus * nodes.count
    per_rank_grad_accum(recipe.train.grad_accum, ranks)  # refused before anything loads
    run, checkpoint, _, _ = prepare_run(recipe, root, resume, ranks)
    chosen = layout.for_run(recipe, run, gpus, ranks)  # once, here: every rank must train the same layout
    batch, accum = chosen.layout.batch_size, chosen.layout.grad_accum
    per_rank = per_rank_grad_accum(accum, ranks)
    console.note(f"{ranks} ranks: accumulation {accum} -> {per_rank} per rank, {batch} sequences per rank and "
                 f"micro-batch: {batch * accum} per optimizer update, as on one GPU")
    if recipe.train.distributed == "fsdp" and not cuda_present():
        console.warn("train.distributed=fsdp shards across GPUs only (accelerate has no FSDP for CPU ranks): "
                     "these CPU ranks train data parallel, each holding the whole model")
    rank_args = [str(run.path), json.dumps(chosen.to_manifest())] + ([str(checkpoint)] if checkpoint else [])
    log_dir = str(run.path / "logs")
    for node in range(1, nodes.count):
        other = Nodes(nodes.count, node, nodes.addr, nodes.port)
        console.note(f"start node {node} with: {node_command(gpus, other, rank_args, log_dir)}")
    run_ranks(torchrun_args(gpus, nodes, rank_args, log_dir), run)
    return run


def run_ranks(args: list[str], run: RunDir) -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args
    from torch.distributed.run import run as torchrun

    for name in list(logging.Logger.manager.loggerDict):  # each sets its own level: the ranks' lines say it all
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default, without its warning
    for stale in (run.path / "logs").glob("rank-*.error"):  # a rank killed before it could write would be
        stale.unlink()  # reported by an earlier session's line (an old SIGTERM) instead
    try:
        with interruptible_until_ranks_start():
            torchrun(parse_args(args))
    except ChildFailedError as exc:
        raise first_error(run, {rank: f.exitcode for rank, f in exc.failures.items()}) from None
    except SignalException:
        raise first_error(run, {}) from None


@contextmanager
def interruptible_until_ranks_start():
    """Ctrl-C while torchrun's agent waits for the other nodes: that wait is in C++ (node 0's TCPStore, for up
    to 600 s), where Python runs no signal handler, so the KeyboardInterrupt would come only when it ends. A
    thread reads the signal from Python's wakeup fd (written by the C-level handler even then) and ends the
    process, as long as the agent has not installed its own handler: from then on it forwards the signal to the
    ranks it started and waits for them, as when a single node is stopped."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    before, default = signal.set_wakeup_fd(write_end), signal.getsignal(signal.SIGINT)

    def watch() -> None:
        while received := os.read(read_end, 1):
            if received[0] == signal.SIGINT and signal.getsignal(signal.SIGINT) is default:
                console.error("interrupted before any rank started (torchrun was waiting for every node to join)")
                os._exit(130)
        os.close(read_end)

    threading.Thread(target=watch, daemon=True, name="sigint-before-ranks").start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(before)
        os.close(write_end)  # the watcher reads end-of-file, closes its end and returns


def first_error(run: RunDir, exit_codes: dict[int, int]) -> RankFailed:
    """The error of the rank that failed first (the others fail because it did), else what torch saw."""
    found = []
    for path in (run.path / "logs").glob("rank-*.error"):
        stamp, code = path.read_text().splitlines()[0].split()
        found.append((int(stamp), int(code), int(path.stem.split("-")[1]), path.read_text().splitlines()[1]))
    if found:
        _, code, rank, message = min(found)
        interrupted = code in (130, 143)
        return RankFailed(message if interrupted else f"rank {rank}: {message} (log: {run.path / 'logs'})", code)
    rank, code = min(exit_codes.items()) if exit_codes else (0, 1)
    return RankFailed(f"rank {rank} ended with exit code {code} before it could say why; its output is in "
                      f"{run.path / 'logs'}", 1)
