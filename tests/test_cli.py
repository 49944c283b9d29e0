"""The real `qlora-app` command in a subprocess: output, exit codes, and one-line errors."""

import pytest
import yaml
from conftest import assert_one_line_error, run_cli

from qlora_app import __version__
from qlora_app.recipe.loader import load_recipe


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0 and __version__ in result.stdout


@pytest.mark.parametrize("command", [[], ["recipes"], ["show"], ["plan"]])
def test_help_is_useful(command):
    result = run_cli(*command, "--help")
    assert result.returncode == 0
    assert "Usage: " in result.stdout and len(result.stdout.splitlines()) > 5


def test_show_prints_the_resolved_recipe():
    result = run_cli("show", "llama3-8b", "--set", "lora.r=16")
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["lora"]["r"] == 16
    assert shown["train"] == load_recipe("llama3-8b").train.model_dump(mode="json")


def test_plan_llama3_8b_fits_a_24_gib_gpu():
    result = run_cli("plan", "llama3-8b")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "base weights, 4-bit" in out and "output head and loss" in out and "total" in out
    assert "fits in 24 GiB" in out and "largest batch at seq 1024" in out


def test_plan_says_when_it_does_not_fit():
    result = run_cli("plan", "llama3-8b-lora", "--gpu-memory", "16")
    assert result.returncode == 0
    assert "does not fit in 16 GiB" in result.stdout


def test_plan_compare_shows_lora_beside_qlora():
    result = run_cli("plan", "llama3-8b", "--compare")
    assert result.returncode == 0
    assert "LoRA vs QLoRA" in result.stdout and "LoRA (bf16 base)" in result.stdout
    assert "QLoRA NF4+DQ" in result.stdout and "largest batch at seq 1024" in result.stdout


def test_recipes_lists_every_recipe_with_its_vram():
    result = run_cli("recipes")
    assert result.returncode == 0, result.stderr
    for name in ("llama3-8b", "llama2-7b", "mistral-7b", "tiny"):
        assert name in result.stdout
    assert "QLoRA NF4+DQ" in result.stdout and "VRAM GiB" in result.stdout
    assert "learns 40 made-up capitals" in result.stdout  # each recipe's description


def test_report_to_a_tracker_that_is_not_installed_is_one_line_before_anything_loads(tmp_path):
    result = run_cli("train", "tiny", "--runs-dir", str(tmp_path), "--set", "train.report_to=[wandb]")
    assert_one_line_error(result, "train.report_to includes wandb, but the wandb package is not installed")
    assert not any(tmp_path.iterdir())


def test_out_of_memory_advice_comes_from_the_planner():
    from qlora_app.plan.report import out_of_memory_advice
    from qlora_app.recipe.loader import load_recipe

    recipe = load_recipe("llama3-8b", ["train.batch_size=16", "train.grad_accum=1"])
    advice = out_of_memory_advice(recipe, 20 * 2**30)
    assert advice.startswith("out of GPU memory at batch 16 x 1024 tokens: with the 20.00 GiB that were free")
    batch = int(advice.split("the plan fits batch ")[1].split()[0])
    assert 1 <= batch < 16 and f"--set train.batch_size={batch} --set train.grad_accum={16 // batch}" in advice
    assert "qlora-app plan llama3-8b" in out_of_memory_advice(recipe, None)


def test_typo_in_recipe_name():
    assert_one_line_error(run_cli("plan", "llama3-8", "--gpu-memory", "24"),
                          "unknown recipe 'llama3-8'", "did you mean 'llama3-8b'", "known recipes:")


def test_typo_in_override():
    assert_one_line_error(run_cli("show", "llama3-8b", "--set", "lora.alhpa=8"),
                          "unknown key 'lora.alhpa'", "did you mean 'alpha'")


def test_typo_in_recipe_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  path: builtin:tiny-llama\ndata:\n  source: x.jsonl\ntrain:\n  batchsize: 8\n")
    assert_one_line_error(run_cli("plan", str(path)), str(path), "unknown key 'train.batchsize'",
                          "did you mean 'batch_size'")


def test_unreachable_hub_model_gets_one_line(tmp_path):
    path = tmp_path / "hub.yaml"
    path.write_text("model:\n  path: someone/not-a-real-model\ndata:\n  source: x.jsonl\n")
    assert_one_line_error(run_cli("plan", str(path), env={"HF_HUB_OFFLINE": "1"}),
                          "someone/not-a-real-model", "not in the local cache")


def test_unsupported_architecture(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "gpt2", "n_embd": 768}')
    path = tmp_path / "r.yaml"
    path.write_text(f"model:\n  path: {model}\ndata:\n  source: x.jsonl\n")
    assert_one_line_error(run_cli("plan", str(path)), "model_type 'gpt2' is not supported")
