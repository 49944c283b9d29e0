"""What a resume refuses, held by fast tests (no model loads): changed data."""

import json

import pytest

from qlora_app.data.sources import load_splits
from qlora_app.errors import UserError
from qlora_app.recipe.loader import load_recipe
from qlora_app.run.directory import RunDir
from qlora_app.train.stage import PreparedData, check_same_data


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
    with pytest.raises(UserError, match="changed since it started"):
        check_same_data(run, prepared(other))
