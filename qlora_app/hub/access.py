"""Talking to the Hugging Face Hub, with its failures turned into one line that says what to do.

The token is never passed around: huggingface_hub reads HF_TOKEN from the environment or the token cached
by `hf auth login`, and nothing here logs or stores it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qlora_app.errors import UserError
from qlora_app.hub import diagnosis


def fetch_file(repo_id: str, filename: str, revision: str = "main") -> Path:
    from huggingface_hub import hf_hub_download

    with hub_errors(repo_id, revision):
        return Path(hf_hub_download(repo_id, filename, revision=revision))


def check_readable(repo_id: str, kind: str = "model") -> None:
    """Ask the Hub whether this token may read the repository; its refusal as one line. For libraries that
    drop the Hub's answer (datasets re-raises its own DatasetNotFoundError `from None`)."""
    from huggingface_hub import HfApi

    with hub_errors(repo_id, kind=kind):
        HfApi().auth_check(repo_id, repo_type=kind)


@contextmanager
def hub_errors(repo_id: str, revision: str = "main", kind: str = "model", action: str = "read") -> Iterator[None]:
    """A Hub failure raised inside the block, however the libraries wrapped it, as a one-line UserError."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        line = diagnosis.explain(exc, diagnosis.Target(repo_id, revision or "main", kind, action))
        if line is None:
            raise
        raise UserError(line) from None
