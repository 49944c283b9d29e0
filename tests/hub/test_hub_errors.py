"""Each Hub failure through the real CLI is one line that says what to do, exit 2, no traceback.

The Hub is tests/hub/fake_hub.py, a local server answering as huggingface.co does (HF_ENDPOINT points at it),
so the real huggingface_hub, transformers and datasets code makes the requests and wraps the errors. Every
case fails before a weight loads.
"""

from __future__ import annotations

import json

import pytest
from conftest import assert_one_line_error, free_port, run_cli
from fake_hub import Account, FakeHub, Repo

from qlora_app.recipe.loader import load_recipe
from qlora_app.run.directory import RunDir

LLAMA = "meta-llama/Meta-Llama-3-8B-Instruct"  # its shape ships with the app: train reaches the tokenizer
REPOS = {LLAMA: Repo({"config.json": b"{}"}, gated=True), "org/gated": Repo({"config.json": b"{}"}, gated=True),
         "org/open": Repo({"README.md": b"# open\n"}),
         "org/data": Repo({"README.md": b"# data\n"}, kind="dataset")}
TOKENS = {"hf_noaccess": Account("alice")}


@pytest.fixture(scope="module")
def hub():
    with FakeHub(REPOS, TOKENS) as server:
        yield server


@pytest.fixture
def online(hub, tmp_path):
    """The environment of a user online with an empty cache, no token, and the Hub at the fake's address."""
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "", "HF_DATASETS_OFFLINE": "",
            "HF_TOKEN": "", "QLORA_RUNS_DIR": str(tmp_path / "runs")}


def test_train_of_a_gated_model_without_a_token(online):
    result = run_cli("train", "llama3-8b", env=online)
    assert_one_line_error(result, f"model {LLAMA} is gated", f"https://huggingface.co/{LLAMA}", "export HF_TOKEN")


def test_a_token_that_has_no_access_yet(online):
    result = run_cli("plan", "tiny", "--set", "model.path=org/gated", env={**online, "HF_TOKEN": "hf_noaccess"})
    assert_one_line_error(result, "your Hugging Face token has no access to the gated model org/gated",
                          "accept its licence at https://huggingface.co/org/gated")


def test_an_invalid_token(online):
    result = run_cli("plan", "tiny", "--set", "model.path=org/open", env={**online, "HF_TOKEN": "hf_revoked"})
    assert_one_line_error(result, "rejected your Hugging Face token", "https://huggingface.co/settings/tokens")


def test_a_revision_that_does_not_exist(online):
    result = run_cli("plan", "tiny", "--set", "model.path=org/open", "--set", "model.revision=v9", env=online)
    assert_one_line_error(result, "model org/open has no revision 'v9'", "model.revision")


def test_a_typo_in_the_model_name_at_plan_time(online):
    result = run_cli("plan", "tiny", "--set", "model.path=org/opne", env=online)
    assert_one_line_error(result, "model org/opne was not found on the Hub", "check the name")


def test_a_file_missing_from_the_model(online):
    result = run_cli("plan", "tiny", "--set", "model.path=org/open", env=online)
    assert_one_line_error(result, "model org/open has no file config.json")


def test_a_dataset_that_does_not_exist(online):
    result = run_cli("train", "tiny", "--set", "data.source=org/no-such-data", env=online)
    assert_one_line_error(result, "dataset org/no-such-data was not found on the Hub")


def test_offline_and_not_cached(online):
    result = run_cli("train", "llama3-8b", env={**online, "HF_HUB_OFFLINE": "1"})
    assert_one_line_error(result, "HF_HUB_OFFLINE is set", f"`hf download {LLAMA}`")


@pytest.mark.slow  # huggingface_hub retries a refused connection for 23 s (1+2+4+8+8) before it gives up
def test_the_hub_is_unreachable(online):
    result = run_cli("plan", "tiny", "--set", "model.path=org/open", env={**online, "HF_ENDPOINT":
                                                                         f"http://127.0.0.1:{free_port()}"})
    assert_one_line_error(result, "cannot reach the Hub at http://127.0.0.1:", "Connection refused",
                          "hf download org/open")


@pytest.fixture
def finished_run(tmp_path) -> RunDir:
    """A finished run of the tiny recipe as push sees it (its adapter's content does not matter here)."""
    run = RunDir.create(load_recipe("tiny"), tmp_path / "runs")
    run.adapter.mkdir()
    (run.adapter / "adapter_config.json").write_text("{}")
    run.manifest.write_text(json.dumps({"status": "finished"}))
    return run


def test_push_to_a_namespace_without_write_access(online, finished_run):
    result = run_cli("push", str(finished_run.path), "--repo", "other/model", env={**online, "HF_TOKEN": "hf_noaccess"})
    assert_one_line_error(result, "cannot push to other/model", "no write access to the namespace 'other'")


def test_push_when_the_hub_is_unreachable(online, finished_run):
    result = run_cli("push", str(finished_run.path), "--repo", "alice/model",
                     env={**online, "HF_TOKEN": "hf_noaccess", "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"})
    assert_one_line_error(result, "cannot reach the Hub", "run push again")


@pytest.mark.slow  # the session's trained run
def test_merge_of_a_run_on_a_gated_base(online, trained_run, tmp_path):
    """merge fetches the base's safetensors from the Hub (snapshot_download): a gated base is one line."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(trained_run.path, copy, ignore=shutil.ignore_patterns("merged", "checkpoints", "tensorboard"))
    recipe = copy / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("path: builtin:tiny-llama", "path: org/gated"))
    result = run_cli("merge", str(copy), env=online)
    assert_one_line_error(result, "model org/gated is gated and no Hugging Face token was sent")
