"""The eval stage: base vs tuned on the run's held-out split, through ONE vLLM server in adapter mode (the base
loaded once, the run's adapter a second model id), greedy and bounded. Scores and answers go to RUN/eval.json
(atomically), the table to the terminal and to the merged model's card. Ctrl-C or SIGTERM stops the server and
everything it spawned.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from qlora_app import console
from qlora_app.data.splits import heldout_chats
from qlora_app.eval.general import comparisons, completions_model, drops, load_tasks, print_general, run_tasks
from qlora_app.eval.generate import answer_all, questions
from qlora_app.eval.metrics import MODELS, score, sentence_chrf, table, worst_table
from qlora_app.machine.atomic import write_json_atomic, write_text_atomic
from qlora_app.merge.stage import adapter_fingerprint
from qlora_app.recipe.schema import Recipe
from qlora_app.run.directory import RunDir, utc_timestamp
from qlora_app.serve.auth import KEY_ENV
from qlora_app.serve.process import sigterm_as_interrupt
from qlora_app.serve.stage import running
from qlora_app.serve.target import adapter_target


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tuned_name(recipe: Recipe) -> str:
    return f"{recipe.name}-tuned"


def fingerprint(run: RunDir, recipe: Recipe) -> dict:
    """What decides eval.json: the adapter, the held-out data and the eval settings."""
    return {"adapter_sha256": adapter_fingerprint(run), "data_fingerprint": heldout_chats(recipe).fingerprint,
            "settings": recipe.eval.settings()}


def is_current(run: RunDir, recipe: Recipe) -> bool:
    import json

    if not run.eval_report.is_file() or not (run.adapter / "adapter_model.safetensors").is_file():
        return False
    made = json.loads(run.eval_report.read_text())
    return all(made.get(key) == value for key, value in fingerprint(run, recipe).items())


def evaluate(run: RunDir, recipe: Recipe, root: Path) -> dict:
    """Answer the held-out questions with base and tuned, run the general tasks on both, score, write eval.json
    and the card; print."""
    spec = recipe.eval
    asked = questions(heldout_chats(recipe).rows, spec.limit)  # a pair: its chosen answer
    task_dict, skipped = load_tasks(spec.tasks) if spec.tasks else ({}, [])  # before the server: data, typos
    for line in skipped:
        console.note(line)
    target = adapter_target(recipe, {tuned_name(recipe): run})
    models = dict(zip(MODELS, (recipe.name, tuned_name(recipe))))
    started = time.time()
    with sigterm_as_interrupt(), running(target, "127.0.0.1", free_port(), root, echo=False) as endpoint:
        answers = ask_both(endpoint.url, list(models.values()), asked, recipe)
        general = general_skills(endpoint.url, models, task_dict, str(target.tokenizer), recipe)
    answers = {label: answers[model] for label, model in models.items()}
    report = {**fingerprint(run, recipe), "created": utc_timestamp(), "examples": len(asked),
              "seconds": round(time.time() - started, 1), "models": models,
              "scores": {label: score(answers[label], [q.reference for q in asked]).as_dict() for label in MODELS},
              "general": {**general, "skipped": skipped + general["skipped"]}, "items": items(asked, answers)}
    write_json_atomic(run.eval_report, report)
    refresh_card(run)
    print_report(report)
    return report


def general_skills(url: str, models: dict[str, str], task_dict: dict, tokenizer: str, recipe: Recipe) -> dict:
    """lm-eval's tasks on base, then tuned (never in one batch: see answer_all), compared per task."""
    if not task_dict:
        return {"tasks": {}, "warnings": [], "skipped": []}
    spec = recipe.eval
    samples = {label: run_tasks(completions_model(url, model, tokenizer, os.environ.get(KEY_ENV),
                                                  recipe.max_model_len), task_dict, spec.task_limit)
               for label, model in models.items()}
    tasks, skipped = comparisons(samples["base"], samples["tuned"])
    for line in skipped:
        console.note(line)
    return {"tasks": tasks, "warnings": drops(tasks, spec.drop_warning), "skipped": skipped}


def answer_budget(recipe: Recipe) -> int:
    """eval.max_tokens, bounded to half the served length so that a question always fits beside its answer."""
    bound = min(recipe.eval.max_tokens, recipe.max_model_len // 2)
    if bound < recipe.eval.max_tokens:
        console.note(f"eval: answers bounded to {bound} tokens, half the served length {recipe.max_model_len}")
    return bound


def ask_both(url: str, models: list[str], asked: list, recipe: Recipe) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key=os.environ.get(KEY_ENV) or "not-needed", max_retries=0,
                    timeout=600)
    try:
        return answer_all(client, models, asked, answer_budget(recipe), recipe.eval.concurrency)
    finally:
        client.close()  # an open keep-alive connection would hold up the server's shutdown


def items(asked: list, answers: dict) -> list[dict]:
    out = []
    for i, q in enumerate(asked):
        item = {"question": q.messages[-1]["content"], "reference": q.reference}
        for label in MODELS:
            a = answers[label][i]
            item.update({label: a.text, f"{label}_finish": a.finish_reason, f"{label}_tokens": a.tokens,
                         f"{label}_chrf": round(sentence_chrf(a.text, q.reference), 2)})
        out.append(item)
    return out


def refresh_card(run: RunDir) -> None:
    """The merged model's card gains the Evaluation section (push renders it afresh from eval.json)."""
    if (run.merged / "README.md").is_file():
        from qlora_app.merge.stage import card

        write_text_atomic(run.merged / "README.md", card(run, run.merged))


def print_report(report: dict) -> None:
    console.out.print(table(report["scores"], f"eval: base vs tuned on {report['examples']} held-out examples"))
    console.out.print(worst_table(report["items"]))
    print_general(report.get("general", {}))


def eval_command(run_dir: str | None, recipe_name: str | None, overrides: tuple[str, ...], root: Path) -> None:
    """`qlora-app eval`: the run (or the latest of a recipe, or of any) with its recipe and the overrides."""
    from qlora_app.recipe.loader import load_recipe
    from qlora_app.run.directory import find_run

    run = find_run(run_dir, recipe_name, root)
    evaluate(run, load_recipe(str(run.recipe_file), overrides), root)
