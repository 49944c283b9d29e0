"""Two ranks on CPU (torchrun, gloo): the same adapter as one process with the same global batch, through a
SIGTERM and a resume; a rank that fails ends the run with its one line.

One 2-rank run serves every test here (stopped by SIGTERM, then resumed), against one 1-rank run with the
same settings: the session's `trained_run` uses the tiny recipe's own batch (4 x 1), which 2 ranks cannot
split without changing the batch per update.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, assert_one_line_error, run_cli
from safetensors.torch import load_file
from test_train_resume import train_losses, wait_for

from qlora_app.run.directory import RunDir, checkpoint_step

pytestmark = pytest.mark.slow

# 40 steps of one packed sequence per rank and micro-batch: 2 per update on 1 rank (grad_accum 2) and on 2
# (grad_accum 1 each). The tiny data packs into 10 sequences, a multiple of 2, so no rank ever sees a padded-out
# batch and both runs visit the same sequences in the same updates.
SETTINGS = ["--set", "train.max_steps=40", "--set", "train.batch_size=1", "--set", "train.grad_accum=2",
            "--set", "train.log_steps=1"]


def logged_steps(root: Path) -> int:
    """Steps logged so far by the one run under root (`latest` points to it only from its first checkpoint)."""
    found = list(root.glob("tiny/*/metrics.jsonl"))
    records = [json.loads(line) for line in found[0].read_text().splitlines() if line.strip()] if found else []
    return max((r["step"] for r in records), default=0)


def train(root: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run_cli("train", "tiny", "--runs-dir", str(root), *SETTINGS, *extra, env=env)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("one-rank")
    result = train(root, env={"OMP_NUM_THREADS": "1"})  # as each rank has: on 2 shared cores, 4x faster
    assert result.returncode == 0, result.stderr[-3000:]
    return (root / "tiny" / "latest").resolve()


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> tuple[RunDir, str]:
    """A 2-rank run stopped by SIGTERM to the launching process after its fifth step."""
    root = tmp_path_factory.mktemp("two-ranks")
    proc = subprocess.Popen([sys.executable, "-m", "qlora_app", "train", "tiny", "--runs-dir", str(root),
                             *SETTINGS, "--gpus", "2"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=os.environ)
    wait_for(lambda: logged_steps(root) >= 5, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    return RunDir((root / "tiny" / "latest").resolve()), stderr


def test_sigterm_stops_every_rank_at_one_checkpoint(interrupted):
    run, stderr = interrupted
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].endswith("continue with: qlora-app train tiny --resume --gpus 2")
    assert run.read_manifest()["status"] == "interrupted"
    (checkpoint,) = run.complete_checkpoints()
    assert checkpoint_step(checkpoint) >= 5
    assert {p.name for p in checkpoint.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert stderr.count("run directory:") == 1  # created once, by the launcher


def test_resume_with_another_number_of_ranks_is_refused(interrupted):
    run, _ = interrupted
    result = train(run.path.parent.parent, "--resume", str(run.path))
    assert_one_line_error(result, "was trained on 2 rank(s): resume it with --gpus 2")


def test_a_failing_rank_ends_the_run_with_its_own_line(interrupted, tmp_path):
    run, _ = interrupted
    copy = tmp_path / "tiny" / run.path.name
    shutil.copytree(run.path, copy)
    (checkpoint,) = RunDir(copy).complete_checkpoints()
    (checkpoint / "rng_state_1.pth").write_bytes(b"not a pickle")  # only rank 1 reads it

    result = train(tmp_path, "--resume", str(copy), "--gpus", "2")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: rank 1: "), last  # the rank that failed first, not rank 0 it took down
    assert (copy / "logs" / "rank-1.error").read_text().count("Traceback") == 1  # the details stay in the run


def test_two_ranks_resumed_train_the_adapter_of_one_rank(interrupted, one_rank):
    run, _ = interrupted
    resumed = train(run.path.parent.parent, "--resume", "--gpus", "2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert run.read_manifest()["status"] == "finished" and run.read_manifest()["ranks"] == 2

    # Same sequences per update, same seed: the runs differ only in the order float sums are taken in (two
    # half-batch gradients all-reduced vs. accumulated), about 1e-7 relative per step. 40 Adam steps at lr 3e-3
    # keep that far below 1e-3, while one different batch or a missing all-reduce moves losses by over 1e-2.
    # (On CPU with gloo the two came out bit-identical; the tolerance is for other reduction orders.)
    mine, reference = train_losses(run.path), train_losses(one_rank)
    assert mine.keys() == reference.keys()
    for step in mine:
        assert mine[step] == pytest.approx(reference[step], rel=1e-3), step
    two, one = (load_file(p / "adapter" / "adapter_model.safetensors") for p in (run.path, one_rank))
    assert two.keys() == one.keys()
    for name in one:
        assert (two[name] - one[name]).abs().max().item() <= 1e-3 * one[name].abs().max().item() + 1e-6, name
    manifest = json.loads((run.path / "manifest.json").read_text())
    assert manifest["losses"]["final_eval_loss"] == pytest.approx(
        RunDir(one_rank).read_manifest()["losses"]["final_eval_loss"], rel=1e-3)
