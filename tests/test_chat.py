"""`qlora-app chat` against a local HTTP server that answers as an OpenAI-compatible server does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import REPO, assert_one_line_error


@contextmanager
def openai_server(models_status: int = 200) -> Iterator[str]:
    """Serves GET /v1/models (one model, or `models_status` with an error body); every other path is a 404."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            found = self.path == "/v1/models"
            status = models_status if found else 404
            body = ({"object": "list", "data": [{"id": "tiny", "object": "model", "owned_by": "me"}]}
                    if status == 200 else {"error": {"message": f"{self.path}: no", "type": "x", "code": status}})
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def chat(url: str) -> subprocess.CompletedProcess:
    """`qlora-app chat --url URL` with nothing typed: the session ends at the first prompt."""
    return subprocess.run([sys.executable, "-m", "qlora_app", "chat", "--url", url], input="", capture_output=True,
                          text=True, cwd=REPO, env=os.environ, timeout=120)


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/"])
def test_chat_takes_the_server_address_with_or_without_v1(suffix):
    with openai_server() as url:
        result = chat(url + suffix)
    assert result.returncode == 0, result.stderr
    assert "chatting with tiny" in result.stdout


def test_an_api_status_error_is_one_line():
    with openai_server(models_status=500) as url:
        result = chat(url)
    assert_one_line_error(result, f"the server at {url}", "500")
