"""Downloads against a real local HTTP server: verification, caching, truncation, outages, kills mid-transfer.

Everything is offline and fast: the server listens on 127.0.0.1, the "checkpoint" is a small ``torch.save`` file.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from clip_model import download
from clip_model.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from clip_model.download import (
    ALLOW_UNVERIFIED_ENV_VAR,
    CACHE_ENV_VAR,
    PART_INFIX,
    SIDECAR_SUFFIX,
    STALE_PART_AGE_S,
    default_cache_dir,
    download_weights,
    fetch,
    sha256_file,
)
from clip_model.errors import ChecksumMismatchError, DownloadError
from clip_model.pretrained import PretrainedWeights

REPO_ROOT = Path(__file__).resolve().parents[2]
FAST_FAIL_S = 5.0  # an unreachable server must be reported within this many seconds
SLOW_PREFIX_BYTES = 8 * 1024  # what the slow route sends before stalling
SERVER_WAIT_S = 30.0  # generous upper bound for waits that normally take milliseconds
POLL_INTERVAL_S = 0.02  # how often the test server checks for shutdown


@dataclass
class ServerState:
    """What the handler serves and what it saw."""

    body: bytes
    requests: list[str] = field(default_factory=list)
    streaming: threading.Event = field(default_factory=threading.Event)  # slow route has sent its first bytes
    release: threading.Event = field(default_factory=threading.Event)  # lets the slow route finish


class _TestServer(ThreadingHTTPServer):
    state: ServerState


class _Handler(BaseHTTPRequestHandler):
    """Routes: /files/* (the checkpoint), /truncated/* (short body), /slow/* (stalls), /missing (404), /error (500)."""

    server: _TestServer

    def do_GET(self) -> None:
        state = self.server.state
        state.requests.append(self.path)
        body = state.body
        if self.path == "/missing":
            self.send_error(404, "Not Found")
        elif self.path == "/error":
            self.send_error(500, "Internal Server Error")
        elif self.path.startswith("/files/"):
            self._headers(len(body))
            self.wfile.write(body)
        elif self.path.startswith("/truncated/"):
            self._headers(len(body))  # promise the whole body ...
            self.wfile.write(body[: len(body) // 2])  # ... send half, then close the connection
            self.close_connection = True
        elif self.path.startswith("/slow/"):
            self._headers(len(body))
            for start in range(0, SLOW_PREFIX_BYTES, 1024):
                self.wfile.write(body[start : start + 1024])
                self.wfile.flush()
                time.sleep(0.01)
            state.streaming.set()
            state.release.wait(SERVER_WAIT_S)
            self.close_connection = True
        else:
            self.send_error(404, "Not Found")

    def _headers(self, length: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass


@dataclass
class Served:
    base_url: str
    state: ServerState
    sha256: str

    def url(self, route: str) -> str:
        return f"{self.base_url}{route}"


@pytest.fixture
def checkpoint() -> bytes:
    """A small but real checkpoint file's bytes (larger than one network read, so streaming is exercised)."""
    buffer = io.BytesIO()
    torch.save({"weight": torch.arange(100_000, dtype=torch.float32).reshape(100, 1000), "bias": torch.ones(7)}, buffer)
    return buffer.getvalue()


@pytest.fixture
def server(checkpoint: bytes) -> Iterator[Served]:
    state = ServerState(body=checkpoint)
    httpd = _TestServer(("127.0.0.1", 0), _Handler)
    httpd.state = state
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": POLL_INTERVAL_S}, daemon=True)
    thread.start()
    host, port = httpd.server_address[:2]
    try:
        yield Served(f"http://{host}:{port}", state, hashlib.sha256(checkpoint).hexdigest())
    finally:
        state.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(SERVER_WAIT_S)


def _parts(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if PART_INFIX in p.name)


def _weights(url: str, sha256: str | None, filename: str = "test-weights.pt") -> PretrainedWeights:
    return PretrainedWeights(
        name="Test-Arch/test_tag",
        url=url,
        sha256=sha256,
        filename=filename,
        config="RN50",
        mean=OPENAI_DATASET_MEAN,
        std=OPENAI_DATASET_STD,
        format="state_dict",
        source="test fixture",
    )


# --- cache directory -------------------------------------------------------------------------------------------


def test_cache_dir_env_var_overrides_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "custom"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "custom"


def test_cache_dir_env_var_expands_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv(CACHE_ENV_VAR, "~/models")
    assert default_cache_dir() == tmp_path / "models"


def test_cache_dir_xdg_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CACHE_ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "clip_model"


@pytest.mark.parametrize("xdg", [None, "", "relative/dir"])
def test_cache_dir_home_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, xdg: str | None) -> None:
    monkeypatch.delenv(CACHE_ENV_VAR, raising=False)
    if xdg is None:
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_CACHE_HOME", xdg)  # empty or relative values are ignored, per the XDG spec
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "clip_model"


def test_download_weights_uses_env_cache_dir(server: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "env-cache"))
    path = download_weights(_weights(server.url("/files/w.pt"), server.sha256), progress=False)
    assert path == tmp_path / "env-cache" / "test-weights.pt"
    assert sha256_file(path) == server.sha256


# --- hashing ---------------------------------------------------------------------------------------------------


def test_sha256_file_matches_hashlib_across_chunks(tmp_path: Path) -> None:
    data = os.urandom(download.HASH_CHUNK_BYTES * 2 + 12345)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


# --- successful downloads and the cache ------------------------------------------------------------------------


def test_download_verifies_and_second_call_uses_cache(server: Served, checkpoint: bytes, tmp_path: Path) -> None:
    weights = _weights(server.url("/files/model.pt"), server.sha256)
    path = download_weights(weights, cache_dir=tmp_path, progress=False)
    assert path == tmp_path / weights.filename
    assert path.read_bytes() == checkpoint
    assert sha256_file(path) == server.sha256
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["bias"], torch.ones(7))
    assert server.state.requests == ["/files/model.pt"]
    assert _parts(tmp_path) == []

    sidecar = json.loads((tmp_path / (weights.filename + SIDECAR_SUFFIX)).read_text())
    assert sidecar["sha256"] == server.sha256
    assert sidecar["size"] == len(checkpoint)

    assert download_weights(weights, cache_dir=tmp_path, progress=False) == path
    assert server.state.requests == ["/files/model.pt"]  # no second request


def test_verified_cache_is_not_rehashed(server: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "model.pt"
    fetch(server.url("/files/model.pt"), target, server.sha256, progress=False)

    def no_hashing(path: Path) -> str:
        raise AssertionError(f"{path} was re-hashed although the sidecar vouches for it")

    monkeypatch.setattr(download, "sha256_file", no_hashing)
    assert fetch(server.url("/files/model.pt"), target, server.sha256, progress=False) == target
    assert len(server.state.requests) == 1


def test_cache_is_rehashed_when_mtime_changes(server: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "model.pt"
    fetch(server.url("/files/model.pt"), target, server.sha256, progress=False)
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns - 10**9))  # e.g. restored from a backup
    calls: list[Path] = []
    real = download.sha256_file

    def counting(path: Path) -> str:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(download, "sha256_file", counting)
    assert fetch(server.url("/files/model.pt"), target, server.sha256, progress=False) == target
    assert calls == [target]  # re-hashed once, still good, no download
    assert len(server.state.requests) == 1


def test_corrupted_cache_is_downloaded_again(
    server: Served, checkpoint: bytes, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    target = tmp_path / "model.pt"
    fetch(server.url("/files/model.pt"), target, server.sha256, progress=False)
    target.write_bytes(b"\0" * len(checkpoint))  # bit rot of the same size
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # make sure mtime moved on coarse clocks
    with caplog.at_level(logging.WARNING, logger="clip_model.download"):
        assert fetch(server.url("/files/model.pt"), target, server.sha256, progress=False) == target
    assert target.read_bytes() == checkpoint
    assert len(server.state.requests) == 2
    assert any("downloading it again" in r.getMessage() for r in caplog.records)
    assert _parts(tmp_path) == []


def test_hand_placed_file_is_verified_and_used(server: Served, checkpoint: bytes, tmp_path: Path) -> None:
    target = tmp_path / "model.pt"
    target.write_bytes(checkpoint)
    assert fetch(server.url("/files/model.pt"), target, server.sha256.upper(), progress=False) == target
    assert server.state.requests == []


def test_progress_bar_shows_the_file(server: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fetch(server.url("/files/model.pt"), tmp_path / "shown.pt", server.sha256, progress=True)
    assert "shown.pt" in capsys.readouterr().err
    fetch(server.url("/files/model.pt"), tmp_path / "quiet.pt", server.sha256, progress=False)
    assert "quiet.pt" not in capsys.readouterr().err


def test_file_url_mirror(checkpoint: bytes, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror" / "model.pt"
    mirror.parent.mkdir()
    mirror.write_bytes(checkpoint)
    target = tmp_path / "cache" / "model.pt"
    assert fetch(mirror.as_uri(), target, hashlib.sha256(checkpoint).hexdigest(), progress=False) == target
    assert target.read_bytes() == checkpoint


def test_missing_file_url(tmp_path: Path) -> None:
    url = (tmp_path / "nowhere.pt").as_uri()
    with pytest.raises(DownloadError) as info:
        fetch(url, tmp_path / "cache" / "x.pt", "0" * 64, progress=False)
    assert url in str(info.value)


# --- failures leave nothing behind -----------------------------------------------------------------------------


def test_wrong_hash(server: Served, tmp_path: Path) -> None:
    target = tmp_path / "model.pt"
    expected = "0" * 64
    url = server.url("/files/model.pt")
    with pytest.raises(ChecksumMismatchError) as info:
        fetch(url, target, expected, progress=False)
    message = str(info.value)
    assert expected in message and server.sha256 in message and url in message
    assert isinstance(info.value, DownloadError)
    assert not target.exists()
    assert _parts(tmp_path) == []
    assert not (tmp_path / ("model.pt" + SIDECAR_SUFFIX)).exists()


def test_truncated_transfer(server: Served, tmp_path: Path) -> None:
    target = tmp_path / "model.pt"
    url = server.url("/truncated/model.pt")
    with pytest.raises(DownloadError) as info:
        fetch(url, target, server.sha256, progress=False)
    assert not isinstance(info.value, ChecksumMismatchError)  # reported as truncation, before any hash check
    message = str(info.value)
    assert url in message and ("truncated" in message or "broke off" in message)
    assert not target.exists()
    assert _parts(tmp_path) == []


@pytest.mark.parametrize(("route", "status"), [("/missing", 404), ("/error", 500)])
def test_http_errors(server: Served, tmp_path: Path, route: str, status: int) -> None:
    target = tmp_path / "model.pt"
    url = server.url(route)
    with pytest.raises(DownloadError) as info:
        fetch(url, target, server.sha256, progress=False)
    message = str(info.value)
    assert f"HTTP {status}" in message and url in message and str(target) in message
    assert not target.exists()
    assert _parts(tmp_path) == []


def test_server_down_fails_fast_with_manual_instructions(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound but not listening: connections are refused, and nobody can take the port
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/ViT-B-32.pt"
        target = tmp_path / "cache" / "ViT-B-32.pt"
        start = time.monotonic()
        with pytest.raises(DownloadError) as info:
            fetch(url, target, "0" * 64, progress=False)
        assert time.monotonic() - start < FAST_FAIL_S
    message = str(info.value)
    assert url in message and str(target) in message and CACHE_ENV_VAR in message
    assert not target.exists()
    assert _parts(target.parent) == []


def test_unresponsive_server_times_out(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)  # accepts connections into the backlog but never answers
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/model.pt"
        start = time.monotonic()
        with pytest.raises(DownloadError) as info:
            fetch(url, tmp_path / "model.pt", "0" * 64, progress=False, timeout=0.5)
        assert time.monotonic() - start < FAST_FAIL_S
    assert url in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_not_enough_disk_space(server: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9, 10))
    with pytest.raises(DownloadError, match="Not enough disk space"):
        fetch(server.url("/files/model.pt"), tmp_path / "model.pt", server.sha256, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cache_dir_that_is_a_file(server: Served, tmp_path: Path) -> None:
    blocker = tmp_path / "cache"
    blocker.write_text("not a directory")
    with pytest.raises(DownloadError, match=CACHE_ENV_VAR):
        fetch(server.url("/files/model.pt"), blocker / "model.pt", server.sha256, progress=False)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_killed_download_leaves_no_complete_looking_file(server: Served, tmp_path: Path) -> None:
    target = tmp_path / "model.pt"
    script = (
        "import sys; from pathlib import Path; from clip_model.download import fetch; "
        "fetch(sys.argv[1], Path(sys.argv[2]), sys.argv[3], progress=False, timeout=60)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, server.url("/slow/model.pt"), str(target), server.sha256], cwd=REPO_ROOT, env=env
    )
    try:
        assert server.state.streaming.wait(SERVER_WAIT_S), "the download never started"
        deadline = time.monotonic() + SERVER_WAIT_S
        while not _parts(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "the download finished although the server stalls"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(SERVER_WAIT_S)
    assert proc.returncode == -signal.SIGKILL
    assert not target.exists()
    leftovers = _parts(tmp_path)
    assert len(leftovers) == 1  # SIGKILL cannot be cleaned up after, but the partial has a name nobody loads

    old = time.time() - STALE_PART_AGE_S - 60
    os.utime(leftovers[0], (old, old))
    assert fetch(server.url("/files/model.pt"), target, server.sha256, progress=False) == target
    assert sha256_file(target) == server.sha256
    assert _parts(tmp_path) == []  # the dead download's partial was swept


def test_recent_partials_of_other_downloads_are_kept(server: Served, tmp_path: Path) -> None:
    target = tmp_path / "model.pt"
    live = tmp_path / f"model.pt{PART_INFIX}live"
    live.write_bytes(b"in progress elsewhere")
    fetch(server.url("/files/model.pt"), target, server.sha256, progress=False)
    assert live.exists()


# --- unverified weights ----------------------------------------------------------------------------------------


def test_unverified_weights_are_refused_by_default(
    server: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ALLOW_UNVERIFIED_ENV_VAR, raising=False)
    with pytest.raises(DownloadError) as info:
        download_weights(_weights(server.url("/files/model.pt"), None), cache_dir=tmp_path, progress=False)
    message = str(info.value)
    assert ALLOW_UNVERIFIED_ENV_VAR in message and "sha256" in message
    assert server.state.requests == []
    with pytest.raises(DownloadError):
        fetch(server.url("/files/model.pt"), tmp_path / "model.pt", None, progress=False)
    assert server.state.requests == []


def test_unverified_weights_with_caller_digest(server: Served, tmp_path: Path) -> None:
    weights = _weights(server.url("/files/model.pt"), None)
    path = download_weights(weights, cache_dir=tmp_path, progress=False, sha256=server.sha256)
    assert sha256_file(path) == server.sha256
    with pytest.raises(ChecksumMismatchError):
        download_weights(weights, cache_dir=tmp_path / "other", progress=False, sha256="1" * 64)


@pytest.mark.parametrize("how", ["parameter", "env"])
def test_unverified_weights_when_accepted_knowingly(
    server: Served, checkpoint: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    weights = _weights(server.url("/files/model.pt"), None)
    if how == "env":
        monkeypatch.setenv(ALLOW_UNVERIFIED_ENV_VAR, "1")
    path = download_weights(weights, cache_dir=tmp_path, progress=False, allow_unverified=how == "parameter")
    assert path.read_bytes() == checkpoint
    assert download_weights(weights, cache_dir=tmp_path, progress=False, allow_unverified=True) == path
    assert len(server.state.requests) == 1


def test_caller_digest_must_agree_with_registry(server: Served, tmp_path: Path) -> None:
    weights = _weights(server.url("/files/model.pt"), server.sha256)
    with pytest.raises(ValueError, match="disagrees"):
        download_weights(weights, cache_dir=tmp_path, progress=False, sha256="1" * 64)
    with pytest.raises(ValueError):
        fetch(server.url("/files/model.pt"), tmp_path / "model.pt", "not-a-digest", progress=False)
    assert server.state.requests == []
