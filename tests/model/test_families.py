"""Every supported family, on a tiny model of it built locally: its shape planned from config.json, unknown
families refused before weights, and (slow) trained on a multi-turn chat set, merged with its end-of-turn and pad
tokens kept, served by vLLM's CPU build and asked through the openai client, turn after turn."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, Background, assert_one_line_error, cli_in_process, free_port, run_cli

from qlora_app.model.architecture import SHIPPED_DIR, Architecture, load_architecture
from qlora_app.model.families import FAMILIES
from qlora_app.plan import planner
from qlora_app.recipe.loader import load_recipe
from qlora_app.recipe.schema import ModelSpec

KEEPERS = REPO / "data" / "tiny" / "keepers.jsonl"
# Each tiny family: LoRA targets (Phi-3's projections are fused), the token that ends an assistant turn, whether
# the template starts with BOS.
TINY = {
    "tiny-qwen3": (None, "<|im_end|>", False),
    "tiny-mistral": (None, "</s>", True),
    "tiny-gemma3": (None, "<end_of_turn>", True),
    "tiny-phi3": (["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], "<|end|>", False),
}
# Published parameter counts of the recipes' models (model cards, or the safetensors index's total / 2 bytes).
PUBLISHED = {
    "Qwen--Qwen3-8B.json": 8.19e9,
    "meta-llama--Llama-3.1-8B-Instruct.json": 8.03e9,
    "google--gemma-3-1b-it.json": 999_885_952,
    "mistralai--Mistral-Nemo-Instruct-2407.json": 12.25e9,
    "microsoft--phi-4.json": 14.66e9,
}


def conversations() -> list[list[dict]]:
    return [json.loads(line)["messages"] for line in KEEPERS.read_text().splitlines() if line.strip()]


def tokenizer_of(name: str):
    from transformers import AutoTokenizer

    from qlora_app.model.tiny import materialize

    return AutoTokenizer.from_pretrained(materialize(f"builtin:{name}"))


def family_recipe(folder: Path, name: str) -> Path:
    """A recipe that makes the tiny model memorise the keepers set in a few seconds of CPU."""
    targets = TINY[name][0]
    recipe = {
        "description": f"{name} on a multi-turn set (tests/model/test_families.py)",
        "model": {"path": f"builtin:{name}", **({"enable_thinking": False} if name == "tiny-qwen3" else {})},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, **({"target_modules": targets} if targets else {})},
        "data": {"source": str(KEEPERS), "format": "messages", "eval_split": str(KEEPERS), "max_length": 128},
        "train": {"epochs": 60, "batch_size": 4, "grad_accum": 1, "lr": 3.0e-3, "lr_scheduler": "cosine",
                  "warmup_ratio": 0.05, "weight_decay": 0.0, "max_grad_norm": 1.0, "optimizer": "adamw_torch",
                  "eval_steps": 1000, "save_steps": 1000, "report_to": []},
        "serve": {"max_model_len": 256, "gpu_memory_utilization": 0.1},  # on CPU: 10% of RAM held for KV
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


# --- shapes and refusals (fast) ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.model_type)
def test_each_family_has_a_tiny_model_of_its_own_class(family):
    from qlora_app.model.tiny import materialize

    config = json.loads((materialize(f"builtin:{family.tiny}") / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == (family.model_type, [family.architecture])


@pytest.mark.parametrize("name", TINY)
def test_planner_counts_the_lora_parameters_peft_makes(name, tmp_path):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from qlora_app.model.loading import lora_config
    from qlora_app.model.tiny import materialize

    recipe = load_recipe(str(family_recipe(tmp_path, name)))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(materialize(recipe.model.path)), lora_config(recipe))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert planner.lora_params(recipe, load_architecture(recipe.model)) == trainable


@pytest.mark.parametrize("name", TINY)
def test_planner_counts_the_parameters_transformers_builds(name):
    from transformers import AutoModelForCausalLM

    from qlora_app.model.tiny import materialize

    model = AutoModelForCausalLM.from_pretrained(materialize(f"builtin:{name}"))
    assert load_architecture(ModelSpec(path=f"builtin:{name}")).total_params == model.num_parameters()


@pytest.mark.parametrize("file", PUBLISHED)
def test_shipped_architectures_match_the_published_parameter_counts(file):
    arch = Architecture.from_config(json.loads((SHIPPED_DIR / file).read_text()))
    assert arch.total_params == pytest.approx(PUBLISHED[file], rel=0.005)


def test_gemma3_reads_its_sliding_layers_and_mistral_nemo_its_head_dim():
    gemma = load_architecture(ModelSpec(path="google/gemma-3-1b-it"))
    assert (gemma.sliding_window, gemma.sliding_layers, gemma.tied_embeddings) == (512, 22, True)
    nemo = load_architecture(ModelSpec(path="mistralai/Mistral-Nemo-Instruct-2407"))
    assert (nemo.head_dim, nemo.hidden // nemo.heads) == (128, 160)
    assert nemo.linear_shapes()["q_proj"] == (5120, 4096)


def test_phi_projections_are_fused():
    shapes = load_architecture(ModelSpec(path="microsoft/phi-4")).linear_shapes()
    assert shapes == {"qkv_proj": (5120, 5120 + 2 * 1280), "o_proj": (5120, 5120), "gate_up_proj": (5120, 2 * 17920),
                      "down_proj": (17920, 5120)}


def test_gemma3_sliding_layers_keep_only_their_window_of_kv_cache():
    from qlora_app.serve.checks import kv_bytes, kv_bytes_per_token

    gemma = load_architecture(ModelSpec(path="google/gemma-3-1b-it"))
    per_layer = kv_bytes_per_token(gemma) // gemma.layers
    assert kv_bytes(gemma, 8192) == per_layer * (4 * 8192 + 22 * 512)
    assert kv_bytes(gemma, 256) == kv_bytes_per_token(gemma) * 256


def model_folder(tmp_path: Path, config: dict) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def recipe_on(tmp_path: Path, model: Path, **lora) -> Path:
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump({"model": {"path": str(model)}, "lora": lora,
                                    "data": {"source": str(KEEPERS), "eval_split": str(KEEPERS)}}))
    return path


@pytest.mark.parametrize("command", ["plan", "show", "train"])
def test_an_unchecked_family_is_refused_in_one_line_before_weights(command, tmp_path):
    gpt2 = model_folder(tmp_path, {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 2})
    result = cli_in_process(command, str(recipe_on(tmp_path, gpt2)), "--runs-dir", str(tmp_path)) if command == "train" \
        else cli_in_process(command, str(recipe_on(tmp_path, gpt2)))
    assert_one_line_error(result, "model_type 'gpt2' is not supported",
                          *(f"{f.name} ({f.model_type})" for f in FAMILIES))
    assert not (tmp_path / "other").exists()  # train made no run directory


def test_multimodal_gemma3_is_refused_with_the_reason(tmp_path):
    gemma = model_folder(tmp_path, {"model_type": "gemma3", "text_config": {"hidden_size": 2560}})
    assert_one_line_error(cli_in_process("plan", str(recipe_on(tmp_path, gemma))), "vision tower", "gemma3_text")


def test_lora_targets_outside_the_family_are_refused_at_plan(tmp_path):
    from qlora_app.model.tiny import materialize

    phi = materialize("builtin:tiny-phi3")
    assert_one_line_error(cli_in_process("plan", str(recipe_on(tmp_path, phi))), "no projection named q_proj, k_proj, v_proj",
                          "qkv_proj, o_proj, gate_up_proj, down_proj")


# --- templates: each family's rendering rules -------------------------------------------------------------------

def test_qwen3_template_has_no_bos_and_thinks_only_after_the_last_question():
    text = tokenizer_of("tiny-qwen3").apply_chat_template(conversations()[0], tokenize=False)
    assert text.startswith("<|im_start|>user\n")
    assert text.count("<think>") == 1 and text.endswith("<think>\n\n</think>\n\nMira lives in Ulqu.<|im_end|>\n")


def test_mistral_template_starts_with_bos_and_closes_answers_with_eos():
    text = tokenizer_of("tiny-mistral").apply_chat_template(conversations()[0], tokenize=False)
    assert text.startswith("<s>[INST]Who keeps the Radazi?[/INST]Mira keeps the Radazi.</s>[INST]")


def test_gemma3_template_answers_as_model_and_folds_the_system_message():
    system = [{"role": "system", "content": "Be brief."}, *conversations()[0][:1]]
    text = tokenizer_of("tiny-gemma3").apply_chat_template(system, tokenize=False, add_generation_prompt=True)
    assert text == "<bos><start_of_turn>user\nBe brief.\n\nWho keeps the Radazi?<end_of_turn>\n<start_of_turn>model\n"


def test_phi3_template_uses_its_tags_and_pads_with_eos_until_training_fixes_it():
    tokenizer = tokenizer_of("tiny-phi3")
    text = tokenizer.apply_chat_template(conversations()[0][:2], tokenize=False)
    assert text == "<|user|>\nWho keeps the Radazi?<|end|>\n<|assistant|>\nMira keeps the Radazi.<|end|>\n<|endoftext|>"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the trap the training tokenizer must avoid


# --- end to end (slow): train, merge, serve with vLLM, ask every turn -------------------------------------------

@pytest.fixture(scope="module", params=list(TINY))
def merged_run(request, tmp_path_factory) -> tuple[str, Path]:
    """One family's tiny model trained on the keepers set and merged, with the real CLI."""
    name, folder = request.param, tmp_path_factory.mktemp(request.param)
    trained = run_cli("train", str(family_recipe(folder, name)), "--runs-dir", str(folder / "runs"))
    assert trained.returncode == 0, trained.stderr[-3000:]
    run = (folder / "runs" / name / "latest").resolve()
    merged = run_cli("merge", str(run))
    assert merged.returncode == 0, merged.stderr[-3000:]
    return name, run


@pytest.fixture(scope="module")
def served(merged_run, tmp_path_factory):
    """vLLM on the family's merged model, for the family's tests; stopped after them."""
    from openai import OpenAI

    name, run = merged_run
    port = free_port()
    server = Background([sys.executable, "-m", "qlora_app", "serve", str(run), "--port", str(port), "--runs-dir",
                         str(run.parent.parent)],
                        f"http://127.0.0.1:{port}", log=tmp_path_factory.mktemp("serve") / f"{name}.log")
    try:
        server.wait_healthy(timeout=600)
        yield name, OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    finally:
        server.terminate()


@pytest.mark.slow
def test_merged_model_stops_at_the_end_of_turn_and_never_pads_with_eos(merged_run):
    from transformers import AutoTokenizer

    name, run = merged_run
    merged = run / "merged"
    tokenizer = AutoTokenizer.from_pretrained(merged)
    generation = json.loads((merged / "generation_config.json").read_text())
    config = json.loads((merged / "config.json").read_text())
    end_of_turn = tokenizer.convert_tokens_to_ids(TINY[name][1])
    assert end_of_turn in generation["eos_token_id"]
    assert tokenizer.pad_token_id not in generation["eos_token_id"]
    assert generation["pad_token_id"] == config["pad_token_id"] == tokenizer.pad_token_id
    assert tokenizer.chat_template == tokenizer_of(name).chat_template
    assert (merged / "chat_template.jinja").read_text() == tokenizer.chat_template


def ask(client, model: str, messages: list[dict]) -> tuple[str, str]:
    choice = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=32).choices[0]
    return choice.message.content, choice.finish_reason


@pytest.mark.slow
def test_served_model_answers_each_first_turn_exactly_and_stops(served):
    name, client = served
    for chat in conversations():
        assert ask(client, name, chat[:1]) == (chat[1]["content"], "stop")


@pytest.mark.slow
def test_served_model_answers_a_later_turn_from_its_history(served):
    name, client = served
    for chat in conversations():
        assert ask(client, name, chat[:3]) == (chat[3]["content"], "stop")

