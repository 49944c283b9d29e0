"""The merge and its check, fast: a real tiny adapter (random LoRA weights, no training) merged in process.

A merge that agrees with base + adapter is published; one that diverges is refused in one line and nothing is
published. Both directions are held here so the fast loop sees a broken scaling or a blunted check.
"""

import json
import shutil

import pytest

from qlora_app.errors import UserError
from qlora_app.machine.atomic import write_json_atomic
from qlora_app.merge import stage
from qlora_app.recipe.loader import load_recipe
from qlora_app.recipe.schema import ALL_LINEAR
from qlora_app.run.directory import RunDir


@pytest.fixture
def untrained_run(tmp_path, tiny_model_dir) -> RunDir:
    """The tiny recipe's run directory with a LoRA adapter of random weights, saved as training saves it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    recipe = load_recipe("tiny")
    run = RunDir.create(recipe, tmp_path)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lora = LoraConfig(r=recipe.lora.r, lora_alpha=recipe.lora.alpha, target_modules=list(ALL_LINEAR),
                      init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(run.adapter)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(tiny_model_dir / name, run.adapter / name)
    write_json_atomic(run.manifest, {"chat": {"end_of_turn_id": EOT}})  # what training records
    return run


EOT = 4  # the tiny Llama's <|eot_id|>


def test_a_faithful_merge_is_published_with_its_check(untrained_run):
    merged = stage.merge(untrained_run)
    report = (merged / "merge_report.json").read_text()
    assert merged == untrained_run.merged and '"verification"' in report


def test_a_divergent_merge_is_refused_and_nothing_is_published(untrained_run, monkeypatch):
    faithful = stage.merge_shard

    def doubled(src, dst, deltas, scaling, *rest):  # a merge bug: the update applied twice over
        faithful(src, dst, deltas, scaling * 2, *rest)

    monkeypatch.setattr(stage, "merge_shard", doubled)
    with pytest.raises(UserError, match="diverges from base \\+ adapter.*nothing was written"):
        stage.merge(untrained_run)
    assert not untrained_run.merged.exists()
    assert not list(untrained_run.path.glob(".merged*"))


def message(call, *args) -> str:
    with pytest.raises(UserError) as refused:
        call(*args)
    return str(refused.value)


def peft_merged(run: RunDir, base_dir, dequantized: bool = False) -> dict:
    """peft's merge_and_unload of the run's adapter on the bf16 base (rounded through NF4 first if asked)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora_app.merge.verify import dequantize

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    if dequantized:
        dequantize(base, run.recipe(), base_dir)
    return PeftModel.from_pretrained(base, run.adapter).merge_and_unload().state_dict()


@pytest.mark.parametrize("base_weights", ["original", "dequantized"])
def test_the_streamed_merge_is_bitwise_peft_merge_and_unload(untrained_run, tiny_model_dir, base_weights):
    import torch
    from safetensors.torch import load_file

    spec = untrained_run.recipe().merge.model_copy(update={"base_weights": base_weights})
    verified = base_weights == "original"  # the check on one of them (auto's own merge checks the other)
    merged = stage.merge(untrained_run, spec, verify=verified)
    ours, reference = load_file(merged / "model.safetensors"), peft_merged(untrained_run, tiny_model_dir,
                                                                          base_weights == "dequantized")
    assert set(ours) == set(reference)
    for key, tensor in ours.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, reference[key]), key
    report = json.loads((merged / "merge_report.json").read_text())
    assert report["base_weights"] == base_weights and report["verified"] is ("verification" in report) is verified
    assert (report["base_weights_reason"], report["shards"], report["merged_weights"]) == (
        f"merge.base_weights={base_weights}", 1, 14)
    assert report["nf4_rounded_weights"] == (14 if base_weights == "dequantized" else 0)


def test_a_plain_lora_run_is_merged_into_the_original_weights_and_checked_against_them(untrained_run):
    import yaml

    recipe = yaml.safe_load(untrained_run.recipe_file.read_text())
    untrained_run.recipe_file.write_text(yaml.safe_dump({**recipe, "quantization": {"enabled": False}}))
    report = json.loads((stage.merge(untrained_run) / "merge_report.json").read_text())
    assert (report["base_weights"], report["base_weights_reason"], report["nf4_rounded_weights"]) == (
        "original", "the adapter was trained on the original 16-bit weights", 0)
    check = report["verification"]
    assert check["loss_adapter_on_4bit"] is None and check["loss_adapter_on_dequantized"] is None
    assert check["loss_merged"] == pytest.approx(check["loss_adapter_on_original"], rel=0.005)


def test_a_rank_stabilized_adapter_is_scaled_by_alpha_over_the_root_of_r(tmp_path, tiny_model_dir):
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    recipe = load_recipe("tiny", ["lora.use_rslora=true", "merge.base_weights=original"])
    run = RunDir.create(recipe, tmp_path)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lora = LoraConfig(r=recipe.lora.r, lora_alpha=recipe.lora.alpha, target_modules=["q_proj"], use_rslora=True,
                      init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(run.adapter)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(tiny_model_dir / name, run.adapter / name)
    ours, reference = load_file(stage.merge(run, verify=False) / "model.safetensors"), peft_merged(run, tiny_model_dir)
    assert all(torch.equal(ours[k], reference[k]) for k in ours)


def test_a_sharded_base_is_merged_shard_by_shard_with_its_index(untrained_run, tiny_model_dir, capsys):
    import torch
    import yaml
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = untrained_run.path.parent / "sharded-base"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(base, max_shard_size="300KB")
    recipe = yaml.safe_load(untrained_run.recipe_file.read_text())
    untrained_run.recipe_file.write_text(yaml.safe_dump({**recipe, "model": {**recipe["model"], "path": str(base)}}))
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(shards) >= 3
    spec = untrained_run.recipe().merge.model_copy(update={"base_weights": "original"})
    merged = stage.merge(untrained_run, spec, verify=False)
    assert sorted(p.name for p in merged.glob("*.safetensors")) == shards
    assert (merged / "model.safetensors.index.json").read_text() == (base / "model.safetensors.index.json").read_text()
    ours = {k: v for shard in shards for k, v in load_file(merged / shard).items()}
    reference = peft_merged(untrained_run, base)
    assert set(ours) == set(reference) and all(torch.equal(ours[k], reference[k]) for k in ours)
    assert json.loads((merged / "merge_report.json").read_text())["shards"] == len(shards)
    assert " ".join(capsys.readouterr().err.split()) == (
        f"merged model: {merged} (14 weights merged into original base weights)")


def test_the_report_says_what_was_merged_and_how_it_was_checked(untrained_run, capsys):
    merged = stage.merge(untrained_run)
    report = json.loads((merged / "merge_report.json").read_text())
    recipe = untrained_run.recipe()
    assert report["adapter_sha256"] == stage.adapter_fingerprint(untrained_run)
    assert report["settings"] == recipe.merge.model_dump() and report["verified"] is True
    assert report["base_weights"] in ("original", "dequantized") and report["merged_weights"] == 14
    assert 0 <= report["merge_seconds"] < 600 and report["peak_rss_bytes"] > 2**20
    check = report["verification"]
    assert sorted(check) == ["examples", "loss_adapter_on_4bit", "loss_adapter_on_dequantized",
                             "loss_adapter_on_original", "loss_merged", "max_logit_diff", "relative_logit_diff"]
    assert check["examples"] == 12 and check["relative_logit_diff"] < 0.05 and check["loss_merged"] > 0
    on_4bit, original, dequantized = (check[f"loss_adapter_on_{kind}"] for kind in ("4bit", "original", "dequantized"))
    # the 4-bit base computes with dequant(NF4) weights: the adapter on them is nearest to what was trained
    assert abs(dequantized - on_4bit) < abs(original - on_4bit) / 3 and report["base_weights"] == "dequantized"
    assert report["base_weights_reason"] == (f"its held-out loss with the adapter ({dequantized:.4f}) is closest to "
                                             f"the adapter on the 4-bit base it was trained on ({on_4bit:.4f})")
    assert check["loss_merged"] == pytest.approx(dequantized, rel=0.005)
    out = capsys.readouterr().out
    table = [" ".join(line.split()) for line in out.splitlines()]
    assert "│ merged into │ dequantized base weights │" in table
    assert " ".join(out.split()).endswith(f"dequantized: {report['base_weights_reason']}")  # the caption
    config = json.loads((merged / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == recipe.merge.dtype
    assert stage.is_current(untrained_run, recipe.merge, verified=True)
    card = (merged / "README.md").read_text()
    assert "## Merge report" in card and f"- merged into: {report['base_weights']} base weights, 14 weights" in card
    assert str(untrained_run.merged) in card and "library_name: transformers" in card
    assert f"{recipe.merge.dtype} model, the adapter merged in" in card


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_the_check_compares_with_base_plus_adapter_in_the_merge_dtype(untrained_run, tiny_model_dir, dtype):
    import torch

    from qlora_app.merge.verify import unmerged

    recipe = untrained_run.recipe().with_section("merge", dtype=dtype)
    model = unmerged(recipe, untrained_run.adapter, tiny_model_dir, "original")
    assert model.get_base_model().model.layers[0].mlp.up_proj.base_layer.weight.dtype == getattr(torch, dtype)


def test_a_merged_model_is_current_only_for_its_adapter_settings_and_check(untrained_run):
    assert not stage.is_current(untrained_run)
    stage.merge(untrained_run, verify=False)
    assert json.loads(untrained_run.merge_report.read_text())["base_weights_reason"] == (
        "the weights the adapter was trained on (no held-out check: --no-verify)")
    spec = untrained_run.recipe().merge
    assert stage.is_current(untrained_run) and stage.is_current(untrained_run, spec)
    assert not stage.is_current(untrained_run, spec, verified=True)  # merged with --no-verify
    assert not stage.is_current(untrained_run, spec.model_copy(update={"dtype": "float32"}))
    with open(untrained_run.adapter / "adapter_model.safetensors", "ab") as f:
        f.write(b" ")  # the adapter changed since
    assert not stage.is_current(untrained_run)
    (untrained_run.adapter / "adapter_model.safetensors").unlink()
    assert not stage.is_current(untrained_run)


def test_merged_generation_stops_at_end_of_turn_and_pads_with_the_training_pad(untrained_run):
    from transformers import AutoTokenizer

    merged = stage.merge(untrained_run, verify=False)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    generation = json.loads((merged / "generation_config.json").read_text())
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert eot == EOT and eot in generation["eos_token_id"] and tokenizer.eos_token_id in generation["eos_token_id"]
    assert generation["pad_token_id"] == tokenizer.pad_token_id == json.loads(
        (merged / "config.json").read_text())["pad_token_id"]
    assert sorted(p.name for p in merged.iterdir() if p.name.startswith("adapter")) == []


def model_files(tiny_model_dir, folder):
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                 "config.json"):
        shutil.copy(tiny_model_dir / name, folder / name)
    return folder


@pytest.mark.parametrize(("eos", "end_of_turn", "expected"), [
    (1, 4, [1, 4]), ([7, 1], 4, [7, 1, 4]), ([4], 4, [4, 1]), (None, 4, [4, 1]),
    (1, None, [1]),  # trained on plain text: no end-of-turn token
    (1, 9, [1, 9]),  # whatever token training ended answers with, special to the tokenizer or not
])
def test_generation_stops_at_the_base_eos_ids_the_end_of_turn_and_eos(tmp_path, tiny_model_dir, eos, end_of_turn,
                                                                      expected):
    folder = model_files(tiny_model_dir, tmp_path / "folder")
    generation = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": eos}))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "pad_token_id"}))
    stage.keep_stop_and_pad(folder, end_of_turn)
    written = json.loads((folder / "generation_config.json").read_text())
    assert written == {**generation, "eos_token_id": expected, "pad_token_id": 5}  # <|eot_id|> is 4, <|pad|> 5
    assert json.loads((folder / "config.json").read_text())["pad_token_id"] == 5


def test_a_tokenizer_that_pads_with_end_of_sequence_is_refused(untrained_run, tiny_model_dir):
    folder = model_files(tiny_model_dir, untrained_run.path / "folder")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "<|eot_id|>"}))
    pad = json.loads((folder / "tokenizer.json").read_text())["added_tokens"]
    pad_id = next(t["id"] for t in pad if t["content"] == "<|eot_id|>")
    assert message(stage.keep_stop_and_pad, folder, EOT) == (
        f"the training tokenizer pads with an end-of-sequence token ({pad_id}): train the run again with this "
        "version of qlora-app")


def test_merge_refuses_a_run_it_cannot_merge(untrained_run):
    run = untrained_run
    plain = run.recipe().with_section("quantization", enabled=False)
    assert message(stage.check_run, run, plain.with_section("merge", base_weights="dequantized")) == (
        f"{run.path} trained plain LoRA on 16-bit weights: merging into NF4-rounded (dequantized) weights would "
        "change the base it learned on; use original or auto")
    (run.adapter / "tokenizer_config.json").unlink()
    assert message(stage.check_run, run, run.recipe()) == (
        f"{run.adapter} has no tokenizer: the run is incomplete; train it again")
    (run.adapter / "generation_config.json").unlink()
    (run.adapter / "adapter_config.json").unlink()
    assert message(stage.check_run, run, run.recipe()) == (
        f"{run.path} has no complete adapter (missing adapter_config.json, generation_config.json): train it "
        f"first with: qlora-app train {run.path.parent.name}")


def test_merge_takes_only_merge_settings(untrained_run):
    assert message(stage.merge_settings, untrained_run, ("merge.dtype=float32", "train.lr=0.1"), None) == (
        "merge takes only merge.* settings (got 'train.lr=0.1'): the rest of the recipe is the run's own")
    spec = stage.merge_settings(untrained_run, ("merge.dtype=float32",), "original")
    assert (spec.dtype, spec.base_weights) == ("float32", "original")
    assert stage.merge_settings(untrained_run, (), None) == untrained_run.recipe().merge


def test_base_weights_auto_is_resolved_and_explained():
    from qlora_app.merge.verify import AdapterLosses

    qlora = load_recipe("tiny")
    assert stage.choose_base_weights(qlora.with_section("merge", base_weights="original"), None) == (
        "original", "merge.base_weights=original")
    assert stage.choose_base_weights(qlora.with_section("quantization", enabled=False), None) == (
        "original", "the adapter was trained on the original 16-bit weights")
    assert stage.choose_base_weights(qlora, None) == (
        "dequantized", "the weights the adapter was trained on (no held-out check: --no-verify)")
    assert stage.choose_base_weights(qlora, AdapterLosses(3, 1.0, 1.5, 1.2)) == (
        "dequantized", "its held-out loss with the adapter (1.2000) is closest to the adapter on the 4-bit base it "
        "was trained on (1.0000)")
    assert stage.choose_base_weights(qlora, AdapterLosses(3, 1.0, 0.9, 1.2))[0] == "original"


def test_an_adapter_that_is_not_lora_or_does_not_fit_is_refused(untrained_run, tiny_model_dir):
    import torch
    from safetensors.torch import load_file, save_file

    file = untrained_run.adapter / "adapter_model.safetensors"
    tensors = load_file(file)
    deltas = stage.load_deltas(untrained_run.adapter)
    assert len(deltas) == 14 and "model.layers.0.self_attn.q_proj.weight" in deltas
    delta = deltas["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(delta.lora_a, tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"])
    assert torch.equal(delta.lora_b, tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"])
    shards = stage.shard_files(tiny_model_dir)
    stage.check_fit(deltas, tiny_model_dir, shards)
    wide = {**deltas, "model.layers.0.mlp.up_proj.weight": stage.Delta(delta.lora_a, torch.zeros(7, 16))}
    assert message(stage.check_fit, wide, tiny_model_dir, shards) == (
        "the adapter does not fit the base model: 'model.layers.0.mlp.up_proj.weight' is (384, 128) in the base, "
        "the adapter expects (7, 128)")
    extra = {**deltas, "model.layers.9.mlp.up_proj.weight": delta}
    assert message(stage.check_fit, extra, tiny_model_dir, shards) == (
        "the adapter does not fit the base model: it adapts 'model.layers.9.mlp.up_proj.weight', which the base lacks")
    save_file({**tensors, "base_model.model.lm_head.weight": torch.zeros(2, 2)}, file)
    assert message(stage.load_deltas, untrained_run.adapter) == (
        f"{untrained_run.adapter}: the adapter holds 'base_model.model.lm_head.weight', which a LoRA merge cannot "
        "fold in (modules_to_save or another tuner)")


def test_the_shards_are_the_index_or_the_single_file(tmp_path, tiny_model_dir):
    assert stage.shard_files(tiny_model_dir) == ["model.safetensors"]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00002-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
        "c": "model-00002-of-00002.safetensors"}}))
    assert stage.shard_files(tmp_path) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    (tmp_path / "model.safetensors.index.json").unlink()
    assert message(stage.shard_files, tmp_path) == (
        f"{tmp_path} has no safetensors weights (model.safetensors or an index); only safetensors checkpoints are "
        "merged")
    recipe = load_recipe("tiny")
    assert stage.base_checkpoint(recipe) == tiny_model_dir
    assert stage.base_checkpoint(recipe.with_section("model", path=str(tmp_path))) == tmp_path


@pytest.mark.parametrize(("share", "refused"), [(1 / 1.1, False), (1 / 1.02, True)])
def test_merge_needs_the_base_size_and_5_percent_free(tmp_path, share, refused):
    """A sparse file as large as a share of the free space: it takes none of it."""
    free = shutil.disk_usage(tmp_path).free
    with open(tmp_path / "model.safetensors", "wb") as f:
        f.truncate(int(free * share))
    if not refused:
        stage.check_disk(tmp_path, ["model.safetensors"], tmp_path)
        return
    needed = int(int(free * share) * 1.05)
    with pytest.raises(UserError, match=rf"^merging needs about {needed / 1e9:.1f} GB free in {tmp_path}, only "
                                        r"\d{1,5}\.\d GB is available$"):
        stage.check_disk(tmp_path, ["model.safetensors"], tmp_path)


def test_the_check_is_summed_up_in_one_table(capsys):
    from qlora_app.merge.verify import AdapterLosses, MergedCheck

    stage.print_verification(AdapterLosses(12, None, 1.3, 1.2345), MergedCheck("dequantized", 0.01234, 0.001, 1.25),
                             "the reason")
    lines = capsys.readouterr().out.splitlines()
    cells = [[cell.strip() for cell in line.split("│")[1:-1]] for line in lines if "│" in line]
    assert all(line.split("│")[2].startswith("  ") for line in lines if "│" in line and "merged into" not in line)
    assert (lines[0].strip(), lines[-1].strip()) == ("merge check on 12 held-out examples", "dequantized: the reason")
    assert cells == [["held-out loss: adapter on the 4-bit base (as trained)", "n/a"],
                     ["held-out loss: adapter on the original 16-bit base", "1.3000"],
                     ["held-out loss: adapter on dequantized NF4 weights", "1.2345"],
                     ["merged into", "dequantized base weights"],
                     ["held-out loss: merged model", "1.2500"],
                     ["largest logit difference, merged vs base + adapter", "0.0123"]]


@pytest.mark.parametrize(("relative", "loss_merged", "outcome"), [
    (0.05, 1.01, "accepted"),  # at the tolerances: accepted without a word
    (0.0501, 1.0, "refused"),
    (0.01, 1.0101, "warned"),
])
def test_the_check_refuses_past_the_logit_tolerance_and_warns_past_the_loss_increase(
        tmp_path, monkeypatch, capsys, relative, loss_merged, outcome):
    from qlora_app.merge.verify import AdapterLosses, MergedCheck
    from qlora_app.run.directory import RunDir

    check = MergedCheck("original", relative * 20, relative, loss_merged)
    monkeypatch.setattr(stage, "compare_merged", lambda *args: check)
    losses = AdapterLosses(12, 1.0, 1.1, 1.05)
    args = (load_recipe("tiny"), RunDir(tmp_path), tmp_path, tmp_path, losses, "original", "why")
    if outcome == "refused":
        assert message(stage.check_merged, *args) == (
            "the merged model diverges from base + adapter (largest logit difference 1.002, 5.0% of the logit scale); "
            "nothing was written")
        return
    assert stage.check_merged(*args) == {
        "examples": 12, "max_logit_diff": relative * 20, "relative_logit_diff": relative, "loss_adapter_on_4bit": 1.0,
        "loss_adapter_on_original": 1.1, "loss_adapter_on_dequantized": 1.05, "loss_merged": loss_merged}
    warned = " ".join(capsys.readouterr().err.split())
    assert warned == ("" if outcome == "accepted" else
                      "warning: the merged model's held-out loss (1.0101) is more than 1.0% above the adapter on its "
                      "4-bit base (1.0000): it answers somewhat differently from the model that was trained")


def test_a_shard_keeps_its_integer_tensors_and_casts_and_merges_the_float_ones(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    weight, steps = torch.randn(4, 3), torch.arange(5, dtype=torch.int64)
    save_file({"w.weight": weight, "rotary.steps": steps, "other.weight": torch.ones(2)}, tmp_path / "in.safetensors")
    delta = stage.Delta(lora_a=torch.ones(1, 3), lora_b=torch.full((4, 1), 0.5))
    recipe = load_recipe("tiny")
    stage.merge_shard(tmp_path / "in.safetensors", tmp_path / "out.safetensors", {"w.weight": delta}, 2.0,
                      "float16", frozenset(), recipe)
    out = load_file(tmp_path / "out.safetensors")
    assert out["rotary.steps"].dtype == torch.int64 and out["rotary.steps"].tolist() == steps.tolist()
    assert out["other.weight"].dtype == torch.float16
    assert torch.equal(out["w.weight"], (weight.half().float() + 1.0).half())


def test_the_merged_config_names_the_merge_dtype_and_stale_staging_is_cleared(untrained_run):
    stale, unrelated = untrained_run.path / ".merged-killed", untrained_run.path / ".other-kept"
    stale.mkdir()
    unrelated.mkdir()
    merged = stage.merge(untrained_run, untrained_run.recipe().merge.model_copy(update={"dtype": "float16"}),
                         verify=False)
    config = json.loads((merged / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "float16"
    assert not stale.exists() and unrelated.is_dir()


@pytest.mark.parametrize("quantized", [True, False], ids=["qlora", "plain-lora"])
def test_a_preference_run_is_also_checked_on_its_held_out_pairs(untrained_run, capsys, quantized):
    """Against the adapter as trained: on the 4-bit base for QLoRA, on the original weights for plain LoRA."""
    import yaml
    from conftest import REPO

    recipe = yaml.safe_load(untrained_run.recipe_file.read_text())
    data = {**recipe["data"], "source": str(REPO / "data/tiny/capitals-prefs.jsonl"), "format": "auto",
            "eval_split": str(REPO / "data/tiny/capitals-prefs-eval.jsonl")}
    untrained_run.recipe_file.write_text(yaml.safe_dump({**recipe, "data": data,
                                                         "quantization": {**recipe["quantization"],
                                                                          "enabled": quantized},
                                                         "train": {**recipe["train"], "method": "dpo"}}))
    check = json.loads((stage.merge(untrained_run) / "merge_report.json").read_text())["verification"]
    assert check["examples"] == check["preference_pairs"] == 12
    assert 0 <= check["preference_accuracy_merged"] <= 1 and check["preference_warning"] is None
    assert abs(check["preference_accuracy_merged"] - check["preference_accuracy_adapter"]) <= 0.05
    assert check["preference_margin_merged"] == pytest.approx(check["preference_margin_adapter"], abs=0.5)
    table = [" ".join(line.split()) for line in capsys.readouterr().out.splitlines()]
    assert f"│ held-out preference accuracy: merged model │ {check['preference_accuracy_merged']:.1%} │" in table
    assert any(line.startswith("│ held-out preference accuracy (12 pairs): adapter as trained │") for line in table)


def test_a_preference_accuracy_apart_by_more_than_5_points_is_warned_and_recorded(tmp_path, monkeypatch, capsys):
    from qlora_app.data.preference import PairScores
    from qlora_app.merge.verify import AdapterLosses, MergedCheck
    from qlora_app.run.directory import RunDir

    monkeypatch.setattr(stage, "compare_merged",
                        lambda *args: MergedCheck("original", 0.1, 0.01, 1.0, PairScores(0.5, 0.25, 12)))
    losses = AdapterLosses(12, 1.0, 1.1, 1.05, PairScores(0.75, 1.5, 12))
    record = stage.check_merged(load_recipe("tiny"), RunDir(tmp_path), tmp_path, tmp_path, losses, "original", "why")
    assert " ".join(capsys.readouterr().err.split()) == (
        "warning: the merged model prefers the chosen answer on 50% of 12 held-out pairs, the adapter as trained on "
        "75%: more than 5 points apart, so it ranks answers somewhat differently from the model that was trained")
    assert (record["preference_accuracy_adapter"], record["preference_accuracy_merged"]) == (0.75, 0.5)
    assert (record["preference_margin_adapter"], record["preference_margin_merged"]) == (1.5, 0.25)
    assert record["preference_pairs"] == 12 and record["preference_warning"].startswith("the merged model prefers")
