"""End to end, offline: train the demo model on the synthetic shapes, check that it retrieves by attributes, including
colour-shape pairs it never saw, then index images it never trained on and ask the running server for "a red circle"
and whether its default relevance cut-off keeps what the collection holds and drops what it does not; finally run the
README's demo command, which reuses the trained model.

The recipe is `make demo`'s own (1,500 optimizer steps: training ~4 min on a quiet 2-core machine, ~8.5 on a slow
one). Cut to 600 steps it retrieves as well at rank 1, but its best matches for things it never saw ("a tax form")
score as high as its true matches further down (bench/README.md, "relevance"), so no cut-off could pass the
relevance test."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.relevance import DEFAULT_MIN_RELEVANCE, unrelated_prompts
from clip_model.train import synthetic
from clip_model.train.demo import Recipe, demo_paths
from indexer.cli import main as clip_index
from tests.app.conftest import REPO, start_server, stop_server, wait_until_ready
from tests.support import free_port

pytestmark = pytest.mark.slow  # the module's training takes minutes: left out of make check
RECIPE = Recipe()
# The floors are 0.8 and 0.5. Seed 0 measured 1.0 on test (64 queries) and on held-out (8); these stricter
# floors allow 6 and 2 misses, for a CPU that sums in another order, and fail on a real regression.
TEST_RECALL_AT_1 = 0.9  # attribute queries over new images of combinations seen in training
HELDOUT_RECALL_AT_1 = 0.75  # colour-shape combinations never seen in training
TOP = 5
RELEVANCE_FIELDS = (("color", "shape"), ("size", "color", "shape"))  # the attribute phrasings of the demo's captions
RELEVANCE_TOP = 10  # the first results a user looks at
# Of the true matches among the attribute queries' first RELEVANCE_TOP results (what the model ranks first: the
# cut-off is there to keep those, not to mend the ranking), the share that must clear the default cut-off. Seed 0
# keeps all of them; this allows 1 in 20 to fall below it on a CPU that sums in another order.
KEPT_FRACTION = 0.95
ABSENT_QUERIES = (
    "a tax form",
    "an invoice",
    "a receipt",
    "a cat",
    "a dog",
    "a bird",
    "a car",
    "a bicycle",
    "a pizza",
    "a sandwich",
    "a person",
    "a baby",
    "a beach",
    "a laptop",
)


@pytest.fixture(scope="module")
def demo(demo_cache: Path) -> tuple[Path, dict[str, Any]]:
    """(cache dir holding demo/, report) of the demo recipe (the session's ``demo_cache``)."""
    return demo_cache, json.loads(demo_paths(demo_cache / "demo", RECIPE)["report"].read_text(encoding="utf-8"))


def test_demo_model_retrieves_by_attributes(demo: tuple[Path, dict[str, Any]]) -> None:
    _, report = demo
    assert report["test"]["text_to_image_recall@1"] >= TEST_RECALL_AT_1, report
    assert report["heldout"]["text_to_image_recall@1"] >= HELDOUT_RECALL_AT_1, report


def top_records(url: str, query: str, records: dict[str, synthetic.ShapeRecord]) -> list[synthetic.ShapeRecord]:
    results = httpx.get(f"{url}/api/search", params={"q": query, "k": TOP}, timeout=30).json()["results"]
    return [records[hit["path"]] for hit in results]


def records_by_path(data: Path) -> dict[str, synthetic.ShapeRecord]:
    found = {}
    for split in ("test", "heldout"):
        for record in synthetic.load_records(data / split):
            found[Path(record.path).relative_to(data).as_posix()] = record
    return found


@pytest.fixture(scope="module")
def demo_index(demo: tuple[Path, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data root, index dir): the images the demo model never trained on (test and held-out splits), indexed."""
    cache, _ = demo
    paths = demo_paths(cache / "demo", RECIPE)
    data, index_dir = paths["root"] / "data", tmp_path_factory.mktemp("demo-index") / "index"
    command = ["build", str(data), "--exclude", "train/", "--index-dir", str(index_dir), "--model", str(paths["model"])]
    assert clip_index([*command, "--workers", "0"]) == 0
    return data, index_dir


def test_the_server_finds_red_circles_among_unseen_images(demo_index: tuple[Path, Path], tmp_path: Path) -> None:
    data, index_dir = demo_index
    server = start_server(index_dir, tmp_path)
    try:
        found = top_records(server.url, "a red circle", records_by_path(data))
    finally:
        stop_server(server)
    assert [(r.color, r.shape) for r in found] == [("red", "circle")] * TOP


def search(url: str, query: str, **params: float) -> list[dict[str, Any]]:
    response = httpx.get(f"{url}/api/search", params={"q": query, **params}, timeout=30)
    assert response.status_code == 200, response.text
    results: list[dict[str, Any]] = response.json()["results"]
    return results


def test_the_default_relevance_cut_off_keeps_true_matches_and_drops_absent_things(
    demo_index: tuple[Path, Path], tmp_path: Path
) -> None:
    data, index_dir = demo_index
    calibration_words = {word for prompt in unrelated_prompts() for word in prompt.split()}
    assert not [q for q in ABSENT_QUERIES if set(q.split()[1:]) & calibration_words]  # held out from calibration
    truth: dict[str, set[str]] = {}
    for path, record in records_by_path(data).items():
        for fields in RELEVANCE_FIELDS:
            truth.setdefault(synthetic.attribute_query(record, fields), set()).add(path)
    server = start_server(index_dir, tmp_path)
    try:
        # the relevance of the true matches among each attribute query's first results, the page's cut-off off
        kept = {
            query: [hit["relevance"] for hit in search(server.url, query, k=RELEVANCE_TOP) if hit["path"] in paths]
            for query, paths in sorted(truth.items())
        }
        absent = {query: search(server.url, query, min_relevance=DEFAULT_MIN_RELEVANCE) for query in ABSENT_QUERIES}
    finally:
        stop_server(server)
    assert not {query: results for query, results in absent.items() if results}
    found = [r for values in kept.values() for r in values]
    above = sum(r >= DEFAULT_MIN_RELEVANCE for r in found)
    assert above >= KEPT_FRACTION * len(found), f"{above} of {len(found)} true matches at or above the cut-off"
    assert not [query for query, values in kept.items() if not values or max(values) < DEFAULT_MIN_RELEVANCE], kept


def test_the_offline_demo_command_reuses_the_model_and_serves(
    demo: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    cache, _ = demo
    port, log = free_port(), tmp_path / "demo.log"
    env = {**os.environ, "CLIP_MODEL_CACHE": str(cache), "CLIPSEARCH_CACHE_DIR": str(tmp_path / "thumbs")}
    with log.open("wb") as out:
        process = subprocess.Popen(["scripts/demo.sh", "--port", str(port)], cwd=REPO, env=env, stdout=out,
                                   stderr=subprocess.STDOUT)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(url, process, log, timeout=300)
        found = top_records(
            url, "a small blue triangle", records_by_path(demo_paths(cache / "demo", RECIPE)["root"] / "data")
        )
    finally:
        process.terminate()
        process.wait(30)
    assert "reusing the demo model" in log.read_text()
    assert (found[0].color, found[0].shape) == ("blue", "triangle")
    assert [r.color for r in found[:3]] == ["blue"] * 3
