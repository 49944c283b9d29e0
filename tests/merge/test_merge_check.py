"""The merge and its check, fast: a real tiny adapter (random LoRA weights, no training) merged in process.

A merge that agrees with base + adapter is published; one that diverges is refused in one line and nothing is
published. Both directions are held here so the fast loop sees a broken scaling or a blunted check.
"""

import shutil

import pytest

from qlora_app.errors import UserError
from qlora_app.merge import stage
from qlora_app.recipe.loader import load_recipe
from qlora_app.recipe.schema import ALL_LINEAR
from qlora_app.run.directory import RunDir


@pytest.fixture
def untrained_run(tmp_path, tiny_model_dir) -> RunDir:
    """The tiny recipe's run directory with a LoRA adapter of random weights, saved as training saves it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    recipe = load_recipe("tiny")
    run = RunDir.create(recipe, tmp_path)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lora = LoraConfig(r=recipe.lora.r, lora_alpha=recipe.lora.alpha, target_modules=list(ALL_LINEAR),
                      init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(run.adapter)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(tiny_model_dir / name, run.adapter / name)
    return run


def test_a_faithful_merge_is_published_with_its_check(untrained_run):
    merged = stage.merge(untrained_run)
    report = (merged / "merge_report.json").read_text()
    assert merged == untrained_run.merged and '"verification"' in report


def test_a_divergent_merge_is_refused_and_nothing_is_published(untrained_run, monkeypatch):
    faithful = stage.merge_shard

    def doubled(src, dst, deltas, scaling, *rest):  # a merge bug: the update applied twice over
        faithful(src, dst, deltas, scaling * 2, *rest)

    monkeypatch.setattr(stage, "merge_shard", doubled)
    with pytest.raises(UserError, match="diverges from base \\+ adapter.*nothing was written"):
        stage.merge(untrained_run)
    assert not untrained_run.merged.exists()
    assert not list(untrained_run.path.glob(".merged*"))
