import pytest
import yaml

from qlora_app.errors import UserError
from qlora_app.recipe.loader import dump_recipe, list_recipes, load_recipe, recipes_dir
from qlora_app.recipe.schema import ALL_LINEAR


def test_shipped_recipes_are_all_there():
    assert {"llama3-8b", "llama2-7b", "mistral-7b", "tiny"} <= set(list_recipes())


@pytest.mark.parametrize("name", list_recipes())
def test_every_shipped_recipe_validates(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    assert not recipe.model.trust_remote_code


def test_llama3_recipe_has_the_articles_settings():
    r = load_recipe("llama3-8b")
    assert r.method == "qlora"
    q = r.quantization
    assert (q.quant_type, q.double_quant, q.compute_dtype) == ("nf4", True, "bfloat16")
    assert (r.lora.r, r.lora.alpha, r.lora.dropout) == (64, 16, 0.1)
    assert r.lora.target_modules == ALL_LINEAR
    assert (r.data.max_length, r.train.optimizer, r.train.lr) == (1024, "paged_adamw_32bit", 2e-4)


def test_llama2_recipe_is_attention_only_with_batch_4x4():
    r = load_recipe("llama2-7b")
    assert (r.lora.r, r.lora.alpha, r.lora.target_modules) == (16, 32, ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert (r.data.max_length, r.train.batch_size, r.train.grad_accum) == (512, 4, 4)


def test_lora_variant_switches_quantization_off():
    assert load_recipe("llama3-8b-lora").method == "lora"


def test_tiny_recipe_points_at_shipped_data():
    r = load_recipe("tiny")
    assert r.model.path == "builtin:tiny-llama"
    from pathlib import Path

    assert Path(r.data.source).is_file() and Path(r.data.eval_split).is_file()


def test_overrides_are_typed_and_validated():
    r = load_recipe("llama3-8b", ["train.lr=1e-4", "lora.r=16", "lora.target_modules=[q_proj,v_proj]",
                                  "quantization.enabled=false"])
    assert r.train.lr == pytest.approx(1e-4)
    assert r.lora.r == 16
    assert r.lora.target_modules == ("q_proj", "v_proj")
    assert r.method == "lora"


def test_show_round_trips(tmp_path):
    r = load_recipe("llama2-7b", ["train.seed=7"])
    path = tmp_path / "copy.yaml"
    path.write_text(dump_recipe(r))
    again = load_recipe(str(path))
    assert again == r


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["lora.rank=8"], "unknown key 'lora.rank' (did you mean 'r'?)"),
        (["trian.lr=1e-4"], "unknown key 'trian' (did you mean 'train'?)"),
        (["train.lr=fast"], "train.lr: Input should be a valid number"),
        (["lora.dropout=1.5"], "lora.dropout: Input should be less than 1 (got 1.5)"),
        (["quantization.quant_type=nf8"], "Input should be 'nf4' or 'fp4' (got 'nf8')"),
        (["train.optimizer=sgd"], "'paged_adamw_32bit', 'paged_adamw_8bit', 'adamw_torch' or 'adamw_8bit'"),
        (["data.eval_split=null", "data.eval_fraction=0"], "data needs a held-out set"),
        (["lora"], "expected section.key=value"),
        (["quantization.enabled=false", "merge.base_weights=dequantized"],
         "merge.base_weights=dequantized rounds the base to NF4, but this recipe trains on 16-bit weights"),
    ],
)
def test_bad_values_name_the_key_and_the_allowed_values(overrides, expected):
    with pytest.raises(UserError) as info:
        load_recipe("llama3-8b", overrides)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_all_problems_are_reported_at_once():
    with pytest.raises(UserError) as info:
        load_recipe("llama3-8b", ["lora.r=0", "train.batch_size=0"])
    assert "lora.r" in str(info.value) and "train.batch_size" in str(info.value)


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(UserError) as info:
        load_recipe("lama3-8b")
    message = str(info.value)
    assert "unknown recipe 'lama3-8b' (did you mean 'llama3-8b'?)" in message
    assert "llama2-7b" in message and "tiny" in message


def test_unknown_key_in_a_file(tmp_path):
    path = tmp_path / "typo.yaml"
    raw = yaml.safe_load((recipes_dir() / "llama3-8b.yaml").read_text())
    raw["train"]["learning_rate"] = 1e-4
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError) as info:
        load_recipe(str(path))
    assert f"{path}: unknown key 'train.learning_rate'" in str(info.value)


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  path: x\ndata:\n  source: [unclosed\n  format: text\n")
    with pytest.raises(UserError) as info:
        load_recipe(str(path))
    assert str(info.value).startswith(f"{path}:5:")
    assert "malformed YAML" in str(info.value)


def test_relative_paths_in_a_file_are_relative_to_the_file(tmp_path):
    (tmp_path / "data.jsonl").write_text('{"text": "hi"}\n')
    path = tmp_path / "r.yaml"
    path.write_text("model: {path: builtin:tiny-llama}\ndata: {source: ./data.jsonl}\n")
    assert load_recipe(str(path)).data.source == str(tmp_path / "data.jsonl")


def test_builtin_tiny_model_is_built_deterministically(tmp_path, monkeypatch, tiny_model_dir):
    import hashlib

    from qlora_app.model.tiny import materialize

    monkeypatch.setenv("QLORA_CACHE_DIR", str(tmp_path))
    again = materialize("builtin:tiny-llama")
    assert again != tiny_model_dir
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        digests = {hashlib.sha256((d / name).read_bytes()).hexdigest() for d in (tiny_model_dir, again)}
        assert len(digests) == 1, name


FAMILY_RECIPES = ("qwen3-8b", "llama3.1-8b", "gemma3-1b", "mistral-nemo-12b", "phi4-14b")


def test_recipes_lists_a_recipe_per_family():
    from conftest import run_cli

    listed = run_cli("recipes").stdout
    assert all(name in listed for name in FAMILY_RECIPES), listed


@pytest.mark.parametrize("name", FAMILY_RECIPES)
def test_family_recipe_plans_into_24_gb_offline(name):
    from conftest import run_cli

    result = run_cli("plan", name, "--gpu-memory", "24", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert "fits in 24 GiB" in result.stdout, result.stdout


TRAIN_KEYS = ("method, beta, loss_type, init_adapter, epochs, max_steps, batch_size, fallback_batch_size, "
              "grad_accum, lr, lr_scheduler, warmup_ratio, weight_decay, max_grad_norm, optimizer, "
              "gradient_checkpointing, attention, seed, log_steps, eval_steps, save_steps, save_total_limit, "
              "report_to, distributed")


@pytest.mark.parametrize(("overrides", "problems"), [
    (["train.decay=0.1"], f"unknown key 'train.decay' (did you mean 'weight_decay'?) (valid keys here: {TRAIN_KEYS})"),
    (["train.zzz=1"], f"unknown key 'train.zzz' (valid keys here: {TRAIN_KEYS})"),
    (["data.eval_split=null", "data.eval_fraction=0"],
     "recipe: data needs a held-out set: set data.eval_fraction > 0 or data.eval_split"),
    (["lora.target_modules=[all-linear,q_proj]"],
     "lora.target_modules: all-linear (peft's every linear layer but the output head) stands alone "
     "(got ['all-linear', 'q_proj'])"),
    (["data.source=null"], "data.source: Input should be a valid string (got None)"),
])
def test_a_bad_recipe_is_one_exact_line(overrides, problems):
    with pytest.raises(UserError) as info:
        load_recipe("tiny", overrides)
    assert str(info.value) == f"{recipes_dir() / 'tiny.yaml'} (with --set {' '.join(overrides)}): {problems}"


def test_a_missing_section_is_named(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {path: builtin:tiny-llama}\n")
    with pytest.raises(UserError) as info:
        load_recipe(str(path))
    assert str(info.value) == f"{path}: missing required key 'data'"


def test_the_resolved_recipe_is_written_in_section_order_one_value_a_line_as_typed():
    description = "Café au lait, " * 6  # non-ASCII, and longer than 80 characters on its line
    text = dump_recipe(load_recipe("tiny").model_copy(update={"description": description}))
    assert [line.split(":")[0] for line in text.splitlines() if not line.startswith(" ")] == [
        "name", "description", "model", "quantization", "lora", "data", "train", "merge", "serve", "eval"]
    assert f"description: '{description}'" in text.splitlines()


def test_lora_scaling_is_alpha_over_r_or_over_its_root_with_rslora():
    from qlora_app.recipe.schema import lora_scaling

    assert (lora_scaling(16, 64), lora_scaling(16, 64, True), lora_scaling(16.0, 4, rslora=False)) == (0.25, 2.0, 4.0)
    assert load_recipe("tiny", ["lora.alpha=8", "lora.r=16", "lora.use_rslora=true"]).lora.scaling == 2.0


def test_what_decides_training_and_evaluation():
    recipe = load_recipe("tiny")
    renamed = recipe.model_copy(update={"name": "other", "description": "another"})
    assert renamed.training_fields() == recipe.training_fields()
    assert list(recipe.training_fields()) == ["model", "quantization", "lora", "data", "train"]
    assert load_recipe("tiny", ["eval.tasks=[arc_easy]"]).eval.settings() == {
        "max_tokens": recipe.eval.max_tokens, "concurrency": recipe.eval.concurrency, "tasks": ["arc_easy"],
        "limit": recipe.eval.limit, "task_limit": recipe.eval.task_limit, "drop_warning": recipe.eval.drop_warning}


def test_overrides_set_typed_values_at_any_depth_and_leave_the_recipe_read_alone(tmp_path, monkeypatch):
    from pathlib import Path

    from qlora_app.recipe.loader import apply_overrides

    monkeypatch.chdir(tmp_path)
    raw = {"train": {"lr": 0.1}}
    assert apply_overrides(raw, ["train.lr=0.5", "model.chat_template={{ a == b }}", "description=",
                                 "serve.adapters.mine=./run", "data.source=./d.jsonl", "model.revision=./r",
                                 "train.report_to=[tensorboard, wandb]"]) == {
        "train": {"lr": 0.5, "report_to": ["tensorboard", "wandb"]},
        "model": {"chat_template": "{{ a == b }}", "revision": "./r"}, "description": "",
        "serve": {"adapters": {"mine": "./run"}}, "data": {"source": str(Path(tmp_path / "d.jsonl").resolve())}}
    assert raw == {"train": {"lr": 0.1}}
    with pytest.raises(UserError) as info:
        apply_overrides(raw, ["train.lr.x=2"])
    assert str(info.value) == "--set 'train.lr.x=2': 'lr' is not a section"


def test_every_problem_is_listed_in_one_line():
    with pytest.raises(UserError) as info:
        load_recipe("tiny", ["lora.r=0", "train.grad_accum=0"])
    assert str(info.value) == (f"{recipes_dir() / 'tiny.yaml'} (with --set lora.r=0 train.grad_accum=0): lora.r: Input "
                               "should be greater than or equal to 1 (got 0); train.grad_accum: Input should be greater "
                               "than or equal to 1 (got 0)")


def test_recipes_come_from_the_environments_folder_else_the_source_tree(tmp_path, monkeypatch):
    from pathlib import Path

    shipped = Path(__file__).resolve().parents[2] / "recipes"
    assert recipes_dir() == shipped
    (tmp_path / "mine.yaml").write_text((shipped / "tiny.yaml").read_text())
    (tmp_path / "other.yml").write_text("model: {path: builtin:tiny-llama}\ndata: {source: x.jsonl, eval_fraction: 0.1}\n")
    monkeypatch.setenv("QLORA_RECIPES_DIR", str(tmp_path))
    assert recipes_dir() == tmp_path and list_recipes() == ["mine"]
    assert load_recipe(str(tmp_path / "other.yml")).name == "other"
    with pytest.raises(UserError) as info:
        load_recipe("qqq")
    assert str(info.value) == "unknown recipe 'qqq'; known recipes: mine"
    (tmp_path / "qqq2.yaml").write_text("")
    with pytest.raises(UserError) as info:
        load_recipe("qqq")
    assert str(info.value) == "unknown recipe 'qqq' (did you mean 'qqq2'?); known recipes: mine, qqq2"


@pytest.mark.parametrize(("content", "problem"), [
    ("model:\n  path: x\ndata:\n  source: [unclosed\n  format: text\n",
     "{path}:5:9: malformed YAML: expected ',' or ']', but got ':'"),
    ("- model\n- data\n", "{path}: a recipe must be a YAML mapping of sections, got list"),
    (b"name: caf\xe9\n", "cannot read recipe {path}: 'utf-8' codec can't decode byte 0xe9 in position 9: invalid "
                        "continuation byte"),
    ("missing", "recipe file {path} does not exist"),
])
def test_a_recipe_file_that_cannot_be_read_is_one_exact_line(tmp_path, content, problem):
    path = tmp_path / "r.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content != "missing":
        path.write_text(content)
    with pytest.raises(UserError) as info:
        load_recipe(str(path))
    assert str(info.value) == problem.format(path=path)
