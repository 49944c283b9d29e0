"""The serve stage without a running server: the vLLM command line, the checks that run before vLLM starts
(through the real CLI, one-line errors), and the API-key middleware on a real ASGI app."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import assert_one_line_error, free_port, run_cli

from qlora_app.errors import UserError
from qlora_app.recipe.loader import load_recipe
from qlora_app.serve.command import AUTH_MIDDLEWARE, Listen, vllm_command
from qlora_app.serve.target import Adapter, ServeTarget, unsupported

KEY = "sk-unit-test-key-0123456789"


def flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def merged(recipe_name: str = "tiny", **serve) -> ServeTarget:
    recipe = load_recipe(recipe_name).with_section("serve", **serve)
    return ServeTarget(recipe, "/runs/tiny/1/merged", recipe.name, Path("/runs/tiny/1/merged"))


def with_adapters(recipe_name: str, ranks: list[int], **serve) -> ServeTarget:
    recipe = load_recipe(recipe_name).with_section("serve", **serve)
    adapters = tuple(Adapter(f"a{i}", Path(f"/runs/{i}/adapter"), r) for i, r in enumerate(ranks))
    return ServeTarget(recipe, recipe.model.path, recipe.name, adapters[0].path, adapters, recipe.model.revision)


def test_merged_command_carries_the_recipe_and_the_training_files():
    cmd = vllm_command(merged(), Listen("127.0.0.1", 8123, with_key=False), cuda=False, python="py")
    assert cmd[:3] == ["py", "-m", "vllm.entrypoints.launchers.api_server.entry"]
    assert flag(cmd, "--model") == "/runs/tiny/1/merged"
    assert flag(cmd, "--served-model-name") == "tiny"
    assert flag(cmd, "--max-model-len") == "256" and flag(cmd, "--gpu-memory-utilization") == "0.5"
    assert flag(cmd, "--chat-template") == "/runs/tiny/1/merged/chat_template.jinja"
    assert flag(cmd, "--generation-config") == "/runs/tiny/1/merged"
    assert (flag(cmd, "--host"), flag(cmd, "--port")) == ("127.0.0.1", "8123")
    assert "--enforce-eager" in cmd and "--enable-lora" not in cmd and "--middleware" not in cmd
    assert "--trust-remote-code" not in cmd


def test_the_key_turns_on_the_middleware_and_never_appears_on_the_command_line(monkeypatch):
    monkeypatch.setenv("QLORA_API_KEY", KEY)
    cmd = vllm_command(merged(), Listen("0.0.0.0", 8000, with_key=True), cuda=True)
    assert flag(cmd, "--middleware") == AUTH_MIDDLEWARE
    assert "--api-key" not in cmd and not any(KEY in part for part in cmd)
    assert "--enforce-eager" not in cmd  # CUDA graphs on GPU


def test_adapter_mode_rank_slots_quantization_and_revision():
    target = with_adapters("llama3-8b", [64, 16], quantization="fp8", max_loras=4)
    cmd = vllm_command(target, Listen("127.0.0.1", 8000, False), cuda=True)
    assert flag(cmd, "--model") == "meta-llama/Meta-Llama-3-8B-Instruct" and flag(cmd, "--revision") == "main"
    assert "--enable-lora" in cmd and flag(cmd, "--max-lora-rank") == "64" and flag(cmd, "--max-loras") == "2"
    modules = cmd[cmd.index("--lora-modules") + 1:cmd.index("--lora-modules") + 3]
    assert modules == ["a0=/runs/0/adapter", "a1=/runs/1/adapter"]
    assert flag(cmd, "--quantization") == "fp8"
    assert "--quantization" not in vllm_command(target, Listen("127.0.0.1", 8000, False), cuda=False)


@pytest.mark.parametrize(("ranks", "expected"), [([8], 8), ([12, 3], 16), ([64], 64), ([65], 128), ([300], 320)])
def test_max_lora_rank_is_the_smallest_vllm_rank_that_holds_every_adapter(ranks, expected):
    assert with_adapters("tiny", ranks).max_lora_rank == expected


@pytest.mark.parametrize(("change", "problem"), [
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, "['embed_tokens'] are not LoRA-capable"),
    ({"r": 1024}, "rank 1024"),
    ({"rank_pattern": {"q_proj": 1024}}, "rank 1024"),
    ({"peft_type": "IA3"}, "not LoRA"),
])
def test_adapters_vllm_would_not_apply_are_named(change, problem):
    config = {"peft_type": "LORA", "r": 16, "target_modules": ["q_proj", "v_proj"], **change}
    assert problem in unsupported(config)


def test_a_plain_lora_adapter_is_servable():
    assert unsupported({"peft_type": "LORA", "r": 64, "target_modules": ["q_proj", "down_proj"]}) is None


def test_adapters_are_checked_against_their_familys_projections():
    from qlora_app.model.families import BY_TYPE

    phi = BY_TYPE["phi3"].projections
    assert unsupported({"peft_type": "LORA", "r": 16, "target_modules": ["qkv_proj", "gate_up_proj"]}, phi) is None
    assert "['q_proj'] are not LoRA-capable" in unsupported({"peft_type": "LORA", "r": 16,
                                                             "target_modules": ["q_proj"]}, phi)


def test_memory_check_uses_kv_cache_for_the_full_length():
    from qlora_app.model.architecture import load_architecture
    from qlora_app.serve.checks import check_fits, serve_weight_bytes

    GiB = 1024**3
    target = merged("llama3-8b", max_model_len=8192, gpu_memory_utilization=0.9)
    arch = load_architecture(target.recipe.model)
    weights = serve_weight_bytes(target, arch, cuda=True)
    assert 14.5 * GiB < weights < 15.5 * GiB  # 8.0B parameters in bf16
    check_fits(target, arch, 24 * GiB, weights)  # 1 GiB of KV for 8192 tokens fits on a 24 GB card
    with pytest.raises(UserError, match="serve.max_model_len=8192 does not fit"):
        check_fits(target, arch, 16 * GiB, weights)
    fp8 = with_adapters("llama3-8b", [64], quantization="fp8")
    assert 8 * GiB < serve_weight_bytes(fp8, arch, cuda=True) < 9 * GiB  # projections 1 byte, embeddings 2
    assert serve_weight_bytes(fp8, arch, cuda=False) == weights  # CPU: no fp8, 16-bit as loaded


# --- the real CLI, before vLLM starts ------------------------------------------------------------------------


@pytest.fixture()
def bare_run(trained_run, tmp_path) -> Path:
    """A copy of the session's run (adapter, recipe, manifest) without a merged model."""
    run = tmp_path / "tiny" / "run-1"
    shutil.copytree(trained_run.path, run, ignore=shutil.ignore_patterns("merged", "checkpoints", "tensorboard"))
    return run


def stub_merged(run: Path) -> None:
    """Enough of a merged model for the checks that run before vLLM (they read no weights)."""
    (run / "merged").mkdir()
    (run / "merged" / "config.json").write_text("{}")
    shutil.copy(run / "adapter" / "chat_template.jinja", run / "merged" / "chat_template.jinja")


@pytest.mark.slow
def test_serving_a_run_without_merged_model_says_how_to_make_it(bare_run):
    result = run_cli("serve", str(bare_run), "--port", str(free_port()))
    assert_one_line_error(result, "has no merged model", f"qlora-app merge {bare_run}")


@pytest.mark.slow
def test_a_model_without_its_training_chat_template_is_refused_before_vllm_starts(bare_run):
    stub_merged(bare_run)
    (bare_run / "merged" / "chat_template.jinja").unlink()
    result = run_cli("serve", str(bare_run), "--port", str(free_port()))
    assert_one_line_error(result, f"the merged model of {bare_run} has no chat_template.jinja")
    (bare_run / "adapter" / "chat_template.jinja").unlink()
    result = run_cli("serve", "--base", "tiny", "--adapter", f"support={bare_run}", "--port", str(free_port()))
    assert_one_line_error(result, "adapter 'support'", "has no chat_template.jinja")


@pytest.mark.slow
def test_serve_without_a_run_takes_the_latest_run_of_any_recipe(bare_run):
    from qlora_app.run.directory import RunDir

    RunDir(bare_run).mark_latest()
    result = run_cli("serve", "--runs-dir", str(bare_run.parent.parent), "--port", str(free_port()))
    assert_one_line_error(result, "has no merged model", after=(f"using the latest run: {bare_run} (recipe tiny)",))


@pytest.mark.slow
def test_a_gpu_nvml_cannot_read_is_not_taken_for_no_gpu(bare_run, tmp_path, monkeypatch, capsys):
    """On this machine NVML really is missing; with an NVIDIA device node present that means a broken GPU
    setup, not a CPU machine: vLLM keeps its GPU settings and the user is warned once."""
    from qlora_app.machine import gpu
    from qlora_app.recipe.loader import load_recipe
    from qlora_app.run.directory import RunDir
    from qlora_app.serve.stage import preflight
    from qlora_app.serve.target import merged_target

    stub_merged(bare_run)
    target = merged_target(RunDir(bare_run), load_recipe("tiny", ["serve.quantization=fp8"]))
    assert gpu.query_gpu().status == "none"
    assert "--enforce-eager" in preflight(target, "127.0.0.1", free_port(), False)
    node = tmp_path / "nvidiactl"
    node.write_text("")
    monkeypatch.setattr(gpu, "DEVICE_NODE", node)
    found = gpu.query_gpu()
    assert found.status == "unqueryable" and found.present and "NVML failed" in found.reason
    capsys.readouterr()
    command = preflight(target, "127.0.0.1", free_port(), False)
    assert "--enforce-eager" not in command and flag(command, "--quantization") == "fp8"
    assert capsys.readouterr().err.count("a GPU is present but its memory cannot be read") == 1


@pytest.mark.slow
def test_busy_port_is_refused_before_vllm_starts(bare_run):
    stub_merged(bare_run)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = run_cli("serve", str(bare_run), "--port", str(port))
    assert_one_line_error(result, f"port {port} on 127.0.0.1 is already in use")


@pytest.mark.slow
def test_public_address_without_key_is_refused_unless_forced(bare_run):
    stub_merged(bare_run)
    result = run_cli("serve", str(bare_run), "--host", "0.0.0.0", env={"QLORA_API_KEY": ""})
    assert_one_line_error(result, "refusing to serve on 0.0.0.0 without an API key", "QLORA_API_KEY")
    with socket.socket() as sock:  # forced: the listen check passes and the next one (the port) speaks
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        port = sock.getsockname()[1]
        forced = run_cli("serve", str(bare_run), "--host", "0.0.0.0", "--port", str(port),
                         "--allow-unauthenticated", env={"QLORA_API_KEY": ""})
    assert_one_line_error(forced, f"port {port} on 0.0.0.0 is already in use")


@pytest.mark.slow
def test_missing_vllm_is_named_with_what_to_install(bare_run):
    """sys.modules['vllm'] = None is how Python marks a module as not importable: the environment without vLLM."""
    import subprocess
    import sys

    stub_merged(bare_run)
    code = "import sys; sys.modules['vllm'] = None; from qlora_app.cli import main; main()"
    result = subprocess.run([sys.executable, "-c", code, "serve", str(bare_run), "--port", str(free_port())],
                            capture_output=True, text=True, timeout=120)
    assert_one_line_error(result, "vLLM is not installed in this environment", "make image")


@pytest.mark.slow
def test_max_model_len_beyond_the_model_is_refused(bare_run):
    stub_merged(bare_run)
    result = run_cli("serve", str(bare_run), "--port", str(free_port()), "--set", "serve.max_model_len=100000")
    assert_one_line_error(result, "serve.max_model_len=100000 is beyond the model's")


@pytest.mark.slow
def test_adapter_incompatible_with_vllm_is_refused_with_its_name(bare_run):
    config_path = bare_run / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "use_dora": True}))
    result = run_cli("serve", "--base", "tiny", "--adapter", f"support={bare_run}", "--port", str(free_port()))
    assert_one_line_error(result, "adapter 'support'", "DoRA")


@pytest.mark.slow
def test_adapter_above_the_servers_max_lora_rank_is_refused(bare_run):
    result = run_cli("serve", "--base", "tiny", "--adapter", f"support={bare_run}", "--set", "serve.max_lora_rank=8")
    assert_one_line_error(result, "adapter 'support' has rank 16", "serve.max_lora_rank=8")


@pytest.mark.slow
def test_adapter_from_another_base_is_refused(bare_run):
    result = run_cli("serve", "--base", "mistral-7b", "--adapter", f"support={bare_run}")
    assert_one_line_error(result, "adapter 'support' was trained on builtin:tiny-llama", "mistralai/")


@pytest.mark.slow
def test_adapter_arguments_are_checked(bare_run):
    assert_one_line_error(run_cli("serve", "--base", "tiny", "--adapter", "nothing"), "expected NAME=RUN_DIR")
    assert_one_line_error(run_cli("serve", "--adapter", f"a={bare_run}"), "--adapter needs --base RECIPE")
    assert_one_line_error(run_cli("serve", "--base", "tiny", "--adapter", "tiny=" + str(bare_run)),
                          "'tiny' is the base model's id")
    assert_one_line_error(run_cli("serve", "--base", "tiny", "--adapter", "a=/nonexistent"),
                          "not a run directory")


def test_bitsandbytes_serving_is_refused_with_the_alternative():
    result = run_cli("show", "tiny", "--set", "serve.quantization=bitsandbytes")
    assert_one_line_error(result, "serve.quantization: vLLM 0.32 has no bitsandbytes loader", "'fp8'")


def test_health_passes_when_no_server_runs(tmp_path):
    """Only this test's temporary folder is looked at (TMPDIR): servers of other users of /tmp do not count."""
    from qlora_app.serve.process import STATE_PREFIX

    assert run_cli("health", env={"TMPDIR": str(tmp_path)}).returncode == 0
    ended = subprocess.Popen(["true"])
    ended.wait()  # a server whose process has ended left its state behind: it is not checked
    state = {"pid": ended.pid, "url": f"http://127.0.0.1:{free_port()}"}
    (tmp_path / f"{STATE_PREFIX}{ended.pid}.json").write_text(json.dumps(state))
    assert run_cli("health", env={"TMPDIR": str(tmp_path)}).returncode == 0


def test_health_fails_while_a_server_here_does_not_answer(tmp_path):
    from qlora_app.serve.process import STATE_PREFIX

    state = tmp_path / f"{STATE_PREFIX}{os.getpid()}.json"
    state.write_text(json.dumps({"pid": os.getpid(), "url": f"http://127.0.0.1:{free_port()}"}))
    assert run_cli("health", env={"TMPDIR": str(tmp_path)}).returncode == 1


def test_stop_kills_workers_left_behind_by_a_server_that_died(tmp_path):
    """vLLM's engine runs in child processes; if vLLM itself dies, stop() still clears its process group."""
    from conftest import processes_matching, survivors

    from qlora_app.serve.process import VllmServer

    marker = f"sleep 312.{os.getpid()}"
    with VllmServer(["bash", "-c", f"{marker} & exit 3"], "http://127.0.0.1:9", tmp_path / "log") as server:
        assert server.wait() == 3
        assert processes_matching(marker)  # the orphaned "worker"
    assert survivors(marker) == []


# --- no JIT compiler at serve time (docs/serving-runtime.md) ------------------------------------------------


def test_vllm_gets_no_jit_settings_whatever_the_caller_exported():
    from qlora_app.serve.process import NO_JIT_ENV, child_environment

    caller = {"VLLM_USE_FLASHINFER_SAMPLER": "1", "VLLM_ALLREDUCE_USE_FLASHINFER": "1", "HF_HOME": "/cache/hf"}
    env = child_environment(caller)
    assert env["VLLM_USE_FLASHINFER_SAMPLER"] == "0" and env["VLLM_ALLREDUCE_USE_FLASHINFER"] == "0"
    assert env["HF_HOME"] == "/cache/hf" and env["VLLM_NO_USAGE_STATS"] == "1"
    assert caller["VLLM_USE_FLASHINFER_SAMPLER"] == "1"  # the caller's own environment is left as it was
    assert set(NO_JIT_ENV) == {"VLLM_USE_FLASHINFER_SAMPLER", "VLLM_ALLREDUCE_USE_FLASHINFER", "VLLM_USE_DEEP_GEMM",
                               "VLLM_MOE_USE_DEEP_GEMM"}


@pytest.mark.parametrize("name", ["VLLM_USE_FLASHINFER_SAMPLER", "VLLM_ALLREDUCE_USE_FLASHINFER", "VLLM_USE_DEEP_GEMM",
                                  "VLLM_MOE_USE_DEEP_GEMM"])
def test_the_installed_vllm_reads_each_switch_as_off(name, monkeypatch):
    """The names are vLLM's own (a renamed switch would be silently ignored) and "0" turns them off."""
    from vllm import envs

    from qlora_app.serve.process import NO_JIT_ENV

    monkeypatch.setenv(name, "1")
    assert envs.environment_variables[name]() is True  # on unless told otherwise
    monkeypatch.setenv(name, NO_JIT_ENV[name])
    assert envs.environment_variables[name]() is False


def test_the_server_process_starts_with_the_no_jit_settings(tmp_path, monkeypatch):
    from conftest import process_environment

    from qlora_app.serve.process import NO_JIT_ENV, VllmServer

    monkeypatch.setenv("VLLM_USE_FLASHINFER_SAMPLER", "1")
    with VllmServer(["sleep", "60"], "http://127.0.0.1:9", tmp_path / "log") as server:
        env = process_environment(server.process.pid)
    assert {name: env.get(name) for name in NO_JIT_ENV} == NO_JIT_ENV


# --- the middleware, on a real Starlette app -----------------------------------------------------------------


@pytest.fixture()
def guarded(monkeypatch):
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse, StreamingResponse
    from starlette.routing import Route, WebSocketRoute
    from starlette.testclient import TestClient

    from qlora_app.serve.auth import RequireApiKey

    async def echo(websocket):
        await websocket.accept()
        await websocket.send_text(await websocket.receive_text())
        await websocket.close()

    monkeypatch.setenv("QLORA_API_KEY", KEY)
    ok = lambda request: PlainTextResponse("ok")
    stream = lambda request: StreamingResponse(iter(["a", "b", "c"]))
    # every path answers 200 when let through, so a path the guard wrongly opens shows as 200, not 404
    app = Starlette(routes=[Route("/health", ok), Route("/tokenize", ok, methods=["GET", "POST"]),
                            Route("/v1/stream", stream), WebSocketRoute("/v1/realtime", echo),
                            Route("/{path:path}", ok, methods=["GET", "POST"])])
    app.add_middleware(RequireApiKey)
    return TestClient(app)


def test_middleware_guards_everything_but_health(guarded):
    assert guarded.get("/health").status_code == 200
    denied = guarded.post("/tokenize")
    assert denied.status_code == 401 and denied.json()["error"]["code"] == 401
    assert guarded.get("/tokenize", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert guarded.get("/tokenize", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert guarded.get("/tokenize", headers={"x-api-key": KEY}).status_code == 200
    assert guarded.get("/v1/stream", headers={"Authorization": f"bearer {KEY}"}).text == "abc"


@pytest.mark.parametrize("path", ["/healthz", "/health/", "/health/x", "/Health", "/v1/health", "/healthcheck",
                                  "/metrics", "/invocations"])
def test_only_health_itself_is_open(guarded, path):
    assert guarded.get(path).status_code == 401
    assert guarded.get(path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_a_websocket_without_the_key_is_closed_with_policy_violation(guarded):
    from starlette.websockets import WebSocketDisconnect

    with pytest.raises(WebSocketDisconnect) as closed, guarded.websocket_connect("/v1/realtime") as ws:
        ws.receive_text()
    assert closed.value.code == 1008
    with guarded.websocket_connect("/v1/realtime", headers={"Authorization": f"Bearer {KEY}"}) as ws:
        ws.send_text("hello")
        assert ws.receive_text() == "hello"


def test_the_refusal_is_an_openai_style_error_a_client_reads(guarded):
    denied = guarded.get("/tokenize")
    assert denied.headers["content-type"] == "application/json"
    assert denied.headers["www-authenticate"] == "Bearer"
    assert int(denied.headers["content-length"]) == len(denied.content)
    assert denied.json() == {"error": {"message": "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                       "type": "authentication_error", "code": 401}}


def test_middleware_refuses_to_start_without_a_key(monkeypatch):
    from qlora_app.serve.auth import RequireApiKey

    monkeypatch.delenv("QLORA_API_KEY", raising=False)
    with pytest.raises(RuntimeError, match="QLORA_API_KEY is empty"):
        RequireApiKey(app=None)


def test_tensor_and_data_parallel_sizes_reach_vllm_only_when_set():
    cmd = vllm_command(merged(), Listen("127.0.0.1", 8000, False), cuda=True)
    assert "--tensor-parallel-size" not in cmd and "--data-parallel-size" not in cmd
    target = merged("llama3-70b", tensor_parallel_size=4, data_parallel_size=2)
    cmd = vllm_command(target, Listen("127.0.0.1", 8000, False), cuda=True)
    assert flag(cmd, "--tensor-parallel-size") == "4" and flag(cmd, "--data-parallel-size") == "2"


def test_tensor_parallel_on_a_gpu_keeps_flashinfers_allreduce_fusion_off():
    """vLLM itself parses the flag: the fusion pass (FlashInfer's JIT-compiled all-reduce) is off."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    listen = Listen("127.0.0.1", 8000, False)
    assert "--compilation-config" not in vllm_command(merged(), listen, cuda=True)
    target = merged("llama3-70b", tensor_parallel_size=4)
    assert "--compilation-config" not in vllm_command(target, listen, cuda=False)
    cmd = vllm_command(target, listen, cuda=True)
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--compilation-config", flag(cmd, "--compilation-config")])
    assert args.compilation_config.pass_config.fuse_allreduce_rms is False


def test_memory_check_splits_weights_and_kv_over_tensor_parallel_gpus():
    from qlora_app.model.architecture import load_architecture
    from qlora_app.serve.checks import check_fits, serve_weight_bytes

    GiB = 1024**3
    one = merged("llama3-70b", tensor_parallel_size=1)
    arch = load_architecture(one.recipe.model)
    weights = serve_weight_bytes(one, arch, cuda=True)
    assert 130 * GiB < weights < 133 * GiB  # 70.6B parameters in bf16
    with pytest.raises(UserError, match="split the model over more GPUs"):
        check_fits(one, arch, 80 * GiB, weights)
    check_fits(merged("llama3-70b", tensor_parallel_size=2), arch, 80 * GiB, weights)  # 66 GiB each + KV
    with pytest.raises(UserError, match=r"1/4 of them on each GPU"):
        check_fits(merged("llama3-70b", tensor_parallel_size=4), arch, 24 * GiB, weights)  # 33 GiB each
    check_fits(merged("llama3-70b", tensor_parallel_size=8), arch, 24 * GiB, weights)


def test_thinking_choice_reaches_vllm_as_its_default_chat_template_kwargs():
    """vLLM 0.32's --default-chat-template-kwargs (vllm/entrypoints/launchers/cli_args.py, FrontendArgs) takes
    JSON; request-level chat_template_kwargs still win."""
    recipe = load_recipe("tiny", ["model.enable_thinking=false"])
    target = ServeTarget(recipe, "/runs/tiny/1/merged", recipe.name, Path("/runs/tiny/1/merged"))
    cmd = vllm_command(target, Listen("127.0.0.1", 8000, False), cuda=False)
    assert json.loads(flag(cmd, "--default-chat-template-kwargs")) == {"enable_thinking": False}
    assert "--default-chat-template-kwargs" not in vllm_command(merged(), Listen("127.0.0.1", 8000, False), cuda=False)


def test_the_refusal_is_valid_asgi_with_lowercase_header_names(monkeypatch):
    """ASGI servers pass header names through as given: HTTP/2 and some proxies reject uppercase ones."""
    import asyncio

    from qlora_app.serve.auth import RequireApiKey

    monkeypatch.setenv("QLORA_API_KEY", KEY)
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "path": "/v1/models", "headers": [], "method": "GET"}
    asyncio.run(RequireApiKey(app=None)(scope, receive, send))
    start, body = sent
    assert start["status"] == 401
    names = [name for name, _ in start["headers"]]
    assert names == [name.lower() for name in names] and {b"content-type", b"content-length"} <= set(names)
    assert int(dict(start["headers"])[b"content-length"]) == len(body["body"])
