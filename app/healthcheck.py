"""``python -m app.healthcheck``: exit 0 when the local server answers 200 on ``/readyz``, else 1.

The container's ``HEALTHCHECK`` runs it (slim images have no curl). Standard library only, so that it starts in
milliseconds and never imports torch. Nothing goes to stdout; on failure one line on stderr says why (Docker keeps it
in ``docker inspect``).

The port comes from the argument, else ``$CLIPSEARCH_PORT``, else 8000. The host is ``$CLIPSEARCH_HOST`` when the
server binds one address, and 127.0.0.1 when it binds every address (``0.0.0.0``, as in the container) or none is set.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

DEFAULT_PORT = 8000
TIMEOUT_S = 3.0
_WILDCARD_HOSTS = {"", "0.0.0.0", "::", "[::]"}
# no proxies: an HTTP_PROXY in the container's environment must not reroute a request to its own loopback
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def readyz_url(port: int | None = None) -> str:
    """The readiness URL of the server this process's environment configures."""
    host = os.environ.get("CLIPSEARCH_HOST", "").strip()
    if host in _WILDCARD_HOSTS:
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"  # a bare IPv6 address
    if port is None:
        port = int(os.environ.get("CLIPSEARCH_PORT") or DEFAULT_PORT)
    return f"http://{host}:{port}/readyz"


def _reason(body: bytes) -> str:
    """The ``reason`` of a /readyz answer, or the start of the body when it is not the expected JSON."""
    try:
        payload = json.loads(body)
    except ValueError:
        return body[:200].decode("utf-8", "replace")
    if isinstance(payload, dict) and payload.get("reason"):
        return str(payload["reason"])
    return "not ready"


def check(url: str, timeout: float = TIMEOUT_S) -> str | None:
    """None when ``url`` answers 200, else what went wrong."""
    try:
        with _OPENER.open(url, timeout=timeout) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        return f"{url}: HTTP {exc.code}: {_reason(exc.read())}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        return f"{url}: {reason}"
    return None if status == 200 else f"{url}: HTTP {status}"


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status for Docker: 0 healthy, 1 unhealthy. ``argv`` may hold one port number."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) > 1 or (args and not args[0].isdigit()):
        sys.stderr.write("usage: python -m app.healthcheck [PORT]\n")
        return 1  # never 2: Docker reserves it
    try:
        url = readyz_url(int(args[0]) if args else None)
    except ValueError:
        sys.stderr.write(f"healthcheck: CLIPSEARCH_PORT is not a number: {os.environ.get('CLIPSEARCH_PORT')!r}\n")
        return 1
    problem = check(url)
    if problem is not None:
        sys.stderr.write(f"unhealthy: {problem}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
