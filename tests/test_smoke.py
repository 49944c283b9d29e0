"""`qlora-app doctor --smoke` on CPU: the path a rented GPU takes (doctor, the tiny model trained with the
recipe's attention, merged, served by vLLM, asked through the openai client), and a failing step named."""

from __future__ import annotations

import re

import pytest
from conftest import REPO, assert_one_line_error, run_cli, survivors

STEPS = ["recipe", "doctor", "train", "merge", "serve", "ask"]


@pytest.mark.slow  # trains, merges and serves (vLLM)
def test_smoke_trains_merges_serves_answers_and_says_pass(tmp_path, monkeypatch):
    # a user's shell has no VLLM_LOGGING_LEVEL; this pytest process got ERROR from trl's import (trl/_compat.py)
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    result = run_cli("doctor", "--smoke", "--runs-dir", str(tmp_path), env={"QLORA_API_KEY": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    steps = dict(re.findall(r"^smoke: (\w+) +ok +\d+\.\d s  (.*)$", result.stdout, re.MULTILINE))
    assert list(steps) == STEPS, result.stdout
    assert steps["recipe"] == "llama3-8b: train.attention=auto"
    assert re.search(r"^30 steps of builtin:tiny-llama, attention per_example via sdpa_per_example "
                     r"\(asked: auto\), [\d,]+ tokens/s",
                     steps["train"])
    assert re.search(r"attention backend: .+; sampler: .+$", steps["serve"])
    assert re.search(r"^'What is the capital of .+\?' -> '.+' \((stop|length); ", steps["ask"]), steps["ask"]
    assert re.search(r"^smoke: PASS in \d+ s on CPU \(no NVIDIA GPU visible\)", result.stdout, re.MULTILINE)
    assert [p.name for p in tmp_path.iterdir()] == [".smoke"]  # the user's runs and runs/latest untouched
    (log,) = (tmp_path / ".smoke" / "logs").glob("serve-tiny-*.log")  # where the backend lines are read from
    assert "Resolved architecture: LlamaForCausalLM" in log.read_text(), "vLLM's INFO lines are not logged"
    port = re.search(r"vLLM up at http://127\.0\.0\.1:(\d+)", steps["serve"])[1]
    assert survivors(f"--port {port}") == []


def test_a_broken_recipe_fails_the_smoke_at_its_step(tmp_path):
    broken = tmp_path / "broken.yaml"
    text = (REPO / "recipes" / "llama3-8b.yaml").read_text()
    broken.write_text(text.replace("attention: auto", "attention: fastest"))
    result = run_cli("doctor", "--smoke", "--recipe", str(broken), "--runs-dir", str(tmp_path / "runs"))
    assert_one_line_error(result, "smoke failed at recipe", "train.attention", "fix: `qlora-app recipes` lists")
    assert result.stdout == ""



def test_recipe_goes_with_smoke_only():
    assert_one_line_error(run_cli("doctor", "--recipe", "tiny"), "--recipe goes with --smoke")
