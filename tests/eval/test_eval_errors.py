"""eval's bad input: one line, exit 2, before any server starts."""

from __future__ import annotations

import pytest
from conftest import assert_one_line_error, run_cli


def test_a_folder_that_is_not_a_run_is_one_line(tmp_path):
    assert_one_line_error(run_cli("eval", str(tmp_path)), "is not a run directory")


def test_no_run_of_the_recipe_is_one_line(tmp_path):
    assert_one_line_error(run_cli("eval", "--recipe", "tiny", "--runs-dir", str(tmp_path)), "no run of recipe 'tiny'")


@pytest.mark.slow  # lm-eval indexes its 14,000 tasks (seconds) to know the name is not one of them
def test_a_task_lm_eval_does_not_know_is_one_line_before_any_server(trained_run, tmp_path):
    result = run_cli("eval", str(trained_run.path), "--runs-dir", str(tmp_path), "--set", "eval.tasks=[arc_easyy]")
    assert_one_line_error(result, "eval.tasks: lm-evaluation-harness has no task arc_easyy")
    assert not (tmp_path / "logs").exists()  # no server was started
