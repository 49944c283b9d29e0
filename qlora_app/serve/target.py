"""What a server serves: a run's merged model, or one base with several runs' adapters (one base, many tenants).

Everything comes from run directories: the merged model folder (weights, tokenizer, chat template,
generation config) or each adapter folder (peft weights, the training tokenizer and template, and the
generation config that stops at end-of-turn). Mistakes are found here, before vLLM loads a byte.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qlora_app.errors import UserError
from qlora_app.model.architecture import load_architecture
from qlora_app.recipe.schema import ALL_LINEAR, VLLM_LORA_RANKS, Recipe
from qlora_app.run.directory import RunDir

# What vLLM 0.32 applies LoRA to in Llama, Mistral, Qwen3 and Gemma 3 models (every linear projection; Phi-3's
# are fused: qualified per family by model.families); an adapter on anything else would be loaded without error
# and ignored for those modules (vLLM has served the bare base silently).
VLLM_LORA_MODULES = ALL_LINEAR


@dataclass(frozen=True)
class Adapter:
    name: str
    path: Path
    rank: int


@dataclass(frozen=True)
class ServeTarget:
    recipe: Recipe  # the merged run's recipe, or the base recipe in adapter mode
    model: str  # a local folder or a hub id
    served_name: str
    tokenizer: Path
    adapters: tuple[Adapter, ...] = ()
    revision: str | None = None  # of a hub model; None for a local folder

    @property
    def chat_template(self) -> Path:
        return self.tokenizer / "chat_template.jinja"

    @property
    def generation_config(self) -> Path:
        return self.tokenizer

    @property
    def model_ids(self) -> list[str]:
        return [self.served_name, *(a.name for a in self.adapters)]

    @property
    def max_lora_rank(self) -> int:
        """The smallest rank vLLM accepts that holds every adapter (memory for LoRA slots scales with it)."""
        largest = max(a.rank for a in self.adapters)
        return self.recipe.serve.max_lora_rank or min(r for r in VLLM_LORA_RANKS if r >= largest)


def merged_target(run: RunDir, recipe: Recipe) -> ServeTarget:
    if not (run.merged / "config.json").is_file():
        raise UserError(f"{run.path} has no merged model: make it with: qlora-app merge {run.path} "
                        "(or serve the adapter with --base and --adapter)")
    check_chat_files(run.merged, f"the merged model of {run.path}")
    return ServeTarget(recipe, str(run.merged), recipe.name, run.merged)


def check_chat_files(folder: Path, what: str) -> None:
    """The training chat template must come along: without it vLLM would format chats its own way (or fail)."""
    if not (folder / "chat_template.jinja").is_file():
        raise UserError(f"{what} has no chat_template.jinja (the template it was trained with): train or merge "
                        "it again with this version of qlora-app")


def adapter_target(base: Recipe, adapters: dict[str, RunDir]) -> ServeTarget:
    if not adapters:
        raise UserError(f"adapter mode needs at least one --adapter NAME=RUN_DIR (or serve.adapters in {base.name})")
    if base.name in adapters:
        raise UserError(f"adapter name '{base.name}' is the base model's id: pick another name")
    found = tuple(check_adapter(name, run, base) for name, run in adapters.items())
    first = found[0].path
    for adapter in found[1:]:
        if (adapter.path / "chat_template.jinja").read_text() != (first / "chat_template.jinja").read_text():
            raise UserError(f"adapters '{found[0].name}' and '{adapter.name}' were trained with different chat "
                            "templates: serve them from separate servers")
    from qlora_app.model.loading import model_location

    model = model_location(base.model)
    revision = None if Path(model).is_dir() else base.model.revision
    return ServeTarget(base, model, base.name, first, found, revision)


def check_adapter(name: str, run: RunDir, base: Recipe) -> Adapter:
    """One adapter that vLLM will really apply to this base, or a one-line reason why not."""
    config_path = run.adapter / "adapter_config.json"
    if not config_path.is_file():
        raise UserError(f"adapter '{name}': {run.path} has no trained adapter (no {config_path.name}): "
                        f"train it with: qlora-app train {run.path.parent.name}")
    trained = run.recipe().model
    if (trained.path, trained.revision) != (base.model.path, base.model.revision):
        raise UserError(f"adapter '{name}' was trained on {trained.path}@{trained.revision}, not on the base "
                        f"{base.model.path}@{base.model.revision}")
    check_chat_files(run.adapter, f"adapter '{name}' ({run.path})")
    config = json.loads(config_path.read_text())
    problem = unsupported(config, load_architecture(base.model).family.projections)
    if problem:
        raise UserError(f"adapter '{name}' ({run.path}) cannot be served by vLLM: {problem}")
    rank, limit = adapter_rank(config), base.serve.max_lora_rank
    if limit and rank > limit:
        raise UserError(f"adapter '{name}' has rank {rank}, above the server's max LoRA rank "
                        f"serve.max_lora_rank={limit}")
    return Adapter(name, run.adapter, rank)


def adapter_rank(config: dict) -> int:
    return int(max([config["r"], *(config.get("rank_pattern") or {}).values()]))


def unsupported(config: dict, lora_modules: tuple[str, ...] = VLLM_LORA_MODULES) -> str | None:
    if config.get("peft_type", "LORA") != "LORA":
        return f"peft_type {config.get('peft_type')} is not LoRA"
    if config.get("use_dora"):
        return "it is a DoRA adapter (use_dora: true)"
    if config.get("modules_to_save"):
        return f"it saves full modules {config['modules_to_save']} (modules_to_save)"
    if adapter_rank(config) > VLLM_LORA_RANKS[-1]:
        return f"rank {adapter_rank(config)} is above vLLM's largest LoRA rank {VLLM_LORA_RANKS[-1]}"
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    other = sorted(set(targets) - set(lora_modules))
    if other:
        return f"target modules {other} are not LoRA-capable in vLLM (supported: {', '.join(lora_modules)})"
    return None


def parse_adapters(pairs: tuple[str, ...], recipe_adapters: dict[str, str]) -> dict[str, RunDir]:
    """NAME=RUN_DIR pairs from the command line over the recipe's serve.adapters."""
    named = dict(recipe_adapters)
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--adapter {pair!r}: expected NAME=RUN_DIR, e.g. --adapter support=runs/llama3-8b/latest")
        named[name] = path
    runs = {}
    for name, path in named.items():
        run = RunDir(Path(path).resolve())
        if not run.recipe_file.is_file():
            raise UserError(f"adapter '{name}': {path} is not a run directory (no recipe.yaml)")
        runs[name] = run
    return runs
