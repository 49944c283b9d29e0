"""What a failed exchange with the Hugging Face Hub means, in one line: what happened and the one thing to do.

The libraries wrap huggingface_hub's errors before they reach us: transformers 5 raises a plain OSError `from`
them, datasets re-raises its own error `from None` (the original stays in __context__), and huggingface_hub
turns a refused connection into LocalEntryNotFoundError. So the whole chain is read, and the most specific
thing found there decides: the Hub's answer (status and X-Error-Code header, as huggingface_hub's own error
classes carry them) or the transport failure (httpx2, the client huggingface_hub uses) before a generic
"not in the cache".
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

TOKENS_PAGE = "https://huggingface.co/settings/tokens"
TRANSPORT_MODULES = ("httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3")


@dataclass(frozen=True)
class Target:
    """What was being asked of the Hub: read a model or dataset, or push a model."""

    repo_id: str
    revision: str = "main"
    kind: str = "model"  # or "dataset"
    action: str = "read"  # or "push"

    @property
    def page(self) -> str:
        return f"https://huggingface.co/{'datasets/' if self.kind == 'dataset' else ''}{self.repo_id}"

    @property
    def download(self) -> str:
        """The command that puts this repository in the cache beforehand."""
        extra = (" --repo-type dataset" if self.kind == "dataset" else "") + (
            f" --revision {self.revision}" if self.revision != "main" else "")
        return f"`hf download {self.repo_id}{extra}`"

    @property
    def name(self) -> str:
        return f"{self.kind} {self.repo_id}"


def quiet_hub_logging() -> None:
    """huggingface_hub warns at each retry ("Retrying in 8s [Retry 4/5]"): a dozen lines that bury the one line
    this module writes. Errors only, unless the user chose a verbosity. Called before the library is imported,
    and inherited by the processes we start."""
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")


def chain(exc: BaseException) -> Iterator[BaseException]:
    """exc, then its causes and contexts, outermost first (a context hidden by `from None` included)."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [current.__cause__, current.__context__]


def explain(exc: BaseException, target: Target | None = None) -> str | None:
    """The one line for a Hub failure anywhere in exc's chain; None when the chain holds none.

    Without a target (the CLI's last resort), the repository is read from the failed request, and only
    huggingface_hub's own errors or a transport failure on the Hub's address count."""
    found = list(chain(exc))
    for error in found:  # the most specific first: the Hub's answer or the transport failure
        line = _http_answer(error, target) or _transport(error, target)
        if line:
            return line
    for error in found:
        line = _not_cached(error, target)
        if line:
            return line
    return None


def _http_answer(error: BaseException, target: Target | None) -> str | None:
    from huggingface_hub.errors import HfHubHTTPError

    if not isinstance(error, HfHubHTTPError) or error.response is None:
        return None
    target = target or _target_of(error)
    status = error.response.status_code
    code = error.response.headers.get("X-Error-Code") or _code_of(error)
    message = error.response.headers.get("X-Error-Message") or error.server_message or ""
    if target.action == "push":
        return _push_refused(target, status, code, message)
    return _read_refused(error, target, status, code, message)


def _read_refused(error, target: Target, status: int, code: str | None, message: str) -> str:
    if code == "GatedRepo" and status == 401:
        return (f"{target.name} is gated and no Hugging Face token was sent: accept its licence at {target.page} "
                f"while logged in, then export HF_TOKEN=<a read token from {TOKENS_PAGE}> (or run `hf auth login`)")
    if code == "GatedRepo":
        return (f"your Hugging Face token has no access to the gated {target.name} yet: accept its licence at "
                f"{target.page} with the token's account and wait until access is granted (or use a token of an "
                "account that has it)")
    if code == "RevisionNotFound":
        return (f"{target.name} has no revision '{target.revision}': set {target.kind}.revision to a branch, tag "
                f"or commit that exists ({target.page}/tree/main)")
    if code == "EntryNotFound":
        return (f"{target.name} has no file {_filename(error)} at revision '{target.revision}': check that it is the "
                f"repository you meant ({target.page}/tree/{target.revision})")
    if code == "RepoNotFound":
        return (f"{target.name} was not found on the Hub: check the name (OWNER/NAME, case-sensitive); a private "
                f"repository needs HF_TOKEN of an account that can read it")
    return _any_status(target, status, message)


def _code_of(error) -> str | None:
    """The Hub's error code as huggingface_hub's class says it, for an answer that lacked the header."""
    from huggingface_hub import errors

    for cls, code in ((errors.GatedRepoError, "GatedRepo"), (errors.RevisionNotFoundError, "RevisionNotFound"),
                      (errors.RemoteEntryNotFoundError, "EntryNotFound"), (errors.RepositoryNotFoundError, "RepoNotFound")):
        if isinstance(error, cls):
            return code
    return None


def _push_refused(target: Target, status: int, code: str | None, message: str) -> str:
    if status == 401 and code is None:
        return _any_status(target, status, message)
    if status in (401, 403, 404) or code == "RepoNotFound":
        owner = target.repo_id.split("/")[0]
        return (f"cannot push to {target.repo_id}: your token's account has no write access to the namespace "
                f"'{owner}' ({message or status}): push to your own user name or an organisation you can write to, "
                f"with a write token ({TOKENS_PAGE})")
    return _any_status(target, status, message)


def _any_status(target: Target, status: int, message: str) -> str:
    if status == 401:
        return (f"the Hub rejected your Hugging Face token (HF_TOKEN or `hf auth login`) as invalid or revoked: "
                f"create a new one at {TOKENS_PAGE} and export HF_TOKEN=<it>")
    if status == 429:
        return (f"the Hub is rate-limiting requests for {target.name} (429): wait a few minutes and run the "
                "command again; a token (HF_TOKEN) raises the limit")
    if status >= 500:
        return (f"the Hub failed to answer for {target.name} ({status} {message}): try again in a few minutes "
                "(https://status.huggingface.co)")
    return f"the Hub refused {target.name} ({status} {message or 'without a reason'})"


def _transport(error: BaseException, target: Target | None) -> str | None:
    kind = _transport_kind(error)
    if kind is None or (target is None and not _on_hub(error)):
        return None
    target = target or _target_of(error)
    endpoint = _endpoint()
    reason = (str(error).splitlines() or [type(error).__name__])[0]
    then = ("then run push again (it resumes)" if target.action == "push"
            else f"or download it beforehand with {target.download} and run with HF_HUB_OFFLINE=1")
    if kind == "timeout":
        return (f"the Hub at {endpoint} did not answer in time for {target.name} ({reason}): check the network "
                f"(or raise HF_HUB_ETAG_TIMEOUT), {then}")
    if kind == "proxy":
        return f"the proxy refused the connection to the Hub at {endpoint} ({reason}): check HTTPS_PROXY, {then}"
    return (f"cannot reach the Hub at {endpoint} for {target.name} ({reason}): check the network, proxy and "
            f"HF_ENDPOINT, {then}")


def _transport_kind(error: BaseException) -> str | None:
    names = {cls.__name__ for cls in type(error).__mro__ if cls.__module__.split(".")[0] in TRANSPORT_MODULES}
    if names & {"TimeoutException", "Timeout", "ConnectTimeout", "ReadTimeout"}:
        return "timeout"
    if "ProxyError" in names:
        return "proxy"
    if names & {"TransportError", "NetworkError", "ConnectError", "ConnectionError", "RemoteProtocolError"}:
        return "network"
    return None


def _not_cached(error: BaseException, target: Target | None) -> str | None:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    if not isinstance(error, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        return None
    if target is None:
        return "the Hub cannot be reached and the files asked for are not in the local cache: " + (
            "unset HF_HUB_OFFLINE" if _offline() else "check the network")
    if target.action == "push":
        return "HF_HUB_OFFLINE is set: unset it to push"
    if _offline():
        return (f"HF_HUB_OFFLINE is set and {target.name} is not in the local cache ({_cache()}): download it first "
                f"while online with {target.download} (same HF_HOME), or unset HF_HUB_OFFLINE")
    return (f"cannot reach the Hub at {_endpoint()} and {target.name} is not in the local cache: check the network, "
            f"or download it beforehand with {target.download}")


def _target_of(error: BaseException) -> Target:
    """The repository a failed request was about, read from its URL (the CLI's last resort has no target)."""
    from huggingface_hub.utils._http import _parse_repo_info_from_url

    repo_type, repo_id = _parse_repo_info_from_url(_url(error) or "")
    return Target(repo_id or "(unknown repository)", kind="dataset" if repo_type == "dataset" else "model")


def _url(error: BaseException) -> str | None:
    response = getattr(error, "response", None)  # HfHubHTTPError: the response (its .request is unset)
    if response is not None:
        return str(response.url)
    try:
        return str(error.request.url)  # httpx's transport errors carry the request
    except (AttributeError, RuntimeError):  # httpx raises RuntimeError for an error without a request
        return None


def _on_hub(error: BaseException) -> bool:
    url = _url(error)
    return url is not None and url.startswith(_endpoint())


def _filename(error) -> str:
    url = _url(error) or ""
    return url.split("/resolve/", 1)[-1].split("/", 1)[-1] if "/resolve/" in url else "(unknown file)"


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


def _cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE
