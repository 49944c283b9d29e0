"""Attention on packed, padding-free batches: each implementation that runs on CPU attends within each example
only, so a packed row trains exactly like its examples run one by one, sliding windows and soft-capping included.
Real tiny models of several families (random fp32 weights) with real LoRA adapters, batches from trl's own
padding-free collator; the reference runs each example alone through transformers' eager attention."""

from __future__ import annotations

import pytest
import torch

from qlora_app.train.attention import FLASH_KERNEL, PER_EXAMPLE, choose

LENGTHS = (9, 14, 6)  # three examples of different lengths, packed into one row
WINDOW = 5  # shorter than two of the examples: sliding layers must keep it inside each one
SHAPE = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)


def family_model(family: str, implementation: str):
    """A tiny model of `family` (random weights, the same for the same family) with `implementation`."""
    import transformers as t

    from qlora_app.model.tiny import ARCHITECTURES
    from qlora_app.train.per_example import register

    register()  # what AttentionChoice.implementation does before training loads a model
    gemma = dict(SHAPE, head_dim=32, query_pre_attn_scalar=32, sliding_window=WINDOW,
                 layer_types=["sliding_attention", "full_attention"])
    config, cls = {
        "llama": (lambda: t.LlamaConfig(vocab_size=256, **ARCHITECTURES["tiny-llama"]), t.LlamaForCausalLM),
        "mistral": (lambda: t.MistralConfig(vocab_size=256, sliding_window=WINDOW, **SHAPE), t.MistralForCausalLM),
        "gemma3": (lambda: t.Gemma3TextConfig(vocab_size=256, **gemma), t.Gemma3ForCausalLM),
        # a cap low enough to bend random scores
        "gemma2": (lambda: t.Gemma2Config(vocab_size=256, attn_logit_softcapping=2.0, **gemma), t.Gemma2ForCausalLM),
    }[family]
    torch.manual_seed(0)
    return cls._from_config(config(), attn_implementation=implementation, dtype=torch.float32)


def tiny_lora_model(implementation: str, family: str = "llama"):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      init_lora_weights=False, task_type="CAUSAL_LM")  # B != 0: every adapter matrix has a gradient
    torch.manual_seed(1)
    return get_peft_model(family_model(family, implementation), lora).train()


def examples(seed: int = 1, lengths=LENGTHS) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=generator).tolist() for n in lengths]


def packed_batch(rows: list[list[int]]) -> dict:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([{"input_ids": r} for r in rows])
    assert batch["input_ids"].shape == (1, sum(map(len, rows)))  # one row, positions restart per example
    return batch


PACKED_PATHS = [("llama", "sdpa"), ("llama", "eager"), ("llama", PER_EXAMPLE), ("mistral", PER_EXAMPLE),
                ("gemma3", PER_EXAMPLE), ("gemma2", PER_EXAMPLE)]


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


@pytest.mark.parametrize(("family", "implementation"), PACKED_PATHS)
def test_packed_row_trains_like_its_examples_one_by_one(family, implementation):
    rows = examples()
    packed_loss, packed_grads = packed_loss_and_gradients(tiny_lora_model(implementation, family), rows)
    alone_loss, alone_grads = one_by_one_loss_and_gradients(tiny_lora_model("eager", family), rows)
    torch.testing.assert_close(packed_loss, alone_loss, rtol=1e-6, atol=1e-6)
    # A and B of 4 projections in 2 layers
    assert packed_grads.keys() == alone_grads.keys() and len(packed_grads) == 2 * 4 * 2
    for name in packed_grads:
        assert packed_grads[name].abs().max() > 0, name
        torch.testing.assert_close(packed_grads[name], alone_grads[name], rtol=1e-5, atol=1e-6, msg=name)


# flex_attention compiles its kernels on first use: most of a minute on 2 cores, so that case is slow
@pytest.mark.parametrize(("family", "implementation"),
                         [*PACKED_PATHS, pytest.param("llama", "flex_attention", marks=pytest.mark.slow)])
def test_packed_examples_never_see_each_other(family, implementation):
    model = tiny_lora_model(implementation, family)
    rows = examples()
    changed = [rows[0], examples(seed=2, lengths=[LENGTHS[1]])[0], rows[2]]
    reference = tiny_lora_model("eager", family)  # the same weights; one compile of flex (one shape) keeps this quick
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
    auto = choose("auto", cuda=False)
    assert auto.implementation == PER_EXAMPLE and not auto.fell_back
    assert choose("sdpa", cuda=False).implementation == "sdpa"  # asked for by name: the dense-mask path
    assert choose("eager", cuda=False).implementation == "eager"
    for kernel in ("flash", "flex"):  # per example, as the recipe meant
        choice = choose(kernel, cuda=False)
        assert choice.implementation == PER_EXAMPLE and choice.fell_back
        assert choice.message.startswith(f"train.attention={kernel} needs a CUDA GPU")


def test_cpu_training_attends_per_example_not_over_the_whole_row(monkeypatch):
    """What makes packed rows cheap on CPU: sdpa never sees a key beyond its own example (no rows x rows)."""
    model = tiny_lora_model(choose("auto", cuda=False).implementation)
    keys = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, **kwargs):
        keys.append(key.shape[2])
        return real(query, key, value, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    model(**packed_batch(examples()), use_cache=False).loss.backward()
    assert sorted(keys) == sorted(LENGTHS * 2)  # each example once per layer


def test_examples_are_found_from_cu_seq_lens_or_position_ids():
    from qlora_app.train.per_example import example_bounds

    cu = torch.tensor([0, 3, 5, 6], dtype=torch.int32)
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    expected = [[(0, 3), (3, 5), (5, 6)]]
    assert example_bounds(1, 6, {"cu_seq_lens_q": cu, "position_ids": positions}) == expected
    assert example_bounds(1, 6, {"position_ids": positions}) == expected
    two_rows = torch.tensor([[0, 1, 2, 3], [0, 1, 0, 1]])
    assert example_bounds(2, 4, {"position_ids": two_rows}) == [[(0, 4)], [(0, 2), (2, 4)]]
    assert example_bounds(2, 4, {}) == [[(0, 4)], [(0, 4)]]


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_padded_batches_and_generation_are_plain_sdpa(family):
    """Without packing (a padding mask, a KV cache) the path is transformers' sdpa with its mask (and the cap)."""
    rows = examples(lengths=(4, 9))
    ids = torch.tensor([[0] * 5 + rows[0], rows[1]])
    mask = (torch.arange(9) >= torch.tensor([[5], [0]])).long()  # the short example left-padded
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    per_example, eager = family_model(family, PER_EXAMPLE).eval(), family_model(family, "eager").eval()
    with torch.no_grad():
        logits = [m(input_ids=ids, attention_mask=mask, position_ids=positions).logits for m in (per_example, eager)]
        generated = [m.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
                     for m in (per_example, eager)]
    torch.testing.assert_close(logits[0][mask.bool()], logits[1][mask.bool()], rtol=1e-5, atol=1e-5)
    assert torch.equal(generated[0], generated[1])


def test_recipe_choice_reaches_the_model(capsys):
    from qlora_app.model.loading import load_base
    from qlora_app.recipe.loader import load_recipe
    from qlora_app.train import attention

    recipe = load_recipe("tiny").with_section("train", attention="flash")
    choice = attention.resolve(recipe.train.attention)
    warning = capsys.readouterr().err.strip().splitlines()
    assert warning == ["warning: train.attention=flash needs a CUDA GPU: using sdpa per example"]
    assert load_base(recipe, choice.implementation).config._attn_implementation == PER_EXAMPLE
    assert load_base(recipe, "flex_attention").config._attn_implementation == "flex_attention"
