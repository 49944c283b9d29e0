"""The run directory's `latest` links, held by fast tests: they move only at a complete checkpoint or a finished
run, never when a run directory is merely created."""

import json
import os
import stat
from pathlib import Path

import pytest
from conftest import REPO
from transformers import TrainerState, TrainingArguments

from qlora_app.errors import UserError
from qlora_app.recipe.loader import dump_recipe, load_recipe
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


def test_runs_root_is_the_argument_else_the_environment_else_runs(monkeypatch):
    from qlora_app.run.directory import runs_root

    monkeypatch.setenv("QLORA_RUNS_DIR", "/from/env")
    assert runs_root("/given") == Path("/given") and runs_root() == Path("/from/env")
    monkeypatch.delenv("QLORA_RUNS_DIR")
    assert runs_root() == Path("runs")


def test_a_new_run_holds_its_resolved_recipe_readable_by_everyone(tmp_path):
    recipe = load_recipe("tiny", ["train.lr=0.001"])
    run = RunDir.create(recipe, tmp_path)
    assert run.path.parent == tmp_path / "tiny" and stat.S_IMODE(run.path.stat().st_mode) == 0o755
    assert run.recipe() == recipe and run.recipe_file.read_text() == dump_recipe(recipe)
    assert [getattr(run, name) for name in ("adapter", "checkpoints", "tensorboard", "metrics", "loss_curve",
                                            "manifest", "merged", "merge_report", "eval_report")] == [
        run.path / "adapter", run.path / "checkpoints", run.path / "tensorboard", run.path / "metrics.jsonl",
        run.path / "loss_curve.png", run.path / "manifest.json", run.path / "merged",
        run.path / "merged" / "merge_report.json", run.path / "eval.json"]


def test_metrics_skip_a_line_cut_short_and_rewind_to_a_step(tmp_path):
    run = RunDir.create(load_recipe("tiny"), tmp_path)
    assert run.read_metrics() == []
    run.metrics.write_text('{"step": 1, "loss": 2.0}\n{"loss": 1.9}\n{"step": 2, "lo\n{"step": 3, "loss": 1.5}\n')
    assert run.read_metrics() == [{"step": 1, "loss": 2.0}, {"loss": 1.9}, {"step": 3, "loss": 1.5}]
    run.rewind_metrics(2)
    assert run.metrics.read_text() == '{"step": 1, "loss": 2.0}\n{"loss": 1.9}\n'
    run.rewind_metrics(0)  # a record without a step was logged before the first one
    assert run.metrics.read_text() == '{"loss": 1.9}\n'
    run.rewind_metrics(-1)
    assert run.metrics.read_text() == ""


def test_manifest_gives_data_fingerprints_and_status(tmp_path):
    run = RunDir.create(load_recipe("tiny"), tmp_path)
    assert run.read_manifest() == {} and run.data_fingerprints() == (None, None) and not run.finished
    run.manifest.write_text(json.dumps({"status": "finished", "data": {"fingerprint": "a", "eval_fingerprint": "b"}}))
    assert run.data_fingerprints() == ("a", "b") and run.finished
    run.manifest.write_text(json.dumps({"status": "running"}))
    assert not run.finished


def test_incomplete_checkpoints_are_the_ones_without_the_marker(tmp_path):
    run = RunDir.create(load_recipe("tiny"), tmp_path)
    for step in (1, 2):
        (run.checkpoints / f"checkpoint-{step}").mkdir(parents=True)
    (run.checkpoints / "checkpoint-1" / COMPLETE_MARKER).write_text("1\n")
    assert run.incomplete_checkpoints() == [run.checkpoints / "checkpoint-2"]


def test_time_stamps_are_utc_whatever_the_local_time_zone(monkeypatch):
    import time
    from datetime import UTC, datetime

    from qlora_app.run.directory import file_stamp, utc_timestamp

    monkeypatch.setenv("TZ", "Asia/Kolkata")  # UTC+05:30 all year
    time.tzset()
    try:
        stamps = [datetime.strptime(utc_timestamp(), "%Y-%m-%dT%H:%M:%SZ"),
                  datetime.strptime(file_stamp(), "%Y%m%d-%H%M%S")]
    finally:
        monkeypatch.undo()
        time.tzset()
    for stamp in stamps:
        assert abs((datetime.now(UTC) - stamp.replace(tzinfo=UTC)).total_seconds()) < 60


def test_marking_again_moves_both_links_and_leaves_no_temporary_link(tmp_path):
    recipe = load_recipe("tiny")
    first, second = RunDir.create(recipe, tmp_path), RunDir.create(recipe, tmp_path)
    first.mark_latest()
    second.mark_latest()
    assert os.readlink(tmp_path / "tiny" / "latest") == second.path.name
    assert os.readlink(tmp_path / "latest") == f"tiny/{second.path.name}"
    assert latest_run("tiny", tmp_path) == RunDir(second.path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "tiny"]
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == sorted(["latest", first.path.name,
                                                                            second.path.name])


def test_find_run_takes_the_directory_given_then_the_recipes_latest_then_any_latest(tmp_path, capsys):
    from qlora_app.run.directory import find_run

    run = RunDir.create(load_recipe("tiny"), tmp_path)
    with pytest.raises(UserError) as no_run:
        find_run(None, None, tmp_path)
    assert str(no_run.value) == f"no trained run under {tmp_path}: train one first with: qlora-app train RECIPE"
    with pytest.raises(UserError) as no_recipe_run:
        find_run(None, "tiny", tmp_path)
    assert str(no_recipe_run.value) == (f"no run of recipe 'tiny' under {tmp_path}: train one first with: "
                                        "qlora-app train tiny")
    with pytest.raises(UserError) as not_a_run:
        find_run(str(tmp_path), None, tmp_path)
    assert str(not_a_run.value) == f"{tmp_path.resolve()} is not a run directory (no recipe.yaml)"
    assert find_run(str(run.path), None, tmp_path) == RunDir(run.path.resolve())
    run.mark_latest()
    assert find_run(None, "tiny", tmp_path) == RunDir(run.path.resolve())
    capsys.readouterr()
    assert find_run(None, None, tmp_path) == RunDir(run.path.resolve())
    assert " ".join(capsys.readouterr().err.split()) == f"using the latest run: {run.path.resolve()} (recipe tiny)"
