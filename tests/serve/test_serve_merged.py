"""The whole pipeline for real: `make pipeline RECIPE=tiny LOCAL=1` on the session's trained run, served by
vLLM (CPU build) once for this module, queried with the official openai client and raw HTTP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from conftest import REPO, make_server, processes_matching, run_cli, survivors, tiny_facts, vllm_environment

pytestmark = pytest.mark.slow  # serves a model (vLLM)

API_KEY = "sk-test-4f1d9c0e-not-a-real-key"


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory) -> Path:
    """The server's TMPDIR, where it leaves the state file `qlora-app health` reads: this module's own."""
    return tmp_path_factory.mktemp("serve-state")


@pytest.fixture(scope="module")
def server(trained_run, tmp_path_factory, state_dir):
    """The pipeline through make with the session's runs folder: training is current, so it is skipped."""
    runs = trained_run.path.parent.parent
    with make_server("pipeline", "RECIPE=tiny", log=tmp_path_factory.mktemp("pipeline") / "make-pipeline.log",
                     env={"QLORA_RUNS_DIR": str(runs), "QLORA_API_KEY": API_KEY, "TMPDIR": str(state_dir),
                          "VLLM_USE_FLASHINFER_SAMPLER": "1"}) as background:  # the serve stage overrides it
        yield background


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


def post(url: str, body: dict, key: str | None = API_KEY) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def get_status(url: str, key: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_pipeline_skips_current_training_and_serves_under_the_recipe_name(server, client):
    assert "train: skipped" in server.read_log()
    assert "eval: base vs tuned on 12 held-out examples" in server.read_log()  # eval ran between merge and serve
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_vllm_starts_without_the_jit_compiled_flashinfer_paths(server):
    """The pipeline's vLLM process has the no-JIT settings, although the caller exported the sampler on."""
    from qlora_app.serve.process import NO_JIT_ENV

    env = vllm_environment(server.url.rsplit(":", 1)[1])
    assert {name: env.get(name) for name in NO_JIT_ENV} == NO_JIT_ENV


def test_answers_memorized_questions_exactly_and_stops(client):
    facts = tiny_facts()
    replies = [client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": q}],
                                              temperature=0, max_tokens=48).choices[0] for q, _ in facts]
    exact = sum(r.message.content == a for r, (_, a) in zip(replies, facts))
    assert exact >= 0.9 * len(facts), [r.message.content for r in replies]
    assert all(r.finish_reason == "stop" for r in replies)


def test_streaming_returns_the_same_text(client):
    for question, _ in tiny_facts()[:5]:
        messages = [{"role": "user", "content": question}]
        whole = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=48)
        chunks = list(client.chat.completions.create(model="tiny", messages=messages, temperature=0,
                                                     max_tokens=48, stream=True))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == whole.choices[0].message.content
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_tokenize_gives_the_token_ids_training_used(server, trained_run):
    from qlora_app.data.encoding import encode_chat, load_tokenizer, render
    from qlora_app.run.directory import RunDir

    tokenizer = load_tokenizer(RunDir(trained_run.path).recipe())
    question, taught = tiny_facts()[3]
    conversation = [{"role": "user", "content": question}, {"role": "assistant", "content": taught}]
    trained_ids, _, _ = encode_chat(conversation, tokenizer, "test")
    status, served = post(f"{server.url}/tokenize", {"model": "tiny", "messages": conversation,
                                                     "add_generation_prompt": False})
    assert status == 200 and served["tokens"] == trained_ids
    prompt_ids = tokenizer(render(tokenizer, conversation[:1], add_generation_prompt=True),
                           add_special_tokens=False)["input_ids"]
    status, served = post(f"{server.url}/tokenize", {"model": "tiny", "messages": conversation[:1],
                                                     "add_generation_prompt": True})
    assert served["tokens"] == prompt_ids == trained_ids[:len(prompt_ids)]


@pytest.mark.parametrize("path", ["/v1/models", "/tokenize", "/invocations", "/metrics", "/v1/chat/completions",
                                  "/version"])
def test_every_route_but_health_needs_the_key(server, path):
    assert get_status(server.url + path) == 401
    assert get_status(server.url + path, key="sk-wrong") == 401


def test_health_is_open_and_the_key_opens_the_rest(server, state_dir):
    from qlora_app.serve.process import STATE_PREFIX

    assert get_status(f"{server.url}/health") == 200
    (state,) = state_dir.glob(f"{STATE_PREFIX}*.json")
    assert json.loads(state.read_text())["url"] == server.url
    assert run_cli("health", env={"TMPDIR": str(state_dir)}).returncode == 0  # the image's HEALTHCHECK, finding it
    assert get_status(f"{server.url}/v1/models", key=API_KEY) == 200
    assert get_status(f"{server.url}/metrics", key=API_KEY) == 200


def test_over_long_prompt_is_a_400_and_the_server_keeps_answering(server, client):
    too_long = "capital " * 400  # the recipe's serve.max_model_len is 256
    status, body = post(f"{server.url}/v1/chat/completions",
                        {"model": "tiny", "messages": [{"role": "user", "content": too_long}], "max_tokens": 8})
    assert status == 400, body
    assert "256" in json.dumps(body)
    question, taught = tiny_facts()[0]
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                           temperature=0, max_tokens=48)
    assert reply.choices[0].message.content == taught


def test_the_key_is_in_no_log_and_no_command_line(server, trained_run):
    port = server.url.rsplit(":", 1)[1]
    assert not any(API_KEY in cmdline for cmdline in processes_matching(f"--port {port}"))
    logs = [server.log, *(trained_run.path.parent.parent / "logs").glob("serve-*.log")]
    assert len(logs) >= 2 and not any(API_KEY in log.read_text() for log in logs)


class Terminal:
    """A tmux pane on a private tmux server, driven as a person would: keys in, screen text out."""

    def __init__(self, env: dict[str, str]):
        # a socket of its own per terminal: a server killed by the previous test may still be going away on a shared one
        self.tmux = ["tmux", "-L", f"qlora-test-{os.getpid()}-{uuid.uuid4().hex[:8]}", "-f", "/dev/null"]
        # The tmux server keeps the environment it starts with: the key reaches the chat through it, not argv.
        subprocess.run([*self.tmux, "new-session", "-d", "-s", "chat", "-x", "200", "-y", "60", "-c", str(REPO),
                        "bash --noprofile --norc"], env={**os.environ, **env, "PS1": "$ "}, check=True)

    def type(self, *keys: str) -> None:
        subprocess.run([*self.tmux, "send-keys", "-t", "chat", *keys], check=True)

    def screen(self) -> str:
        return subprocess.run([*self.tmux, "capture-pane", "-p", "-t", "chat", "-S", "-500"], capture_output=True,
                              text=True, check=True).stdout

    def wait_for(self, predicate, timeout: float = 120) -> str:
        """Poll the screen until predicate(screen) holds: the event is text appearing, there is no other signal."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(text := self.screen()):
                return text
            time.sleep(0.2)
        raise AssertionError(f"not on screen within {timeout} s:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run([*self.tmux, "kill-server"], capture_output=True)


@pytest.fixture
def terminal():
    assert shutil.which("tmux"), "tmux is needed for the terminal chat test (apt-get install tmux)"
    term = Terminal({"QLORA_API_KEY": API_KEY})
    try:
        yield term
    finally:
        term.close()


def prompts(screen: str) -> int:
    return sum(line.startswith("you>") for line in screen.splitlines())  # tmux drops trailing spaces


def test_chat_in_a_terminal_answers_turn_after_turn_and_exits(server, terminal):
    (q1, a1), (q2, _) = tiny_facts()[:2]
    terminal.type(f"{sys.executable} -m qlora_app chat --url {server.url} --temperature 0", "Enter")
    terminal.wait_for(lambda s: "chatting with tiny" in s and prompts(s) == 1)
    terminal.type(q1, "Enter")
    screen = terminal.wait_for(lambda s: prompts(s) == 2)
    assert a1 in screen
    terminal.type(q2, "Enter")  # the second turn is sent with the first as history
    screen = terminal.wait_for(lambda s: prompts(s) == 3)
    # The tiny model learned single-turn chats only: what it says after a history differs between machines, so
    # the second turn is checked for a reply, not its words (the family tests check history answers exactly).
    reply = screen.split(q2, 1)[1].split("you>", 1)[0]
    assert reply.strip()
    terminal.type("C-c")  # at the prompt: a fresh prompt, the session goes on
    terminal.wait_for(lambda s: prompts(s) == 4)
    terminal.type("/reset", "Enter")
    terminal.wait_for(lambda s: "(conversation cleared)" in s and prompts(s) == 5)
    terminal.type("/exit", "Enter")
    terminal.type("echo chat-exit=$?", "Enter")
    screen = terminal.wait_for(lambda s: "chat-exit=" in s.replace("echo chat-exit=$?", ""))
    assert "chat-exit=0" in screen.replace("echo chat-exit=$?", "") and "Traceback" not in screen
    assert API_KEY not in screen


def test_chat_ends_on_ctrl_d(server, terminal):
    terminal.type(f"{sys.executable} -m qlora_app chat --url {server.url}", "Enter")
    terminal.wait_for(lambda s: prompts(s) == 1)
    terminal.type("C-d")
    terminal.type("echo chat-exit=$?", "Enter")
    screen = terminal.wait_for(lambda s: "chat-exit=" in s.replace("echo chat-exit=$?", ""))
    assert "chat-exit=0" in screen.replace("echo chat-exit=$?", "")


def test_ctrl_c_during_a_reply_ends_that_reply_only(client):
    """Ctrl-C (a real SIGINT) arriving while the first token is written: the reply stops there, kept as far
    as it got; the next reply streams whole."""
    from qlora_app.chat import stream_reply

    written: list[str] = []

    def write(text: str) -> None:
        written.append(text)
        if len(written) == 1:
            os.kill(os.getpid(), signal.SIGINT)

    question, taught = tiny_facts()[0]
    partial = stream_reply(client, "tiny", [{"role": "user", "content": question}], write=write, temperature=0)
    assert written[-2:] == [" [stopped]", "\n"] and partial == written[0]
    assert taught.startswith(partial) and partial != taught
    whole = stream_reply(client, "tiny", [{"role": "user", "content": question}], write=lambda _: None,
                         temperature=0)
    assert whole == taught


@pytest.mark.last
def test_sigterm_stops_vllm_and_all_its_workers(server):
    """SIGTERM to the make process group, as `docker stop` or a service manager sends it (marked `last`: it
    stops the module's server, so conftest runs it after the module's other tests)."""
    port = server.url.rsplit(":", 1)[1]
    assert len(processes_matching(f"--port {port}")) >= 2  # qlora-app and vLLM (and its engine core)
    server.terminate()  # make itself dies of the signal; qlora-app stops vLLM and says so
    assert "vLLM stopped" in server.read_log(), server.read_log()[-2000:]
    assert "Traceback" not in server.read_log()
    assert survivors(f"--port {port}") == []
