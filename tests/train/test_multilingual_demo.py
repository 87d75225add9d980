"""End to end, offline: train the multilingual demo (shapes captioned in English, German and French, an XLM-RoBERTa
text tower over a vocabulary trained on them, beside the English demo model's locked image tower) by its documented
command, check that attribute queries in each language find the images English queries find, on new images and on
colour-shape pairs never seen in training, then index the images it never trained on and ask the running server in
the three languages.

The English demo model is the session's (``demo_cache``, shared with test_demo_e2e). The recipe is ``clip-train
multilingual``'s, cut to ``STEPS`` optimizer steps and ``TRAIN_IMAGES`` training images (its ``--steps`` and
``--train-images``) to keep the CI within its time; docs/training.md gives the full recipe's numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from clip_model.train.multilingual import Recipe, multilingual_paths, recall_table
from clip_model.train.multilingual_captions import LANGUAGES, attribute_query_in
from indexer.cli import main as clip_index
from tests.app.conftest import REPO, start_server, stop_server
from tests.train.test_demo_e2e import records_by_path, top_records

pytestmark = pytest.mark.slow  # the module's training takes minutes: left out of make check
STEPS = 600
TRAIN_IMAGES = 6_000  # 18,000 pairs: 4.3 epochs at 600 steps of 128
RECIPE = Recipe(steps=STEPS, train_images=TRAIN_IMAGES)
MAX_GAP = 0.1  # the issue's: recall@1 of each language within 0.1 of English's on the held-out split
TEST_RECALL_AT_1 = 0.9  # English attribute queries over new images of combinations seen in training
HELDOUT_RECALL_AT_1 = 0.75  # combinations never seen in training
TOP = 5
# Of a query's first TOP results, how many must have its colour and shape (the first always). Seed 0 at this size
# finds 5 of 5 for every query but German "ein violetter Stern" (a held-out pair): 4, a purple triangle fifth.
TOP_RIGHT = 4
SERVER_QUERIES = (
    {"color": "red", "shape": "circle"},  # a pair seen in training
    {"color": "yellow", "shape": "square"},
    {"color": "purple", "shape": "star"},  # a held-out pair
)


@pytest.fixture(scope="module")
def demo(demo_cache: Path) -> tuple[dict[str, Path], dict[str, Any]]:
    """(the recipe's paths, its report), trained once for the module by the documented command beside the session's
    English demo model, in a process of its own (as the English demo: threads left by earlier tests would share the
    cores)."""
    out = demo_cache / "demo"
    flags = ["--steps", str(STEPS), "--train-images", str(TRAIN_IMAGES), "--out", str(out)]
    command = [sys.executable, "-m", "clip_model.train", "multilingual", *flags]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    paths = multilingual_paths(out, RECIPE)
    return paths, json.loads(paths["report"].read_text(encoding="utf-8"))


def test_queries_in_each_language_find_what_english_queries_find(
    demo: tuple[dict[str, Path], dict[str, Any]],
) -> None:
    _, report = demo
    recall = recall_table(report)
    assert recall["test"]["en"] >= TEST_RECALL_AT_1, recall
    assert recall["heldout"]["en"] >= HELDOUT_RECALL_AT_1, recall
    for language in LANGUAGES:
        assert abs(recall["heldout"][language] - recall["heldout"]["en"]) <= MAX_GAP, recall
        assert abs(recall["test"][language] - recall["test"]["en"]) <= MAX_GAP, recall


def test_the_server_answers_queries_in_three_languages(
    demo: tuple[dict[str, Path], dict[str, Any]], tmp_path: Path
) -> None:
    paths, _ = demo
    data, index_dir = paths["root"] / "data", tmp_path / "index"
    command = ["build", str(data), "--exclude", "train/", "--index-dir", str(index_dir), "--model", str(paths["model"])]
    assert clip_index([*command, "--workers", "0"]) == 0
    records = records_by_path(data)
    server = start_server(index_dir, tmp_path)
    try:
        found = {
            (language, attributes["color"], attributes["shape"]): top_records(
                server.url, attribute_query_in(language, attributes, ("color", "shape")), records
            )
            for attributes in SERVER_QUERIES
            for language in LANGUAGES
        }
    finally:
        stop_server(server)
    for (language, color, shape), top in found.items():
        right = [(r.color, r.shape) == (color, shape) for r in top]
        assert right[0] and sum(right) >= TOP_RIGHT, (language, color, shape, right)
