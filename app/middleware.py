"""Pure ASGI middleware: the request body limit, and the request context (id, access log, latency metric).

Both are plain ASGI callables rather than ``BaseHTTPMiddleware``, so they see bytes as they arrive and add no
task per request.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .metrics import Metrics

logger = logging.getLogger("app.access")

request_id_var: ContextVar[str] = ContextVar("request_id", default="-")
REQUEST_ID_HEADER = "x-request-id"
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # a client-sent id is echoed only if it looks like one


class BodyTooLargeError(Exception):
    """Raised into the app when the body passes the limit (the 413 has been sent already)."""


async def _send_json(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodySizeLimitMiddleware:
    """413 for request bodies over ``max_bytes``: refused from Content-Length when it says so, and counted while
    the bytes arrive otherwise (chunked bodies, or a Content-Length that lies). Once the 413 is sent, whatever the
    app tries to send is dropped."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, size: str) -> str:
        return f"request body is {size}, the limit is {self.max_bytes} bytes: send a smaller file"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await _send_json(send, 400, "Content-Length must be a non-negative integer")
                return
            if int(declared) > self.max_bytes:
                await _send_json(send, 413, self._too_large(f"{int(declared)} bytes"))
                return
        received, started, responded = 0, False, False

        async def limited_receive() -> Message:
            nonlocal received, responded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    if not started and not responded:
                        await _send_json(send, 413, self._too_large(f"more than {self.max_bytes} bytes"))
                    responded = True
                    raise BodyTooLargeError(self._too_large(f"more than {self.max_bytes} bytes"))
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if responded:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not responded:
                raise
            logger.debug("request stopped after its body passed the limit", exc_info=True)


class RequestContextMiddleware:
    """Gives each request an id (the client's ``X-Request-ID`` if sane, else a new one), echoes it in the response,
    logs one access line and observes the latency histogram by route template."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope["headers"]).get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        request_id = sent if REQUEST_ID_RE.fullmatch(sent) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER.encode(), request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            method, path, elapsed_ms = scope["method"], scope["path"], elapsed * 1000
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.request_seconds.labels(method, template, str(status)).observe(elapsed)
            fields = {"method": method, "path": path, "status": status, "duration_ms": round(elapsed_ms, 2)}
            logger.info("%s %s %d %.1fms", method, path, status, elapsed_ms, extra=fields)
            request_id_var.reset(token)
