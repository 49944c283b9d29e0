"""The run directory's `latest` links, held by fast tests: they move only at a complete checkpoint or a finished
run, never when a run directory is merely created."""

import os

from conftest import REPO
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


def test_checkpoints_sort_by_step_not_by_name(tmp_path):
    run = RunDir.create(load_recipe("tiny"), tmp_path)
    for step in (10, 9, 100):
        (run.checkpoints / f"checkpoint-{step}").mkdir(parents=True)
        (run.checkpoints / f"checkpoint-{step}" / COMPLETE_MARKER).write_text(f"{step}\n")
    (run.checkpoints / "checkpoint-200").mkdir()  # saving was cut short: not complete
    assert [p.name for p in run.complete_checkpoints()] == ["checkpoint-9", "checkpoint-10", "checkpoint-100"]


def test_run_ids_start_with_their_utc_start_time_and_runs_list_newest_first(tmp_path):
    from qlora_app.run.directory import file_stamp, runs_of

    recipe = load_recipe("tiny")
    (tmp_path / "tiny").mkdir()
    older = RunDir((tmp_path / "tiny" / "20200101-000000-x"))
    older.path.mkdir()
    older.recipe_file.write_text((REPO / "recipes" / "tiny.yaml").read_text())
    newer = RunDir.create(recipe, tmp_path)
    assert newer.path.name.startswith(file_stamp()[:8]) and len(file_stamp()) == len("20200101-000000")
    assert runs_of("tiny", tmp_path) == [newer, older]


def test_no_latest_run_before_one_is_marked(tmp_path):
    RunDir.create(load_recipe("tiny"), tmp_path)
    assert latest_run("tiny", tmp_path) is None
