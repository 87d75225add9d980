"""Fixtures for indexer tests: a tiny random-weight CLIP checkpoint and folders of real image files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support import save_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight CLIP small enough to encode hundreds of images per second; carries its config."""
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny.safetensors", seed=0)


@pytest.fixture(scope="session")
def other_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same architecture as ``tiny_model``, other weights."""
    return save_tiny_model(tmp_path_factory.mktemp("models") / "other.safetensors", seed=1)


def write_photo(path: Path, seed: int, size: tuple[int, int] = (96, 64)) -> Path:
    """A small distinct JPEG: random blocks of colour, so every file has different content and embedding."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(4, 6, 3), dtype=np.uint8)
    pixels = np.kron(blocks, np.ones((size[1] // 4, size[0] // 6, 1), dtype=np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90)
    return path


def write_photos(root: Path, count: int, start: int = 0, subdir: str = "") -> list[Path]:
    return [write_photo(root / subdir / f"photo_{i:05d}.jpg", seed=i) for i in range(start, start + count)]
