"""The planner's figures against the real libraries: bitsandbytes' 4-bit footprint and peft's LoRA size."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from qlora_app.model.architecture import Architecture
from qlora_app.plan import planner
from qlora_app.recipe.loader import load_recipe

GiB = planner.GiB

# Llama shapes small enough to quantize on CPU, from embedding-heavy to projection-heavy, MHA and GQA.
SHAPES = {
    "gqa-wide": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=3, num_attention_heads=16,
                     num_key_value_heads=4, vocab_size=2048),
    "mha-llama2-like": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=12,
                            num_key_value_heads=12, vocab_size=8000),
    "big-vocab": dict(hidden_size=512, intermediate_size=1792, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=32000),
}


def build_llama(tmp_path, shape: dict) -> tuple[str, Architecture]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path)
    return str(tmp_path), Architecture.from_config(config.to_dict())


def real_footprint(model) -> int:
    """Bytes of every distinct tensor the loaded model holds: parameters, buffers and 4-bit quant state."""
    tensors = list(model.parameters()) + list(model.buffers())
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            tensors += [state.absmax, state.code]
            if state.nested:
                tensors += [state.offset, state.state2.absmax, state.state2.code]
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def load_4bit(path: str, double_quant: bool, skip: list[str]):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=skip,
    )
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.bfloat16,
                                                device_map="cpu")


@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
@pytest.mark.parametrize(
    ("double_quant", "skip"), [(True, ["lm_head"]), (False, ["lm_head"]), (True, ["lm_head", "down_proj"])],
    ids=["nf4-dq", "nf4", "selective"],
)
def test_base_weight_figure_matches_bitsandbytes_within_5_percent(tmp_path, shape, double_quant, skip):
    path, arch = build_llama(tmp_path, SHAPES[shape])
    model = load_4bit(path, double_quant, skip)
    recipe = load_recipe("tiny", [f"quantization.double_quant={str(double_quant).lower()}",
                                  f"quantization.skip_modules=[{','.join(skip)}]"])
    quantized, sixteen = planner.base_weight_bytes(recipe, arch)
    sixteen -= arch.norm_params * 2  # the planner counts norms as fp32 (upcast for training); loaded they are bf16
    real = real_footprint(model)
    assert quantized + sixteen == pytest.approx(real, rel=0.05)
    # and the 4-bit part on its own, the figure the planner is really about
    real_4bit = real_footprint(model) - sum(
        p.numel() * p.element_size() for n, p in model.named_parameters() if p.dtype != torch.uint8)
    assert quantized == pytest.approx(real_4bit, rel=0.05)


def test_lora_parameter_count_matches_peft(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    recipe = load_recipe("tiny")
    arch = Architecture.from_config(__import__("json").loads((tiny_model_dir / "config.json").read_text()))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=recipe.lora.r, lora_alpha=recipe.lora.alpha,
                                                  target_modules=list(recipe.lora.target_modules)))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert planner.lora_params(recipe, arch) == trainable


def test_nf4_bytes_is_about_4_13_bits_per_weight_with_double_quant():
    n = 4096 * 14336
    assert planner.nf4_bytes(n, True) * 8 / n == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=0.01)
    assert planner.nf4_bytes(n, False) * 8 / n == pytest.approx(4.5, abs=0.01)


def test_llama3_8b_figures():
    recipe = load_recipe("llama3-8b")
    from qlora_app.model.architecture import load_architecture

    arch = load_architecture(recipe.model)
    assert arch.total_params == pytest.approx(8.03e9, rel=0.01)
    p = planner.plan(recipe, arch)
    assert p.trainable_params == 167_772_160  # r=64 on all seven projections of 32 layers
    lora = planner.plan(planner.as_lora(recipe), arch)
    assert lora.base_weights / 2**30 == pytest.approx(14.96, abs=0.05)  # 8.03B x 2 bytes
    assert p.base_weights < 0.36 * lora.base_weights


def test_checkpointing_cuts_activations_and_planner_is_linear_in_batch():
    from qlora_app.model.architecture import load_architecture

    recipe = load_recipe("llama3-8b")
    arch = load_architecture(recipe.model)
    on = planner.plan(recipe, arch, gradient_checkpointing=True)
    off = planner.plan(recipe, arch, gradient_checkpointing=False)
    assert off.activations > 10 * on.activations
    budget = 24 * 2**30
    best = planner.largest_batch(recipe, arch, budget)
    assert planner.plan(recipe, arch, batch_size=best).total <= budget < planner.plan(
        recipe, arch, batch_size=best + 1).total
    seq = planner.largest_seq_len(recipe, arch, budget)
    assert planner.plan(recipe, arch, seq_len=seq).total <= budget < planner.plan(recipe, arch, seq_len=seq + 64).total


@pytest.mark.parametrize("page", ["README.md", "docs/recipes.md"])
def test_recipe_tables_match_the_planner(page):
    import re

    from qlora_app.model.architecture import load_architecture
    from qlora_app.recipe.loader import list_recipes

    text = (Path(__file__).resolve().parents[2] / page).read_text()
    rows = re.findall(r"^\| `([\w.-]+)` \|.*\| ([\d.]+) \|$", text, flags=re.MULTILINE)
    assert sorted(name for name, _ in rows) == list_recipes(), "every shipped recipe, once"
    for name, figure in rows:
        recipe = load_recipe(name)
        assert f"{planner.plan(recipe, load_architecture(recipe.model)).total / 2**30:.2f}" == figure, name


MEASUREMENTS = Path(__file__).resolve().parents[2] / "docs" / "measurements"


@pytest.mark.parametrize("measurement", ["h100-llama3-8b-qlora-fused.json", "h100-llama3-8b-lora-bf16-fused.json"])
def test_planner_matches_training_steps_measured_on_a_gpu(measurement):
    """docs/gpu-measurements.md: bare training steps (bench/gpu_memory.py) on an H100 vs today's planner."""
    from qlora_app.model.architecture import load_architecture

    data = json.loads((MEASUREMENTS / measurement).read_text())
    recipe = load_recipe(data["recipe"])
    arch = load_architecture(recipe.model)
    for point in data["points"]:
        measured = point["peak_reserved"] + point["context"]
        planned = planner.plan(recipe, arch, batch_size=point["batch"], seq_len=point["seq"],
                               gradient_checkpointing=point["checkpointing"]).step_total
        assert planned == pytest.approx(measured, rel=0.05), point


def test_planner_matches_the_train_stage_measured_on_a_gpu():
    """The whole train stage (bench/gpu_train.py) on the llama3-8b recipe's shape, H100."""
    from qlora_app.model.architecture import load_architecture

    manifest = json.loads((MEASUREMENTS / "train-stage-h100" / "manifest.json").read_text())
    recipe = load_recipe("llama3-8b")
    planned = planner.plan(recipe, load_architecture(recipe.model)).total
    assert planned == pytest.approx(manifest["training"]["gpu_device_peak_bytes"], rel=0.05)


def test_fastest_layout_keeps_tokens_per_update_and_fits():
    from qlora_app.model.architecture import load_architecture

    budget = 24 * 2**30
    for name in ("llama3-8b", "llama2-7b", "mistral-7b"):
        recipe = load_recipe(name)
        arch = load_architecture(recipe.model)
        layout = planner.fastest_layout(recipe, arch, budget)
        assert layout.batch_size * layout.grad_accum == recipe.train.effective_batch
        assert planner.plan(recipe, arch, batch_size=layout.batch_size,
                            gradient_checkpointing=layout.gradient_checkpointing).total <= budget
    # Llama 2 at 512 tokens fits batch 4 without recomputation on 24 GiB; Llama 3 at 1024 does not
    assert not planner.fastest_layout(load_recipe("llama2-7b"), load_architecture(load_recipe("llama2-7b").model),
                                      budget).gradient_checkpointing
    llama3 = load_recipe("llama3-8b")
    assert planner.fastest_layout(llama3, load_architecture(llama3.model), budget).gradient_checkpointing


def test_fsdp_shards_weights_lora_and_optimizer_per_gpu_and_counts_the_cards():
    from qlora_app.model.architecture import load_architecture

    recipe = load_recipe("llama3-70b")
    arch = load_architecture(recipe.model)
    assert (arch.layers, arch.hidden, arch.kv_heads, arch.vocab) == (80, 8192, 8, 128256)
    assert 69e9 < arch.total_params < 72e9
    one, four = planner.plan(recipe, arch), planner.plan(recipe, arch, ranks=4)
    assert 36 * GiB < one.base_weights < 38 * GiB  # 4-bit layers plus 16-bit embeddings and head: "~37 GiB"
    assert four.base_quantized == one.base_quantized // 4 and four.optimizer_state == one.optimizer_state // 4
    assert four.lora_weights == one.lora_weights // 4 and four.lora_gradients == one.lora_gradients // 4
    assert four.activations == one.activations and four.base_16bit == one.base_16bit  # per rank / kept whole
    assert four.gathered == 2 * (one.base_quantized + one.trainable_params * 4) // arch.layers
    needed = planner.gpus_needed(recipe, arch, 24 * GiB)
    assert planner.plan(recipe, arch, ranks=needed).total <= 24 * GiB < planner.plan(recipe, arch, ranks=needed - 1).total
    ddp = recipe.with_section("train", distributed="ddp")
    assert planner.plan(ddp, arch, ranks=4).total == planner.plan(ddp, arch).total  # every GPU holds everything
    assert planner.gpus_needed(ddp, arch, 24 * GiB) is None


def test_plan_with_gpus_prints_the_per_gpu_peak_and_the_cards_needed():
    from conftest import run_cli

    result = run_cli("plan", "llama3-70b", "--gpus", "4", "--gpu-memory", "24")
    assert result.returncode == 0, result.stderr
    assert "per GPU of 4 (FSDP)" in result.stdout and "FSDP: a layer gathered" in result.stdout
    assert "fits in 24 GiB" in result.stdout
    assert "FSDP: needs 3 GPUs of 24 GiB; with train.grad_accum=16: train --gpus 4" in result.stdout


# A small Llama layer: hidden 64, MLP 176, 3 layers, 4 query heads and 2 key/value heads of 16, vocabulary 1000.
# Per layer q, o: 64x64 = 4096 weights; k, v: 64x32 = 2048; gate, up, down: 64x176 = 11264.
SMALL = dict(hidden=64, intermediate=176, layers=3, heads=4, kv_heads=2, head_dim=16, vocab=1000, max_positions=512)
CONTEXT, TRAINER = int(0.75 * GiB), int(0.95 * GiB)


@pytest.mark.parametrize(("numel", "double_quant"), [(4096, True), (7000, False), (42957, True), (42957, False),
                                                      (4_194_304, True)])
def test_nf4_bytes_are_exactly_what_bitsandbytes_holds_for_one_weight(numel, double_quant):
    """Packed codes, absmax per block of 64 (or 8-bit, with fp32 absmax per 256 blocks), tables and offset:
    odd sizes, partial blocks and several nested blocks."""
    import bitsandbytes.functional as bnb

    packed, state = bnb.quantize_4bit(torch.ones(numel, dtype=torch.bfloat16), quant_type="nf4",
                                      compress_statistics=double_quant)
    tensors = [packed, state.absmax, state.code]
    if double_quant:
        tensors += [state.offset, state.state2.absmax, state.state2.code]
    assert planner.nf4_bytes(numel, double_quant) == sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize(("case", "overrides", "arch", "kwargs", "expected"), [
    # tiny recipe: r=16 on all 7 projections, dropout 0, NF4 with double quantization, lm_head kept, adamw_torch,
    # 4 x 128 tokens, checkpointing
    ("qlora", [], dict(tied_embeddings=False), {}, dict(
        base_quantized=3 * (2 * 3208 + 2 * 2152 + 3 * 6904),  # nf4_bytes of 4096, 2048, 11264 weights
        base_16bit=2 * 64_000 * 2 + 448 * 4,  # embeddings and head in bf16; (2 x 3 + 1) x 64 norm weights in fp32
        lora_weights=4 * 56_064, lora_gradients=4 * 56_064, optimizer_state=8 * 56_064,
        # per token: each layer's input (3 x 64 x 2) + one layer's norms 2 x (4 + 2) x 64, q/k/v etc.
        # 2 x (64 + 64) + 2 x (64 + 32) + 2 x 64, MLP 8 x 176 and LoRA 7 x 4 x 16
        activations=512 * (384 + 768 + 576 + 1408 + 448), logits=int(512 * 1000 * 2.5),
        overhead=CONTEXT + 2 * 11264 * 2 + int(0.12 * (512 * 3584 + 1_280_000)), trainer_overhead=TRAINER,
        batch_size=4, ranks=1, seq_len=128, trainable_params=3 * 16 * (2 * 128 + 2 * 96 + 3 * 240), gathered=0)),
    # no double quantization, the head quantized too, dropout (3 bytes per adapter input), 8-bit optimizer,
    # 2 x 64 tokens, no checkpointing
    ("no-dq-head-dropout", ["lora.dropout=0.1", "quantization.double_quant=false", "quantization.skip_modules=[]",
                            "train.optimizer=paged_adamw_8bit"], dict(tied_embeddings=False),
     dict(batch_size=2, seq_len=64, gradient_checkpointing=False), dict(
        base_quantized=3 * (2 * 2368 + 2 * 1216 + 3 * 6400) + 36_064, base_16bit=64_000 * 2 + 448 * 4,
        lora_weights=4 * 56_064, lora_gradients=4 * 56_064, optimizer_state=2 * 56_064,
        # every layer's full set (LoRA: 3 x 64 + 64 on six adapters, 3 x 176 + 64 on down_proj) + the input
        activations=128 * (3 * (768 + 576 + 1408 + 6 * 256 + 592) + 128), logits=int(128 * 1000 * 2.5),
        overhead=CONTEXT + 2 * 11264 * 2 + int(0.12 * (1_890_304 + 320_000)), trainer_overhead=TRAINER,
        batch_size=2, ranks=1, seq_len=64, trainable_params=56_064, gathered=0)),
    # plain LoRA in fp32 on Qwen3 (norms on queries and keys), tied embeddings, all-linear at r=8
    ("lora-qwen3-tied", ["quantization.enabled=false", "model.dtype=float32", "lora.target_modules=all-linear",
                         "lora.r=8"], dict(tied_embeddings=True, model_type="qwen3"), {}, dict(
        base_quantized=0, base_16bit=3 * 46_080 * 4 + 64_000 * 4 + (7 * 64 + 3 * 32) * 4,
        lora_weights=4 * 28_032, lora_gradients=4 * 28_032, optimizer_state=8 * 28_032,
        activations=512 * (384 + 768 + 6 * 96 + 576 + 1408 + 7 * 32), logits=1_280_000,
        overhead=CONTEXT + int(0.12 * (2_015_232 + 1_280_000)), trainer_overhead=TRAINER,
        batch_size=4, ranks=1, seq_len=128, trainable_params=3 * 8 * (2 * 128 + 2 * 96 + 3 * 240), gathered=0)),
    # the head quantized too, with double quantization: 1000 x 64 weights in 1000 blocks, 4 nested blocks
    ("qlora-head", ["quantization.skip_modules=[]"], dict(tied_embeddings=False), {}, dict(
        base_quantized=94_296 + 32_000 + 1000 + 4 * 4 + 256 * 4 + 4 + 64, base_16bit=64_000 * 2 + 448 * 4,
        lora_weights=4 * 56_064, lora_gradients=4 * 56_064, optimizer_state=8 * 56_064, activations=1_835_008,
        logits=1_280_000, overhead=CONTEXT + 45_056 + int(0.12 * (1_835_008 + 1_280_000)), trainer_overhead=TRAINER,
        batch_size=4, ranks=1, seq_len=128, trainable_params=56_064, gathered=0)),
    # plain LoRA on a bf16 base: every frozen weight in bf16, norms too
    ("lora-bf16", ["quantization.enabled=false"], dict(tied_embeddings=False), {}, dict(
        base_quantized=0, base_16bit=3 * 46_080 * 2 + 2 * 64_000 * 2 + 448 * 2,
        lora_weights=4 * 56_064, lora_gradients=4 * 56_064, optimizer_state=8 * 56_064, activations=1_835_008,
        logits=1_280_000, overhead=CONTEXT + int(0.12 * (1_835_008 + 1_280_000)), trainer_overhead=TRAINER,
        batch_size=4, ranks=1, seq_len=128, trainable_params=56_064, gathered=0)),
    # FSDP over 4 ranks: 4-bit layers, adapters and optimizer sharded; two layers' worth gathered
    ("fsdp-4", ["train.distributed=fsdp"], dict(tied_embeddings=False), dict(ranks=4), dict(
        base_quantized=94_296 // 4, base_16bit=257_792, lora_weights=56_064, lora_gradients=56_064,
        optimizer_state=112_128, activations=1_835_008, logits=1_280_000,
        overhead=CONTEXT + 45_056 + int(0.12 * (1_835_008 + 1_280_000)), trainer_overhead=TRAINER,
        batch_size=4, ranks=4, seq_len=128, trainable_params=56_064, gathered=2 * (94_296 + 4 * 56_064) // 3)),
])
def test_every_term_of_the_plan_is_counted_exactly(case, overrides, arch, kwargs, expected):
    plan = planner.plan(load_recipe("tiny", overrides), Architecture(**SMALL, **arch), **kwargs)
    assert plan == planner.MemoryPlan(**expected)
    assert all(type(value) is int for value in dataclasses.astuple(plan))  # whole bytes, even over several ranks
    assert plan.total == sum(value for _, value in plan.rows()) == plan.step_total + TRAINER
    assert plan.base_weights == expected["base_quantized"] + expected["base_16bit"]


def test_the_plan_table_names_every_term_and_fsdps_only_with_fsdp():
    arch = Architecture(**SMALL, tied_embeddings=False)
    labels = ["base weights, 4-bit (incl. quantization constants)",
              "base weights, 16-bit (embeddings, head, norms, skipped)", "LoRA weights (fp32)",
              "LoRA gradients (fp32)", "optimizer state", "FSDP: a layer gathered, and the next prefetched",
              "activations", "output head and loss (tiled)", "CUDA context, workspace, fragmentation",
              "Trainer (evaluation, bookkeeping)"]
    fsdp = planner.plan(load_recipe("tiny", ["train.distributed=fsdp"]), arch, ranks=4)
    assert [label for label, _ in fsdp.rows()] == labels
    assert [label for label, _ in planner.plan(load_recipe("tiny"), arch).rows()] == labels[:5] + labels[6:]


def test_largest_batch_and_sequence_are_the_last_that_fit_and_zero_when_none_does():
    recipe, arch = load_recipe("tiny"), Architecture(**SMALL, tied_embeddings=False)
    total = {b: planner.plan(recipe, arch, batch_size=b).total for b in (1, 7)}
    # (the plan is linear in the batch up to a few bytes of rounding)
    assert planner.largest_batch(recipe, arch, total[7]) == 7 and planner.largest_batch(recipe, arch, total[7] - 99) == 6
    assert planner.largest_batch(recipe, arch, total[1] - 99) == 0 and planner.largest_batch(recipe, arch, 0) == 0
    assert planner.largest_batch(recipe, arch, total[7], seq_len=64) == 14  # half the tokens per row
    seq = {s: planner.plan(recipe, arch, seq_len=s).total for s in (64, 320)}
    assert planner.largest_seq_len(recipe, arch, seq[320]) == 320
    assert planner.largest_seq_len(recipe, arch, seq[320] - 99) == 256
    assert planner.largest_seq_len(recipe, arch, seq[64] - 99) == 0 and planner.largest_seq_len(recipe, arch, 0) == 0
    assert planner.largest_seq_len(recipe, arch, seq[320], multiple=32) == 320
    fsdp = recipe.with_section("train", distributed="fsdp")
    four = planner.plan(fsdp, arch, batch_size=3, ranks=4).total
    assert planner.largest_batch(fsdp, arch, four) < 3 == planner.largest_batch(fsdp, arch, four, ranks=4)
    assert planner.largest_seq_len(fsdp, arch, planner.plan(fsdp, arch, seq_len=192, ranks=4).total, ranks=4) == 192


@pytest.mark.parametrize(("fits_without", "rows", "ranks", "layout"), [
    (16, 16, 1, (16, 1, False)),  # every row at once, no recomputation
    (5, 16, 1, (4, 4, False)),  # 4 or more fit without: the largest divisor of 16 up to 5
    (3, 16, 1, (4, 4, True)),  # fewer than 4 fit without: recomputation, where 6 fit
    (3, 12, 1, (6, 2, True)),
    (2, 2, 1, (2, 1, False)),  # all of a rank's 2 rows fit without: no recomputation though 2 < 4
    (3, 16, 2, (4, 4, True)),  # 8 rows a rank: 4 a micro-batch; the accumulation is the whole update's
    (0, 16, 1, (1, 16, True)),  # nothing fits: one row at a time (the plan then says it does not fit)
])
def test_fastest_layout_recomputes_only_when_needed_and_keeps_the_rows_per_update(fits_without, rows, ranks, layout):
    recipe, arch = load_recipe("tiny"), Architecture(**SMALL, tied_embeddings=False)
    without = recipe.with_section("train", gradient_checkpointing=False)
    budget = planner.plan(without, arch, batch_size=fits_without, ranks=ranks).total if fits_without else 0
    assert planner.largest_batch(recipe.with_section("train", gradient_checkpointing=True), arch, budget,
                                 ranks=ranks) == 2 * fits_without  # recomputation halves this model's peak per row
    chosen = planner.fastest_layout(recipe, arch, budget, rows, ranks=ranks)
    assert (chosen.batch_size, chosen.grad_accum, chosen.gradient_checkpointing) == layout


def test_rows_that_do_not_split_over_the_ranks_are_refused():
    with pytest.raises(ValueError) as refused:
        planner.fastest_layout(load_recipe("tiny"), Architecture(**SMALL, tied_embeddings=False), 10 * GiB, 6, ranks=4)
    assert str(refused.value) == "6 rows per update cannot be split evenly over 4 ranks"
    recipe = load_recipe("tiny", ["train.batch_size=2", "train.grad_accum=3"])
    assert planner.fastest_layout(recipe, Architecture(**SMALL, tied_embeddings=False), 10 * GiB).grad_accum == 1


def test_the_fewest_gpus_that_hold_the_plan():
    recipe, arch = load_recipe("tiny", ["train.distributed=fsdp"]), Architecture(**SMALL, tied_embeddings=False)
    three = planner.plan(recipe, arch, ranks=3).total
    assert planner.gpus_needed(recipe, arch, three) == 3 and planner.gpus_needed(recipe, arch, three - 1) == 4
    assert planner.gpus_needed(recipe, arch, planner.plan(recipe, arch).total) == 1
    assert planner.gpus_needed(recipe, arch, three, most=2) is None
    assert planner.gpus_needed(recipe, arch, planner.plan(recipe, arch, ranks=64).total) <= 64
    ddp = recipe.with_section("train", distributed="ddp")
    assert planner.gpus_needed(ddp, arch, planner.plan(ddp, arch).total) == 1
    assert planner.gpus_needed(ddp, arch, planner.plan(ddp, arch).total - 1) is None
    assert planner.as_lora(recipe).quantization.enabled is False and planner.as_lora(recipe).lora == recipe.lora


def test_fsdp_searches_count_the_memory_of_the_ranks_they_are_given():
    """A model whose 4-bit layers outweigh its activations: sharding them over more ranks fits more."""
    arch = Architecture(hidden=1024, intermediate=2816, layers=8, heads=16, kv_heads=4, head_dim=64, vocab=1000,
                        max_positions=512, tied_embeddings=False)
    for checkpointing in ("true", "false"):  # the recipe's own setting: the layout picks its own
        recipe = load_recipe("tiny", ["train.distributed=fsdp", f"train.gradient_checkpointing={checkpointing}"])
        budget = planner.plan(recipe.with_section("train", gradient_checkpointing=True), arch, batch_size=8,
                              ranks=4).total
        assert planner.fastest_layout(recipe, arch, budget, 32, ranks=4) == planner.Layout(8, 4, True)
        assert planner.fastest_layout(recipe, arch, budget, 32) == planner.Layout(2, 16, True)
    recipe = load_recipe("tiny", ["train.distributed=fsdp"])
    budget = planner.plan(recipe, arch, batch_size=8, ranks=4).total
    assert [planner.largest_batch(recipe, arch, budget, ranks=r) for r in (2, 4)] == [5, 8]
    assert planner.largest_batch(recipe, arch, budget) == 2
    budget = planner.plan(recipe, arch, seq_len=256, ranks=4).total
    assert (planner.largest_seq_len(recipe, arch, budget), planner.largest_seq_len(recipe, arch, budget, ranks=4)) == (
        64, 256)


def test_no_more_than_64_gpus_are_counted():
    recipe, arch = load_recipe("tiny", ["train.distributed=fsdp"]), Architecture(**SMALL, tied_embeddings=False)
    budget = planner.plan(recipe, arch, ranks=65).total  # 65 ranks would fit, 64 not
    assert planner.plan(recipe, arch, ranks=64).total > budget
    assert planner.gpus_needed(recipe, arch, budget) is None and planner.gpus_needed(recipe, arch, budget, 65) == 65
