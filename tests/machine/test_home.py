"""QLORA_HOME that cannot be a folder is one line before any command does anything."""

from __future__ import annotations

import pytest
from conftest import assert_one_line_error, run_cli

from qlora_app.errors import UserError
from qlora_app.machine.home import home_environment


@pytest.mark.parametrize("command", [["plan", "tiny"], ["recipes"], ["train", "tiny"]])
def test_qlora_home_pointing_at_a_file_is_one_line(tmp_path, command):
    home = tmp_path / "workspace"
    home.write_text("not a folder")
    assert_one_line_error(run_cli(*command, env={"QLORA_HOME": str(home)}), f"QLORA_HOME={home}", "not a folder")


def test_qlora_home_below_a_file_is_refused_and_a_new_folder_is_fine(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="not a folder"):
        home_environment({"QLORA_HOME": str(tmp_path / "file" / "home")})
    assert home_environment({"QLORA_HOME": str(tmp_path / "new" / "home")})["QLORA_RUNS_DIR"].endswith("new/home/runs")
