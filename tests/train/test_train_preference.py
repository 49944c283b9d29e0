"""Preference tuning (train.method dpo / orpo) on the tiny model: recipe checks, the init run, the planner, and
real DPO and ORPO runs with trl's trainers on CPU (DPO continuing the session's SFT run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, assert_one_line_error, interrupted_copy_of, run_cli

from qlora_app.errors import UserError
from qlora_app.machine.atomic import write_json_atomic
from qlora_app.model.architecture import load_architecture
from qlora_app.plan import planner
from qlora_app.recipe.loader import load_recipe
from qlora_app.run.directory import RunDir, checkpoint_step
from qlora_app.train.preference import resolve_init_run

# ---- the recipe ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("recipe", "overrides", "problem"), [
    ("tiny", ["train.beta=0.5"], "train.beta: only for train.method dpo or orpo (this recipe trains sft)"),
    ("tiny", ["train.init_adapter=tiny", "train.loss_type=ipo"],
     "train.loss_type, train.init_adapter: only for train.method dpo or orpo"),
    ("tiny-orpo", ["train.loss_type=ipo"], "train.loss_type applies to method dpo; orpo has one loss"),
    ("tiny-dpo", ["train.loss_type=exo_pair"], "train.loss_type: Input should be 'sigmoid', 'hinge', 'ipo'"),
    ("tiny-dpo", ["train.beta=0"], "train.beta: Input should be greater than 0"),
])
def test_preference_settings_are_checked_in_one_line(recipe, overrides, problem):
    with pytest.raises(UserError) as info:
        load_recipe(recipe, overrides)
    assert problem in str(info.value) and "\n" not in str(info.value)


def test_the_shipped_preference_recipes():
    dpo, orpo, big = load_recipe("tiny-dpo"), load_recipe("tiny-orpo"), load_recipe("llama3-8b-dpo")
    assert (dpo.train.method, dpo.train.init_adapter, dpo.train.preference_loss) == ("dpo", "tiny", "sigmoid")
    assert (orpo.train.method, orpo.train.init_adapter, orpo.train.loss_type) == ("orpo", None, None)
    sft = load_recipe("tiny")
    assert all(getattr(dpo, s) == getattr(sft, s) for s in ("model", "quantization", "lora"))
    assert all(getattr(big, s) == getattr(load_recipe("llama3-8b"), s) for s in ("model", "quantization", "lora"))
    assert (big.data.split, big.data.eval_split, big.train.init_adapter) == ("train_prefs", "test_prefs", "llama3-8b")


def test_an_init_adapter_path_in_a_recipe_is_relative_to_the_recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text((REPO / "recipes" / "tiny-dpo.yaml").read_text().replace("init_adapter: tiny",
                                                                            "init_adapter: ./runs/tiny/one")
                    .replace("../data", str(REPO / "data")))
    assert load_recipe(str(path)).train.init_adapter == str(tmp_path / "runs" / "tiny" / "one")


def test_a_setting_for_sft_is_refused_by_the_cli_in_one_line():
    result = run_cli("train", "tiny", "--set", "train.beta=0.5")
    assert_one_line_error(result, "train.beta: only for train.method dpo or orpo")


# ---- the run it continues --------------------------------------------------------------------------------------


def fake_run(root: Path, recipe, status: str = "finished") -> RunDir:
    """A run directory as training leaves it, without training: its recipe and manifest."""
    run = RunDir.create(recipe, root)
    write_json_atomic(run.manifest, {"status": status, "recipe": recipe.name, "data": {"fingerprint": "f"}})
    return run


def test_init_adapter_needs_a_finished_run_of_the_recipe(tmp_path):
    dpo = load_recipe("tiny-dpo")
    with pytest.raises(UserError, match=f"no finished run of recipe 'tiny' under {tmp_path}; train it first"):
        resolve_init_run(dpo, tmp_path)
    fake_run(tmp_path, load_recipe("tiny"), status="interrupted")
    with pytest.raises(UserError, match="no finished run of recipe 'tiny'"):
        resolve_init_run(dpo, tmp_path)
    finished = fake_run(tmp_path, load_recipe("tiny"))
    assert resolve_init_run(dpo, tmp_path) == finished


def test_init_adapter_run_directory_must_be_a_finished_run(tmp_path):
    unfinished = fake_run(tmp_path, load_recipe("tiny"), status="interrupted")
    with pytest.raises(UserError, match="has not finished; finish it first"):
        resolve_init_run(load_recipe("tiny-dpo", [f"train.init_adapter={unfinished.path}"]), tmp_path)
    with pytest.raises(UserError, match="no such run directory"):
        resolve_init_run(load_recipe("tiny-dpo", [f"train.init_adapter={tmp_path}/nothing"]), tmp_path)


@pytest.mark.parametrize(("override", "section"), [("lora.r=8", "lora"), ("model.dtype=float32", "model"),
                                                    ("quantization.enabled=false", "quantization")])
def test_init_adapter_must_have_trained_the_same_base_and_lora(tmp_path, override, section):
    other = fake_run(tmp_path, load_recipe("tiny", [override]))
    with pytest.raises(UserError, match=f"trained a different {section} section"):
        resolve_init_run(load_recipe("tiny-dpo", [f"train.init_adapter={other.path}"]), tmp_path)


def test_train_refuses_a_missing_init_run_before_loading_weights(tmp_path):
    result = run_cli("train", "tiny-dpo", "--runs-dir", str(tmp_path))
    assert_one_line_error(result, "train.init_adapter=tiny: no finished run of recipe 'tiny'")
    assert not (tmp_path / "tiny-dpo").exists()


def test_the_model_card_says_the_chain_and_the_preference_figures(tmp_path):
    from qlora_app.hub.card import CardFacts, render

    run = fake_run(tmp_path, load_recipe("tiny-dpo"))
    write_json_atomic(run.manifest, {
        **run.read_manifest(), "training_method": {"method": "dpo", "beta": 0.1, "loss_type": "sigmoid"},
        "chain": {"init_run": "/runs/tiny/r1", "init_recipe": "tiny", "init_run_id": "r1", "init_method": "sft",
                  "init_data_fingerprint": "abc"},
        "preference": {"base": {"accuracy": 0.5, "margin": 0.1, "pairs": 12, "what": "init adapter"},
                       "tuned": {"accuracy": 1.0, "margin": 2.5, "pairs": 12}}})
    card = render(run, CardFacts("adapter", "me/tiny-dpo"))
    assert "- dpo\n" in card  # the method as a Hub tag
    assert "- method: DPO (beta 0.1, loss sigmoid) on chosen/rejected pairs" in card
    assert "continued from: run r1 of recipe tiny (sft, data fingerprint abc)" in card
    assert "init adapter 50.0%, tuned 100.0%; mean log-prob margin 0.100 -> 2.500" in card
    sft = fake_run(tmp_path, load_recipe("tiny"))
    assert "Preference tuning" not in render(sft, CardFacts("adapter", "me/tiny"))


# ---- the planner -----------------------------------------------------------------------------------------------


def test_the_planner_counts_two_sequences_a_row_and_dpos_reference():
    sft = load_recipe("llama3-8b", ["train.batch_size=4"])
    dpo = load_recipe("llama3-8b-dpo", ["train.batch_size=4"])
    arch = load_architecture(sft.model)
    a, b = planner.plan(sft, arch), planner.plan(dpo, arch)
    assert b.sequences_per_row == 2 and b.activations == 2 * a.activations and b.logits == 2 * a.logits
    trainable_copy = b.trainable_params * 4  # the frozen fp32 copy of the SFT adapter, DPO's reference
    one_layer = 2 * 4 * 1024 * planner.layer_activation_bytes_per_token(dpo, arch)
    assert b.reference == one_layer + trainable_copy
    new_adapter = planner.plan(dpo.with_section("train", init_adapter=None), arch)
    assert new_adapter.reference == one_layer  # the reference is the base with the adapter off
    orpo = planner.plan(dpo.with_section("train", method="orpo", loss_type=None), arch)
    assert orpo.reference == 0 and orpo.logits > b.logits  # no reference; full logits
    assert planner.largest_batch(dpo, arch, 24 * planner.GiB) < planner.largest_batch(sft, arch, 24 * planner.GiB)
    assert "DPO reference forward (no gradients; frozen adapter copy)" in dict((k, v) for k, v in b.rows())


def test_llama3_8b_dpo_plans_into_24_gb_offline():
    result = run_cli("plan", "llama3-8b-dpo", "--gpu-memory", "24", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert "fits in 24 GiB" in result.stdout and "pairs (2 sequences each)" in result.stdout


# ---- real runs -------------------------------------------------------------------------------------------------


def train_dpo(root: Path, init: Path, *extra: str) -> list[str]:
    """The command line of the tiny DPO run continuing `init` (a path: the same run whatever else `root` holds)."""
    return [sys.executable, "-m", "qlora_app", "train", "tiny-dpo", "--runs-dir", str(root),
            "--set", f"train.init_adapter={init}", *extra]


@pytest.fixture(scope="module")
def dpo_run(trained_run, tmp_path_factory) -> tuple[RunDir, subprocess.CompletedProcess]:
    """tiny-dpo once for this module, continuing the session's SFT run."""
    root = tmp_path_factory.mktemp("dpo-runs")
    result = subprocess.run(train_dpo(root, trained_run.path), cwd=REPO, capture_output=True, text=True,
                            env=os.environ, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return RunDir((root / "tiny-dpo" / "latest").resolve()), result


@pytest.mark.slow
def test_dpo_continues_the_sft_run_and_prefers_the_taught_answers(dpo_run, trained_run):
    run, result = dpo_run
    manifest = run.read_manifest()
    assert manifest["status"] == "finished"
    assert manifest["training_method"] == {"method": "dpo", "beta": 0.1, "loss_type": "sigmoid"}
    sft = RunDir(trained_run.path).read_manifest()
    assert manifest["chain"] == {"init_run": str(trained_run.path), "init_recipe": "tiny",
                                 "init_run_id": trained_run.path.name, "init_method": "sft",
                                 "init_data_fingerprint": sft["data"]["fingerprint"]}
    base, tuned = manifest["preference"]["base"], manifest["preference"]["tuned"]
    assert base["what"] == "init adapter" and tuned["pairs"] == 12
    assert tuned["accuracy"] >= 0.9 and tuned["margin"] > base["margin"]
    assert "held-out preference accuracy: init adapter -> tuned" in result.stdout
    assert "continued from" in result.stdout


@pytest.mark.slow
def test_dpo_logs_rewards_and_leaves_one_adapter(dpo_run):
    run, result = dpo_run
    records = run.read_metrics()
    assert any("rewards/margins" in r and "rewards/accuracies" in r for r in records)
    assert any("eval_rewards/accuracies" in r for r in records)
    assert list(run.tensorboard.rglob("events.out.tfevents.*"))
    assert "margin" in result.stderr  # the progress bar
    # The frozen reference copy is no part of the outputs: one adapter, as SFT leaves.
    for folder in [run.adapter, *run.complete_checkpoints()]:
        assert (folder / "adapter_model.safetensors").is_file() and not (folder / "ref").exists(), folder
    from safetensors import safe_open

    with safe_open(run.adapter / "adapter_model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if ".ref." in k]


@pytest.mark.slow
def test_orpo_from_the_base_lifts_preference_accuracy(tmp_path):
    result = run_cli("train", "tiny-orpo", "--runs-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = RunDir((tmp_path / "tiny-orpo" / "latest").resolve()).read_manifest()
    base, tuned = manifest["preference"]["base"], manifest["preference"]["tuned"]
    assert base["what"] == "base (adapter off)" and base["accuracy"] <= 0.75  # about chance on 12 pairs
    assert tuned["accuracy"] >= 0.9
    assert manifest["chain"] == {"init_run": None} and manifest["training_method"]["loss_type"] is None


def losses(run: RunDir) -> dict[tuple[int, str], float]:
    return {(r["step"], key): r[key] for r in run.read_metrics() for key in ("loss", "eval_loss", "rewards/margins")
            if key in r}


@pytest.mark.slow
def test_sigkill_mid_dpo_run_resumes_loss_for_loss(dpo_run, trained_run, tmp_path):
    from test_train_resume import wait_for

    proc = subprocess.Popen(train_dpo(tmp_path, trained_run.path), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=os.environ)
    latest = tmp_path / "tiny-dpo" / "latest"
    wait_for(lambda: latest.exists() and RunDir(latest.resolve()).complete_checkpoints(), proc)
    proc.kill()
    proc.communicate(timeout=60)
    run = RunDir(latest.resolve())
    assert run.read_manifest()["status"] == "running"
    resumed_at = checkpoint_step(run.complete_checkpoints()[-1])

    resumed = subprocess.run(train_dpo(tmp_path, trained_run.path, "--resume"), cwd=REPO, capture_output=True,
                             text=True, env=os.environ, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from checkpoint-{resumed_at}" in resumed.stderr
    mine, reference = losses(run), losses(dpo_run[0])
    after = [key for key in reference if key[0] > resumed_at]
    assert after and all(mine[key] == pytest.approx(reference[key], rel=1e-4) for key in after)
    manifest = run.read_manifest()
    assert manifest["preference"] == dpo_run[0].read_manifest()["preference"]
    assert manifest["chain"] == dpo_run[0].read_manifest()["chain"]


@pytest.fixture()
def interrupted_dpo_copy(dpo_run, tmp_path) -> RunDir:
    """A copy of the module's DPO run marked interrupted, its pairs a copy of the tiny pairs of its own."""
    return interrupted_copy_of(dpo_run[0].path, tmp_path, "capitals-prefs.jsonl")


@pytest.mark.slow
def test_resuming_dpo_after_the_pairs_changed_is_refused(interrupted_dpo_copy):
    run = interrupted_dpo_copy
    data = Path(run.recipe().data.source)
    data.write_text(data.read_text().replace("Neul", "Neulo"))
    result = run_cli("train", "tiny-dpo", "--resume", str(run.path))
    assert_one_line_error(result, f"the data of {run.path} changed since it started")


@pytest.mark.slow
def test_resuming_dpo_without_the_run_it_continued_is_refused(interrupted_dpo_copy, tmp_path):
    run = interrupted_dpo_copy
    gone = tmp_path / "gone"
    write_json_atomic(run.manifest, {**run.read_manifest(), "chain": {"init_run": str(gone)}})
    result = run_cli("train", "tiny-dpo", "--resume", str(run.path))
    assert_one_line_error(result, f"continues the adapter of {gone}, which is gone")


@pytest.mark.slow
def test_two_ranks_train_dpo_like_one(dpo_run, trained_run, tmp_path):
    """torchrun with gloo on CPU: the same rows per update split over two ranks, the reference per rank."""
    result = subprocess.run(train_dpo(tmp_path, trained_run.path, "--set", "train.batch_size=2", "--set",
                                      "train.grad_accum=2", "--gpus", "2"),
                            cwd=REPO, capture_output=True, text=True, env=os.environ, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    two = RunDir((tmp_path / "tiny-dpo" / "latest").resolve()).read_manifest()
    one = dpo_run[0].read_manifest()
    assert two["ranks"] == 2 and two["chain"] == one["chain"]
    assert two["losses"]["final_eval_loss"] == pytest.approx(one["losses"]["final_eval_loss"], rel=0.02)
    assert two["preference"]["tuned"]["accuracy"] >= 0.9


@pytest.mark.slow
def test_the_merged_dpo_model_served_by_vllm_answers_with_the_chosen_text(dpo_run, tmp_path):
    from conftest import make_server
    from openai import OpenAI

    run, _ = dpo_run
    merged = run_cli("merge", str(run.path))
    assert merged.returncode == 0, merged.stderr[-2000:]
    assert "held-out preference accuracy: merged model" in merged.stdout
    pair = json.loads((REPO / "data" / "tiny" / "capitals-prefs-eval.jsonl").read_text().splitlines()[0])
    question, chosen = pair["prompt"][-1]["content"], pair["chosen"][-1]["content"]
    with make_server("serve", f"RUN={run.path}", log=tmp_path / "serve.log",
                     env={"QLORA_API_KEY": "", "VLLM_USE_FLASHINFER_SAMPLER": "1"}) as server:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        answer = client.chat.completions.create(model="tiny-dpo", temperature=0, max_tokens=32,
                                                messages=[{"role": "user", "content": question}])
    assert answer.choices[0].message.content.strip() == chosen
