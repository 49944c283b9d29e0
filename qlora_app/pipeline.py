"""train -> merge -> serve, each stage skipped when its outputs are already current.

Training is current when the latest run of the recipe finished with the same training settings and the same
data (fingerprints of the normalized records); an interrupted run with the same recipe is resumed instead of
restarted. A merged model is current when it was made from the run's adapter as it is now.
"""

from __future__ import annotations

import json
from pathlib import Path

from qlora_app import console
from qlora_app.recipe import Recipe
from qlora_app.run_dir import RunDir, latest_run


def same_recipe_run(recipe: Recipe, root: Path) -> RunDir | None:
    run = latest_run(recipe.name, root)
    if run is None or not run.recipe_file.is_file() or run.recipe().training_fields() != recipe.training_fields():
        return None
    return run


def same_data(run: RunDir, recipe: Recipe) -> bool:
    from qlora_app.data import load_splits

    train, held_out = load_splits(recipe.data)
    data = run.read_manifest().get("data", {})
    return (data.get("fingerprint"), data.get("eval_fingerprint")) == (train.fingerprint, held_out.fingerprint)


def ensure_trained(recipe: Recipe, root: Path) -> RunDir:
    from qlora_app.train import train

    run = same_recipe_run(recipe, root)
    if run is not None and run.finished and same_data(run, recipe):
        console.note(f"train: skipped, {run.path} is current (same recipe and data)")
        return run
    if run is not None and not run.finished and run.complete_checkpoints():
        console.note(f"train: resuming {run.path}")
        return train(recipe, root, resume=str(run.path))  # says from which checkpoint
    return train(recipe, root)


def merged_is_current(run: RunDir, base_weights: str) -> bool:
    from qlora_app.merge import adapter_fingerprint

    report = run.path / "merged" / "merge_report.json"
    if not report.is_file():
        return False
    made = json.loads(report.read_text())
    return (made.get("adapter_sha256"), made.get("base_weights")) == (adapter_fingerprint(run), base_weights)


def ensure_merged(run: RunDir, recipe: Recipe) -> None:
    from qlora_app.merge import merge

    if merged_is_current(run, recipe.merge.base_weights):
        console.note(f"merge: skipped, {run.path / 'merged'} is current (made from this adapter)")
    else:
        merge(run, recipe.merge.base_weights)


def pipeline(recipe: Recipe, root: Path, host: str, port: int, allow_unauthenticated: bool = False) -> None:
    from qlora_app.serve.stage import serve
    from qlora_app.serve.target import merged_target

    run = ensure_trained(recipe, root)
    ensure_merged(run, recipe)
    serve(merged_target(run, recipe), host, port, root, allow_unauthenticated)
