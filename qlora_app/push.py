"""`qlora-app push`: a finished run's adapter or merged model to the Hugging Face Hub, with its model card.

Everything that can refuse does so before anything uploads. The folder that is uploaded is built from the
run (hard links, so a 16 GB model costs no space) and sent with one huggingface_hub call, which skips files
already committed and so resumes an interrupted push. The token is huggingface_hub's own business (HF_TOKEN
or the `hf auth login` cache): we only ask whether there is one, and never print or store it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from qlora_app import console
from qlora_app.errors import UserError
from qlora_app.hub.card import CardFacts, Kind, base_license, render
from qlora_app.run.directory import RunDir

SKIPPED = ("README.md", "merge_report.json")  # the card replaces the first; the second is summarised in it


@dataclass(frozen=True)
class UploadPlan:
    kind: Kind
    repo_id: str
    files: dict[str, Path]  # path in the repository -> local file
    card: str


def check_pushable(run: RunDir, kind: Kind) -> Path:
    """The folder to push; a one-line refusal for a run that is not finished or has no such model."""
    status = run.read_manifest().get("status", "unknown")
    if status != "finished":
        raise UserError(f"{run.path} has not finished training (status: {status}): finish it with: "
                        f"qlora-app train {run.recipe().name} --resume")
    if kind == "adapter":
        return run.adapter
    if not (run.merged / "config.json").is_file():
        raise UserError(f"{run.path} has no merged model: run qlora-app merge {run.path} first, or push --adapter")
    from qlora_app.merge.stage import is_current

    if not is_current(run):
        raise UserError(f"{run.merged} was not made from this run's current adapter: merge again with: "
                        f"qlora-app merge {run.path}")
    return run.merged


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        repo_id = ""
    if repo_id.count("/") != 1:
        raise UserError("--repo must be USER/NAME (or ORG/NAME): letters, digits, '-', '_' and '.'")


def check_token() -> None:
    from huggingface_hub import get_token

    if not get_token():
        raise UserError("no Hugging Face token: export HF_TOKEN=<a write token> or run `hf auth login` first")


def plan_upload(run: RunDir, kind: Kind, repo_id: str, fetch_license: bool = True,
                source: Path | None = None) -> UploadPlan:
    """What would be uploaded; `source`: the folder check_pushable already returned (else it is checked here)."""
    source = source or check_pushable(run, kind)
    files = {p.name: p for p in sorted(source.iterdir()) if p.is_file() and p.name not in SKIPPED}
    files["recipe.yaml"] = run.recipe_file
    facts = CardFacts(kind, repo_id, base_license(run.recipe(), fetch_license),
                      merged_dir=source if kind == "merged" else None)
    return UploadPlan(kind, repo_id, files, render(run, facts))


def stage(plan: UploadPlan, folder: Path) -> Path:
    """The plan as a folder: hard links to the run's files (copies across file systems) and the card."""
    for name, source in plan.files.items():
        try:
            os.link(source, folder / name)
        except OSError:
            shutil.copy2(source, folder / name)
    (folder / "README.md").write_text(plan.card, encoding="utf-8")
    return folder


def push(run: RunDir, kind: Kind, repo_id: str, public: bool) -> str:
    check_repo_id(repo_id)
    source = check_pushable(run, kind)
    check_token()
    plan = plan_upload(run, kind, repo_id, source=source)
    from huggingface_hub import HfApi

    from qlora_app.hub.access import hub_errors

    api = HfApi()
    with tempfile.TemporaryDirectory(prefix=".push-", dir=run.path) as tmp, hub_errors(repo_id, action="push"):
        folder = stage(plan, Path(tmp))
        url = api.create_repo(repo_id, private=not public, exist_ok=True).url
        api.upload_folder(repo_id=repo_id, folder_path=folder,
                          commit_message=f"qlora-app push: {kind} of {run.recipe().name} run {run.path.name}")
    console.note(f"pushed the {kind} of {run.path.name} to {url} ({'public' if public else 'private'})")
    return url
