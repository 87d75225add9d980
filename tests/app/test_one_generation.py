"""One answer, one generation: a real server process answers searches while a build rewrites, deletes and adds files
in the folder it serves, committing rows long before it publishes. Every answer must describe exactly the images of
the generation it names: no hit missing, none extra, and no path, size or dimensions from another generation."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

import indexer.build
from app.main import create_app
from app.settings import Settings
from indexer.cli import main as clip_index
from indexer.store import Catalog, publish
from tests.app.conftest import LiveServer, start_server, stop_server, write_image

FIRST = 60  # images of the first generation
REWRITTEN, DELETED, ADDED = range(0, 30), range(30, 40), range(100, 130)
FIRST_SIZE, REWRITTEN_SIZE, ADDED_SIZE = (40, 30), (56, 24), (32, 32)
K = 1000  # more than either generation holds: every answer lists the whole generation
SEARCHES_DURING_BUILD = 5  # at least this many answers from the old generation while the build commits


def photo(root: Path, i: int) -> Path:
    return root / f"p{i:03d}.png"


def index(root: Path, index_dir: Path, model: Path) -> None:
    command = ["build", str(root), "--index-dir", str(index_dir), "--model", str(model), "--workers", "0"]
    assert clip_index([*command, "--batch-size", "4"]) == 0


@pytest.fixture
def served(tmp_path: Path, app_model: Path) -> Iterator[tuple[Path, Path, LiveServer]]:
    root, index_dir = tmp_path / "photos", tmp_path / "index"
    for i in range(FIRST):
        write_image(photo(root, i), (200, 40, 40), seed=i, size=FIRST_SIZE)
    index(root, index_dir, app_model)
    server = start_server(index_dir, tmp_path, {"CLIPSEARCH_RELOAD_INTERVAL_S": "0.05"})
    yield root, index_dir, server
    stop_server(server)


def test_every_answer_during_a_build_comes_from_one_generation(
    served: tuple[Path, Path, LiveServer], app_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, index_dir, server = served
    expected = {"g-000001": {f"p{i:03d}.png": FIRST_SIZE for i in range(FIRST)}}
    second = dict(expected["g-000001"])
    for i in REWRITTEN:
        write_image(photo(root, i), (40, 200, 40), seed=1000 + i, size=REWRITTEN_SIZE)
        second[photo(root, i).name] = REWRITTEN_SIZE
    for i in DELETED:
        photo(root, i).unlink()
        del second[photo(root, i).name]
    for i in ADDED:
        write_image(photo(root, i), (40, 40, 200), seed=i, size=ADDED_SIZE)
        second[photo(root, i).name] = ADDED_SIZE
    expected["g-000002"] = second
    files_on_disk = {p.name: p.stat().st_size for p in root.iterdir()}

    monkeypatch.setattr(indexer.build, "COMMIT_EVERY_N_FILES", 4)  # many commits before the publish
    writing = threading.Event()
    add_image = Catalog.add_image

    def add_image_and_tell(self: Catalog, *args: object, **kwargs: object) -> int:
        writing.set()
        return add_image(self, *args, **kwargs)  # type: ignore[arg-type]  # the real signature, passed through

    monkeypatch.setattr(Catalog, "add_image", add_image_and_tell)
    answers: list[tuple[bool, str, list[dict[str, object]]]] = []  # (asked while writing, generation, results)
    stop = threading.Event()

    def search() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            while not stop.is_set():
                during = writing.is_set()
                response = client.get("/api/search", params={"q": "a red photo", "k": K})
                assert response.status_code == 200, response.text
                body = response.json()
                answers.append((during, body["generation"], body["results"]))

    with httpx.Client(base_url=server.url, timeout=60) as client:  # warm up: the first query loads the text tower
        assert client.get("/api/search", params={"q": "warm up"}).status_code == 200
    searcher = threading.Thread(target=search, daemon=True)
    searcher.start()
    try:
        index(root, index_dir, app_model)
        deadline = time.monotonic() + 30
        while not any(generation == "g-000002" for _, generation, _ in answers[-3:]):
            assert time.monotonic() < deadline, "the server never served the second generation"
            assert searcher.is_alive(), "the searching thread failed"
            time.sleep(0.05)
    finally:
        stop.set()
        searcher.join(30)

    old_during_build = [a for a in answers if a[0] and a[1] == "g-000001"]
    assert len(old_during_build) >= SEARCHES_DURING_BUILD, f"only {len(old_during_build)} answers during the build"
    disagreements = []
    for during, generation, results in answers:
        shown = {str(hit["path"]): (hit["width"], hit["height"]) for hit in results}
        if shown != {path: tuple(size) for path, size in expected[generation].items()}:
            disagreements.append((during, generation, len(results)))
    assert not disagreements, f"{len(disagreements)} of {len(answers)} answers disagree: {disagreements[:5]}"
    with httpx.Client(base_url=server.url) as client:  # and the second generation's image records are the files
        for hit in client.get("/api/search", params={"q": "a photo", "k": K}).json()["results"]:
            info = client.get(f"/api/images/{hit['id']}").json()
            assert info["bytes"] == files_on_disk[info["path"]]


def test_a_server_on_a_retired_generation_answers_503_until_it_loads_the_published_one(
    tmp_path: Path, app_model: Path
) -> None:
    root, index_dir = tmp_path / "photos", tmp_path / "index"
    for i in range(3):
        write_image(photo(root, i), (200, 40, 40), seed=i, size=FIRST_SIZE)
    index(root, index_dir, app_model)
    settings = Settings(index_dir=index_dir, cache_dir=tmp_path / "cache")
    with TestClient(create_app(settings, watch=False)) as client:
        assert client.get("/api/images/1").status_code == 200
        for _ in range(2):  # two publishes: the catalog keeps only what the last two generations show
            with Catalog.open(index_dir) as catalog:
                publish(index_dir, catalog)
        response = client.get("/api/images/1")
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
        assert "republished" in response.json()["detail"]
        client.app.state.runtime.refresh()  # what the watcher does every CLIPSEARCH_RELOAD_INTERVAL_S
        assert client.get("/api/images/1").json()["path"] == "p000.png"
