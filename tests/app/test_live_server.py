"""The server as users run it: a real process (`python -m app`, the same as `clip-serve`) on a loopback port, spoken
to over raw sockets where HTTP clients would be too polite (chunked bodies over the limit, lying lengths)."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.app.conftest import REPO, IndexedFolder, LiveServer, start_server, stop_server
from tests.support import free_port

LIMIT = 256 * 1024  # the live server's upload limit in these tests


def raw_request(url: str, head: bytes, body_chunks: list[bytes], timeout: float = 10.0) -> bytes:
    """Send ``head`` and then ``body_chunks`` on a fresh connection; return what the server answered (until it
    closes or ``timeout``). Sending stops quietly once the server has closed its side."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head)
        for chunk in body_chunks:
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        answer = b""
        try:
            while data := sock.recv(65536):
                answer += data
        except (TimeoutError, ConnectionResetError):
            pass
    return answer


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else -1


def test_search_over_real_http(live_server: LiveServer, indexed: IndexedFolder) -> None:
    body = httpx.get(f"{live_server.url}/api/search", params={"q": "a red square", "k": 4}).json()
    assert len(body["results"]) == 4
    thumb = httpx.get(live_server.url + body["results"][0]["thumbnail_url"])
    assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"
    upload = indexed.files["red/red_0.jpg"].read_bytes()
    response = httpx.post(f"{live_server.url}/api/search/image", files={"file": ("r.jpg", upload)})
    assert response.json()["results"][0]["path"] == "red/red_0.jpg"
    assert "x-request-id" in response.headers


def test_the_start_up_log_says_what_is_served_and_nothing_that_looks_like_an_error(live_server: LiveServer) -> None:
    log = live_server.logs()
    start = log[: log.index("Uvicorn running on http://127.0.0.1:")]
    assert "search by FAISS " in start and re.search(r"serving g-\d{6} of ", start)
    suspicious = [line for line in start.splitlines() if any(w in line for w in ("Error", "error:", "Could not"))]
    assert suspicious == []


def test_body_limits_hold_against_chunked_and_lying_requests(indexed: IndexedFolder, tmp_path: Path) -> None:
    server = start_server(indexed.index_dir, tmp_path, {"CLIPSEARCH_MAX_UPLOAD_BYTES": str(LIMIT)})
    try:
        url = server.url
        boundary = b"XyZ"
        part = b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'
        payload = part + b"\xff" * (4 * LIMIT) + b"\r\n--XyZ--\r\n"
        chunks = [payload[i : i + 16384] for i in range(0, len(payload), 16384)]
        chunked_head = (
            b"POST /api/search/image HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: multipart/form-data; boundary=" + boundary + b"\r\n\r\n"
        )
        chunked = [b"%x\r\n%s\r\n" % (len(c), c) for c in chunks] + [b"0\r\n\r\n"]
        answer = raw_request(url, chunked_head, chunked)
        assert status_of(answer) == 413 and b"limit is 262144 bytes" in answer

        declared_big = (
            b"POST /api/search/image HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
            b"Content-Type: multipart/form-data; boundary=XyZ\r\n\r\n" % (10 * LIMIT)
        )
        assert status_of(raw_request(url, declared_big, chunks[:2])) == 413

        lying_small = (  # says 40 bytes, sends a megabyte: only the declared bytes are a body, the rest is no request
            b"POST /api/embed/text HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\nContent-Type: application/json\r\n\r\n"
        )
        answer = raw_request(url, lying_small, [b'{"texts": ["a"]}' + b" " * 24, b"\x00" * (4 * LIMIT)])
        assert status_of(answer) in (200, 400, 422)
        assert b" 500 " not in answer
        assert httpx.get(f"{url}/readyz").status_code == 200  # and the server is fine
    finally:
        stop_server(server)
    assert "Traceback" not in server.logs()


@pytest.mark.slow  # heavy end to end (seconds): CI runs it, make check leaves it out
def test_clip_serve_explains_what_is_missing(tmp_path: Path, indexed: IndexedFolder) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    no_dir = subprocess.run([sys.executable, "-m", "app"], cwd=REPO, env=env, capture_output=True, text=True)
    assert no_dir.returncode == 2 and "CLIPSEARCH_INDEX_DIR (--index-dir): Field required" in no_dir.stderr
    missing_model = subprocess.run(
        [sys.executable, "-m", "app", "--index-dir", str(indexed.index_dir), "--model", str(tmp_path / "nope.pt"),
         "--port", str(free_port())],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert missing_model.returncode == 1
    assert "cannot start" in missing_model.stderr and "nope.pt" in missing_model.stderr


UNPARSEABLE = {
    "Content-Length that is no number": b"POST /api/embed/text HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    "header line without a colon": b"GET /livez HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
    "two Content-Lengths that differ": (
        b"POST /livez HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
    ),
}


def json_error(answer: bytes) -> dict[str, object]:
    """The JSON body of a 400 the HTTP layer answered (status, content type and length checked)."""
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    assert status_of(answer) == 400, answer[:300]
    assert headers["content-type"] == "application/json" and int(headers["content-length"]) == len(body), headers
    detail = json.loads(body)
    assert isinstance(detail, dict) and "invalid HTTP request" in detail["detail"]
    return detail


@pytest.mark.slow  # heavy end to end (seconds): CI runs it, make check leaves it out
def test_the_http_layer_refuses_unparseable_requests_with_json(
    live_server: LiveServer, indexed: IndexedFolder, tmp_path: Path
) -> None:
    """uvicorn's parsers (httptools by default, h11 as the alternative) answer before the app runs: their 400s
    are JSON like every other error."""
    long_url = b"GET /api/search?q=" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    for name, request in {**UNPARSEABLE, "100 KB URL": long_url}.items():
        json_error(raw_request(live_server.url, request, []))
        assert httpx.get(f"{live_server.url}/livez").status_code == 200, name
    h11 = start_server(indexed.index_dir, tmp_path, {"CLIPSEARCH_HTTP_PARSER": "h11"})
    try:
        for request in UNPARSEABLE.values():
            json_error(raw_request(h11.url, request, []))
        assert httpx.get(f"{h11.url}/livez").status_code == 200
    finally:
        stop_server(h11)
    assert "Traceback" not in h11.logs() + live_server.logs()


@pytest.mark.slow  # heavy end to end (seconds): CI runs it, make check leaves it out
def test_over_the_connection_limit_the_503_is_json_and_says_when_to_retry(
    indexed: IndexedFolder, tmp_path: Path
) -> None:
    """uvicorn refuses a request beyond CLIPSEARCH_LIMIT_CONCURRENCY before the app runs; the refusal is JSON too,
    with either parser, and the limit is uvicorn's own: open connections count."""
    for parser in ("httptools", "h11"):
        env = {"CLIPSEARCH_HTTP_PARSER": parser, "CLIPSEARCH_LIMIT_CONCURRENCY": "2"}
        (tmp_path / parser).mkdir()
        server = start_server(indexed.index_dir, tmp_path / parser, env)
        try:
            host, port = server.url.removeprefix("http://").split(":")
            assert httpx.get(f"{server.url}/livez").status_code == 200  # one connection: under the limit
            with socket.create_connection((host, int(port))):  # an idle connection takes the second place
                answer = raw_request(server.url, b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n", [])
            head, _, body = answer.partition(b"\r\n\r\n")
            headers = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
            assert status_of(answer) == 503 and headers[b"content-type"] == b"application/json", answer
            assert headers[b"retry-after"] == b"1" and "connection limit" in json.loads(body)["detail"]
            assert httpx.get(f"{server.url}/livez").status_code == 200  # the idle connection is gone
        finally:
            stop_server(server)
        assert "Exceeded concurrency limit." in server.logs() and "Traceback" not in server.logs()
