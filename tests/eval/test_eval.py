"""`qlora-app eval` for real: the session's tiny run, base vs tuned on its held-out questions
(data/tiny/capitals-eval.jsonl, paraphrases of the taught ones) through one vLLM server in adapter mode."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import REPO, run_cli

from qlora_app.run.directory import RunDir

API_KEY = "sk-eval-TESTKEYdoNotLeak"
LOCAL_TASK = REPO / "data" / "tiny" / "capitals-choice.yaml"  # lm-eval's multiple choice over a local JSONL
# The settings the module's eval runs with: lm-eval's two defaults (offline: skipped) and 20 of the local task's 40
AS_RUN = (f"eval.tasks=[{LOCAL_TASK}, arc_easy, hellaswag]", "eval.task_limit=20")


@pytest.fixture(scope="module")
def evaluated(trained_run, tmp_path_factory):
    """A copy of the session's run (eval writes into it), evaluated once with the real CLI: one server, behind
    an API key, offline with an empty datasets cache (lm-eval's own tasks cannot have their data)."""
    root = tmp_path_factory.mktemp("eval-runs")
    run = RunDir(root / "tiny" / trained_run.path.name)
    shutil.copytree(trained_run.path, run.path, ignore=shutil.ignore_patterns("merged", "tensorboard", "checkpoints"))
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path_factory.mktemp("datasets-cache")),
               "QLORA_API_KEY": API_KEY}
    result = run_cli("eval", str(run.path), "--runs-dir", str(root),
                     *(arg for setting in AS_RUN for arg in ("--set", setting)), env=offline)
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
    from qlora_app.recipe.loader import load_recipe

    as_run = list(AS_RUN)
    assert is_current(run, load_recipe(str(run.recipe_file), as_run))
    assert not is_current(run, load_recipe(str(run.recipe_file), [*as_run, "eval.limit=5"]))
    assert not is_current(run, run.recipe())  # other general tasks


def test_the_table_and_the_worst_examples_are_printed(evaluated):
    stdout = evaluated[1].stdout
    assert "eval: base vs tuned on 12 held-out examples" in stdout and "exact match" in stdout
    assert "worst tuned answers" in stdout


def test_the_local_lm_eval_task_runs_on_base_and_tuned_through_the_server(evaluated):
    general = json.loads(evaluated[0].eval_report.read_text())["general"]
    task = general["tasks"]["tiny_capitals_choice"]
    assert task["metric"] == "acc" and task["examples"] == 20  # eval.task_limit
    assert task["base"] <= 0.5 and task["tuned"] >= 0.8, task  # four choices: chance is 0.25
    assert task["delta"] == pytest.approx(task["tuned"] - task["base"]) and 0 < task["stderr"] < 0.2
    assert "general skills (lm-evaluation-harness)" in evaluated[1].stdout
    assert "tiny_capitals_choice" in evaluated[1].stdout


def test_tasks_without_cached_data_offline_are_skipped_in_one_line_each(evaluated):
    result = evaluated[1]
    lines = [line for line in result.stderr.splitlines() if "skipped" in line]
    assert [line.split(" skipped")[0] for line in lines] == ["eval: general task arc_easy",
                                                             "eval: general task hellaswag"], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert json.loads(evaluated[0].eval_report.read_text())["general"]["skipped"] == lines


def test_the_api_key_lands_in_no_output(evaluated):
    run, result = evaluated
    logs = "".join(p.read_text(errors="replace") for p in (run.path.parent.parent / "logs").glob("*.log"))
    for text in (result.stdout, result.stderr, run.eval_report.read_text(), logs):
        assert API_KEY not in text


def test_the_model_card_holds_the_evaluation_table(evaluated):
    from qlora_app.hub.card import CardFacts, render

    run = evaluated[0]
    card = render(run, CardFacts("adapter", str(run.adapter)))
    tuned = json.loads(run.eval_report.read_text())["scores"]["tuned"]
    assert "## Evaluation" in card and "| metric | base | tuned |" in card
    assert "| chrF | " in card and f"{tuned['chrf']:.1f} |" in card
    assert "| tiny_capitals_choice | acc | 20 |" in card


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
