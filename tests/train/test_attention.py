"""Attention on packed, padding-free batches: each implementation that runs on CPU attends within each example
only, so a packed row trains exactly like its examples run one by one. A real Llama (the tiny one's shape,
random fp32 weights) with real LoRA adapters, batches from trl's own padding-free collator."""

from __future__ import annotations

import pytest
import torch

from qlora_app.train.attention import FLASH_KERNEL, choose

LENGTHS = (9, 14, 6)  # three examples of different lengths, packed into one row


def tiny_lora_model(implementation: str):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora_app.model.tiny import ARCHITECTURES

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, **ARCHITECTURES["tiny-llama"])
    model = LlamaForCausalLM._from_config(config, attn_implementation=implementation, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      init_lora_weights=False, task_type="CAUSAL_LM")  # B != 0: every adapter matrix has a gradient
    return get_peft_model(model, lora).train()


def examples(seed: int = 1, lengths=LENGTHS) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=generator).tolist() for n in lengths]


def packed_batch(rows: list[list[int]]) -> dict:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([{"input_ids": r} for r in rows])
    assert batch["input_ids"].shape == (1, sum(map(len, rows)))  # one row, positions restart per example
    return batch


def lora_gradients(model) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def packed_loss_and_gradients(model, rows):
    loss = model(**packed_batch(rows), use_cache=False).loss  # mean over every example's predicted tokens
    loss.backward()
    return loss.detach(), lora_gradients(model)


def one_by_one_loss_and_gradients(model, rows):
    predicted = sum(len(r) - 1 for r in rows)
    total = 0
    for r in rows:
        ids = torch.tensor([r])
        # each example's mean loss weighted by its tokens: the packed row's token mean, example by example
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss * (len(r) - 1) / predicted
        loss.backward()
        total += loss.detach()
    return total, lora_gradients(model)


def packed_logits(model, rows) -> list[torch.Tensor]:
    batch = packed_batch(rows)
    batch.pop("labels")
    logits = model(**batch, use_cache=False).logits[0]
    return list(logits.split([len(r) for r in rows]))


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_packed_row_trains_like_its_examples_one_by_one(implementation):
    model = tiny_lora_model(implementation)
    rows = examples()
    packed_loss, packed_grads = packed_loss_and_gradients(model, rows)
    alone_loss, alone_grads = one_by_one_loss_and_gradients(model, rows)
    torch.testing.assert_close(packed_loss, alone_loss, rtol=1e-6, atol=1e-6)
    # A and B of 4 projections in 2 layers
    assert packed_grads.keys() == alone_grads.keys() and len(packed_grads) == 2 * 4 * 2
    for name in packed_grads:
        assert packed_grads[name].abs().max() > 0, name
        torch.testing.assert_close(packed_grads[name], alone_grads[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("implementation", ["sdpa", "eager", "flex_attention"])
def test_packed_examples_never_see_each_other(implementation):
    model = tiny_lora_model(implementation)
    rows = examples()
    changed = [rows[0], examples(seed=2, lengths=[LENGTHS[1]])[0], rows[2]]
    reference = tiny_lora_model("eager")  # the same weights; one compile of flex (one shape) keeps this quick
    with torch.no_grad():  # flex attention has no backward on CPU; the forward is what decides what attends
        before, after = packed_logits(model, rows), packed_logits(model, changed)
        alone = [reference(input_ids=torch.tensor([r]), use_cache=False).logits[0] for r in rows]
    assert not torch.allclose(before[1], after[1])  # the change is visible where it was made...
    for i in (0, 2):  # ...and nowhere else
        torch.testing.assert_close(after[i], before[i], rtol=0, atol=1e-6)
    for packed, single in zip(before, alone):
        torch.testing.assert_close(packed, single, rtol=1e-5, atol=1e-5)


def test_choice_on_cuda_prefers_flash_then_flex():
    assert choose("auto", cuda=True).implementation == FLASH_KERNEL
    assert choose("flash", cuda=True).implementation == FLASH_KERNEL
    offline = choose("auto", cuda=True, flash_problem="offline, no cached kernel")
    assert offline.implementation == "flex_attention" and offline.fell_back and "offline" in offline.message
    assert choose("flex", cuda=True).implementation == "flex_attention"
    assert choose("sdpa", cuda=True).implementation == "sdpa" and not choose("sdpa", cuda=True).fell_back


def test_choice_on_cpu_runs_what_can_train_here():
    assert choose("auto", cuda=False).implementation == "sdpa" and not choose("auto", cuda=False).fell_back
    assert choose("eager", cuda=False).implementation == "eager"
    for kernel in ("flash", "flex"):
        choice = choose(kernel, cuda=False)
        assert choice.implementation == "sdpa" and choice.fell_back
        assert choice.message.startswith(f"train.attention={kernel} needs a CUDA GPU")


def test_recipe_choice_reaches_the_model(capsys):
    from qlora_app.model.loading import load_base
    from qlora_app.recipe.loader import load_recipe
    from qlora_app.train import attention

    recipe = load_recipe("tiny").with_section("train", attention="flash")
    choice = attention.resolve(recipe.train.attention)
    warning = capsys.readouterr().err.strip().splitlines()
    assert warning == ["warning: train.attention=flash needs a CUDA GPU: using sdpa"]
    assert load_base(recipe, choice.implementation).config._attn_implementation == "sdpa"
    assert load_base(recipe, "flex_attention").config._attn_implementation == "flex_attention"
