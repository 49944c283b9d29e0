"""`qlora-app runs`: every run directory under the runs root, newest first, with what each stage left in it.

Read only from the run directories' own files (manifest.json, merged/merge_report.json, eval.json): a run in
progress, a killed one and a finished one are told apart by what they wrote, never by a process being alive.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from qlora_app import console
from qlora_app.errors import UserError
from qlora_app.run.directory import RunDir, checkpoint_step, runs_of


def all_runs(root: Path, recipe_name: str | None) -> list[RunDir]:
    """The runs of one recipe, or of every recipe under root, newest first."""
    names = [recipe_name] if recipe_name else sorted(p.name for p in root.iterdir() if p.is_dir()) \
        if root.is_dir() else []
    found = [run for name in names for run in runs_of(name, root)]
    return sorted(found, key=lambda run: run.path.name, reverse=True)


def status(run: RunDir, manifest: dict) -> str:
    if manifest.get("status") == "finished":
        return "finished"
    done = run.complete_checkpoints()  # oldest first
    return f"stopped at step {checkpoint_step(done[-1])} (resumable)" if done else manifest.get("status", "started")


def held_out_loss(manifest: dict) -> str:
    losses = manifest.get("losses", {})
    base, tuned = losses.get("base_eval_loss"), losses.get("final_eval_loss")
    return f"{base:.3f} -> {tuned:.3f}" if base is not None and tuned is not None else "-"


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def eval_summary(run: RunDir) -> str:
    """Exact match base -> tuned, each general task's delta, and the warnings, from eval.json."""
    report = read_json(run.eval_report)
    scores = report.get("scores", {})
    if not {"base", "tuned"} <= set(scores):
        return "-"
    parts = [f"exact {scores['base']['exact_match']:.0%} -> {scores['tuned']['exact_match']:.0%}"]
    general = report.get("general", {})
    parts += [f"{task} {c['delta']:+.3f}" for task, c in general.get("tasks", {}).items()]
    if general.get("warnings"):
        parts.append(f"{len(general['warnings'])} drop warning(s)")
    return ", ".join(parts)


def row(run: RunDir) -> tuple[str, ...]:
    manifest = run.read_manifest()
    steps = manifest.get("training", {}).get("steps")
    merged = "-" if not run.merge_report.is_file() else \
        "verified" if "verification" in read_json(run.merge_report) else "unverified"
    return (f"{run.path.parent.name}/{run.path.name}", status(run, manifest), "-" if steps is None else str(steps),
            held_out_loss(manifest), merged, eval_summary(run))


def runs_table(runs: list[RunDir], root: Path) -> Table:
    table = Table(title=f"runs under {root}")
    table.add_column("run", no_wrap=True)
    for column in ("status", "steps", "held-out loss", "merged", "eval"):
        table.add_column(column)
    table.caption = "held-out loss and eval: base -> tuned; eval's task deltas are tuned - base"
    for run in runs:
        table.add_row(*row(run))
    return table


def runs_command(recipe_name: str | None, root: Path) -> None:
    runs = all_runs(root, recipe_name)
    if not runs:
        where = f"of recipe '{recipe_name}' " if recipe_name else ""
        raise UserError(f"no run {where}under {root}: train one first with: qlora-app train {recipe_name or 'RECIPE'}")
    console.out.print(runs_table(runs, root))
