"""The run directory's `latest` links, held by fast tests: they move only at a complete checkpoint or a finished
run, never when a run directory is merely created."""

import os

from transformers import TrainerState, TrainingArguments

from qlora_app.recipe.loader import load_recipe
from qlora_app.run.directory import COMPLETE_MARKER, RunDir, latest_run
from qlora_app.train.callbacks import CheckpointMarker


def test_creating_a_run_leaves_latest_where_it_was(tmp_path):
    recipe = load_recipe("tiny")
    first = RunDir.create(recipe, tmp_path)
    first.mark_latest()
    RunDir.create(recipe, tmp_path)
    assert latest_run("tiny", tmp_path) == RunDir(first.path.resolve())
    assert (tmp_path / "latest").resolve() == first.path.resolve()


def test_latest_moves_at_the_first_complete_checkpoint(tmp_path):
    run = RunDir.create(load_recipe("tiny"), tmp_path)
    marker = CheckpointMarker(run)
    args = TrainingArguments(output_dir=str(run.checkpoints), report_to=[])
    state = TrainerState(global_step=5)
    marker.on_save(args, state, None)  # the Trainer did not write checkpoint-5 (a crash mid-save)
    assert not (tmp_path / "tiny" / "latest").exists() and run.complete_checkpoints() == []
    (run.checkpoints / "checkpoint-5").mkdir(parents=True)
    marker.on_save(args, state, None)
    assert (run.checkpoints / "checkpoint-5" / COMPLETE_MARKER).is_file()
    assert run.complete_checkpoints() == [run.checkpoints / "checkpoint-5"]
    assert os.readlink(tmp_path / "tiny" / "latest") == run.path.name
    assert os.readlink(tmp_path / "latest") == f"tiny/{run.path.name}"
