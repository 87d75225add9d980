"""The README's main command, as a user runs it: `scripts/serve.sh FOLDER --model CHECKPOINT` indexes the folder and
serves it; a rerun encodes nothing new and serves again."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.app.conftest import REPO, wait_until_ready, write_image
from tests.support import free_port, save_tiny_model

START_TIMEOUT_S = 120.0


def serve(root: Path, model: Path, index_dir: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "CLIPSEARCH_CACHE_DIR": str(index_dir.parent / "cache")}
    command = ["scripts/serve.sh", str(root), "--model", str(model), "--index-dir", str(index_dir), "--port", str(port)]
    with log.open("ab") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process, log, START_TIMEOUT_S)
    except RuntimeError:
        process.kill()
        raise
    return process, url


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(20)


@pytest.mark.slow  # heavy end to end (seconds): CI runs it, make check leaves it out
def test_serve_indexes_a_folder_and_serves_it(tmp_path: Path) -> None:
    root, index_dir, log = tmp_path / "photos", tmp_path / "data" / "index", tmp_path / "serve.log"
    for i, colour in enumerate([(200, 20, 20), (20, 200, 20), (20, 20, 200)]):
        write_image(root / f"p{i}.png", colour, seed=i)
    model = save_tiny_model(tmp_path / "tiny.safetensors", seed=0)
    process, url = serve(root, model, index_dir, log)
    try:
        results = httpx.get(f"{url}/api/search", params={"q": "a photo"}).json()["results"]
        assert sorted(hit["path"] for hit in results) == ["p0.png", "p1.png", "p2.png"]
        assert httpx.get(url + results[0]["url"]).status_code == 200
        assert "<title>" in httpx.get(url).text
    finally:
        stop(process)
    write_image(root / "p3.png", (200, 200, 20), seed=3)
    process, url = serve(root, model, index_dir, log)
    try:
        assert httpx.get(f"{url}/api/stats").json()["images"] == 4
    finally:
        stop(process)
    logged = log.read_text()
    assert ": 3 files, 0 unchanged, 3 added" in logged  # the first run
    assert ": 4 files, 3 unchanged, 1 added" in logged and "; 1 encoded" in logged  # the rerun encodes only the new one


def test_serve_without_a_folder_says_how_to_use_it() -> None:
    done = subprocess.run(["scripts/serve.sh"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and "IMAGE_FOLDER" in done.stderr


def test_make_serve_needs_a_folder() -> None:
    done = subprocess.run(["make", "serve"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode != 0 and "IMAGES=" in done.stderr
