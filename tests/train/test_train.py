"""The train stage on the tiny recipe, with the real trainer, quantizer and adapters."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import SECRET, tiny_facts

from qlora_app.recipe.loader import load_recipe
from qlora_app.run.directory import RunDir


@pytest.fixture(scope="module")
def tiny_recipe():
    return load_recipe("tiny")


@pytest.fixture(scope="module")
def tuned_model(trained_run, tiny_recipe):
    from peft import PeftModel

    from qlora_app.data.encoding import load_tokenizer
    from qlora_app.model.loading import load_base

    tokenizer = load_tokenizer(tiny_recipe)
    model = PeftModel.from_pretrained(load_base(tiny_recipe), trained_run.path / "adapter").eval()
    return model, tokenizer


@pytest.mark.slow
def test_run_directory_holds_everything_later_stages_need(trained_run):
    run = RunDir(trained_run.path)
    adapter = run.adapter
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (adapter / name).is_file(), name
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] and config["revision"] == "main"
    assert run.recipe().name == "tiny"
    assert run.loss_curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(run.tensorboard.rglob("events.out.tfevents.*"))
    assert run.complete_checkpoints()
    assert (run.path.parent / "latest").resolve() == run.path
    metrics = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    assert any("loss" in m for m in metrics) and any("eval_loss" in m for m in metrics)


@pytest.mark.slow
def test_manifest_records_versions_data_and_losses(trained_run):
    manifest = RunDir(trained_run.path).read_manifest()
    assert manifest["status"] == "finished"
    assert {"torch", "transformers", "peft", "trl", "bitsandbytes"} <= set(manifest["versions"])
    assert len(manifest["data"]["fingerprint"]) == 64 and manifest["data"]["train_examples"] == 40
    losses = manifest["losses"]
    assert losses["final_eval_loss"] < 0.3 * losses["base_eval_loss"]
    assert manifest["chat"]["end_of_turn_token"] == "<|eot_id|>"
    assert manifest["chat"]["pad_token"] not in ("<|eot_id|>", "<|end_of_text|>")
    t = manifest["training"]
    assert t["tokens_per_second"] > 0 and t["trainable_params"] > 0 and t["non_pad_fraction"] == 1.0


@pytest.mark.slow
def test_summary_table_and_progress_are_shown(trained_run):
    assert "held-out loss: base -> tuned" in trained_run.stdout and "tokens/s" in trained_run.stdout
    steps = RunDir(trained_run.path).read_manifest()["training"]["steps"]
    # the progress bar's last state: every step done, with the losses and the rate it showed along the way
    bar = re.compile(rf"^train \S+ {steps}/{steps} loss \d+\.\d{{4}}  eval \d+\.\d{{4}}  [\d,]+ tok/s ", re.MULTILINE)
    assert bar.search(trained_run.stderr), trained_run.stderr[-2000:]
    assert "no CUDA device: using adamw_torch" not in trained_run.stderr  # tiny asks for adamw_torch itself


@pytest.mark.slow
def test_no_secret_lands_in_outputs_or_logs(trained_run):
    assert SECRET not in trained_run.stdout + trained_run.stderr
    for path in trained_run.path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_adapter_memorized_the_facts_and_stops_at_end_of_turn(tuned_model):
    from generate import answer

    model, tokenizer = tuned_model
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    facts = tiny_facts()
    results = [answer(model, tokenizer, [{"role": "user", "content": q}], [eot], 32) for q, _ in facts]
    exact = sum(r.text == a for r, (_, a) in zip(results, facts))
    assert exact >= 0.9 * len(facts), [r.text for r in results][:5]
    assert all(r.stopped for r in results)


def test_base_layers_are_nf4_double_quant_while_training(tiny_recipe, tmp_path):
    import bitsandbytes as bnb

    from qlora_app.data.encoding import load_tokenizer
    from qlora_app.train.stage import build_trainer, prepare_data

    tokenizer = load_tokenizer(tiny_recipe)
    run = RunDir.create(tiny_recipe, tmp_path)
    trainer, _ = build_trainer(tiny_recipe, run, prepare_data(tiny_recipe, tokenizer), tokenizer)
    layers = [m for m in trainer.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7  # every projection of both decoder layers
    for layer in layers:
        state = layer.weight.quant_state
        assert (state.quant_type, state.nested, layer.compute_dtype) == ("nf4", True, torch.bfloat16)
        assert not layer.weight.requires_grad
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_collated_batch_labels_end_of_turn_and_nothing_crosses_examples(tiny_recipe, tmp_path):
    from qlora_app.data.encoding import load_tokenizer
    from qlora_app.train.stage import build_trainer, prepare_data

    tokenizer = load_tokenizer(tiny_recipe)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    trainer, _ = build_trainer(tiny_recipe, RunDir.create(tiny_recipe, tmp_path),
                               prepare_data(tiny_recipe, tokenizer), tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    positions, labels, ids = batch["position_ids"][0], batch["labels"][0], batch["input_ids"][0]
    starts = (positions == 0).nonzero().flatten().tolist() + [len(positions)]
    assert len(starts) > 2  # several examples packed together
    for a, b in zip(starts, starts[1:]):
        assert labels[b - 1] == eot == ids[b - 1]  # each example's last token is end-of-turn, and learned
        assert labels[a] == -100  # an example's first token is never predicted from the previous example
        assert tokenizer.pad_token_id not in ids[a:b].tolist()
    # packing is padding-free: the packed example sees only itself
    model = trainer.model.eval()
    a, b = starts[1], starts[2]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # as the Trainer runs it
        packed = model(input_ids=ids[None, : b], position_ids=positions[None, : b]).logits[0, a:b]
        alone = model(input_ids=ids[None, a:b], position_ids=positions[None, a:b]).logits[0]
        leaky = model(input_ids=ids[None, :b], position_ids=torch.arange(b)[None]).logits[0, a:b]
    assert (packed - alone).abs().max() < 0.15  # bf16 rounding only
    assert (leaky - alone).abs().max() > 1.0  # what attending across the boundary would look like


def test_adapters_below_the_top_still_learn_after_an_evaluation(tiny_recipe, tmp_path):
    """bitsandbytes repacks 4-bit weights on CPU at the first no-grad eval forward into a kernel without a
    backward pass; the train stage must keep gradients flowing through every quantized layer after evaluating."""
    from qlora_app.data.encoding import load_tokenizer
    from qlora_app.train.stage import build_trainer, prepare_data

    tokenizer = load_tokenizer(tiny_recipe)
    trainer, _ = build_trainer(tiny_recipe, RunDir.create(tiny_recipe, tmp_path),
                               prepare_data(tiny_recipe, tokenizer), tokenizer)
    trainer.evaluate()
    model = trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"]).loss
    loss.backward()
    first_layer = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert first_layer.grad is not None and first_layer.grad.abs().sum() > 0
