"""Fixtures for server tests: a real index built by the indexer from real image files, the app over it (in
process, lifespan running) and the server as a real process on a loopback port."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from app.settings import Settings
from indexer.cli import main as clip_index
from tests.support import free_port, save_tiny_model

REPO = Path(__file__).resolve().parents[2]
CAPTIONS = ("a red square", "a green square", "a blue square", "a photo of a cat", "a sunset over the sea")
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220), "yellow": (230, 220, 40)}
SERVER_START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class IndexedFolder:
    """An image folder, the tiny model it was indexed with and the index directory (with a text corpus)."""

    root: Path
    index_dir: Path
    model: Path
    files: dict[str, Path]  # catalog path -> file

    def settings(self, tmp_path: Path, **overrides: object) -> Settings:
        values: dict[str, object] = {"index_dir": self.index_dir, "cache_dir": tmp_path / "cache"}
        values.update(overrides)
        return Settings(**values)  # type: ignore[arg-type]  # test overrides of typed fields


def write_image(path: Path, colour: tuple[int, int, int], seed: int, size: tuple[int, int] = (120, 80)) -> Path:
    """A mostly one-colour image with some noise, so files differ; format from the suffix."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.normal(0, 25, size=(size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def build_folder(base: Path, model: Path) -> IndexedFolder:
    root, index_dir = base / "photos", base / "index"
    files: dict[str, Path] = {}
    for i, (name, colour) in enumerate(COLOURS.items()):
        for j, suffix in enumerate((".jpg", ".png", ".webp")):
            relative = f"{name}/{name}_{j}{suffix}"
            files[relative] = write_image(root / relative, colour, seed=10 * i + j)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    assert clip_index(["build", str(root), "--index-dir", str(index_dir), "--model", str(model), "--workers", "0"]) == 0
    captions = base / "captions.txt"
    captions.write_text("\n".join(CAPTIONS) + "\n", encoding="utf-8")
    assert clip_index(["texts", str(captions), "--index-dir", str(index_dir)]) == 0
    return IndexedFolder(root, index_dir, model, files)


@pytest.fixture(scope="session")
def app_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("app-models") / "tiny.safetensors", seed=0)


@pytest.fixture(scope="session")
def indexed(tmp_path_factory: pytest.TempPathFactory, app_model: Path) -> IndexedFolder:
    """12 images (JPEG/PNG/WebP in 4 colours) + one corrupt file, indexed, with 5 captions. Do not modify."""
    return build_folder(tmp_path_factory.mktemp("indexed"), app_model)


@pytest.fixture
def client(indexed: IndexedFolder, tmp_path: Path) -> Iterator[TestClient]:
    """The app over ``indexed`` with its lifespan running (no watcher thread)."""
    with TestClient(create_app(indexed.settings(tmp_path), watch=False)) as test_client:
        yield test_client


@dataclass
class LiveServer:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def logs(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


def start_server(index_dir: Path, tmp_path: Path, env: dict[str, str] | None = None, *args: str) -> LiveServer:
    """``python -m app`` on a free loopback port, waited for until /readyz answers 200."""
    port = free_port()
    log = tmp_path / f"server-{port}.log"
    environment = {**os.environ, "CLIPSEARCH_CACHE_DIR": str(tmp_path / "cache"), **(env or {})}
    command = [sys.executable, "-m", "app", "--index-dir", str(index_dir), "--port", str(port), *args]
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=REPO, env=environment, stdout=out, stderr=subprocess.STDOUT)
    server = LiveServer(f"http://127.0.0.1:{port}", process, log)
    try:
        wait_until_ready(server.url, process, log)
    except RuntimeError:
        stop_server(server)
        raise
    return server


def wait_until_ready(
    url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = SERVER_START_TIMEOUT_S
) -> None:
    """Poll ``url``/readyz until it answers 200; RuntimeError with the process's log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text(errors='replace')}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server not ready after {timeout} s:\n{log.read_text(errors='replace')}")


def stop_server(server: LiveServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(15)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="module")
def live_server(indexed: IndexedFolder, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The real server process over ``indexed`` (module-scoped: several tests share it)."""
    server = start_server(indexed.index_dir, tmp_path_factory.mktemp("live"))
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def other_app_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny architecture with other weights."""
    return save_tiny_model(tmp_path_factory.mktemp("app-models") / "other.safetensors", seed=1)
