"""`qlora-app eval` for real: the session's tiny run, base vs tuned on its held-out questions
(data/tiny/capitals-eval.jsonl, paraphrases of the taught ones) through one vLLM server in adapter mode."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import run_cli

from qlora_app.run.directory import RunDir


@pytest.fixture(scope="module")
def evaluated(trained_run, tmp_path_factory):
    """A copy of the session's run (eval writes into it), evaluated once with the real CLI: one server."""
    root = tmp_path_factory.mktemp("eval-runs")
    run = RunDir(root / "tiny" / trained_run.path.name)
    shutil.copytree(trained_run.path, run.path, ignore=shutil.ignore_patterns("merged", "tensorboard", "checkpoints"))
    result = run_cli("eval", str(run.path), "--runs-dir", str(root))
    assert result.returncode == 0, result.stderr[-3000:]
    return run, result


pytestmark = pytest.mark.slow


def test_the_tuned_model_wins_by_a_wide_margin(evaluated):
    scores = json.loads(evaluated[0].eval_report.read_text())["scores"]
    assert scores["tuned"]["exact_match"] >= 0.8 and scores["base"]["exact_match"] <= 0.1, scores
    assert scores["tuned"]["chrf"] - scores["base"]["chrf"] >= 50, scores
    assert scores["tuned"]["stopped"] == 1.0, scores


def test_eval_json_holds_every_answer_and_is_current_for_this_adapter_and_settings(evaluated):
    from qlora_app.eval.stage import is_current
    from qlora_app.merge.stage import adapter_fingerprint

    run = evaluated[0]
    report = json.loads(run.eval_report.read_text())
    assert report["examples"] == len(report["items"]) == 12
    assert report["models"] == {"base": "tiny", "tuned": "tiny-tuned"}
    assert report["adapter_sha256"] == adapter_fingerprint(run)
    assert is_current(run, run.recipe())
    from qlora_app.recipe.loader import load_recipe

    assert not is_current(run, load_recipe(str(run.recipe_file), ["eval.limit=5"]))


def test_the_table_and_the_worst_examples_are_printed(evaluated):
    stdout = evaluated[1].stdout
    assert "eval: base vs tuned on 12 held-out examples" in stdout and "exact match" in stdout
    assert "worst tuned answers" in stdout


def test_the_model_card_holds_the_evaluation_table(evaluated):
    from qlora_app.hub.card import CardFacts, render

    run = evaluated[0]
    card = render(run, CardFacts("adapter", str(run.adapter)))
    tuned = json.loads(run.eval_report.read_text())["scores"]["tuned"]
    assert "## Evaluation" in card and "| metric | base | tuned |" in card
    assert "| chrF | " in card and f"{tuned['chrf']:.1f} |" in card


@pytest.mark.last
def test_sigterm_stops_eval_and_its_server_leaving_no_process(evaluated):
    """SIGTERM while the server is starting: eval exits 130 and no process serving this run is left."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO, live_processes, survivors

    run = evaluated[0]
    root = run.path.parent.parent
    process = subprocess.Popen([sys.executable, "-m", "qlora_app", "eval", str(run.path), "--runs-dir", str(root)],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + 300
    while not live_processes(str(run.adapter)) and time.monotonic() < deadline:  # the event: vLLM is running
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.2)
    assert live_processes(str(run.adapter)), "vLLM never started"
    process.send_signal(signal.SIGTERM)
    assert process.wait(120) == 130, process.stderr.read()
    assert survivors(str(run.adapter)) == []
