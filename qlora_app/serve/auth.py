"""API-key guard for every route of the vLLM server but /health, loaded into vLLM with --middleware.

vLLM's own --api-key checks only /v1, /v2 and /inference; /tokenize, /invocations, /metrics and the rest stay
open. This pure-ASGI middleware runs in the vLLM process, reads the key from QLORA_API_KEY there (so the key
never appears on a command line or in a log) and refuses any request without it. Streaming is untouched.
"""

from __future__ import annotations

import hmac
import json
import os

KEY_ENV = "QLORA_API_KEY"
OPEN_PATHS = frozenset({"/health"})


class RequireApiKey:
    def __init__(self, app) -> None:
        self.app = app
        self.key = os.environ.get(KEY_ENV, "").encode()
        if not self.key:
            raise RuntimeError(f"{KEY_ENV} is empty: the server would refuse every request")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in OPEN_PATHS or self._authorized(scope):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            await _unauthorized(send)

    def _authorized(self, scope) -> bool:
        headers = dict(scope.get("headers") or [])
        bearer = headers.get(b"authorization", b"")
        offered = bearer[7:] if bearer[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")
        return hmac.compare_digest(offered.strip(), self.key)


async def _unauthorized(send) -> None:
    body = json.dumps({"error": {"message": "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                 "type": "authentication_error", "code": 401}}).encode()
    await send({"type": "http.response.start", "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
