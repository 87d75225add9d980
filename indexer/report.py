"""What ``clip-index info`` shows: the index's model, counts, published generation, last run, skipped files.

The image index's type and its recall@10 against exact search come from the manifest: they were measured when the
generation was published (``indexer.index_choice.calibrate``), over the vectors it holds, so ``info`` stays a
cheap read and describes what is served even after the catalog moved on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import IndexNotFoundError
from .store import Catalog, current_generation, read_manifest


def index_info(index_dir: Path, skipped_limit: int | None = 20) -> dict[str, Any]:
    """A JSON-ready summary of ``index_dir``; ``skipped_files`` lists (stored path, reason) by path, at most
    ``skipped_limit`` of them (None: all). Paths are in the stored form of :mod:`indexer.paths` (valid UTF-8, lossless);
    show them with ``paths.display``."""
    if not index_dir.is_dir():
        raise IndexNotFoundError(f"no index directory at {index_dir}")
    with Catalog.open(index_dir, readonly=True) as catalog:
        model = catalog.model()
        counts = catalog.counts()
        skipped = catalog.skipped()
        last_run = catalog.last_run()
    generation = current_generation(index_dir)
    manifest = read_manifest(index_dir, generation) if generation else None
    return {
        "index_dir": str(index_dir),
        "model": model.name if model else None,
        "weights_sha256": model.weights_sha256 if model else None,
        "embed_dim": model.embed_dim if model else None,
        "images_indexed": counts.get("ok", 0),
        "images_skipped": counts.get("skipped", 0),
        "texts_indexed": counts.get("texts", 0),
        "published_generation": generation,
        "published_at": manifest.created_at if manifest else None,
        "published_images": manifest.counts.get("images") if manifest else None,
        "factory": manifest.factory if manifest else None,
        "index_type": (manifest.requested_factory or None) if manifest else None,
        "index_reason": (manifest.index_reason or None) if manifest else None,
        "memory_budget": manifest.memory_budget if manifest else None,
        "search_params": manifest.search_params if manifest else None,
        "recall_at_10": manifest.recall_at_10 if manifest else None,
        "recall_queries": manifest.recall_queries if manifest else None,
        "last_run": last_run,
        "skipped_files": skipped[:skipped_limit],
    }
