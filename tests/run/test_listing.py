"""`qlora-app runs`: one row per run from the files the stages left, newest first."""

from __future__ import annotations

import json

from conftest import assert_one_line_error, run_cli

from qlora_app.run.directory import RunDir
from qlora_app.run.listing import all_runs, row


def make_run(root, recipe: str, run_id: str, manifest: dict | None = None) -> RunDir:
    run = RunDir(root / recipe / run_id)
    run.path.mkdir(parents=True)
    run.recipe_file.write_text("name: x\n")
    if manifest is not None:
        run.manifest.write_text(json.dumps(manifest))
    return run


def test_runs_of_every_recipe_newest_first(tmp_path):
    make_run(tmp_path, "a", "20261201-000000-x")
    make_run(tmp_path, "b", "20261203-000000-y")
    make_run(tmp_path, "a", "20261202-000000-z")
    assert [r.path.name for r in all_runs(tmp_path, None)] == ["20261203-000000-y", "20261202-000000-z",
                                                              "20261201-000000-x"]
    assert [r.path.name for r in all_runs(tmp_path, "a")] == ["20261202-000000-z", "20261201-000000-x"]


def test_a_finished_merged_evaluated_run_shows_each_stage(tmp_path):
    run = make_run(tmp_path, "tiny", "20261201-000000-x", {
        "status": "finished", "training": {"steps": 300},
        "losses": {"base_eval_loss": 17.7, "final_eval_loss": 0.0138}})
    run.merged.mkdir()
    run.merge_report.write_text(json.dumps({"verified": True, "verification": {"passed": True}}))
    scores = {"base": {"exact_match": 0.0}, "tuned": {"exact_match": 1.0}}
    run.eval_report.write_text(json.dumps({"scores": scores, "general": {
        "tasks": {"arc_easy": {"delta": -0.05}}, "warnings": ["arc_easy: acc fell 0.050"]}}))
    assert row(run) == ("tiny/20261201-000000-x", "finished", "300", "17.700 -> 0.014", "verified",
                        "exact 0% -> 100%, arc_easy -0.050, 1 drop warning(s)")


def test_a_killed_run_is_resumable_from_its_last_complete_checkpoint(tmp_path):
    run = make_run(tmp_path, "tiny", "20261201-000000-x", {"status": "training"})
    for step, complete in ((50, True), (100, True), (150, False)):
        folder = run.checkpoints / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        if complete:
            from qlora_app.run.directory import COMPLETE_MARKER

            (folder / COMPLETE_MARKER).write_text("")
    assert row(run)[1:] == ("stopped at step 100 (resumable)", "-", "-", "-", "-")


def test_the_command_prints_the_table_and_an_empty_root_is_one_line(tmp_path):
    make_run(tmp_path, "tiny", "20261201-000000-x", {"status": "finished"})
    result = run_cli("runs", "--runs-dir", str(tmp_path))
    assert result.returncode == 0 and "tiny/20261201-000000-x" in result.stdout and "finished" in result.stdout
    assert_one_line_error(run_cli("runs", "--runs-dir", str(tmp_path / "none")), "no run under",
                          "qlora-app train RECIPE")
    assert_one_line_error(run_cli("runs", "--recipe", "other", "--runs-dir", str(tmp_path)),
                          "no run of recipe 'other' under", "qlora-app train other")
