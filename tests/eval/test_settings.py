"""The recipe's eval section: validated like the rest, and apart from what decides training."""

from __future__ import annotations

import pytest

from qlora_app.errors import UserError
from qlora_app.recipe.loader import load_recipe


@pytest.mark.parametrize(("override", "expected"), [
    ("eval.max_tokens=0", "eval.max_tokens: Input should be greater than or equal to 1"),
    ("eval.concurrency=0", "eval.concurrency: Input should be greater than or equal to 1"),
    ("eval.limit=0", "eval.limit: Input should be greater than or equal to 1"),
    ("eval.drop_warning=2", "eval.drop_warning: Input should be less than or equal to 1"),
    ("eval.task_limit=0", "eval.task_limit: Input should be greater than or equal to 1"),
    ("eval.tasks=arc_easy", "eval.tasks: Input should be a valid tuple"),
    ("eval.enabled=maybe", "eval.enabled: Input should be a valid boolean"),
    ("eval.nope=1", "eval.nope"),
])
def test_bad_eval_values_name_the_key(override, expected):
    with pytest.raises(UserError) as info:
        load_recipe("tiny", [override])
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_eval_settings_do_not_decide_training_and_enabled_does_not_decide_eval_json():
    tiny, other = load_recipe("tiny"), load_recipe("tiny", ["eval.limit=5", "eval.enabled=false"])
    assert tiny.training_fields() == other.training_fields()
    assert tiny.eval.settings() != other.eval.settings()
    assert load_recipe("tiny", ["eval.enabled=false"]).eval.settings() == tiny.eval.settings()


def test_defaults_are_on_with_bounded_answers():
    spec = load_recipe("llama3-8b").eval
    assert spec.enabled and spec.max_tokens == 256 and spec.limit is None
    assert spec.tasks == ("arc_easy", "hellaswag") and spec.task_limit == 200


def test_local_task_paths_are_relative_to_the_recipe_and_names_stay_names(tmp_path):
    from conftest import REPO

    assert load_recipe("tiny").eval.tasks == (str(REPO / "data" / "tiny" / "capitals-choice.yaml"),)
    recipe = tmp_path / "r.yaml"
    recipe.write_text((REPO / "recipes" / "tiny.yaml").read_text().replace("../data", str(REPO / "data"))
                      .replace(f"tasks: [{REPO / 'data'}/tiny/capitals-choice.yaml]", "tasks: [./mine.yaml, arc_easy]"))
    assert load_recipe(str(recipe)).eval.tasks == (str(tmp_path / "mine.yaml"), "arc_easy")
