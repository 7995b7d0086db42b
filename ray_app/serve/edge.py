"""The HTTP edge of the app, below FastAPI: the body is read here, with a byte limit that holds whatever the framing
(Content-Length or chunked) and a deadline for the whole body, and the API key is checked before anything is parsed.

A pure ASGI middleware, not `@app.middleware("http")`: Starlette's BaseHTTPMiddleware wraps every request in a task
group and memory streams, and it cannot stop a chunked body early. Every refusal is the app's JSON error body.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Open even when an API key is set: liveness, and the API's documentation (Swagger UI's page and files, and the OpenAPI
# document it renders: routes, limits and labels, no model or data). Everything else needs the key.
OPEN_PATHS = (
    "/health", "/docs", "/openapi.json",
    "/swagger/swagger-ui-bundle.js", "/swagger/swagger-ui.css", "/swagger/favicon-32x32.png",
)  # fmt: skip


def error_body(code: str, detail: Any) -> dict[str, Any]:
    return {"error": code, "detail": detail}


async def send_json(send: Send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


class EdgeGuard:
    """`limits(scope)` returns (max_body_bytes, body_timeout_s, api_key or None): read per request, since the
    replica sets them in its constructor after the app object exists. `shed(scope)` returns why the request must be
    refused now (503, before its body is read: the cheapest refusal there is), or None."""

    def __init__(
        self,
        app: ASGIApp,
        limits: Callable[[Scope], tuple[int, float, str | None]],
        shed: Callable[[Scope], tuple[str, int] | None] = lambda scope: None,
    ) -> None:
        self.app, self.limits, self.shed = app, limits, shed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        max_bytes, timeout_s, key = self.limits(scope)
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        if key and not scope.get("path", "").endswith(OPEN_PATHS):
            given = headers.get("x-api-key") or headers.get("authorization", b"").removeprefix(b"Bearer ")
            if not hmac.compare_digest(given, key.encode()):
                return await send_json(
                    send, 401, error_body("unauthorized", "missing or wrong API key: send it in the X-API-Key header")
                )
        if refused := self.shed(scope):
            reason, retry_after = refused
            return await send_json(send, 503, error_body("overloaded", reason), {"Retry-After": str(retry_after)})
        declared = headers.get("content-length", b"")
        if declared.isdigit() and int(declared) > max_bytes:
            return await send_json(
                send, 413, error_body("request_too_large", f"body of {int(declared)} bytes exceeds {max_bytes}")
            )
        body, more, deadline = bytearray(), True, time.monotonic() + timeout_s
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0))
            except TimeoutError:
                return await send_json(
                    send, 408, error_body("request_timeout", f"the body did not arrive within {timeout_s:g} s")
                )
            if message["type"] == "http.disconnect":
                return None  # the client left: nobody to answer
            body += message.get("body", b"")
            if len(body) > max_bytes:
                return await send_json(
                    send, 413, error_body("request_too_large", f"body exceeds {max_bytes} bytes (read so far)")
                )
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)
