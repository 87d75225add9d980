"""uvicorn's HTTP/1.1 protocols, with a JSON body on the 400 their parser answers by itself.

uvicorn refuses a request it cannot parse (an unparseable ``Content-Length``, a URL or header over the parser's
limits, broken framing) before the app sees it, with a plain-text 400 "Invalid HTTP request received.". These
subclasses keep everything else of uvicorn's (the status, the warning it logs, closing the connection) and send
``{"detail": "..."}`` as JSON instead, like every other error of the server. ``uvicorn.Config(http=...)`` takes the
class, by parser name from :data:`PROTOCOLS` (httptools, uvicorn's default, or the pure-Python h11).
"""

from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

INVALID_REQUEST = (
    "invalid HTTP request: the request line, a header (such as Content-Length or Transfer-Encoding) or the "
    "framing cannot be parsed, or the URL or a header is too long"
)
JSON_HEADERS = ((b"content-type", b"application/json"), (b"connection", b"close"))


def error_body(detail: str = INVALID_REQUEST) -> bytes:
    """The JSON body of a refusal."""
    return json.dumps({"detail": detail}).encode("utf-8")


class JSONErrorH11Protocol(H11Protocol):
    """h11's protocol whose parser-level 400 has a JSON body."""

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


class JSONErrorHttpToolsProtocol(HttpToolsProtocol):
    """httptools' protocol whose parser-level 400 has a JSON body."""

    def send_400_response(self, msg: str) -> None:
        body = error_body()
        head = [b"HTTP/1.1 400 Bad Request\r\n"]
        for name, value in (*self.server_state.default_headers, *JSON_HEADERS):
            head.append(name + b": " + value + b"\r\n")
        head.append(b"content-length: " + str(len(body)).encode("ascii") + b"\r\n\r\n")
        self.transport.write(b"".join(head) + body)
        self.transport.close()


PROTOCOLS: dict[str, type[asyncio.Protocol]] = {"httptools": JSONErrorHttpToolsProtocol, "h11": JSONErrorH11Protocol}
