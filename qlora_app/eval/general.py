"""General skills: lm-evaluation-harness tasks on base and tuned, through the eval server's completions API.

lm-eval's `local-completions` model sends each loglikelihood request to the running vLLM server (echo with
logprobs), so the numbers come from the weights and the runtime that will serve. A task is a name lm-eval knows
(its data comes from the Hub or the datasets cache) or a local YAML file (its data_files relative to it), which
works offline. A task whose data cannot be had is skipped with one line; a name lm-eval does not know is a
recipe error, found before the server starts.
"""

from __future__ import annotations

import logging
import math
import statistics
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.table import Table

from qlora_app import console
from qlora_app.errors import UserError

METRICS = ("acc_norm", "acc", "exact_match")  # the first a task reports is its score


@dataclass(frozen=True)
class Comparison:
    metric: str
    examples: int
    base: float
    tuned: float
    delta: float  # tuned - base
    stderr: float  # of the delta, paired over the same examples

    def as_dict(self) -> dict:
        return asdict(self)


def is_local(task: str) -> bool:
    return task.endswith((".yaml", ".yml"))


def local_config(path: str) -> dict:
    """A local task's YAML as lm-eval reads it, its data_files made absolute (relative to the YAML)."""
    from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's own reader: includes and !function tags

    file = Path(path)
    if not file.is_file():
        raise UserError(f"eval.tasks: no task file {path}")
    try:
        config = load_yaml(file)
    except Exception as exc:  # YAML syntax, a bad include or !function: the file is unusable either way
        raise UserError(f"eval.tasks: {path} is not an lm-eval task file ({str(exc).splitlines()[0]})") from None
    files = config.get("dataset_kwargs", {}).get("data_files")
    if isinstance(files, dict):
        config["dataset_kwargs"]["data_files"] = {split: str((file.parent / name).resolve())
                                                  for split, name in files.items()}
    return config


@contextmanager
def quiet():
    """lm-eval logs every request batch at INFO and its settings (the API key among them) at DEBUG."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def task_manager(tasks: tuple[str, ...]):
    """lm-eval's index of tasks; indexing its 14,000 built-in tasks takes seconds, so only when a name needs it."""
    from lm_eval.tasks import TaskManager

    with quiet():
        return TaskManager(include_defaults=any(not is_local(t) for t in tasks))


def load_tasks(tasks: tuple[str, ...]) -> tuple[dict, list[str]]:
    """Every task lm-eval can build, with its data; one line for each that cannot have its data."""
    from lm_eval.tasks import get_task_dict

    manager = task_manager(tasks)
    unknown = [t for t in tasks if not is_local(t) and t not in manager.all_tasks]
    if unknown:
        raise UserError(f"eval.tasks: lm-evaluation-harness has no task {', '.join(unknown)} "
                        "(`lm-eval ls tasks` lists them; a local task is a .yaml path)")
    loaded, skipped = {}, []
    for task in tasks:
        spec = local_config(task) if is_local(task) else task
        try:
            with quiet():
                loaded.update(get_task_dict([spec], manager))
        except Exception as exc:  # datasets raises many types when offline or gated; each is one skipped task
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            skipped.append(f"eval: general task {task} skipped: its data is not available here ({reason})")
    return loaded, skipped


def completions_model(url: str, model: str, tokenizer: str, api_key: str | None, max_length: int):
    """lm-eval's local-completions model aimed at one model id of the running server, one request at a time:
    vLLM 0.32 with LoRA enabled fails a batch of prompt-logprob requests (its LoRA logits step indexes by request,
    not by prompt token; the engine dies), while one request alone is computed right."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    with quiet():
        return LocalCompletionsAPI(model=model, base_url=f"{url}/v1/completions", tokenizer=tokenizer,
                                   tokenizer_backend="huggingface", num_concurrent=1, batch_size=1,
                                   max_length=max_length, max_retries=1, timeout=600,
                                   header={"Authorization": f"Bearer {api_key or 'not-needed'}"})


def run_tasks(lm, task_dict: dict, limit: int | None) -> dict[str, dict[int, dict]]:
    """Per task, per example id, the example's metrics (lm-eval's logged samples)."""
    from lm_eval.evaluator import evaluate

    with quiet():
        results = evaluate(lm, task_dict, limit=limit, bootstrap_iters=0, log_samples=True, verbosity="ERROR")
    return {task: {s["doc_id"]: s for s in samples} for task, samples in results["samples"].items()}


def score_metric(sample: dict) -> str | None:
    """The task's per-example score: acc_norm, acc or exact_match where it has one, else its first numeric
    metric; None for a task with no per-example number (perplexity tasks score the corpus as a whole)."""
    names = sample.get("metrics") or [m for m in METRICS if m in sample]
    numeric = [m for m in names if isinstance(sample.get(m), (int, float))]
    return next((m for m in METRICS if m in numeric), numeric[0] if numeric else None)


def compare(base: dict[int, dict], tuned: dict[int, dict]) -> Comparison:
    """The score of each and the delta with its standard error, paired over the examples both answered."""
    ids = sorted(base.keys() & tuned.keys())
    metric = score_metric(base[ids[0]])
    b = [float(base[i][metric]) for i in ids]
    t = [float(tuned[i][metric]) for i in ids]
    deltas = [y - x for x, y in zip(b, t)]
    stderr = statistics.stdev(deltas) / math.sqrt(len(ids)) if len(ids) > 1 else float("nan")
    return Comparison(metric, len(ids), statistics.fmean(b), statistics.fmean(t), statistics.fmean(deltas), stderr)


def comparisons(base: dict[str, dict], tuned: dict[str, dict]) -> tuple[dict[str, dict], list[str]]:
    """Every task both models answered with a per-example score, compared; a line for each that cannot be."""
    compared, skipped = {}, []
    for task in base:
        if not (base[task].keys() & tuned.get(task, {}).keys()) or score_metric(next(iter(base[task].values()))) \
                is None:
            skipped.append(f"eval: general task {task} skipped: it gives no per-example score to compare")
        else:
            compared[task] = compare(base[task], tuned[task]).as_dict()
    return compared, skipped


def drops(comparisons: dict[str, dict], threshold: float) -> list[str]:
    """The warning for each task whose score fell by more than the recipe's eval.drop_warning."""
    return [f"{task}: {c['metric']} fell {-c['delta']:.3f} (base {c['base']:.3f}, tuned {c['tuned']:.3f}, "
            f"stderr {c['stderr']:.3f}), more than eval.drop_warning {threshold}"
            for task, c in comparisons.items() if -c["delta"] > threshold]


def general_table(comparisons: dict[str, dict]) -> Table:
    table = Table(title="eval: general skills (lm-evaluation-harness), base vs tuned")
    for column in ("task", "metric", "examples", "base", "tuned", "delta ± stderr"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for task, c in comparisons.items():
        table.add_row(task, c["metric"], str(c["examples"]), f"{c['base']:.3f}", f"{c['tuned']:.3f}",
                      f"{c['delta']:+.3f} ± {c['stderr']:.3f}")
    return table


def print_general(general: dict) -> None:
    if general.get("tasks"):
        console.out.print(general_table(general["tasks"]))
    for line in general.get("warnings", []):
        console.warn(f"eval: general skill dropped: {line}")
