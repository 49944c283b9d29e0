"""train.batch_size: auto, a pure function of (recipe, free GPU memory); `plan` and `train` use the same one."""

from __future__ import annotations

import pytest
from conftest import run_cli

from qlora_app.model.architecture import load_architecture
from qlora_app.plan import layout, planner
from qlora_app.recipe.loader import load_recipe

GiB = 2**30


@pytest.fixture(scope="module")
def llama3():
    recipe = load_recipe("llama3-8b")
    assert recipe.train.batch_size == "auto"
    return recipe, load_architecture(recipe.model)


def test_no_gpu_means_the_recipes_fallback_layout(llama3):
    recipe, _ = llama3
    chosen = layout.choose_layout(recipe, None)
    assert chosen.layout == planner.Layout(4, 4, True)
    assert "fallback" in chosen.describe()


@pytest.mark.parametrize("free_gib", [12, 24, 40, 80])
def test_auto_is_the_planners_fastest_layout_that_fits_keeping_rows_per_update(llama3, free_gib):
    recipe, arch = llama3
    chosen = layout.choose_layout(recipe, free_gib * GiB, arch).layout
    fixed = recipe.with_section("train", batch_size=4)
    assert chosen == planner.fastest_layout(fixed, arch, free_gib * GiB)
    assert chosen.batch_size * chosen.grad_accum == 16  # fallback 4 x accumulation 4
    assert planner.plan(layout.apply(recipe, layout.ChosenLayout(chosen, "")), arch).total <= free_gib * GiB


def test_more_memory_buys_a_bigger_batch_then_no_recomputation(llama3):
    recipe, arch = llama3
    at = {gib: layout.choose_layout(recipe, gib * GiB, arch).layout for gib in (16, 24, 80)}
    assert at[16].batch_size < at[24].batch_size and at[24].gradient_checkpointing
    assert not at[80].gradient_checkpointing


def test_a_fixed_batch_is_kept_whatever_the_memory(llama3):
    recipe, arch = llama3
    fixed = recipe.with_section("train", batch_size=2, grad_accum=3, gradient_checkpointing=False)
    for free in (None, 80 * GiB):
        assert layout.choose_layout(fixed, free, arch).layout == planner.Layout(2, 3, False)


def test_this_cpu_machine_trains_auto_with_the_fallback(llama3):
    recipe, _ = llama3
    assert layout.for_this_machine(recipe).layout == planner.Layout(4, 4, True)


def test_plan_prints_the_layout_train_would_choose(llama3):
    recipe, arch = llama3
    result = run_cli("plan", "llama3-8b", "--gpu-memory", "24")
    assert result.returncode == 0, result.stderr
    chosen = layout.choose_layout(recipe, 24 * GiB, arch)
    assert chosen.describe() in result.stdout
    assert f"batch {chosen.layout.batch_size} x seq 1024" in result.stdout


def test_resumed_run_keeps_the_first_sessions_layout():
    recorded = layout.ChosenLayout(planner.Layout(8, 2, True), "x").to_manifest()
    assert layout.from_manifest(recorded).layout == planner.Layout(8, 2, True)


@pytest.mark.slow
def test_train_prints_and_records_its_layout(trained_run):
    from qlora_app.run.directory import RunDir

    recorded = RunDir(trained_run.path).read_manifest()["layout"]
    assert recorded == {"batch_size": 4, "grad_accum": 1, "gradient_checkpointing": True,
                        "reason": "as the recipe says"}
    assert "layout: batch 4 x accumulation 1, gradient checkpointing on (as the recipe says)" in trained_run.stderr


@pytest.mark.parametrize("ranks", [2, 4])
def test_several_ranks_split_the_rows_of_an_update_and_keep_them(llama3, ranks):
    """A layout for N ranks: each rank's micro-batch divides its share of the rows, the accumulation (the whole
    update's, as on one GPU) divides over the ranks, and the rows per update stay the recipe's."""
    from qlora_app.plan.layout import per_rank_grad_accum

    recipe, arch = llama3
    chosen = layout.choose_layout(recipe, 80 * GiB, arch, ranks=ranks).layout
    assert chosen.batch_size * chosen.grad_accum == 16
    assert (16 // ranks) % chosen.batch_size == 0
    assert per_rank_grad_accum(chosen.grad_accum, ranks) * ranks * chosen.batch_size == 16
    single = layout.choose_layout(recipe, 80 * GiB, arch).layout
    assert chosen.batch_size <= single.batch_size


def test_rows_that_ranks_cannot_share_have_no_layout(llama3):
    recipe, arch = llama3
    with pytest.raises(ValueError, match="16 rows per update cannot be split evenly over 3 ranks"):
        layout.choose_layout(recipe, 80 * GiB, arch, ranks=3)


def test_a_rank_reads_its_own_gpu(monkeypatch):
    from qlora_app.machine.gpu import local_device

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert local_device() == "3" and local_device(0) == "0"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,GPU-abc,7,2")
    assert local_device() == "2" and local_device(1) == "GPU-abc"
    for hidden in ("", "-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert local_device() is None


@pytest.mark.parametrize("free_gib", [12, 14, 20, 24, 40])
def test_out_of_memory_advice_keeps_the_rows_per_update(free_gib):
    """A 16-row recipe (16 x 1) that ran out of memory: the advice is the planner's fastest layout of 16 rows,
    never 14 x 1 ("same tokens per update" must be true)."""
    import re

    from qlora_app.plan.report import out_of_memory_advice

    recipe = load_recipe("llama3-8b", ["train.batch_size=16", "train.grad_accum=1"])
    advice = out_of_memory_advice(recipe, free_gib * 2**30)
    batch, accum = map(int, re.search(r"train.batch_size=(\d+) --set train.grad_accum=(\d+)", advice).groups())
    assert batch * accum == 16, advice
    best = planner.fastest_layout(recipe, load_architecture(recipe.model), free_gib * 2**30)
    assert (batch, accum) == (best.batch_size, best.grad_accum), advice
    assert f"train.gradient_checkpointing={str(best.gradient_checkpointing).lower()}" in advice
