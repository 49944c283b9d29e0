"""train -> merge -> eval -> serve, each stage skipped when its outputs are already current.

Training is current when a run of the recipe finished with the same training settings and the same data
(fingerprints of the normalized records); an interrupted one with a checkpoint is resumed instead of restarted.
A merged model is current when it was made from the run's adapter as it is now, with the merge settings given
now.
"""

from __future__ import annotations

from pathlib import Path

from qlora_app import console
from qlora_app.errors import UserError
from qlora_app.recipe.schema import Recipe
from qlora_app.run.directory import RunDir, runs_of


def data_fingerprints(recipe: Recipe) -> tuple[str, str]:
    from qlora_app.data.splits import training_splits

    train, held_out = training_splits(recipe)
    return train.fingerprint, held_out.fingerprint


def reusable_run(recipe: Recipe, root: Path) -> RunDir | None:
    """The newest run of the recipe with the same training settings and data that finished or can be resumed
    here (on one rank); runs that crashed before their first checkpoint, were trained otherwise, or were
    interrupted on several ranks (train --resume --gpus N continues those) are looked past."""
    wanted = data_fingerprints(recipe)
    for run in runs_of(recipe.name, root):
        if ((run.finished or resumable_here(run)) and run.data_fingerprints() == wanted
                and same_training(run, recipe)):
            return run
    return None


def resumable_here(run: RunDir) -> bool:
    """A checkpoint this process can continue: one rank's (the pipeline trains on one)."""
    return bool(run.complete_checkpoints()) and run.read_manifest().get("ranks", 1) == 1


def same_training(run: RunDir, recipe: Recipe) -> bool:
    try:
        return run.recipe().training_fields() == recipe.training_fields()
    except UserError:  # a recipe.yaml this version cannot read: not the same training
        return False


def ensure_trained(recipe: Recipe, root: Path) -> RunDir:
    from qlora_app.train.stage import train

    run = reusable_run(recipe, root)
    if run is not None and run.finished:
        console.note(f"train: skipped, {run.path} is current (same recipe and data)")
        return run
    if run is not None:
        console.note(f"train: resuming {run.path}")
        return train(recipe, root, resume=str(run.path))  # says from which checkpoint
    return train(recipe, root)


def ensure_merged(run: RunDir, recipe: Recipe) -> None:
    """Merge with the merge settings given now; skipped when run/merged was made that way from this adapter and
    verified (a merge made with --no-verify is merged again, verified)."""
    from qlora_app.merge.stage import is_current, merge

    if is_current(run, recipe.merge, verified=True):
        console.note(f"merge: skipped, {run.merged} is current (made from this adapter with these settings, "
                     "verified)")
    else:
        merge(run, recipe.merge)


def ensure_evaluated(run: RunDir, recipe: Recipe, root: Path) -> None:
    """Base vs tuned on the held-out split; skipped when switched off or eval.json is current."""
    from qlora_app.eval.stage import evaluate, is_current, print_report

    if not recipe.eval.enabled:
        console.note("eval: skipped (eval.enabled: false)")
    elif is_current(run, recipe):
        console.note(f"eval: skipped, {run.eval_report} is current (this adapter, data and eval settings)")
        import json

        print_report(json.loads(run.eval_report.read_text()))
    else:
        evaluate(run, recipe, root)


def pipeline(recipe: Recipe, root: Path, host: str, port: int, allow_unauthenticated: bool = False) -> None:
    from qlora_app.serve.stage import serve
    from qlora_app.serve.target import merged_target

    run = ensure_trained(recipe, root)
    ensure_merged(run, recipe)
    ensure_evaluated(run, recipe, root)
    serve(merged_target(run, recipe), host, port, root, allow_unauthenticated)
