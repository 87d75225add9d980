"""uvicorn's HTTP/1.1 protocols, with JSON bodies on the answers uvicorn gives by itself.

uvicorn answers two things before the app sees a request, in plain text: a request it cannot parse (an unparseable
``Content-Length``, a URL or header over the parser's limits, broken framing) gets a 400 "Invalid HTTP request
received.", and a request beyond ``limit_concurrency`` (open connections or running requests) a 503 "Service
Unavailable". These subclasses keep everything else of uvicorn's (the statuses, the warnings it logs, closing the
connection) and send ``{"detail": "..."}`` as JSON instead, like every other error of the server; the 503 also says
when to retry. They take over uvicorn's concurrency check (same counts, same limit) so that the refusal goes through
:func:`at_capacity`. ``uvicorn.Config(http=...)`` takes the class, by parser name from :data:`PROTOCOLS`
(httptools, uvicorn's default, or the pure-Python h11).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

INVALID_REQUEST = (
    "invalid HTTP request: the request line, a header (such as Content-Length or Transfer-Encoding) or the "
    "framing cannot be parsed, or the URL or a header is too long"
)
AT_CAPACITY = "the server is at its connection limit (CLIPSEARCH_LIMIT_CONCURRENCY): retry shortly"
RETRY_AFTER_S = 1
JSON_HEADERS = ((b"content-type", b"application/json"), (b"connection", b"close"))
logger = logging.getLogger("uvicorn.error")  # where uvicorn logs its own refusals


def error_body(detail: str = INVALID_REQUEST) -> bytes:
    """The JSON body of a refusal."""
    return json.dumps({"detail": detail}).encode("utf-8")


async def at_capacity(scope: Any, receive: Any, send: Any) -> None:
    """The ASGI app a request over the concurrency limit gets instead of the server's: a JSON 503."""
    body = error_body(AT_CAPACITY)
    headers = [*JSON_HEADERS, (b"retry-after", str(RETRY_AFTER_S).encode()), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class _CapacityCheck:
    """uvicorn's concurrency check, answered by :func:`at_capacity`: the protocol's own check is switched off
    (``limit_concurrency = None``) and each request is checked here, with the same counts, before uvicorn picks
    the app (``self.app``) for it."""

    app: Any
    connections: Any
    tasks: Any
    limit_concurrency: int | None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._limit, self.limit_concurrency = self.limit_concurrency, None

    def _over_limit(self) -> bool:
        limit = self._limit
        return limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit)

    def _with_capacity_check(self, handle: Any) -> None:
        """``handle()`` (uvicorn's code that starts the request's app) with :func:`at_capacity` as the app if the
        server is over its limit."""
        if not self._over_limit():
            handle()
            return
        logger.warning("Exceeded concurrency limit.")
        served, self.app = self.app, at_capacity
        try:
            handle()
        finally:
            self.app = served


class JSONErrorH11Protocol(_CapacityCheck, H11Protocol):
    """h11's protocol whose parser-level 400 and concurrency-limit 503 have JSON bodies."""

    def handle_events(self) -> None:
        self._with_capacity_check(super().handle_events)

    def send_400_response(self, msg: str) -> None:
        body = error_body()
        headers = [*JSON_HEADERS, (b"content-length", str(len(body)).encode("ascii"))]
        for event in (
            h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event) or b"")
        self.transport.close()


class JSONErrorHttpToolsProtocol(_CapacityCheck, HttpToolsProtocol):
    """httptools' protocol whose parser-level 400 and concurrency-limit 503 have JSON bodies."""

    def on_headers_complete(self) -> None:
        self._with_capacity_check(super().on_headers_complete)

    def send_400_response(self, msg: str) -> None:
        body = error_body()
        head = [b"HTTP/1.1 400 Bad Request\r\n"]
        for name, value in (*self.server_state.default_headers, *JSON_HEADERS):
            head.append(name + b": " + value + b"\r\n")
        head.append(b"content-length: " + str(len(body)).encode("ascii") + b"\r\n\r\n")
        self.transport.write(b"".join(head) + body)
        self.transport.close()


PROTOCOLS: dict[str, type[asyncio.Protocol]] = {"httptools": JSONErrorHttpToolsProtocol, "h11": JSONErrorH11Protocol}
