"""lora.target_modules is checked against the model family's projections before a weight loads."""

from __future__ import annotations

import pytest
from conftest import assert_one_line_error, cli_in_process

from qlora_app.errors import UserError
from qlora_app.model.architecture import check_recipe, load_architecture
from qlora_app.model.loading import lora_config
from qlora_app.plan import planner
from qlora_app.recipe.loader import load_recipe
from qlora_app.recipe.schema import ALL_LINEAR


@pytest.mark.parametrize("targets", ["[q_proj,v_prj]", "[v_prj]"])
def test_a_target_the_model_does_not_have_is_one_line_before_a_run_directory(tmp_path, targets):
    """v_prj beside q_proj used to be dropped silently (an adapter on q_proj only, exit 0); alone, a peft
    traceback after the model loaded."""
    result = cli_in_process("train", "tiny", "--runs-dir", str(tmp_path), "--set",
                            f"lora.target_modules={targets}", "--set", "train.max_steps=1")
    assert_one_line_error(result, "lora.target_modules: Llama (2, 3, 3.1, 3.3) (llama) models have no projection "
                                  "named v_prj; they have q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj "
                                  "(or give all-linear)")
    assert not any(tmp_path.iterdir())


def test_all_linear_is_peft_s_own_word_and_the_planner_counts_every_projection():
    every = load_recipe("tiny", ["lora.target_modules=all-linear"])
    check_recipe(every)
    assert lora_config(every).target_modules == "all-linear"
    arch = load_architecture(every.model)
    listed = load_recipe("tiny", [f"lora.target_modules=[{','.join(ALL_LINEAR)}]"])
    assert planner.lora_params(every, arch) == planner.lora_params(listed, arch) > 0
    with pytest.raises(UserError, match="all-linear"):
        load_recipe("tiny", ["lora.target_modules=[all-linear,q_proj]"])
