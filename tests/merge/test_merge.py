"""The merge stage on the session's trained tiny run, against real peft and plain transformers."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, assert_one_line_error, cli_in_process, run_cli, tiny_facts

from qlora_app.recipe.loader import load_recipe


@pytest.fixture(scope="module")
def merged(trained_run) -> Path:
    result = cli_in_process("merge", str(trained_run.path))
    assert result.returncode == 0, result.stderr[-2000:]
    return trained_run.path / "merged"


def run_copy(trained_run, tmp_path: Path) -> Path:
    copy = tmp_path / "tiny" / "run"
    shutil.copytree(trained_run.path, copy, ignore=shutil.ignore_patterns("merged", "checkpoints", "tensorboard"))
    return copy


@pytest.mark.slow
def test_auto_merges_into_the_base_closest_to_what_was_trained_and_says_why(merged):
    report = json.loads((merged / "merge_report.json").read_text())
    check = report["verification"]
    gaps = {kind: abs(check[f"loss_adapter_on_{kind}"] - check["loss_adapter_on_4bit"])
            for kind in ("original", "dequantized")}
    assert report["settings"]["base_weights"] == "auto"
    assert report["base_weights"] == min(gaps, key=gaps.get)
    assert "closest to the adapter on the 4-bit base" in report["base_weights_reason"]


@pytest.mark.slow
def test_merge_settings_given_now_are_the_ones_used(tmp_path, trained_run):
    from safetensors import safe_open

    copy = run_copy(trained_run, tmp_path)
    result = cli_in_process("merge", str(copy), "--set", "merge.dtype=float16", "--base-weights", "original",
                     "--no-verify")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((copy / "merged" / "merge_report.json").read_text())
    assert report["settings"]["dtype"] == "float16" and report["base_weights"] == "original"
    assert report["verified"] is False and "verification" not in report  # a later pipeline merges again
    with safe_open(copy / "merged" / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.float16
    assert_one_line_error(cli_in_process("merge", str(copy), "--set", "train.lr=0.1"),
                          "merge takes only merge.* settings")


@pytest.mark.slow
def test_a_plain_lora_run_is_never_merged_into_nf4_rounded_weights(tmp_path, trained_run):
    copy = run_copy(trained_run, tmp_path)
    recipe = yaml.safe_load((copy / "recipe.yaml").read_text())
    recipe["quantization"]["enabled"] = False
    (copy / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    from qlora_app.run.directory import RunDir

    RunDir(copy).mark_latest()  # and merge with no run named takes the latest run of any recipe
    result = cli_in_process("merge", "--runs-dir", str(tmp_path), "--base-weights", "dequantized")
    assert_one_line_error(result, f"{copy / 'recipe.yaml'}", "rounds the base to NF4", "quantization.enabled: false",
                          after=(f"using the latest run: {copy} (recipe tiny)",))
    assert not (copy / "merged").exists()


@pytest.mark.slow
def test_the_check_refuses_a_base_it_cannot_compare(trained_run, tiny_model_dir):
    from qlora_app.merge.verify import compare_merged

    lora = load_recipe("tiny", ["quantization.enabled=false"])
    for kind in ("auto", "dequantized"):
        with pytest.raises(ValueError, match="cannot check a merge into"):
            compare_merged(lora, trained_run.path / "adapter", tiny_model_dir, tiny_model_dir, kind)


def test_dequantized_weights_are_exactly_the_ones_bitsandbytes_quantizes(tiny_model_dir):
    """Every 4-bit weight of the training model is rounded in a dequantized merge, and nothing else."""
    import bitsandbytes as bnb

    from qlora_app.model.loading import load_base, quantized_weight_names

    recipe = load_recipe("tiny")
    trained_in_4bit = {f"{name}.weight" for name, module in load_base(recipe).named_modules()
                       if isinstance(module, bnb.nn.Linear4bit)}
    assert quantized_weight_names(recipe, tiny_model_dir) == trained_in_4bit
    assert "lm_head.weight" not in trained_in_4bit and len(trained_in_4bit) == 14
    assert quantized_weight_names(load_recipe("tiny", ["quantization.enabled=false"]), tiny_model_dir) == set()


@pytest.mark.slow
def test_merged_model_answers_like_the_adapter_and_stops(merged):
    from generate import answer
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged)
    stop_ids = GenerationConfig.from_pretrained(merged).eos_token_id
    facts = tiny_facts()
    results = [answer(model, tokenizer, [{"role": "user", "content": q}], stop_ids, 32) for q, _ in facts]
    assert sum(r.text == a for r, (_, a) in zip(results, facts)) >= 0.9 * len(facts)
    assert all(r.stopped for r in results)


@pytest.mark.slow
def test_merged_folder_loads_with_plain_transformers_without_peft(merged):
    code = (
        "import sys; sys.modules['peft'] = None\n"  # any import of peft now fails
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(merged)!r}); t = AutoTokenizer.from_pretrained({str(merged)!r})\n"
        "ids = t.apply_chat_template([{'role': 'user', 'content': 'hi'}], add_generation_prompt=True, return_tensors='pt',"
        " return_dict=True)['input_ids']\n"
        "print(m.generate(ids, max_new_tokens=3).shape)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow
def test_chat_template_and_stop_ids_are_the_training_ones(merged, trained_run):
    from transformers import AutoTokenizer

    from qlora_app.data.encoding import encode_chat, load_tokenizer

    training = load_tokenizer(load_recipe(str(trained_run.path / "recipe.yaml")))
    served = AutoTokenizer.from_pretrained(merged)
    messages = [{"role": "user", "content": "What is the capital of Dateul?"},
                {"role": "assistant", "content": "The capital of Dateul is Neul."}]
    assert encode_chat(messages, served, "merged") == encode_chat(messages, training, "training")
    eot = training.convert_tokens_to_ids("<|eot_id|>")
    assert eot in json.loads((merged / "generation_config.json").read_text())["eos_token_id"]
    card = (merged / "README.md").read_text()
    assert "builtin:tiny-llama" in card and "held-out loss" in card


@pytest.mark.slow
def test_run_without_adapter_is_a_one_line_error(tmp_path, trained_run):
    copy = tmp_path / "run"
    shutil.copytree(trained_run.path, copy, ignore=shutil.ignore_patterns("merged", "checkpoints"))
    (copy / "adapter" / "adapter_model.safetensors").unlink()
    assert_one_line_error(cli_in_process("merge", str(copy)),
                          "has no complete adapter (missing adapter_model.safetensors)",
                          "qlora-app train")


@pytest.mark.slow
def test_adapter_that_does_not_fit_the_base_is_a_one_line_error(tmp_path, trained_run):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other-base"
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=600)).save_pretrained(other)
    copy = tmp_path / "run"
    shutil.copytree(trained_run.path, copy, ignore=shutil.ignore_patterns("merged", "checkpoints"))
    recipe = yaml.safe_load((copy / "recipe.yaml").read_text())
    recipe["model"]["path"] = str(other)
    (copy / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert_one_line_error(cli_in_process("merge", str(copy)), "the adapter does not fit the base model")
    assert not (copy / "merged").exists()


def test_merge_needs_a_run(tmp_path):
    assert_one_line_error(cli_in_process("merge", "--runs-dir", str(tmp_path)), f"no trained run under {tmp_path}")


@pytest.mark.slow
def test_merge_report_checks_the_merge_and_compares_base_weights(merged):
    check = json.loads((merged / "merge_report.json").read_text())["verification"]
    assert check["examples"] == 12 and check["relative_logit_diff"] < 0.05
    for key in ("loss_adapter_on_4bit", "loss_adapter_on_original", "loss_adapter_on_dequantized", "loss_merged"):
        assert 0 < check[key] < 1.0, key


@pytest.mark.slow
def test_merging_into_dequantized_weights_matches_what_was_trained(tmp_path, trained_run):
    import math

    copy = tmp_path / "run"
    shutil.copytree(trained_run.path, copy, ignore=shutil.ignore_patterns("merged", "checkpoints"))
    result = cli_in_process("merge", str(copy), "--base-weights", "dequantized")
    assert result.returncode == 0, result.stderr[-2000:]
    check = json.loads((copy / "merged" / "merge_report.json").read_text())["verification"]
    # within 0.5% of the perplexity of the adapter on the 4-bit base it was trained on
    assert math.exp(check["loss_merged"] - check["loss_adapter_on_4bit"]) - 1 < 0.005


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory, trained_run):
    """A run whose base is a 12-shard Llama of about 100 MB, with a random (non-zero) adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("sharded")
    base = root / "base"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=12,
                                         num_attention_heads=8, num_key_value_heads=4, vocab_size=552))
    model.to(torch.bfloat16).save_pretrained(base, max_shard_size="8MB")
    run = root / "run"
    shutil.copytree(trained_run.path, run, ignore=shutil.ignore_patterns("merged", "checkpoints", "adapter"))
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.01)
    peft_model.save_pretrained(run / "adapter")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(trained_run.path / "adapter" / name, run / "adapter" / name)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["model"]["path"] = str(base)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert len(list(base.glob("*.safetensors"))) >= 10
    return run


# The merge, killed by SIGKILL at a fixed point: as it is about to create the KILL_AT-th shard of its staging
# folder (Python's audit hook sees the open() before it happens), so the earlier shards are whole, the rest absent.
KILL_AT = 6
KILLED_MERGE = """
import os, signal, sys
opened = 0
def kill_at_shard(event, args):
    global opened
    if event == "open" and ".merged-" in str(args[0]) and str(args[0]).endswith(".safetensors") \\
            and "w" in str(args[1]):
        opened += 1
        if opened == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)
sys.addaudithook(kill_at_shard)
from qlora_app.cli import main
main(["merge", {run!r}, "--no-verify"])
"""


def kill_merge_midway(run: Path) -> None:
    code = KILLED_MERGE.format(kill_at=KILL_AT, run=str(run))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]  # killed, not finished
    (staging,) = run.glob(".merged-*")
    assert len(list(staging.glob("*.safetensors"))) == KILL_AT - 1


@pytest.mark.slow
def test_killing_a_merge_midway_publishes_nothing_and_keeps_the_previous_model(sharded_run):
    kill_merge_midway(sharded_run)
    assert not (sharded_run / "merged").exists()  # only a staging folder, which the next merge removes

    assert run_cli("merge", str(sharded_run), "--no-verify").returncode == 0
    published = {p.name: p.read_bytes() for p in (sharded_run / "merged").glob("*.safetensors")}
    assert len(published) >= 10 and not list(sharded_run.glob(".merged-*"))

    kill_merge_midway(sharded_run)
    assert {p.name: p.read_bytes() for p in (sharded_run / "merged").glob("*.safetensors")} == published


@pytest.mark.slow
def test_merge_checks_free_disk_space_first(small_disk, sharded_run):
    run = small_disk.outside / "run"
    shutil.copytree(sharded_run, run, ignore=shutil.ignore_patterns("merged", ".merged-*"))
    small_disk.fill(leave=16 * 2**20)
    assert_one_line_error(small_disk.run_cli("merge", str(small_disk.path / "run"), "--no-verify"),
                          "merging needs about 0.1 GB free in", "is available")
    assert not (run / "merged").exists() and not list(run.glob(".merged-*"))
