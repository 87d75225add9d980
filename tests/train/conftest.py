"""Shared fixtures for training tests: a tiny CLIP architecture and a tiny captioned dataset of coloured shapes."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from tests.support import TINY_ARCH, TINY_IMAGE_SIZE

REPO = Path(__file__).resolve().parents[2]
DEMO_CACHE_ENV = "CLIPSEARCH_TEST_DEMO_CACHE"  # a folder that keeps the trained demo model between runs
DEMO_TRAIN_TIMEOUT_S = 1800

IMAGE_SIDE = TINY_IMAGE_SIZE  # pixels; the tiny architecture's input size, so preprocessing does not resample
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle")
SHAPES_COUNT = 64  # images in the shared dataset: 8 captions x 8 images


def write_shapes(root: Path, count: int, seed: int = 0) -> Path:
    """``count`` PNGs of a coloured square or circle on grey, plus ``captions.jsonl`` (path, caption, label).

    Captions are "a <colour> <shape>" (8 distinct ones, cycled), labels "<colour> <shape>"; position, size and
    background vary with ``seed``. Returns ``root``.
    """
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    kinds = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    records = []
    for i in range(count):
        colour, shape = kinds[i % len(kinds)]
        grey = rng.randrange(100, 160)
        image = Image.new("RGB", (IMAGE_SIDE, IMAGE_SIDE), (grey, grey, grey))
        size = rng.randrange(12, 22)
        left, top = rng.randrange(0, IMAGE_SIDE - size), rng.randrange(0, IMAGE_SIDE - size)
        box = (left, top, left + size, top + size)
        draw = ImageDraw.Draw(image)
        (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[colour])
        name = f"{i:03d}.png"
        image.save(root / name)
        records.append({"path": name, "caption": f"a {colour} {shape}", "label": f"{colour} {shape}"})
    lines = "".join(json.dumps(record) + "\n" for record in records)
    (root / "captions.jsonl").write_text(lines, encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of 64 labelled 32x32 shape images with captions.jsonl (do not modify it)."""
    return write_shapes(tmp_path_factory.mktemp("shapes"), SHAPES_COUNT)


@pytest.fixture(scope="session")
def tiny_arch_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:data:`TINY_ARCH` as a JSON architecture file (the format of clip_model/configs/*.json)."""
    path = tmp_path_factory.mktemp("arch") / "tiny.json"
    path.write_text(json.dumps(TINY_ARCH), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder whose ``demo/`` holds the demo model of ``clip_model.train.demo.Recipe()`` (the README's), trained
    once per session by the documented command: the end-to-end demo test and the fine-tuning demo start from it.

    In a process of its own, as users run it: in this one, threads that earlier tests left running torch would
    share the cores with the training (slower, and a different thread count sums in another order). With
    ``CLIPSEARCH_TEST_DEMO_CACHE`` set, that folder is used and kept, so the model is trained once across runs on a
    developer's machine; the recipe's key names the model's folder, so a changed recipe trains again."""
    cache = Path(os.environ[DEMO_CACHE_ENV]) if os.environ.get(DEMO_CACHE_ENV) else tmp_path_factory.mktemp("cache")
    command = [sys.executable, "-m", "clip_model.train", "demo", "--out", str(cache / "demo")]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=DEMO_TRAIN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    return cache
