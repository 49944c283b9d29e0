"""What a resume takes and refuses, held by fast tests (no model loads): the run to continue, its checkpoint,
changed settings, data or number of ranks."""

import json

import pytest

from qlora_app.data.sources import load_splits
from qlora_app.errors import UserError
from qlora_app.recipe.loader import load_recipe
from qlora_app.run.directory import COMPLETE_MARKER, RunDir
from qlora_app.train.stage import (
    PreparedData,
    check_same_data,
    check_same_ranks,
    find_resumable,
    resume_point,
    run_to_resume,
)


def prepared(recipe) -> PreparedData:
    train, held_out = load_splits(recipe.data)
    return PreparedData(None, None, train, held_out)


def started_on(tmp_path, data: PreparedData) -> RunDir:
    run = RunDir.create(load_recipe("tiny"), tmp_path)
    run.manifest.write_text(json.dumps({"data": {"fingerprint": data.train_records.fingerprint,
                                                 "eval_fingerprint": data.eval_records.fingerprint}}))
    return run


def test_the_same_data_resumes(tmp_path):
    data = prepared(load_recipe("tiny"))
    check_same_data(started_on(tmp_path, data), data)


def test_a_run_without_a_manifest_yet_resumes(tmp_path):
    check_same_data(RunDir.create(load_recipe("tiny"), tmp_path), prepared(load_recipe("tiny")))


@pytest.mark.parametrize("split", ["source", "eval_split"])
def test_changed_training_or_held_out_data_is_refused(tmp_path, split):
    recipe = load_recipe("tiny")
    run = started_on(tmp_path, prepared(recipe))
    original = getattr(recipe.data, split)
    changed = tmp_path / "changed.jsonl"
    lines = open(original).read().splitlines()
    changed.write_text("\n".join(lines[:-1]) + "\n")  # one record fewer
    other = recipe.model_copy(update={"data": recipe.data.model_copy(update={split: str(changed)})})
    assert message(check_same_data, run, prepared(other)) == (
        f"the data of {run.path} changed since it started ({recipe.data.source} holds other records now): "
        "resuming would mix two datasets; start a new run without --resume")


def message(call, *args) -> str:
    with pytest.raises(UserError) as refused:
        call(*args)
    return str(refused.value)


def test_resume_takes_the_recipes_latest_run_or_the_one_named_unless_it_finished(tmp_path):
    root = tmp_path / "runs"
    assert message(run_to_resume, "tiny", root, "latest") == f"nothing to resume: no run of recipe 'tiny' under {root}"
    run = RunDir.create(load_recipe("tiny"), root)
    assert message(run_to_resume, "tiny", root, "latest") == f"nothing to resume: no run of recipe 'tiny' under {root}"
    assert run_to_resume("tiny", root, str(run.path)) == run
    assert message(run_to_resume, "tiny", root, str(tmp_path)) == (
        f"nothing to resume: no run of recipe 'tiny' under {root}")
    run.mark_latest()
    assert run_to_resume("tiny", root, "latest") == RunDir(run.path.resolve())
    run.manifest.write_text(json.dumps({"status": "finished"}))
    assert message(run_to_resume, "tiny", root, str(run.path)) == (
        f"run {run.path} already finished; start a new one without --resume")


def test_resume_refuses_other_training_settings_but_not_other_merge_or_serve_settings(tmp_path):
    run = RunDir.create(load_recipe("tiny"), tmp_path)
    again = load_recipe("tiny", ["merge.dtype=float32", "serve.port=9000", "eval.enabled=false"])
    assert find_resumable(again, tmp_path, str(run.path)) == run
    run.mark_latest()
    assert find_resumable(again, tmp_path, "latest") == RunDir(run.path.resolve())
    assert message(find_resumable, load_recipe("tiny", ["train.lr=0.001"]), tmp_path, str(run.path)) == (
        f"run {run.path} was started with a different recipe; resume it without --set, or start a new run")


@pytest.mark.parametrize(("before", "per_node", "now", "flags"), [
    (None, None, 2, " --gpus 1"), (2, 2, 1, " --gpus 2"), (4, 2, 1, " --gpus 2 --nodes 2"), (2, None, 4, " --gpus 2")])
def test_resume_refuses_another_number_of_ranks_and_says_how_to_resume(tmp_path, before, per_node, now, flags):
    run = RunDir.create(load_recipe("tiny"), tmp_path)
    manifest = {key: value for key, value in (("ranks", before), ("ranks_per_node", per_node)) if value}
    run.manifest.write_text(json.dumps(manifest))
    assert message(find_resumable, load_recipe("tiny"), tmp_path, str(run.path), now) == (
        f"run {run.path} was trained on {before or 1} rank(s): resume it with{flags}; its checkpoints hold one "
        f"random state per rank, so {now} rank(s) would not continue exactly the same run (start a new run to use "
        "another number of GPUs)")
    check_same_ranks(run, before or 1)


def test_resume_point_is_the_newest_complete_checkpoint_with_the_logs_cut_back_to_it(tmp_path, capsys):
    run = RunDir.create(load_recipe("tiny"), tmp_path)
    for step in (2, 10, 11, 12):
        (run.checkpoints / f"checkpoint-{step}").mkdir(parents=True)
    for step in (2, 10, 11):
        (run.checkpoints / f"checkpoint-{step}" / COMPLETE_MARKER).write_text(f"{step}\n")
    run.metrics.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 10, 11, 12)))
    assert resume_point(run) == run.checkpoints / "checkpoint-11"
    assert not (run.checkpoints / "checkpoint-12").exists() and (run.checkpoints / "checkpoint-2").exists()
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 10, 11]
    assert " ".join(capsys.readouterr().err.split()) == (
        "warning: skipping checkpoint-12: it was not completely written (the process died while saving); "
        "removing it resuming from checkpoint-11")


def test_a_run_without_a_complete_checkpoint_starts_over_with_clean_logs(tmp_path, capsys):
    run = RunDir.create(load_recipe("tiny"), tmp_path)
    run.metrics.write_text(json.dumps({"step": 1}) + "\n")
    (run.tensorboard / "events").mkdir(parents=True)
    assert resume_point(run) is None
    assert run.read_metrics() == [] and not run.tensorboard.exists()
    assert " ".join(capsys.readouterr().err.split()) == (
        f"{run.path} has no complete checkpoint yet: training it from the start")
    assert resume_point(run) is None  # again, with no TensorBoard logs left to remove
