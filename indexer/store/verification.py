"""Verification: the published generation checked against its manifest and the catalog (:func:`verify`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .. import _faiss_io
from .._faiss_io import FaissIndex
from ..errors import IndexerError, IndexFormatError
from .catalog import Catalog
from .format import CURRENT_FILE, GENERATIONS_DIR, NORM_TOLERANCE, TEXTS_FILE, Manifest, generation_number
from .reader import _check_files, _read_manifest, current_generation, load_generation
from .segments import LoadedSegment, written_by

logger = logging.getLogger(__name__)

VECTOR_TOLERANCE = 1e-5  # max |FAISS - catalog| per component for exact (non-PQ/SQ) indexes
VERIFY_SAMPLE_SIZE = 1000  # vectors compared between FAISS and the catalog by verify()


def verify(index_dir: Path, *, sample: int = VERIFY_SAMPLE_SIZE) -> list[str]:
    """Check the published generation against its manifest and the catalog. Returns the problems (empty = OK).

    Catalog rows changed after the generation was published (or a later indexer run) are reported at INFO level
    only: the next publish picks them up.
    """
    index_dir = Path(index_dir)
    try:
        name = current_generation(index_dir)
        if name is None:
            return [f"nothing is published in {index_dir}: {CURRENT_FILE} is missing"]
        generation_dir = index_dir / GENERATIONS_DIR / name
        if not generation_dir.is_dir():
            return [f"{CURRENT_FILE} names {name}, but {generation_dir} does not exist"]
        manifest = _read_manifest(generation_dir)
    except (OSError, IndexFormatError) as exc:
        return [str(exc)]
    problems = list(_check_files(index_dir, manifest, checksums=True).values())
    if problems:
        return problems
    try:
        loaded = load_generation(index_dir, name, verify_checksums=False)  # hashed just above
    except (OSError, IndexFormatError) as exc:
        return [str(exc)]
    number = generation_number(manifest.generation)
    for segment, saved in zip(loaded.segments, loaded.saved_params, strict=True):
        if written_by(segment.record.file) not in (number, None):
            continue  # written by an earlier generation with the knob of then; the manifest's is set on load
        if segment.record.id_range is not None:
            continue  # a part of a split build: written before the knob was calibrated over all the parts
        if any(saved.get(name) != value for name, value in manifest.search_params.items()):
            problems.append(
                f"{segment.record.file} has search parameters {saved}, the manifest records {manifest.search_params}"
            )
    images, duplicates = _live_images(loaded.segments)
    if duplicates:
        problems.append(f"{len(duplicates)} image ids are live in two segments: {duplicates[:5]}")
    texts = {int(i): loaded.texts for i in _faiss_io.index_ids(loaded.texts)}
    try:
        catalog = Catalog.open(index_dir, readonly=True)
    except IndexerError as exc:
        return [*problems, str(exc)]
    with catalog, catalog.snapshot():
        problems += _check_catalog(catalog, manifest, {"images": images, "texts": texts}, sample)
    return problems


def _live_images(segments: list[LoadedSegment]) -> tuple[dict[int, FaissIndex], list[int]]:
    """id -> the segment index holding its live vector, and the ids live in more than one segment."""
    live: dict[int, FaissIndex] = {}
    duplicates = []
    for segment in segments:
        ids = _faiss_io.index_ids(segment.index)
        if segment.deleted is not None:
            ids = ids[~np.isin(ids, segment.deleted.ids())]
        for image_id in ids.tolist():
            if image_id in live:
                duplicates.append(image_id)
            live[image_id] = segment.index
    return live, sorted(duplicates)


def _check_catalog(
    catalog: Catalog, manifest: Manifest, held: Mapping[str, Mapping[int, FaissIndex]], sample: int
) -> list[str]:
    """The ids each index holds (``held``: table -> id -> the index holding it) against the catalog's rows."""
    last_run = catalog.last_run()
    catalog_moved_on = last_run is not None and last_run["started_at"] > manifest.created_at
    model = catalog.model()
    if model is None or not model.same_embeddings(manifest.model):
        message = f"the catalog's model {model} differs from the model of generation {manifest.generation}"
        if not catalog_moved_on:
            return [message]
        logger.info("%s: a later run (--rebuild?) switched models; its publish will replace the generation", message)
        return []
    problems = []
    for table, where in (("images", "the image segments"), ("texts", TEXTS_FILE)):
        states = catalog._states(table)  # id -> (has an embedding, updated_at)
        newer = {i for i, (_, updated_at) in states.items() if updated_at > manifest.created_at}
        if newer:
            logger.info("%d %s rows changed after %s was published", len(newer), table, manifest.generation)
        faiss_ids = set(held[table])
        unknown = sorted(i for i in faiss_ids - newer if not states.get(i, (False, 0.0))[0])
        if unknown and (catalog_moved_on or newer):  # deleted by a later run: the next publish drops them
            logger.info("%d ids in %s were removed from the catalog after publishing", len(unknown), where)
        elif unknown:
            problems.append(f"{len(unknown)} ids in {where} have no usable {table} row in the catalog: {unknown[:5]}")
        missing = sorted(i for i, (usable, _) in states.items() if usable and i not in faiss_ids and i not in newer)
        if missing:
            problems.append(f"{len(missing)} {table} rows of the catalog are missing from {where}: {missing[:5]}")
        lossy = _faiss_io.is_lossy(manifest.factory if table == "images" else manifest.text_factory)
        checked = sorted(faiss_ids - newer - set(unknown))
        problems += _check_vectors(catalog, table, None if lossy else held[table], checked, sample)
    return problems


def _check_vectors(
    catalog: Catalog, table: str, held: Mapping[int, FaissIndex] | None, ids: list[int], sample: int
) -> list[str]:
    """Up to ``sample`` of ``ids``: the catalog vector is unit-norm and, if ``held`` (id -> index) is given, equal
    to the one its index holds."""
    if not ids:
        return []
    chosen = np.random.default_rng(0).choice(np.asarray(ids, dtype=np.int64), size=min(sample, len(ids)), replace=False)
    bad_norm, differ = [], []
    for item_id in chosen.tolist():
        stored = catalog._vector(table, item_id)
        if stored is None or abs(float(np.linalg.norm(stored)) - 1.0) > NORM_TOLERANCE:
            bad_norm.append(item_id)
        elif held is not None:
            vector = _faiss_io.reconstruct(held[item_id], item_id)
            if vector is None or float(np.max(np.abs(vector - stored))) > VECTOR_TOLERANCE:
                differ.append(item_id)
    problems = []
    if bad_norm:
        problems.append(f"{len(bad_norm)} sampled {table} embeddings are not unit-norm: ids {bad_norm[:5]}")
    if differ:
        problems.append(f"{len(differ)} sampled {table} vectors in FAISS differ from the catalog: ids {differ[:5]}")
    return problems
