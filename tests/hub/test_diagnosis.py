"""The diagnosis on real exceptions: huggingface_hub's own, raised by its real client against the fake Hub,
then wrapped the way transformers 5 (`raise OSError(...) from e`) and datasets (`from None`) wrap them."""

from __future__ import annotations

import os

import pytest
from conftest import free_port
from fake_hub import Account, FakeHub, Repo

from qlora_app.errors import UserError
from qlora_app.hub.access import hub_errors
from qlora_app.hub.diagnosis import Target, chain, explain, quiet_hub_logging

REPOS = {"org/gated": Repo({"config.json": b"{}"}, gated=True), "org/open": Repo({"config.json": b"{}"}),
         "org/down": Repo(failing=503), "org/busy": Repo(failing=429)}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with FakeHub(REPOS, {"hf_noaccess": Account("alice")}) as server:
        server.cache = tmp_path_factory.mktemp("hf-cache")
        yield server


@pytest.fixture(autouse=True)
def online(monkeypatch):
    """The suite runs offline (HF_HUB_OFFLINE=1, read once at huggingface_hub's import): these tests talk to the
    fake Hub, so the library's flag is lifted for each of them, and only for them."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def failure(hub, repo_id: str, filename: str = "config.json", token: str | bool = False, **kwargs) -> Exception:
    """What huggingface_hub raises for this download from the fake Hub."""
    from huggingface_hub import hf_hub_download

    with pytest.raises(Exception) as info:
        hf_hub_download(repo_id, filename, endpoint=hub.url, token=token, cache_dir=hub.cache, **kwargs)
    return info.value


def wrapped_as_transformers_does(error: Exception) -> OSError:
    """transformers.utils.hub.cached_files: `raise OSError("You are trying to access a gated repo...") from e`."""
    try:
        raise OSError("You are trying to access a gated repo.") from error
    except OSError as wrapped:
        return wrapped


def wrapped_as_datasets_does(error: Exception) -> FileNotFoundError:
    """datasets.load: the Hub's error handled, its own raised `from None` (the original stays as __context__)."""
    try:
        try:
            raise error
        except Exception:
            raise FileNotFoundError("Dataset 'org/gated' doesn't exist on the Hub") from None
    except FileNotFoundError as wrapped:
        return wrapped


def test_gated_without_a_token_through_transformers_wrapping(hub):
    error = wrapped_as_transformers_does(failure(hub, "org/gated"))
    line = explain(error, Target("org/gated"))
    assert line.startswith("model org/gated is gated and no Hugging Face token was sent")
    assert "https://huggingface.co/org/gated" in line and "export HF_TOKEN" in line


def test_gated_with_a_token_without_access_through_datasets_wrapping(hub):
    error = wrapped_as_datasets_does(failure(hub, "org/gated", token="hf_noaccess"))
    assert explain(error, Target("org/gated")).startswith("your Hugging Face token has no access to the gated")


def test_not_found_bad_revision_missing_file(hub):
    assert "was not found on the Hub" in explain(failure(hub, "org/opne"), Target("org/opne"))
    assert "has no revision 'v9'" in explain(failure(hub, "org/open", revision="v9"), Target("org/open", "v9"))
    assert "has no file tokenizer.json" in explain(failure(hub, "org/open", "tokenizer.json"), Target("org/open"))


def test_an_invalid_token(hub):
    assert "rejected your Hugging Face token" in explain(failure(hub, "org/open", token="hf_revoked"),
                                                         Target("org/open"))


def test_the_repository_is_read_from_the_request_without_a_target(hub):
    assert explain(wrapped_as_transformers_does(failure(hub, "org/gated"))).startswith("model org/gated is gated")


def test_a_refused_connection_under_the_not_cached_error():
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError
    from huggingface_hub.file_download import get_hf_file_metadata

    port = free_port()
    with pytest.raises(Exception) as info:  # one HEAD, no retry: what hf_hub_download's first attempt raises
        get_hf_file_metadata(f"http://127.0.0.1:{port}/org/open/resolve/main/config.json", token=False)
    try:
        raise LocalEntryNotFoundError("An error happened while trying to locate the file") from info.value
    except LocalEntryNotFoundError as wrapped:
        line = explain(wrapped, Target("org/open"))
    assert line.startswith(f"cannot reach the Hub at {constants.ENDPOINT} for model org/open")
    assert "Connection refused" in line and "`hf download org/open`" in line
    assert "run push again" in explain(info.value, Target("org/open", action="push"))


def test_offline_and_not_cached(hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import
    error = failure(hub, "org/open", local_files_only=True)
    line = explain(wrapped_as_transformers_does(error), Target("org/open", "v2"))
    assert line.startswith("HF_HUB_OFFLINE is set and model org/open is not in the local cache")
    assert "`hf download org/open --revision v2`" in line


def test_the_hub_down_or_limiting(hub):
    from huggingface_hub.file_download import get_hf_file_metadata

    for repo_id, expected in (("org/down", "the Hub failed to answer for model org/down (503"),
                              ("org/busy", "the Hub is rate-limiting requests for model org/busy (429)")):
        with pytest.raises(Exception) as info:  # one HEAD without the library's retries
            get_hf_file_metadata(f"{hub.url}/{repo_id}/resolve/main/config.json", token=False)
        assert explain(info.value, Target(repo_id)).startswith(expected)


def test_a_hub_that_does_not_answer_in_time():
    import socket

    import httpx2

    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        with pytest.raises(httpx2.TimeoutException) as info:
            httpx2.get(f"http://127.0.0.1:{silent.getsockname()[1]}/org/open/resolve/main/config.json", timeout=0.2)
    assert "did not answer in time for model org/open" in explain(info.value, Target("org/open"))


def test_push_refusals_name_write_access(hub):
    line = explain(failure(hub, "org/gated", token="hf_noaccess"), Target("org/gated", action="push"))
    assert line.startswith("cannot push to org/gated: your token's account has no write access to the namespace 'org'")


def test_what_is_not_a_hub_failure_is_left_alone():
    assert explain(ValueError("bad")) is None
    import httpx2

    with pytest.raises(Exception) as info:  # the chat client's server is down: an httpx error, not the Hub's
        httpx2.get(f"http://127.0.0.1:{free_port()}/v1/models")
    assert explain(info.value) is None
    with pytest.raises(ValueError), hub_errors("org/open"):
        raise ValueError("not the Hub's")
    with pytest.raises(UserError, match="mine"), hub_errors("org/open"):
        raise UserError("mine")


def test_hub_errors_is_one_line_without_a_traceback_chain(hub):
    with pytest.raises(UserError) as info, hub_errors("org/gated"):
        raise wrapped_as_transformers_does(failure(hub, "org/gated"))
    assert "\n" not in str(info.value) and info.value.__suppress_context__


def test_a_cyclic_chain_ends():
    first, second = OSError("a"), OSError("b")
    first.__context__, second.__context__ = second, first
    assert list(chain(first)) == [first, second]
    assert explain(first) is None


def test_quiet_logging_keeps_the_users_choice(monkeypatch):
    monkeypatch.setenv("HF_HUB_VERBOSITY", "info")
    quiet_hub_logging()
    assert os.environ["HF_HUB_VERBOSITY"] == "info"
    monkeypatch.delenv("HF_HUB_VERBOSITY")
    quiet_hub_logging()
    assert os.environ["HF_HUB_VERBOSITY"] == "error"
