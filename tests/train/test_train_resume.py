"""Nothing lost: a run stopped by SIGTERM or killed by SIGKILL resumes and ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, assert_one_line_error, interrupted_copy_of, run_cli

from qlora_app.recipe.loader import load_recipe
from qlora_app.run.directory import RunDir, checkpoint_step

pytestmark = pytest.mark.slow


def start_training(root: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "qlora_app", "train", "tiny", "--runs-dir", str(root)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"training ended early: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "timed out waiting for training to progress"
        time.sleep(0.1)


def logged_steps(root: Path) -> int:
    metrics = root / "tiny" / "latest" / "metrics.jsonl"
    if not metrics.is_file():
        return 0
    return max((json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()), default=0)


def final_eval_loss(run: Path) -> float:
    return RunDir(run).read_manifest()["losses"]["final_eval_loss"]


def train_losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def assert_resumed_like_uninterrupted(resumed: Path, uninterrupted: Path, resumed_at: int) -> None:
    """After the resume point the run retraces the uninterrupted one (weights, optimizer, scheduler, data
    position and RNG all restored) and ends at the same held-out loss."""
    mine, reference = train_losses(resumed), train_losses(uninterrupted)
    log_every = load_recipe("tiny").train.log_steps  # a logged loss averages the steps since the last log
    after = [step for step in mine if step >= resumed_at + log_every]
    assert after
    for step in after:
        assert mine[step] == pytest.approx(reference[step], rel=1e-3), step
    assert final_eval_loss(resumed) == pytest.approx(final_eval_loss(uninterrupted), rel=1e-3, abs=1e-4)


def test_sigterm_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(tmp_path, trained_run):
    proc = start_training(tmp_path)
    wait_for(lambda: logged_steps(tmp_path) >= 20, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    run = RunDir((tmp_path / "tiny" / "latest").resolve())
    assert "continue with: qlora-app train tiny --resume" in stderr and "Traceback" not in stderr
    assert run.read_manifest()["status"] == "interrupted"
    checkpoints = run.complete_checkpoints()
    stopped_at = checkpoint_step(checkpoints[-1]) if checkpoints else 0
    assert stopped_at >= 20  # saved where it stopped

    resumed = run_cli("train", "tiny", "--runs-dir", str(tmp_path), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_resumed_like_uninterrupted(run.path, trained_run.path, stopped_at)
    t = run.read_manifest()["training"]  # this session's figures: its training fits in its stage
    assert t["train_seconds"] <= t["stage_seconds"] and t["train_seconds_all_sessions"] > t["train_seconds"]


def test_sigkill_mid_run_resumes_from_last_complete_checkpoint(tmp_path, trained_run):
    proc = start_training(tmp_path)
    run_path = lambda: (tmp_path / "tiny" / "latest").resolve()
    wait_for(lambda: (tmp_path / "tiny" / "latest").exists() and RunDir(run_path()).complete_checkpoints(), proc)
    proc.kill()
    proc.communicate(timeout=60)
    run = RunDir(run_path())
    newest = run.complete_checkpoints()[-1]
    # what a process killed while saving leaves behind: a newer checkpoint folder, half written
    broken = run.checkpoints / "checkpoint-999"
    broken.mkdir()
    (broken / "adapter_model.safetensors").write_bytes(b"\0" * 100)

    resumed = run_cli("train", "tiny", "--runs-dir", str(tmp_path), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "skipping checkpoint-999" in resumed.stderr
    assert f"resuming from {newest.name}" in resumed.stderr
    assert not broken.exists()
    assert RunDir(run.path).read_manifest()["status"] == "finished"
    assert_resumed_like_uninterrupted(run.path, trained_run.path, checkpoint_step(newest))


def test_resume_without_a_run_is_a_clear_error(tmp_path):
    result = run_cli("train", "tiny", "--runs-dir", str(tmp_path), "--resume")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: nothing to resume: no run of recipe 'tiny' under {tmp_path}"]


@pytest.fixture()
def interrupted_copy(trained_run, tmp_path) -> RunDir:
    """A copy of the session's run marked interrupted, its data a copy of the tiny data of its own."""
    return interrupted_copy_of(trained_run.path, tmp_path, "capitals.jsonl")


@pytest.mark.slow
def test_resuming_after_the_data_changed_is_refused_before_weights_load(interrupted_copy):
    run = interrupted_copy
    data = Path(run.recipe().data.source)
    data.write_text(data.read_text().replace("Dateul", "Dateulo"))
    before = run.metrics.read_text()
    result = run_cli("train", "tiny", "--set", f"data.source={data}", "--resume", str(run.path))
    assert_one_line_error(result, f"the data of {run.path} changed since it started", "start a new run")
    assert run.metrics.read_text() == before and run.complete_checkpoints()


@pytest.mark.slow
def test_restarting_a_run_without_a_complete_checkpoint_drops_what_it_logged(interrupted_copy):
    from qlora_app.train.stage import resume_point

    run = interrupted_copy
    shutil.rmtree(run.checkpoints)
    assert run.read_metrics()
    assert resume_point(run) is None
    assert run.read_metrics() == []  # the restart logs its steps afresh: no step twice


SHORT = ("--set", "train.max_steps=20", "--set", "train.save_steps=10")  # checkpoint-10, then checkpoint-20
# checkpoint-20 runs out of space in optimizer.pt (torch.save; tests/test_disk_full.py covers safetensors' own
# error type): what the Trainer writes into a checkpoint before it
FAILING = "optimizer.pt"
WRITTEN_BEFORE = ["README.md", "adapter_model.safetensors", "adapter_config.json", "chat_template.jinja",
                  "tokenizer_config.json", "tokenizer.json", "training_args.bin"]
RUN_FILES = 64 * 1024  # recipe, manifest, metrics, tensorboard events, markers: a few pages each


def pages(size: int) -> int:
    return -(-size // 4096) * 4096


def room_to_fail_halfway(reference: Path) -> int:
    """Free space that lets the short run write checkpoint-10 whole, then runs out halfway through FAILING in
    checkpoint-20 (sizes from a complete checkpoint of the same model, tmpfs counting whole pages)."""
    checkpoint = sum(pages(p.stat().st_size) for p in reference.iterdir())
    before = sum(pages((reference / name).stat().st_size) for name in WRITTEN_BEFORE)
    return RUN_FILES + checkpoint + before + (reference / FAILING).stat().st_size // 2


def test_disk_full_while_saving_a_checkpoint_is_one_line_and_keeps_the_last_one(small_disk, trained_run):
    """The disk is full in the middle of torch.save writing checkpoint-20's optimizer state (never in a
    metrics append): one line, and checkpoint-10 is intact and resumable."""
    from safetensors.torch import load_file

    reference = RunDir(trained_run.path).complete_checkpoints()[-1]
    filler = small_disk.fill(leave=room_to_fail_halfway(reference))
    result = small_disk.run_cli("train", "tiny", "--runs-dir", str(small_disk.path), *SHORT)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: disk full while training into") and "(checkpoint-10 is intact)" in last_line

    (run_path,) = [p for p in (small_disk.outside / "tiny").iterdir() if p.is_dir() and not p.is_symlink()]
    run = RunDir(run_path)
    partial = run.checkpoints / "checkpoint-20"
    assert partial.is_dir() and partial in run.incomplete_checkpoints()  # it failed while saving checkpoint-20,
    assert all((partial / name).is_file() for name in WRITTEN_BEFORE)  # after what comes before the optimizer,
    adapter = "adapter_model.safetensors"  # the adapter whole,
    assert (partial / adapter).stat().st_size == (reference / adapter).stat().st_size
    assert (partial / FAILING).stat().st_size < (reference / FAILING).stat().st_size  # in the middle of it
    assert [checkpoint_step(p) for p in run.complete_checkpoints()] == [10]
    assert load_file(run.complete_checkpoints()[0] / "adapter_model.safetensors")  # intact and loadable

    filler.unlink()
    resumed = small_disk.run_cli("train", "tiny", "--runs-dir", str(small_disk.path), "--resume", *SHORT)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "skipping checkpoint-20" in resumed.stderr and "resuming from checkpoint-10" in resumed.stderr
    assert run.read_manifest()["status"] == "finished"


def test_resume_without_set_continues_a_run_started_with_set(tmp_path):
    """A run started with `train tiny --set ...` and stopped prints `qlora-app train tiny --resume`: that command
    continues it with the recipe it was started with (it was refused as 'a different recipe')."""
    run = RunDir.create(load_recipe("tiny", ["train.max_steps=2", "train.eval_steps=2"]), tmp_path)
    run.mark_latest()  # stopped before its first checkpoint: resumed from the start
    result = run_cli("train", "tiny", "--runs-dir", str(tmp_path), "--resume")
    assert result.returncode == 0, result.stderr[-2000:]
    assert run.finished and run.read_manifest()["training"]["steps"] == 2
