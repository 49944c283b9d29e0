"""The merge check's measures, fast, on the tiny model: held-out examples, token-weighted loss, the largest logit
difference, and which base `auto` picks and why."""

import json

import pytest
import torch

from qlora_app.merge import verify
from qlora_app.merge.verify import AdapterLosses
from qlora_app.recipe.loader import load_recipe


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def loss_and_count(model, ids, labels) -> tuple[float, int]:
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
    return float(loss), sum(1 for x in labels[1:] if x != -100)


def test_mean_loss_weighs_each_example_by_its_learned_tokens_and_skips_unlabelled_ones(model):
    a = ([5, 6, 7, 8, 9, 10], [-100, -100, 7, 8, 9, 10])
    b = ([11, 12, 13], [-100, 12, 13])
    (la, ca), (lb, cb) = loss_and_count(model, *a), loss_and_count(model, *b)
    unlabelled = ([1, 2, 3], [-100, -100, -100])
    assert verify.mean_loss(model, [a, b, unlabelled]) == pytest.approx((la * ca + lb * cb) / (ca + cb), rel=1e-6)


def test_logit_difference_is_the_largest_gap_and_the_largest_logit(model, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        other.lm_head.weight.mul_(1.5)
    examples = [([5, 6, 7], None), ([8, 9, 10, 11], None)]
    with torch.no_grad():
        la = [model(input_ids=torch.tensor([ids])).logits for ids, _ in examples]
        lb = [other(input_ids=torch.tensor([ids])).logits for ids, _ in examples]
    diff = max(float((x - y).abs().max()) for x, y in zip(la, lb))
    scale = max(float(y.abs().max()) for y in lb)
    assert verify.logit_difference(model, other, examples) == pytest.approx((diff, scale), rel=1e-6)
    assert verify.logit_difference(model, model, examples) == (0.0, pytest.approx(max(float(x.abs().max())
                                                                                      for x in la), rel=1e-6))


def test_held_out_examples_are_the_eval_split_encoded_at_most_32(tmp_path):
    from qlora_app.data.encoding import load_tokenizer

    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus one?"},
                          {"role": "assistant", "content": f"{i + 1}."}]} for i in range(40)]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = load_recipe("tiny", [f"data.eval_split={tmp_path / 'eval.jsonl'}"])
    tokenizer = load_tokenizer(recipe)
    examples = verify.heldout_examples(recipe, tokenizer)
    assert len(examples) == verify.MAX_EXAMPLES == 32
    assert tokenizer.decode([t for t in examples[31][1] if t != -100]) == "32.<|eot_id|>"
    assert len(verify.heldout_examples(load_recipe("tiny"), tokenizer)) == 12
    template = tokenizer.chat_template.replace("{{ bos_token }}", "{{ bos_token }}{{ greeting }}", 1)
    greeted = recipe.with_section("model", chat_template=template, chat_template_kwargs={"greeting": "Welcome."})
    ids = verify.heldout_examples(greeted, load_tokenizer(greeted))[0][0]
    assert tokenizer.decode(ids).startswith("<|begin_of_text|>Welcome.")


@pytest.mark.parametrize(("losses", "expected"), [
    (AdapterLosses(4, None, 1.5, None), ("original", "the adapter was trained on the original 16-bit weights")),
    (AdapterLosses(4, 1.0, 1.5, None), ("original", "the adapter was trained on the original 16-bit weights")),
    (AdapterLosses(4, None, 1.5, 1.2), ("original", "the adapter was trained on the original 16-bit weights")),
    (AdapterLosses(4, 1.0, 1.02, 0.99), ("dequantized", "its held-out loss with the adapter (0.9900) is closest to "
                                                        "the adapter on the 4-bit base it was trained on (1.0000)")),
    (AdapterLosses(4, 1.0, 1.02, 1.03), ("original", "its held-out loss with the adapter (1.0200) is closest to "
                                                     "the adapter on the 4-bit base it was trained on (1.0000)")),
])
def test_auto_picks_the_base_closest_to_the_adapter_on_4_bit(losses, expected):
    assert losses.closest_to_trained() == expected


@pytest.mark.parametrize(("overrides", "base_weights", "problem"), [
    ([], "auto", "cannot check a merge into 'auto' base weights for a qlora recipe"),
    (["quantization.enabled=false"], "dequantized", "cannot check a merge into 'dequantized' base weights for a lora "
                                                    "recipe"),
])
def test_the_check_compares_only_with_a_base_it_can_build(tmp_path, overrides, base_weights, problem):
    with pytest.raises(ValueError) as refused:
        verify.compare_merged(load_recipe("tiny", overrides), tmp_path, tmp_path, tmp_path, base_weights)
    assert str(refused.value) == problem
