"""Publishing: the FAISS files are derived from the catalog and rebuilt by :func:`publish`.

A generation is written under a temp name, fsynced, renamed into place, and only then published by atomically
replacing CURRENT, so a crash at any point leaves the previous generation published and intact; the next publish
sweeps the leftovers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from .. import _faiss_io
from .._faiss_io import FaissIndex
from ..errors import IndexerError
from ..index_choice import AUTO, FLAT_MAX_VECTORS, build_calibrated, choose_index
from .catalog import Catalog
from .format import (
    CATALOG_FILE,
    CURRENT_FILE,
    CURRENT_TMP_FILE,
    FORMAT_VERSION,
    GENERATION_RE,
    GENERATIONS_DIR,
    IMAGES_FILE,
    MANIFEST_FILE,
    METRIC,
    TEMP_PREFIX,
    TEXT_FACTORY,
    TEXTS_FILE,
    Manifest,
    _digest,
    _fsync,
    _write_durably,
    generation_number,
)
from .lock import _HELD_LOCKS, WriterLock
from .reader import current_generation

logger = logging.getLogger(__name__)


def publish(
    index_dir: Path,
    catalog: Catalog,
    factory: str | None = None,
    *,
    memory_budget: int | None = None,
    flat_max_vectors: int = FLAT_MAX_VECTORS,
) -> Manifest:
    """Build the FAISS indexes from ``catalog`` and publish them as a new generation of ``index_dir``.

    ``factory`` (default: the catalog's, initially "auto") is "auto" or a faiss.index_factory string; the catalog
    remembers it for later publishes. "auto" applies :func:`indexer.index_choice.choose_index` to the current
    number of images, within ``memory_budget`` bytes (default: the catalog's; 0 removes it) and with exact search
    up to ``flat_max_vectors``; so a growing collection switches type when it passes a threshold. A factory string
    gets an "IDMap2," prefix if missing, and trainable indexes are trained on a seeded sample of the vectors
    (IndexBuildError if there are too few). The search-time knob (IVF nprobe, HNSW efSearch) is then calibrated
    to recall@10 >= 0.95 against exact search (:func:`indexer.index_choice.calibrate`) and recorded, with the
    recall, in the manifest. Takes the WriterLock unless this process already holds it. The generation is written
    under a temp name, fsynced, renamed into place, then CURRENT is replaced atomically; the generation CURRENT
    named before is kept, older ones and temp dirs of crashed runs are removed. A crash at any point leaves the
    previous generation published. FAISS's thread count is left to the caller.
    """
    index_dir = Path(index_dir)
    if catalog.index_dir.resolve() != index_dir.resolve():
        raise ValueError(f"catalog of {catalog.index_dir} cannot be published into {index_dir}")
    with contextlib.ExitStack() as stack:
        if index_dir.resolve() not in _HELD_LOCKS:
            stack.enter_context(WriterLock(index_dir))
        requested, budget = resolve_index_request(catalog, factory, memory_budget)
        return _publish_locked(index_dir, catalog, requested, budget, flat_max_vectors)


def resolve_index_request(catalog: Catalog, factory: str | None, memory_budget: int | None) -> tuple[str, int | None]:
    """(index type, budget) a publish with these arguments builds: ``factory`` normalized ("auto" or "IDMap2,...")
    or else the catalog's; ``memory_budget`` bytes, or else the catalog's, with 0 meaning none (None)."""
    requested = factory or catalog.factory()
    requested = AUTO if requested.strip().lower() == AUTO else _faiss_io.normalize_factory(requested)
    budget = catalog.memory_budget() if memory_budget is None else (memory_budget or None)
    return requested, budget


def _publish_locked(
    index_dir: Path, catalog: Catalog, requested: str, budget: int | None, flat_max_vectors: int
) -> Manifest:
    model = catalog.model()
    if model is None:
        raise IndexerError(f"{index_dir / CATALOG_FILE} records no model: call Catalog.set_model() before publishing")
    created_at = time.time()
    previous = current_generation(index_dir)
    generations = index_dir / GENERATIONS_DIR
    generations.mkdir(exist_ok=True)
    _remove_dirs(generations, lambda name: name.startswith(TEMP_PREFIX))
    name = _next_generation_name(generations, previous)
    with catalog.transaction():  # what the generation holds, and the catalog's record of it, in one step
        catalog.stamp_generation(generation_number(name))
        image_ids, image_vectors = catalog.embeddings()
        text_ids, text_vectors = catalog.text_embeddings()
    started = time.monotonic()
    if requested == AUTO:
        choice = choose_index(len(image_ids), model.embed_dim, budget, flat_max_vectors=flat_max_vectors)
        factory, reason = choice.factory, choice.reason
    else:
        factory, reason = requested, "the factory asked for"
    built = build_calibrated(
        image_ids, image_vectors, model.embed_dim, factory, auto=requested == AUTO, memory_budget_bytes=budget
    )
    images, factory, tuned, reason = built.index, built.factory, built.calibration, reason + built.note
    seconds, params = time.monotonic() - started, tuned.search_params or "no search parameters"
    recall = "n/a" if tuned.recall is None else f"{tuned.recall:.3f}"
    logger.info(
        "built and calibrated %s over %d images in %.1fs (%s); %s, recall@10 %s on %d queries",
        factory,
        len(image_ids),
        seconds,
        reason,
        params,
        recall,
        tuned.queries,
    )
    indexes = {
        IMAGES_FILE: images,
        TEXTS_FILE: _faiss_io.build_index(text_ids, text_vectors, model.embed_dim, TEXT_FACTORY),
    }
    del image_vectors, text_vectors
    if requested != catalog.factory():
        catalog.set_factory(requested)
    if budget != catalog.memory_budget():
        catalog.set_memory_budget(budget)
    counts = {"images": int(indexes[IMAGES_FILE].ntotal), "texts": int(indexes[TEXTS_FILE].ntotal)}
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        generation=name,
        created_at=created_at,
        model_name=model.name,
        weights_sha256=model.weights_sha256,
        embed_dim=model.embed_dim,
        preprocess=model.preprocess,
        metric=METRIC,
        factory=factory,
        text_factory=TEXT_FACTORY,
        counts=counts,
        files={},
        requested_factory=requested,
        memory_budget=budget if requested == AUTO else None,
        index_reason=reason,
        search_params=tuned.search_params,
        recall_at_10=tuned.recall,
        recall_queries=tuned.queries,
    )
    tmp_dir = generations / f"{TEMP_PREFIX}{name}"
    manifest = _write_generation(tmp_dir, manifest, indexes)
    _install_generation(tmp_dir, generations / name)
    _replace_current(index_dir, name)
    keep = {name, previous}
    _remove_dirs(generations, lambda entry: GENERATION_RE.fullmatch(entry) is not None and entry not in keep)
    catalog.forget_before(generation_number(previous or name))
    logger.info("published %s in %s: %d images, %d texts (%s)", name, index_dir, *counts.values(), factory)
    return manifest


def _next_generation_name(generations: Path, previous: str | None) -> str:
    names = [entry.name for entry in generations.iterdir()] + ([previous] if previous else [])
    numbers = [int(m.group(1)) for n in names if (m := GENERATION_RE.fullmatch(n.removeprefix(TEMP_PREFIX)))]
    return f"g-{max(numbers, default=0) + 1:06d}"


def _write_generation(tmp_dir: Path, manifest: Manifest, indexes: Mapping[str, FaissIndex]) -> Manifest:
    """Write the index files and manifest.json into ``tmp_dir``, all fsynced. Returns the manifest with digests."""
    tmp_dir.mkdir()
    files = {}
    for file_name, index in indexes.items():
        path = tmp_dir / file_name
        _faiss_io.write_index(index, path)
        _fsync(path)
        files[file_name] = _digest(path)
    manifest = dataclasses.replace(manifest, files=files)
    _write_durably(tmp_dir / MANIFEST_FILE, manifest.to_json())
    _fsync(tmp_dir)
    return manifest


def _install_generation(tmp_dir: Path, final_dir: Path) -> None:
    os.rename(tmp_dir, final_dir)
    _fsync(final_dir.parent)


def _replace_current(index_dir: Path, name: str) -> None:
    tmp = index_dir / CURRENT_TMP_FILE
    _write_durably(tmp, f"{name}\n")
    os.replace(tmp, index_dir / CURRENT_FILE)
    _fsync(index_dir)


def _remove_dirs(parent: Path, condition: Callable[[str], bool]) -> None:
    for entry in parent.iterdir():
        if entry.is_dir() and condition(entry.name):
            logger.debug("removing %s", entry)
            shutil.rmtree(entry, ignore_errors=True)
