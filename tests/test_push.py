"""`qlora-app push` without the Hub: the folder and model card that would be uploaded, built from the session's
trained run (and a merged copy of it), and the refusals through the real CLI, each before anything uploads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import SECRET, assert_one_line_error, run_cli

from qlora_app.push import plan_upload, stage
from qlora_app.run.directory import RunDir

pytestmark = pytest.mark.slow  # trains (the session's run) and merges


@pytest.fixture(scope="module")
def merged_run(trained_run, tmp_path_factory) -> RunDir:
    """A copy of the session's run, merged (without the verification pass: it is merge's own test)."""
    copy = tmp_path_factory.mktemp("push") / trained_run.path.name
    shutil.copytree(trained_run.path, copy, ignore=shutil.ignore_patterns("merged", "checkpoints", "tensorboard"))
    result = run_cli("merge", str(copy), "--no-verify")
    assert result.returncode == 0, result.stderr[-2000:]
    return RunDir(copy)


def card_metadata(card: str) -> dict:
    _, front, _ = card.split("---\n", 2)
    return yaml.safe_load(front)


def staged(plan, tmp_path: Path) -> dict[str, Path]:
    folder = tmp_path / "upload"
    folder.mkdir()
    return {p.name: p for p in stage(plan, folder).iterdir()}


def test_adapter_upload_is_the_adapter_tokenizer_recipe_and_a_card(trained_run, tmp_path):
    run = RunDir(trained_run.path)
    plan = plan_upload(run, "adapter", "someone/tiny-capitals", fetch_license=False)
    files = staged(plan, tmp_path)
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json", "recipe.yaml",
            "README.md"} <= set(files)
    assert not any(name.startswith(("checkpoint", "manifest", "metrics")) for name in files)
    assert files["adapter_model.safetensors"].stat().st_ino == (run.adapter / "adapter_model.safetensors").stat().st_ino
    meta = card_metadata(files["README.md"].read_text())
    assert meta["library_name"] == "peft" and meta["base_model_relation"] == "adapter"
    assert meta["license"] == "apache-2.0" and meta["license_link"].startswith("https://")
    assert {"qlora-app", "qlora", "lora"} <= set(meta["tags"])
    assert "base_model" not in meta  # builtin:tiny-llama is not a Hub id


def test_adapter_card_says_where_it_came_from_and_how_to_use_it(trained_run):
    run = RunDir(trained_run.path)
    card = plan_upload(run, "adapter", "someone/tiny-capitals", fetch_license=False).card
    manifest = run.read_manifest()
    assert manifest["data"]["fingerprint"] in card and "capitals.jsonl" in card
    assert f"tuned {manifest['losses']['final_eval_loss']:.4f}" in card
    assert "--enable-lora --max-lora-rank 16 --lora-modules tiny=someone/tiny-capitals" in card
    assert 'AutoPeftModelForCausalLM.from_pretrained("someone/tiny-capitals"' in card
    assert f"transformers {manifest['versions']['transformers']}" in card
    assert run.recipe_file.read_text().strip() in card
    assert SECRET not in card


def test_merged_upload_is_the_model_with_a_card_that_reports_the_merge(merged_run, tmp_path):
    plan = plan_upload(merged_run, "merged", "someone/tiny-capitals-merged", fetch_license=False)
    files = staged(plan, tmp_path)
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"} <= set(files)
    assert "merge_report.json" not in files
    card = files["README.md"].read_text()
    assert card_metadata(card)["library_name"] == "transformers"
    report = json.loads((merged_run.path / "merged" / "merge_report.json").read_text())
    assert f"merged into: {report['base_weights']} base weights" in card
    assert "vllm serve someone/tiny-capitals-merged --served-model-name tiny" in card
    assert not any(SECRET.encode() in p.read_bytes() for p in files.values())


def test_the_merge_stage_writes_the_same_card(merged_run):
    from qlora_app.hub.card import CardFacts, base_license, render

    merged = merged_run.path / "merged"
    facts = CardFacts("merged", str(merged), base_license(merged_run.recipe(), fetch=False), merged)
    assert (merged / "README.md").read_text() == render(merged_run, facts)


def push(run: Path, *args: str, token: str | None = SECRET, home: Path) -> object:
    env = {"HF_TOKEN": token or "", "HF_HOME": str(home)}  # an empty HF_HOME: no cached login
    return run_cli("push", str(run), *args, env=env)


def test_no_token_is_refused(trained_run, tmp_path):
    result = push(trained_run.path, "--repo", "someone/x", token=None, home=tmp_path)
    assert_one_line_error(result, "no Hugging Face token", "HF_TOKEN", "hf auth login")


def test_a_run_without_a_merged_model_is_refused_with_merged(trained_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained_run.path, copy, ignore=shutil.ignore_patterns("merged", "checkpoints", "tensorboard"))
    result = push(copy, "--repo", "someone/x", "--merged", home=tmp_path)
    assert_one_line_error(result, "has no merged model", "qlora-app merge")
    assert SECRET not in result.stderr + result.stdout


def test_an_unfinished_run_is_refused(trained_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained_run.path, copy, ignore=shutil.ignore_patterns("merged", "checkpoints", "tensorboard"))
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "status": "interrupted"}))
    result = push(copy, "--repo", "someone/x", home=tmp_path)
    assert_one_line_error(result, "has not finished training (status: interrupted)", "--resume")


def test_a_merged_model_from_an_older_adapter_is_refused(merged_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(merged_run.path, copy)
    report = copy / "merged" / "merge_report.json"
    report.write_text(json.dumps({**json.loads(report.read_text()), "adapter_sha256": "0" * 64}))
    result = push(copy, "--repo", "someone/x", "--merged", home=tmp_path)
    assert_one_line_error(result, "was not made from this run's current adapter")


@pytest.mark.parametrize("repo", ["no-slash", "a/b/c", "bad name/x"])
def test_a_malformed_repo_id_is_refused(trained_run, tmp_path, repo):
    assert_one_line_error(push(trained_run.path, "--repo", repo, home=tmp_path), "--repo must be USER/NAME")
