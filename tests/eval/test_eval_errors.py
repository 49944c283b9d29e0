"""eval's bad input: one line, exit 2, before any server starts."""

from __future__ import annotations

from conftest import assert_one_line_error, run_cli


def test_a_folder_that_is_not_a_run_is_one_line(tmp_path):
    assert_one_line_error(run_cli("eval", str(tmp_path)), "is not a run directory")


def test_no_run_of_the_recipe_is_one_line(tmp_path):
    assert_one_line_error(run_cli("eval", "--recipe", "tiny", "--runs-dir", str(tmp_path)), "no run of recipe 'tiny'")
