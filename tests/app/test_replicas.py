"""Several server replicas over one index directory they cannot write, as docs/scaling.md runs them behind a load
balancer: two real server processes (`python -m app`, as `clip-serve`) answer alike, and both follow what one writer
(`clip-index build`, a separate process with write access) publishes.

The replicas get the index directory read-only twice over: its permission bits (``chmod -R a-w``, until the writer
runs) and, where the machine allows it, a read-only bind mount for their whole life (:mod:`tests.read_only`), which
also binds root, as a `:ro` volume does. Without user namespaces, root cannot be kept from writing: the test skips.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from indexer.store.reader import current_generation
from tests.app.conftest import REPO, LiveServer, build_folder, stop_server, wait_until_ready, write_image
from tests.read_only import read_only, unavailable_reason
from tests.support import free_port

REPLICAS = 2
PICK_UP_TIMEOUT_S = 60.0  # a replica checks CURRENT every RELOAD_INTERVAL_S, then loads the generation
RELOAD_INTERVAL_S = "0.2"
WRITE_BITS = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH

pytestmark = pytest.mark.slow  # two servers and two indexer runs: about 30 s on 2 cores


def set_writable(directory: Path, writable: bool) -> None:
    """``chmod -R a-w`` (``writable=False``) or ``chmod -R u+w`` over ``directory``, itself included."""
    paths = [directory] + [Path(top) / name for top, dirs, files in os.walk(directory) for name in dirs + files]
    for path in paths:
        mode = path.stat().st_mode
        path.chmod(mode | stat.S_IWUSR if writable else mode & ~WRITE_BITS)


def start_replica(index_dir: Path, tmp_path: Path, number: int, mount_read_only: bool) -> LiveServer:
    """A server process over ``index_dir`` on a free loopback port (not yet waited for), with its own cache."""
    port = free_port()
    command = [sys.executable, "-m", "app", "--index-dir", str(index_dir), "--port", str(port)]
    if mount_read_only:
        command = read_only(command, index_dir)
    env = {
        **os.environ,
        "CLIPSEARCH_CACHE_DIR": str(tmp_path / f"cache-{number}"),
        "CLIPSEARCH_RELOAD_INTERVAL_S": RELOAD_INTERVAL_S,
        "CLIPSEARCH_TORCH_THREADS": "1",  # two replicas share the cores
    }
    log = tmp_path / f"replica-{number}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    return LiveServer(f"http://127.0.0.1:{port}", process, log)


def wait_for_generation(replicas: list[LiveServer], generation: str) -> None:
    """Poll each replica's /api/stats until it serves ``generation``; fail after PICK_UP_TIMEOUT_S."""
    deadline = time.monotonic() + PICK_UP_TIMEOUT_S
    for replica in replicas:
        while (served := httpx.get(f"{replica.url}/api/stats").json()["generation"]) != generation:
            assert time.monotonic() < deadline, f"{replica.url} still serves {served}, not {generation}"
            time.sleep(0.1)


def answers(replica: LiveServer, upload: bytes) -> tuple[dict[str, Any], dict[str, Any], tuple[str, int, int]]:
    """What a client sees from ``replica`` (but the time taken): a text search, an image search, the stats' counts."""
    text = httpx.get(f"{replica.url}/api/search", params={"q": "a red square", "k": 8}).json()
    image = httpx.post(f"{replica.url}/api/search/image", params={"k": 3}, files={"file": ("q.png", upload)}).json()
    stats = httpx.get(f"{replica.url}/api/stats").json()
    for body in (text, image):
        assert body.pop("took_ms") >= 0, body
    return text, image, (stats["generation"], stats["images"], stats["texts"])


def test_read_only_replicas_answer_alike_and_follow_the_writers_publish(tmp_path: Path, app_model: Path) -> None:
    reason = unavailable_reason(tmp_path / "probe")
    if reason is not None and os.geteuid() == 0:
        pytest.skip(f"root writes through permission bits, and {reason}")
    folder = build_folder(tmp_path / "shared", app_model)
    index_dir, first = folder.index_dir, current_generation(folder.index_dir)
    set_writable(index_dir, False)
    replicas = []
    try:
        replicas = [start_replica(index_dir, tmp_path, n, mount_read_only=reason is None) for n in range(REPLICAS)]
        for replica in replicas:
            wait_until_ready(replica.url, replica.process, replica.log)
        red = folder.files["red/red_0.jpg"].read_bytes()
        before = [answers(replica, red) for replica in replicas]
        assert before[0] == before[1]
        text, image, counts = before[0]
        assert counts == (first, 12, 5) and len(text["results"]) == 8
        assert image["results"][0]["path"] == "red/red_0.jpg"

        set_writable(index_dir, True)  # the writer's access; the replicas keep their read-only mount
        added = write_image(folder.root / "white" / "white_0.png", (250, 250, 250), seed=99).read_bytes()
        writer = [sys.executable, "-m", "indexer", "build", str(folder.root), "--index-dir", str(index_dir)]
        done = subprocess.run([*writer, "--workers", "0"], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        second = current_generation(index_dir)
        assert second is not None and second != first
        wait_for_generation(replicas, second)
        after = [answers(replica, added) for replica in replicas]
        assert after[0] == after[1]
        _, image, counts = after[0]
        assert counts == (second, 13, 5)
        assert image["results"][0]["path"] == "white/white_0.png"
    finally:
        for replica in replicas:
            stop_server(replica)
        set_writable(index_dir, True)
    for replica in replicas:
        assert "Traceback" not in replica.logs(), replica.logs()
