"""The image workflow (.github/workflows/image.yml), checked without GitHub: actionlint, then what it publishes."""

from __future__ import annotations

import yaml
from conftest import REPO, lint

WORKFLOW = REPO / ".github" / "workflows" / "image.yml"


def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def steps() -> list[dict]:
    return workflow()["jobs"]["publish"]["steps"]


def step(uses_prefix: str) -> dict:
    (found,) = [s for s in steps() if s.get("uses", "").startswith(uses_prefix)]
    return found


def test_actionlint_passes():
    result = lint("actionlint", WORKFLOW)
    assert result.returncode == 0, result.stdout + result.stderr


def test_runs_on_version_tags_only_and_may_write_packages():
    flow = workflow()
    assert flow[True] == {"push": {"tags": ["v*"]}}  # YAML 1.1 reads the key `on` as true
    assert flow["permissions"] == {"contents": "read", "packages": "write"}


def test_pushes_the_dockerfile_build_to_ghcr_under_the_owner():
    meta = step("docker/metadata-action")["with"]
    assert meta["images"] == "ghcr.io/${{ github.repository_owner }}/qlora-app"
    assert "type=semver,pattern={{version}}" in meta["tags"]
    build = step("docker/build-push-action")["with"]
    assert build["context"] == "." and build["push"] is True  # the Dockerfile, which installs the hashed lock
    assert (REPO / "Dockerfile").is_file()
    assert step("docker/login-action")["with"]["registry"] == "ghcr.io"


def test_labels_and_annotations_carry_the_lock_hash_and_the_summary_the_digest():
    (lock,) = [s for s in steps() if s.get("id") == "lock"]
    assert "sha256sum requirements/gpu.lock" in lock["run"]
    meta = step("docker/metadata-action")["with"]
    for key in ("labels", "annotations"):
        assert "io.github.qlora-app.gpu-lock.sha256=${{ steps.lock.outputs.sha256 }}" in meta[key]
    build = step("docker/build-push-action")["with"]
    assert build["labels"] == "${{ steps.meta.outputs.labels }}"
    assert build["annotations"] == "${{ steps.meta.outputs.annotations }}"
    summary = steps()[-1]
    assert summary["env"]["DIGEST"] == "${{ steps.build.outputs.digest }}" and "GITHUB_STEP_SUMMARY" in summary["run"]


def test_no_secret_but_the_workflow_token_is_used():
    text = WORKFLOW.read_text()
    assert text.count("secrets.") == 1 and "secrets.GITHUB_TOKEN" in text
