"""The model card (README.md with the Hub's YAML metadata) of a run's adapter or merged model.

One card for both places it is written: the merge stage's merged/ folder and `qlora-app push`. Everything
in it comes from the run directory (resolved recipe, manifest, merge report); nothing is typed twice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from qlora_app.errors import UserError
from qlora_app.run.directory import RunDir

Kind = Literal["adapter", "merged"]


@dataclass(frozen=True)
class BaseLicense:
    license: str  # an SPDX-like Hub id (apache-2.0, llama3) or "other"
    link: str | None = None  # where to read it
    name: str | None = None  # the Hub's license_name, for license: other


@dataclass(frozen=True)
class CardFacts:
    kind: Kind
    model_ref: str  # how a reader names this model: a Hub repo id, or a local folder
    base_license: BaseLicense = field(default_factory=lambda: BaseLicense("other"))
    merged_dir: Path | None = None  # the folder holding merge_report.json (merged cards only)


def is_hub_id(path: str) -> bool:
    return path.count("/") == 1 and ":" not in path and not path.startswith((".", "/"))


def base_license(recipe, fetch: bool = True) -> BaseLicense:
    """The base model's license as its own card states it (fetched from the Hub only when asked)."""
    path = recipe.model.path
    if path.startswith("builtin:"):
        return BaseLicense("apache-2.0", "https://www.apache.org/licenses/LICENSE-2.0")  # built here, ours
    if Path(path).is_dir():
        return card_license(Path(path) / "README.md", None)
    page = f"https://huggingface.co/{path}"
    if not fetch:
        return BaseLicense("other", page)
    from qlora_app.hub import access

    try:
        return card_license(access.fetch_file(path, "README.md", recipe.model.revision), page)
    except UserError:  # a base without a card: point at its page
        return BaseLicense("other", page)


def card_license(readme: Path, page: str | None) -> BaseLicense:
    from huggingface_hub import ModelCard

    if not readme.is_file():
        return BaseLicense("other", page)
    data = ModelCard.load(readme).data
    link = data.get("license_link")
    if link and page and not link.startswith("http"):
        link = f"{page}/blob/main/{link}"  # a file in the base's repository
    return BaseLicense(data.get("license") or "other", link or page, data.get("license_name"))


def metadata(recipe, facts: CardFacts) -> str:
    from huggingface_hub import ModelCardData

    base = recipe.model.path
    lic = facts.base_license
    data = ModelCardData(
        base_model=base if is_hub_id(base) else None, license=lic.license, license_name=lic.name,
        license_link=lic.link, library_name="peft" if facts.kind == "adapter" else "transformers",
        base_model_relation="adapter" if facts.kind == "adapter" else "finetune" if is_hub_id(base) else None,
        tags=["qlora-app", "qlora" if recipe.method == "qlora" else "lora", "lora", recipe.train.method, "trl"],
        pipeline_tag="text-generation")
    return f"---\n{data.to_yaml()}\n---\n"


def render(run: RunDir, facts: CardFacts) -> str:
    recipe = run.recipe()
    manifest = run.read_manifest()
    sections = [metadata(recipe, facts), summary(recipe, run, manifest, facts), preference_section(manifest),
                usage(recipe, facts),
                merge_section(facts.merged_dir), evaluation_section(run), versions(manifest),
                "## Recipe\n\nThe resolved recipe the run used (`recipe.yaml`):\n\n```yaml\n"
                f"{run.recipe_file.read_text().rstrip()}\n```\n"]
    return "\n".join(s for s in sections if s)


def summary(recipe, run: RunDir, manifest: dict, facts: CardFacts) -> str:
    data, losses = manifest.get("data", {}), manifest.get("losses", {})
    what = "LoRA adapter" if facts.kind == "adapter" else f"{recipe.merge.dtype} model, the adapter merged in"
    lic = facts.base_license
    return (f"# {recipe.name} ({facts.kind})\n\nA {what}, fine-tuned with qlora-app ({recipe.method}, LoRA "
            f"r={recipe.lora.r}, alpha={recipe.lora.alpha}).\n\n"
            f"- base model: {recipe.model.path} (revision {recipe.model.revision}); license: {lic.license}"
            f"{f' ({lic.link})' if lic.link else ''}\n"
            f"- run: {run.path.name}\n"
            f"- data: {recipe.data.source}: {data.get('train_examples', 'n/a')} train / "
            f"{data.get('eval_examples', 'n/a')} held-out examples (fingerprint {data.get('fingerprint', 'n/a')})\n"
            f"- held-out loss: base {fmt(losses.get('base_eval_loss'))}, tuned {fmt(losses.get('final_eval_loss'))}\n"
            f"{template_line(recipe)}")


def preference_section(manifest: dict) -> str:
    """dpo / orpo: the method and its settings, the run it continued, and base vs tuned on the held-out pairs."""
    method = manifest.get("training_method", {})
    if method.get("method") in (None, "sft"):
        return ""
    loss = f", loss {method['loss_type']}" if method.get("loss_type") else ""
    lines = [f"- method: {method['method'].upper()} (beta {method.get('beta')}{loss}) on chosen/rejected pairs"]
    chain = manifest.get("chain", {})
    if chain.get("init_run"):
        lines.append(f"- continued from: run {chain.get('init_run_id')} of recipe {chain.get('init_recipe')} "
                     f"({chain.get('init_method')}, data fingerprint {chain.get('init_data_fingerprint')}); its "
                     "adapter was the starting point" + (" and the reference" if method["method"] == "dpo" else ""))
    else:
        lines.append("- started from: the base model (a new adapter)")
    scores = manifest.get("preference")
    if scores:
        base, tuned = scores["base"], scores["tuned"]
        lines.append(f"- held-out preference accuracy (chosen over rejected, {tuned['pairs']} pairs): "
                     f"{base['what']} {base['accuracy']:.1%}, tuned {tuned['accuracy']:.1%}; mean log-prob margin "
                     f"{base['margin']:.3f} -> {tuned['margin']:.3f}")
    return "## Preference tuning\n\n" + "\n".join(lines) + "\n"


def template_line(recipe) -> str:
    """The chat-template arguments the model was trained with, which every prompt must be rendered with too."""
    kwargs = recipe.model.template_kwargs
    if not kwargs:
        return ""
    thinking = {True: "thinking on", False: "thinking off"}.get(kwargs.get("enable_thinking"), "")
    return (f"- chat template arguments: `{json.dumps(kwargs, sort_keys=True)}`{f' ({thinking})' if thinking else ''}"
            "; trained with them: render prompts with the same (vLLM: `--default-chat-template-kwargs`, "
            "transformers: `apply_chat_template(..., **kwargs)`)\n")


def template_flag(recipe) -> str:
    kwargs = recipe.model.template_kwargs
    return f" --default-chat-template-kwargs '{json.dumps(kwargs, sort_keys=True)}'" if kwargs else ""


def usage(recipe, facts: CardFacts) -> str:
    ref, base, name = facts.model_ref, recipe.model.path, recipe.name
    if facts.kind == "merged":
        return ("## Use\n\nServe with vLLM's OpenAI-compatible server:\n\n"
                f"```bash\nvllm serve {ref} --served-model-name {name}{template_flag(recipe)}\n```\n\n"
                "Load with transformers:\n\n```python\nfrom transformers import AutoModelForCausalLM, "
                f"AutoTokenizer\n\nmodel = AutoModelForCausalLM.from_pretrained(\"{ref}\", dtype=\"auto\")\n"
                f"tokenizer = AutoTokenizer.from_pretrained(\"{ref}\")\n```\n")
    return ("## Use\n\nServe on its base with vLLM (adapter mode; one base can serve many adapters):\n\n"
            f"```bash\nvllm serve {base} --enable-lora --max-lora-rank {vllm_rank(recipe.lora.r)} "
            f"--lora-modules {name}={ref}{template_flag(recipe)}\n```\n\n"
            "Load with transformers and peft:\n\n```python\nfrom peft import AutoPeftModelForCausalLM\n"
            "from transformers import AutoTokenizer\n\n"
            f"model = AutoPeftModelForCausalLM.from_pretrained(\"{ref}\", dtype=\"auto\")\n"
            f"tokenizer = AutoTokenizer.from_pretrained(\"{ref}\")  # the training tokenizer and chat template\n"
            "```\n")


def vllm_rank(r: int) -> int:
    from qlora_app.recipe.schema import VLLM_LORA_RANKS

    return min((v for v in VLLM_LORA_RANKS if v >= r), default=r)


def merge_section(merged_dir: Path | None) -> str:
    report_file = merged_dir / "merge_report.json" if merged_dir else None
    if report_file is None or not report_file.is_file():
        return ""
    report = json.loads(report_file.read_text())
    check = report.get("verification", {})
    lines = [f"- merged into: {report.get('base_weights')} base weights, {report.get('merged_weights')} weights"]
    if check:
        lines.append(f"- largest logit difference, merged vs base + adapter: {fmt(check.get('max_logit_diff'))}")
        lines.append(f"- held-out loss of the merged model: {fmt(check.get('loss_merged'))}")
    return "## Merge report\n\n" + "\n".join(lines) + "\n"


EVAL_ROWS = (("exact match", "exact_match", "{:.0%}"), ("ROUGE-L", "rouge_l", "{:.3f}"), ("chrF", "chrf", "{:.1f}"),
             ("finished (stop)", "stopped", "{:.0%}"), ("mean answer tokens", "mean_tokens", "{:.1f}"))


def evaluation_section(run: RunDir) -> str:
    """Base vs tuned on the held-out split, from the eval stage's eval.json (nothing when it has not run)."""
    if not run.eval_report.is_file():
        return ""
    report = json.loads(run.eval_report.read_text())
    scores = report.get("scores", {})
    if not {"base", "tuned"} <= set(scores):
        return ""
    rows = [f"| {label} | {fmt.format(scores['base'][key])} | {fmt.format(scores['tuned'][key])} |"
            for label, key, fmt in EVAL_ROWS]
    return (f"## Evaluation\n\nBase vs tuned on {report.get('examples')} held-out examples (greedy, at most "
            f"{report.get('settings', {}).get('max_tokens')} tokens; `eval.json`):\n\n"
            "| metric | base | tuned |\n|---|---|---|\n" + "\n".join(rows) + "\n"
            + general_skills_section(report.get("general", {})))


def general_skills_section(general: dict) -> str:
    """lm-evaluation-harness tasks, base vs tuned, and a line for each task whose score dropped."""
    tasks = general.get("tasks", {})
    if not tasks:
        return ""
    rows = [f"| {task} | {c['metric']} | {c['examples']} | {c['base']:.3f} | {c['tuned']:.3f} | "
            f"{c['delta']:+.3f} ± {c['stderr']:.3f} |" for task, c in tasks.items()]
    warnings = "".join(f"\n**Warning:** general skill dropped: {line}\n" for line in general.get("warnings", []))
    return ("\nGeneral skills (lm-evaluation-harness through the same server; delta ± its standard error, paired "
            "over the same examples):\n\n| task | metric | examples | base | tuned | delta |\n|---|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n" + warnings)


def versions(manifest: dict) -> str:
    found = manifest.get("versions", {})
    if not found:
        return ""
    listed = ", ".join(f"{name} {version}" for name, version in found.items())
    return f"## Versions\n\nTrained with {listed} (git commit {manifest.get('git_commit') or 'n/a'}).\n"


def fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "n/a" if value is None else str(value)
