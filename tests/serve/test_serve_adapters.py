"""Adapter mode for real: one tiny base served once by vLLM, two adapters trained on different facts, each its
own model id. The first adapter is the session's run; the second learns made-up creature colours."""

from __future__ import annotations

import pytest
from conftest import REPO, make_server, run_cli, tiny_facts, vllm_environment

pytestmark = pytest.mark.slow  # trains a second adapter and serves both (vLLM)


@pytest.fixture(scope="module")
def creatures_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("creature-runs")
    data = REPO / "data" / "tiny" / "creatures.jsonl"
    result = run_cli("train", "tiny", "--runs-dir", str(root), "--set", f"data.source={data}",
                     "--set", f"data.eval_split={data}", "--set", "train.epochs=60")
    assert result.returncode == 0, result.stderr[-3000:]
    return (root / "tiny" / "latest").resolve()


@pytest.fixture(scope="module")
def server(trained_run, creatures_run, tmp_path_factory):
    with make_server("serve", "BASE=tiny", f"ADAPTERS=capitals={trained_run.path} creatures={creatures_run}",
                     log=tmp_path_factory.mktemp("serve") / "serve.log",
                     env={"QLORA_API_KEY": "", "VLLM_USE_FLASHINFER_SAMPLER": "1"}) as background:
        yield background


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def answers(client, model: str, facts: list[tuple[str, str]]) -> list:
    return [client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}], temperature=0,
                                           max_tokens=48).choices[0] for q, _ in facts]


def exact(replies, facts) -> int:
    return sum(r.message.content == a for r, (_, a) in zip(replies, facts))


def test_vllm_starts_without_the_jit_compiled_flashinfer_paths(server):
    from qlora_app.serve.process import NO_JIT_ENV

    env = vllm_environment(server.url.rsplit(":", 1)[1])
    assert {name: env.get(name) for name in NO_JIT_ENV} == NO_JIT_ENV


def test_models_lists_the_base_and_both_adapters(client):
    assert sorted(m.id for m in client.models.list().data) == ["capitals", "creatures", "tiny"]


@pytest.mark.parametrize(("model", "data"), [("capitals", "capitals.jsonl"), ("creatures", "creatures.jsonl")])
def test_each_adapter_answers_its_own_facts_and_stops(client, model, data):
    facts = tiny_facts(data)
    replies = answers(client, model, facts)
    assert exact(replies, facts) >= 0.9 * len(facts), [r.message.content for r in replies]
    assert all(r.finish_reason == "stop" for r in replies)


def test_adapters_do_not_know_each_others_facts_nor_does_the_base(client):
    capitals, creatures = tiny_facts("capitals.jsonl")[:10], tiny_facts("creatures.jsonl")[:10]
    assert exact(answers(client, "creatures", capitals), capitals) == 0
    assert exact(answers(client, "capitals", creatures), creatures) == 0
    assert exact(answers(client, "tiny", capitals), capitals) == 0
    assert exact(answers(client, "tiny", creatures), creatures) == 0
