"""The pipeline's decisions on real run directories: what is current, what is resumed, what stops it.
(The whole pipeline through make, serving included, runs in test_serve_merged.py.)"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from conftest import REPO, assert_one_line_error, run_cli

from qlora_app.machine.atomic import write_json_atomic
from qlora_app.pipeline import reusable_run
from qlora_app.recipe.loader import load_recipe
from qlora_app.run.directory import RunDir, point_latest


@pytest.fixture()
def run_copy(trained_run, tmp_path) -> RunDir:
    """A copy of the session's finished run, as the latest tiny run under a runs root of its own."""
    path = tmp_path / "tiny" / trained_run.path.name
    shutil.copytree(trained_run.path, path, ignore=shutil.ignore_patterns("merged", "tensorboard", "eval.json"))
    point_latest(path.parent, path.name)
    return RunDir(path)


@pytest.mark.slow
def test_training_is_current_only_for_the_same_training_settings_and_data(run_copy):
    root, tiny = run_copy.path.parent.parent, load_recipe("tiny")
    assert reusable_run(tiny, root) == run_copy
    serve_only = load_recipe("tiny", ["serve.port=9000", "merge.dtype=float16"])
    assert reusable_run(serve_only, root) == run_copy  # serving and merge settings do not retrain
    assert reusable_run(load_recipe("tiny", ["train.lr=1e-3"]), root) is None
    other_data = load_recipe("tiny", [f"data.source={REPO / 'data/tiny/creatures.jsonl'}"])
    assert reusable_run(other_data, root) is None


@pytest.mark.slow
def test_a_crashed_attempt_hides_neither_latest_nor_the_finished_run(run_copy):
    """A newer run that died before its first checkpoint (a bad GPU, a killed load) is looked past, and
    `latest` still names the finished run."""
    root, tiny = run_copy.path.parent.parent, load_recipe("tiny")
    run_copy.mark_latest()
    crashed = RunDir.create(tiny, root)
    assert crashed.path.name > run_copy.path.name
    assert (root / "tiny" / "latest").resolve() == run_copy.path == (root / "latest").resolve()
    assert reusable_run(tiny, root) == run_copy


@pytest.mark.slow
def test_merged_model_is_current_only_for_this_adapter_and_these_merge_settings(run_copy):
    from qlora_app.merge.stage import adapter_fingerprint, is_current

    settings = load_recipe("tiny").merge
    assert not is_current(run_copy, settings)  # no merged model yet
    made = {"adapter_sha256": adapter_fingerprint(run_copy), "settings": settings.model_dump()}
    write_json_atomic(run_copy.merge_report, made)
    assert is_current(run_copy, settings)
    assert not is_current(run_copy, load_recipe("tiny", ["merge.dtype=float16"]).merge)
    assert not is_current(run_copy, load_recipe("tiny", ["merge.max_loss_increase=0.5"]).merge)
    assert not is_current(run_copy, load_recipe("tiny", ["merge.base_weights=original"]).merge)
    write_json_atomic(run_copy.merge_report, {**made, "adapter_sha256": "0" * 64})
    assert not is_current(run_copy, settings)


@pytest.mark.slow
def test_an_interrupted_run_is_resumed_not_restarted(run_copy):
    manifest = run_copy.read_manifest()
    write_json_atomic(run_copy.manifest, {**manifest, "status": "interrupted"})
    code = ("import sys; from pathlib import Path; from qlora_app.pipeline import ensure_trained; "
            "from qlora_app.recipe.loader import load_recipe; "
            "print(ensure_trained(load_recipe('tiny'), Path(sys.argv[1])).path)")
    result = subprocess.run([sys.executable, "-c", code, str(run_copy.path.parent.parent)], capture_output=True,
                            text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"train: resuming {run_copy.path}" in result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(run_copy.path)
    assert run_copy.finished and len(list(run_copy.path.parent.glob("2*"))) == 1  # no new run


def test_a_failing_stage_stops_the_pipeline_with_its_error(tmp_path):
    bad = tmp_path / "chats.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    result = run_cli("pipeline", "tiny", "--runs-dir", str(tmp_path / "runs"), "--set", f"data.source={bad}")
    assert_one_line_error(result, f"{bad}:2: malformed JSON")
    assert not (tmp_path / "runs" / "tiny").exists() or not any((tmp_path / "runs" / "tiny").iterdir())


def test_a_merge_made_without_verification_is_not_current_for_a_pipeline_that_verifies(tmp_path):
    from qlora_app.merge.stage import adapter_fingerprint, is_current

    run = RunDir(tmp_path / "tiny" / "run")
    run.adapter.mkdir(parents=True)
    (run.adapter / "adapter_model.safetensors").write_bytes(b"the adapter's bytes")
    settings = load_recipe("tiny").merge
    made = {"adapter_sha256": adapter_fingerprint(run), "settings": settings.model_dump()}
    write_json_atomic(run.merge_report, {**made, "verified": False})  # what merge --no-verify leaves
    assert is_current(run, settings)  # push and serve take it as it is
    assert not is_current(run, settings, verified=True)  # the pipeline merges (and verifies) again
    write_json_atomic(run.merge_report, {**made, "verified": True, "verification": {"passed": True}})
    assert is_current(run, settings, verified=True)


@pytest.mark.parametrize(("status", "ranks", "reused"), [("interrupted", 1, True), ("interrupted", 2, False),
                                                          ("finished", 2, True)])
def test_an_interrupted_run_of_several_ranks_is_not_resumed_by_the_pipeline(tmp_path, status, ranks, reused):
    """The pipeline trains on one rank: resuming a 2-rank run there is refused ('resume it with --gpus 2', and
    pipeline has no --gpus), so such a run is looked past; its finished adapter is as good as any."""
    from qlora_app.pipeline import data_fingerprints
    from qlora_app.run.directory import COMPLETE_MARKER

    tiny = load_recipe("tiny")
    run = RunDir.create(tiny, tmp_path)
    train, held_out = data_fingerprints(tiny)
    write_json_atomic(run.manifest, {"status": status, "ranks": ranks,
                                     "data": {"fingerprint": train, "eval_fingerprint": held_out}})
    (run.checkpoints / "checkpoint-5").mkdir(parents=True)
    (run.checkpoints / "checkpoint-5" / COMPLETE_MARKER).write_text("")
    assert reusable_run(tiny, tmp_path) == (run if reused else None)

@pytest.mark.slow
def test_eval_is_skipped_when_switched_off_or_current(run_copy, capsys):
    from qlora_app.eval.stage import fingerprint, is_current
    from qlora_app.pipeline import ensure_evaluated

    root, tiny = run_copy.path.parent.parent, load_recipe("tiny")
    ensure_evaluated(run_copy, load_recipe("tiny", ["eval.enabled=false"]), root)
    assert "eval: skipped (eval.enabled: false)" in capsys.readouterr().err
    assert not is_current(run_copy, tiny)  # never evaluated
    scores = {"exact_match": 1.0, "rouge_l": 1.0, "chrf": 100.0, "stopped": 1.0, "mean_tokens": 8.0}
    write_json_atomic(run_copy.eval_report, {**fingerprint(run_copy, tiny), "examples": 1, "items": [],
                                             "scores": {"base": scores, "tuned": scores}})
    ensure_evaluated(run_copy, tiny, root)
    captured = capsys.readouterr()
    assert f"eval: skipped, {run_copy.eval_report} is current" in captured.err and "exact match" in captured.out
    assert not is_current(run_copy, load_recipe("tiny", ["eval.max_tokens=32"]))
