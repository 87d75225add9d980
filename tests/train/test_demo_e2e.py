"""End to end, offline: train the demo model on the synthetic shapes, check that it retrieves by attributes, including
colour-shape pairs it never saw, then index images it never trained on and ask the running server for "a red circle";
finally run the README's demo command, which reuses the trained model.

The recipe is `make demo`'s, cut from 1,500 to ``STEPS`` optimizer steps (the demo's ``--steps``), to keep the CI
within its time: training ~3.5 min instead of ~8.5 on a slow 2-core machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from clip_model.train import synthetic
from clip_model.train.demo import Recipe, demo_paths
from indexer.cli import main as clip_index
from tests.app.conftest import REPO, start_server, stop_server, wait_until_ready
from tests.support import free_port

pytestmark = pytest.mark.slow  # the module's training takes minutes: left out of make check
STEPS = 600
# The floors are 0.8 and 0.5. At 600 steps, seed 0 measured 1.0 on test (64 queries) and 0.875 on held-out
# (one miss of 8: small blue cross -> large); these stricter floors allow 6 and 1 more misses, for a CPU that sums
# in another order, and fail on a real regression.
TEST_RECALL_AT_1 = 0.9  # attribute queries over new images of combinations seen in training
HELDOUT_RECALL_AT_1 = 0.75  # colour-shape combinations never seen in training
RECIPE = Recipe(steps=STEPS)
TOP = 5


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """(cache dir holding demo/, report) of the demo recipe, trained once for the module by the documented command.

    In a process of its own, as users run it: in this one, threads that earlier tests left running torch would
    share the cores with the training (slower, and a different thread count sums in another order)."""
    cache = tmp_path_factory.mktemp("cache")
    command = [sys.executable, "-m", "clip_model.train", "demo", "--steps", str(STEPS), "--out", str(cache / "demo")]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    return cache, json.loads(demo_paths(cache / "demo", RECIPE)["report"].read_text(encoding="utf-8"))


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


def test_the_server_finds_red_circles_among_unseen_images(demo: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    cache, _ = demo
    paths = demo_paths(cache / "demo", RECIPE)
    data, index_dir = paths["root"] / "data", tmp_path / "index"
    command = ["build", str(data), "--exclude", "train/", "--index-dir", str(index_dir), "--model", str(paths["model"])]
    assert clip_index([*command, "--workers", "0"]) == 0
    server = start_server(index_dir, tmp_path)
    try:
        found = top_records(server.url, "a red circle", records_by_path(data))
    finally:
        stop_server(server)
    assert [(r.color, r.shape) for r in found] == [("red", "circle")] * TOP


def test_the_offline_demo_command_reuses_the_model_and_serves(
    demo: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    cache, _ = demo
    port, log = free_port(), tmp_path / "demo.log"
    env = {**os.environ, "CLIP_MODEL_CACHE": str(cache), "CLIPSEARCH_CACHE_DIR": str(tmp_path / "thumbs")}
    with log.open("wb") as out:
        process = subprocess.Popen(["scripts/demo.sh", "--port", str(port), "--steps", str(STEPS)], cwd=REPO, env=env,
                                   stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
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
