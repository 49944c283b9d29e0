"""The run directory: the contract between stages.

runs/<recipe>/<run-id>/
  recipe.yaml        the resolved recipe the run used (later stages read it back, never the original file)
  adapter/           the LoRA adapter (peft format) with the tokenizer and chat template used in training
  checkpoints/       resumable Trainer checkpoints; a complete one holds the COMPLETE marker
  tensorboard/       TensorBoard logs
  metrics.jsonl      every logged step (loss, lr, eval loss, tokens/s)
  loss_curve.png     train and eval loss
  manifest.json      versions, git commit, data fingerprint, timings, memory, losses
  merged/            the merge stage's 16-bit model, with merge_report.json (how it was made and checked)
  eval.json          the eval stage's base vs tuned scores on the held-out split, with the answers
runs/<recipe>/latest -> <run-id>     the recipe's newest run that has a checkpoint or finished
runs/latest -> <recipe>/<run-id>     the same, over all recipes: what `merge` and `serve` take by default
runs/logs/                           the serve stage's vLLM logs

`latest` moves only once a run has something to resume or use (a complete checkpoint, or the finished
adapter): a run that crashed while loading never hides the run before it.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qlora_app import console
from qlora_app.errors import UserError
from qlora_app.machine.atomic import write_text_atomic
from qlora_app.recipe.loader import dump_recipe, load_recipe
from qlora_app.recipe.schema import Recipe

COMPLETE_MARKER = "COMPLETE"


def runs_root(explicit: str | os.PathLike | None = None) -> Path:
    return Path(explicit or os.environ.get("QLORA_RUNS_DIR") or "runs")


@dataclass(frozen=True)
class RunDir:
    path: Path

    recipe_file = property(lambda self: self.path / "recipe.yaml")
    adapter = property(lambda self: self.path / "adapter")
    checkpoints = property(lambda self: self.path / "checkpoints")
    tensorboard = property(lambda self: self.path / "tensorboard")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    loss_curve = property(lambda self: self.path / "loss_curve.png")
    manifest = property(lambda self: self.path / "manifest.json")
    merged = property(lambda self: self.path / "merged")
    merge_report = property(lambda self: self.path / "merged" / "merge_report.json")
    eval_report = property(lambda self: self.path / "eval.json")

    @classmethod
    def create(cls, recipe: Recipe, root: Path) -> RunDir:
        base = root / recipe.name
        base.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=f"{file_stamp()}-", dir=base))  # unique even for two runs in one second
        path.chmod(0o755)
        run = cls(path)
        write_text_atomic(run.recipe_file, dump_recipe(recipe))
        return run

    def mark_latest(self) -> None:
        """Point runs/<recipe>/latest and runs/latest here (the run has a checkpoint or finished)."""
        point_latest(self.path.parent, self.path.name)
        point_latest(self.path.parent.parent, f"{self.path.parent.name}/{self.path.name}")

    def recipe(self) -> Recipe:
        if not self.recipe_file.is_file():
            raise UserError(f"{self.path} is not a run directory (no recipe.yaml)")
        return load_recipe(str(self.recipe_file))

    def complete_checkpoints(self) -> list[Path]:
        """Checkpoints that finished saving, oldest first."""
        found = [p for p in self.checkpoints.glob("checkpoint-*") if (p / COMPLETE_MARKER).is_file()]
        return sorted(found, key=checkpoint_step)

    def incomplete_checkpoints(self) -> list[Path]:
        return [p for p in self.checkpoints.glob("checkpoint-*") if not (p / COMPLETE_MARKER).is_file()]

    def read_metrics(self) -> list[dict[str, Any]]:
        """Logged records; a line cut short (the process died or the disk filled mid-write) is skipped."""
        if not self.metrics.is_file():
            return []
        records = []
        for line in self.metrics.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def rewind_metrics(self, step: int) -> None:
        """Keep only what was logged up to `step`: a resumed run logs the later steps again."""
        kept = [r for r in self.read_metrics() if r.get("step", 0) <= step]
        write_text_atomic(self.metrics, "".join(json.dumps(r) + "\n" for r in kept))

    def read_manifest(self) -> dict[str, Any]:
        return json.loads(self.manifest.read_text()) if self.manifest.is_file() else {}

    def data_fingerprints(self) -> tuple[str | None, str | None]:
        """The training and held-out data the run was started on (normalized records)."""
        data = self.read_manifest().get("data", {})
        return data.get("fingerprint"), data.get("eval_fingerprint")

    @property
    def finished(self) -> bool:
        return self.read_manifest().get("status") == "finished"


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step a Trainer checkpoint folder (checkpoint-N) was saved at."""
    return int(checkpoint.name.split("-")[-1])


def file_stamp() -> str:
    """UTC time for names of run directories and logs: sorts by time, no characters a shell minds."""
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S")


def utc_timestamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def latest_run(recipe_name: str, root: Path) -> RunDir | None:
    link = root / recipe_name / "latest"
    return RunDir(link.resolve()) if link.exists() else None


def point_latest(base: Path, name: str) -> None:
    """Swap base/latest to point at `name` atomically (a rename over the old link)."""
    tmp = base / f".latest-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(name)
    tmp.replace(base / "latest")


def runs_of(recipe_name: str, root: Path) -> list[RunDir]:
    """Every run directory of a recipe, newest first (run ids start with their UTC start time)."""
    found = [RunDir(p) for p in (root / recipe_name).glob("2*") if (p / "recipe.yaml").is_file()]
    return sorted(found, key=lambda run: run.path.name, reverse=True)


def find_run(run_dir: str | None, recipe_name: str | None, root: Path) -> RunDir:
    """RUN_DIR if given, else the latest run of the recipe, else the latest run of any recipe (runs/latest)."""
    if run_dir:
        run = RunDir(Path(run_dir).resolve())
        run.recipe()  # fails with a clear line if it is not a run directory
        return run
    if recipe_name is None:
        link = root / "latest"
        if not link.exists():
            raise UserError(f"no trained run under {root}: train one first with: qlora-app train RECIPE")
        run = RunDir(link.resolve())
        console.note(f"using the latest run: {run.path} (recipe {run.path.parent.name})")
        return run
    run = latest_run(recipe_name, root)
    if run is None:
        raise UserError(f"no run of recipe '{recipe_name}' under {root}: train one first with: "
                        f"qlora-app train {recipe_name}")
    return run
