"""What the tests of ``clip-index encode`` share: a folder of real images with files that cannot be indexed, and
readings of shards directories and indexes by stored path."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from indexer.shards import list_shards, read_manifest, read_shard
from indexer.store import Catalog, PublishedIndex
from tests.indexer.conftest import write_photo, write_photos

UNINDEXABLE = {  # stored path -> the category of its skip reason
    "empty.jpg": "empty file",
    "notes.png": "not an image",
    "gone.jpg": "dangling symlink",
}


def image_folder(root: Path, photos: int = 24) -> Path:
    """``photos`` distinct JPEGs (some in a subfolder, one with a PNG twin) and the UNINDEXABLE entries."""
    write_photos(root, photos - photos // 3)
    write_photos(root, photos // 3, start=photos - photos // 3, subdir="trip")
    write_photo(root / "trip" / "wide.png", seed=999, size=(180, 60))
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.png").write_text("not an image\n")
    (root / "gone.jpg").symlink_to(root / "nowhere.jpg")
    return root


def shard_rows(shards_dir: Path) -> dict[str, tuple[Any, ...]]:
    """stored path -> (sha256, size, mtime_ns, width, height, error, vector or None) over every shard of the
    directory; AssertionError if a path is in two shards or twice in one."""
    model = read_manifest(shards_dir).model
    rows: dict[str, tuple[Any, ...]] = {}
    seen: Counter[str] = Counter()
    for path in list_shards(shards_dir):
        shard = read_shard(path, model)
        vectors = iter(shard.embeddings)
        for i, stored in enumerate(shard.paths):
            seen[stored] += 1
            error = shard.errors[i]
            facts = (shard.sha256[i], int(shard.size[i]), int(shard.mtime_ns[i]), shard.width[i], shard.height[i])
            rows[stored] = (*facts, error, None if error is not None else next(vectors))
    twice = [stored for stored, count in seen.items() if count > 1]
    assert not twice, f"in more than one row: {twice}"
    return rows


def index_vectors(index_dir: Path) -> dict[str, np.ndarray | str]:
    """stored path -> the catalog's vector of an ok image, or the reason of a skipped one."""
    with Catalog.open(index_dir, readonly=True) as catalog:
        records = catalog.images([record.id for record in catalog.files().values()])
        out: dict[str, np.ndarray | str] = {}
        for image_id, record in records.items():
            vector = catalog.embedding(image_id)
            out[record.path] = vector if vector is not None else (record.error or "")
    return out


def search_by_path(index_dir: Path, queries: np.ndarray, k: int = 8) -> list[list[str]]:
    """The paths of the published index's top ``k`` for each query, best first."""
    with PublishedIndex.open(index_dir) as index:
        hits = index.search(queries, k=k)
        records = index.images([hit.id for row in hits for hit in row])
    return [[records[hit.id].path for hit in row] for row in hits]


def max_vector_difference(a: dict[str, np.ndarray | str], b: dict[str, np.ndarray | str]) -> float:
    """The largest absolute difference between the vectors two readings give one path; AssertionError if they
    differ in paths or in which paths are skipped, and why."""
    assert a.keys() == b.keys()
    worst = 0.0
    for path, value in a.items():
        other = b[path]
        if isinstance(value, str) or isinstance(other, str):
            assert value == other, path
            continue
        worst = max(worst, float(np.abs(value - other).max()))
    return worst
