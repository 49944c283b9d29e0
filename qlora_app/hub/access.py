"""Talking to the Hugging Face Hub, with its failures turned into one line that says what to do.

The token is never passed around: huggingface_hub reads HF_TOKEN from the environment or the token cached
by `hf auth login`, and nothing here logs or stores it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qlora_app.errors import UserError


def fetch_file(repo_id: str, filename: str, revision: str = "main") -> Path:
    from huggingface_hub import hf_hub_download

    with hub_errors(repo_id, revision):
        return Path(hf_hub_download(repo_id, filename, revision=revision))


@contextmanager
def hub_errors(repo_id: str, revision: str = "main", kind: str = "model") -> Iterator[None]:
    """Translate huggingface_hub's exceptions raised inside the block into a UserError."""
    from huggingface_hub import errors

    page = f"https://huggingface.co/{'datasets/' if kind == 'dataset' else ''}{repo_id}"
    try:
        yield
    except errors.GatedRepoError:
        raise UserError(
            f"{kind} {repo_id} is gated: accept its license at {page} with your account, then set HF_TOKEN "
            "(or run `hf auth login`)"
        ) from None
    except errors.RepositoryNotFoundError:
        raise UserError(
            f"{kind} {repo_id} was not found on the Hub: check the id, or set HF_TOKEN if it is private"
        ) from None
    except errors.RevisionNotFoundError:
        raise UserError(f"{kind} {repo_id} has no revision '{revision}': check {kind}.revision") from None
    except (errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError):
        raise UserError(
            f"cannot reach the Hub for {kind} {repo_id} and it is not in the local cache "
            "(HF_HUB_OFFLINE is set or the network is down)"
        ) from None
    except errors.HfHubHTTPError as exc:
        raise UserError(f"the Hub refused {kind} {repo_id}: {str(exc).splitlines()[0]}") from None

