"""A local HTTP server that answers as huggingface.co does, for the requests huggingface_hub makes.

Point HF_ENDPOINT at `FakeHub.url` and the real libraries (huggingface_hub, transformers, datasets) talk to
it. It knows a few repositories and tokens and answers with the Hub's status codes, X-Error-Code and
X-Error-Message headers (huggingface_hub.utils._http.hf_raise_for_status reads them):

  unknown repo                    401 (anonymous) or 404 (with a token), X-Error-Code: RepoNotFound
  gated repo, no token            401, X-Error-Code: GatedRepo, "... Please log in."
  gated repo, token without access 403, X-Error-Code: GatedRepo, "... not in the authorized list ..."
  unknown token                   401, X-Error-Message: Invalid credentials in Authorization header
  unknown revision                404, X-Error-Code: RevisionNotFound
  unknown file                    404, X-Error-Code: EntryNotFound
  creating a repo elsewhere       403, "You don't have the rights to create a model under the namespace ..."

Endpoints: HEAD/GET /[datasets/]{repo}/resolve/{rev}/{file}, GET /api/{models|datasets}/{repo}[/revision/{rev}],
GET /api/{models|datasets}/{repo}/auth-check,
GET /api/whoami-v2, POST /api/repos/create; every request is recorded in `requests`.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

SHA = "0123456789abcdef0123456789abcdef01234567"
RESOLVE = re.compile(r"^/(?:(datasets)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
INFO = re.compile(r"^/api/(models|datasets)/([^/]+/[^/]+)(?:/revision/([^/]+))?$")
AUTH_CHECK = re.compile(r"^/api/(models|datasets)/([^/]+/[^/]+)/auth-check$")


@dataclass
class Repo:
    files: dict[str, bytes] = field(default_factory=dict)
    gated: bool = False
    kind: str = "model"
    failing: int | None = None  # every request about this repository answers this status (503: the Hub is down)


@dataclass
class Account:
    name: str
    granted: set[str] = field(default_factory=set)  # gated repos whose licence this account accepted


@dataclass
class Answer:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


class FakeHub:
    def __init__(self, repos: dict[str, Repo], tokens: dict[str, Account]):
        self.repos = repos
        self.tokens = tokens
        self.requests: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # the test's output stays clean
                pass

            def handle_one(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                hub.requests.append(f"{method} {self.path}")
                auth = self.headers.get("Authorization", "")
                answer = hub.answer(method, unquote(urlsplit(self.path).path), auth.removeprefix("Bearer ") or None)
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                if method != "HEAD":
                    self.wfile.write(answer.body)

            def do_HEAD(self):
                self.handle_one("HEAD")

            def do_GET(self):
                self.handle_one("GET")

            def do_POST(self):
                self.handle_one("POST")

        return Handler

    # What the Hub answers ------------------------------------------------------------------------------------

    def answer(self, method: str, path: str, token: str | None) -> Answer:
        if token is not None and token not in self.tokens:
            return error(401, None, "Invalid credentials in Authorization header")
        account = self.tokens.get(token) if token else None
        if path == "/api/whoami-v2":
            return json_answer({"type": "user", "name": account.name}) if account else error(401, None, "Unauthorized")
        if path == "/api/repos/create" and method == "POST":
            return error(403, None, "You don't have the rights to create a model under this namespace")
        if match := RESOLVE.match(path):
            kind, repo_id, revision, filename = match.groups()
            return self.resolve(kind or "models", repo_id, revision, filename, account, method)
        if match := AUTH_CHECK.match(path):
            kind, repo_id = match.groups()
            return self.access(kind, repo_id, "main", account) or json_answer({})
        if match := INFO.match(path):
            kind, repo_id, revision = match.groups()
            return self.info(kind, repo_id, revision or "main", account)
        return error(404, None, "Not Found")

    def access(self, kind: str, repo_id: str, revision: str, account: Account | None) -> Answer | None:
        """The refusal for this repo and revision, or None when the request may go on."""
        repo = self.repos.get(repo_id)
        if repo is not None and repo.failing:
            return error(repo.failing, None, "Service Unavailable" if repo.failing >= 500 else "Too Many Requests")
        if repo is None or f"{repo.kind}s" != kind:
            return error(404 if account else 401, "RepoNotFound", "Repository not found")
        if repo.gated and account is None:
            return error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access to it "
                                           "and be authenticated to access it. Please log in.")
        if repo.gated and repo_id not in account.granted:
            return error(403, "GatedRepo", f"Access to model {repo_id} is restricted and you are not in the "
                                           f"authorized list. Visit https://huggingface.co/{repo_id} to ask for access.")
        if revision not in ("main", SHA):
            return error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return None

    def resolve(self, kind: str, repo_id: str, revision: str, filename: str, account, method: str) -> Answer:
        refused = self.access(kind, repo_id, revision, account)
        if refused:
            return refused
        content = self.repos[repo_id].files.get(filename)
        if content is None:
            return error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": SHA})
        etag = hashlib.sha256(content).hexdigest()
        return Answer(200, {"X-Repo-Commit": SHA, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream"},
                      content)

    def info(self, kind: str, repo_id: str, revision: str, account) -> Answer:
        refused = self.access(kind, repo_id, revision, account)
        if refused:
            return refused
        repo = self.repos[repo_id]
        return json_answer({"id": repo_id, "sha": SHA, "private": False, "gated": "manual" if repo.gated else False,
                            "siblings": [{"rfilename": name} for name in repo.files]})


def error(status: int, code: str | None, message: str, extra: dict[str, str] | None = None) -> Answer:
    headers = {"X-Error-Message": message, "Content-Type": "application/json", **(extra or {})}
    if code:
        headers["X-Error-Code"] = code
    return Answer(status, headers, json.dumps({"error": message}).encode())


def json_answer(data) -> Answer:
    return Answer(200, {"Content-Type": "application/json"}, json.dumps(data).encode())
