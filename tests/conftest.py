"""Test options shared by the whole suite.

Markers: ``slow`` marks the tests that dominate the suite's time (full-size parity checkpoints, end-to-end demo
training, schema fuzzing, the benchmark smoke run). ``make test`` runs everything; ``make check`` deselects them
(``-m "not slow"``) for a fast loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.indexer.scenes import PlantedLibrary, index_library, plant_library
from tests.support import save_tiny_model


@dataclass(frozen=True)
class PlantedIndex:
    """A planted library (:mod:`tests.indexer.scenes`) and its index, built with ``model``."""

    library: PlantedLibrary
    index_dir: Path
    model: Path


@pytest.fixture(scope="session")
def planted_index(tmp_path_factory: pytest.TempPathFactory) -> PlantedIndex:
    """16 scenes, the first 4 with a resized, a recompressed, a cropped and an EXIF-rotated copy and the first 2 with
    a byte-identical one, indexed with the tiny random-weight model (indexer and server duplicate tests). Do not
    modify."""
    base = tmp_path_factory.mktemp("planted")
    model = save_tiny_model(base / "tiny.safetensors", seed=0)
    library = plant_library(base / "photos", scenes=16, planted=4)
    return PlantedIndex(library, index_library(library, base / "index", model), model)
