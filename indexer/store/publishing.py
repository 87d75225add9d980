"""Publishing: the FAISS files are derived from the catalog by :func:`publish`.

The image index is a set of segments that generations share (:mod:`indexer.store.segments`): a publish writes the
new segment and deletion files under their final names (durable, but referenced by no generation yet), then the
generation itself (texts index and manifest) under a temp name, fsynced and renamed into place, and only then
replaces CURRENT atomically. A crash at any point leaves the previous generation published and intact; the next
publish sweeps the leftovers (files no kept generation names).
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

import numpy as np

from .. import _faiss_io
from .._faiss_io import FaissIndex
from ..errors import IndexerError, IndexFormatError
from ..index_choice import AUTO, FLAT_MAX_VECTORS
from .calibration import GroundTruth
from .catalog import Catalog
from .format import (
    CATALOG_FILE,
    CURRENT_FILE,
    CURRENT_TMP_FILE,
    FORMAT_VERSION,
    GENERATION_RE,
    GENERATIONS_DIR,
    MANIFEST_FILE,
    METRIC,
    TEMP_PREFIX,
    TEXT_FACTORY,
    TEXTS_FILE,
    FileDigest,
    Ids,
    Manifest,
    _digest,
    _fsync,
    _write_durably,
    generation_number,
)
from .image_index import ImageIndex, Request, next_image_index
from .lock import _HELD_LOCKS, WriterLock
from .reader import current_generation, read_manifest
from .segments import SEGMENTS_DIR, install_staged

logger = logging.getLogger(__name__)


def publish(
    index_dir: Path,
    catalog: Catalog,
    factory: str | None = None,
    *,
    memory_budget: int | None = None,
    flat_max_vectors: int = FLAT_MAX_VECTORS,
    retrain: bool = False,
) -> Manifest:
    """Bring the FAISS indexes up to date with ``catalog`` and publish them as a new generation of ``index_dir``.

    The image index is updated segment by segment when the previous generation's can be (a new segment for the
    rows written since, deletions, merges: :mod:`indexer.store.image_index`); it is built anew over every row
    when there is none, the model or index type changed, the collection outgrew its training, or on ``retrain``.
    ``factory`` (default: the catalog's, initially "auto") is "auto" or a faiss.index_factory string; the catalog
    remembers it for later publishes. "auto" applies :func:`indexer.index_choice.choose_index` to the current
    number of images, within ``memory_budget`` bytes (default: the catalog's; 0 removes it) and with exact search
    up to ``flat_max_vectors``; so a growing collection switches type when it passes a threshold. A factory string
    gets an "IDMap2," prefix if missing, and trainable indexes are trained on a seeded sample of the vectors
    (IndexBuildError if there are too few). The search-time knob (IVF nprobe, HNSW efSearch) of an index built anew
    is calibrated to recall@10 >= 0.95 against exact search (:func:`indexer.index_choice.calibrate`) and recorded,
    with the recall, in the manifest. Takes the WriterLock unless this process already holds it. The generation is
    written under a temp name, fsynced, renamed into place, then CURRENT is replaced atomically; the generation
    CURRENT named before is kept, older ones and temp dirs of crashed runs are removed. A crash at any point leaves
    the previous generation published. FAISS's thread count is left to the caller.
    """
    index_dir = Path(index_dir)
    if catalog.index_dir.resolve() != index_dir.resolve():
        raise ValueError(f"catalog of {catalog.index_dir} cannot be published into {index_dir}")
    with contextlib.ExitStack() as stack:
        if index_dir.resolve() not in _HELD_LOCKS:
            stack.enter_context(WriterLock(index_dir))
        requested, budget = resolve_index_request(catalog, factory, memory_budget)
        return _publish_locked(index_dir, catalog, Request(requested, budget, flat_max_vectors, retrain))


def resolve_index_request(catalog: Catalog, factory: str | None, memory_budget: int | None) -> tuple[str, int | None]:
    """(index type, budget) a publish with these arguments builds: ``factory`` normalized ("auto" or "IDMap2,...")
    or else the catalog's; ``memory_budget`` bytes, or else the catalog's, with 0 meaning none (None)."""
    requested = factory or catalog.factory()
    requested = AUTO if requested.strip().lower() == AUTO else _faiss_io.normalize_factory(requested)
    budget = catalog.memory_budget() if memory_budget is None else (memory_budget or None)
    return requested, budget


def up_to_date(index_dir: Path, catalog: Catalog, factory: str | None, memory_budget: int | None) -> bool:
    """Whether the published generation already shows every image row as the catalog holds it and was built as a
    publish with ``factory`` and ``memory_budget`` would build it, so that publishing again would change nothing a
    reader sees. False when rows were written or deleted since, also by a run killed before it published.
    Generations published before manifests recorded the request count as built as asked."""
    published = current_generation(index_dir)
    if published is None or catalog.has_unpublished_images(generation_number(published)):
        return False
    manifest = read_manifest(index_dir, published)
    requested, budget = resolve_index_request(catalog, factory, memory_budget)
    if not manifest.requested_factory:
        return True
    return requested == manifest.requested_factory and (requested != AUTO or budget == manifest.memory_budget)


def _publish_locked(index_dir: Path, catalog: Catalog, request: Request) -> Manifest:
    model = catalog.model()
    if model is None:
        raise IndexerError(f"{index_dir / CATALOG_FILE} records no model: call Catalog.set_model() before publishing")
    created_at = time.time()
    previous = current_generation(index_dir)
    prior = _prior_manifest(index_dir, previous)
    generations, segments_dir = index_dir / GENERATIONS_DIR, index_dir / SEGMENTS_DIR
    generations.mkdir(exist_ok=True)
    segments_dir.mkdir(exist_ok=True)
    _remove_dirs(generations, lambda name: name.startswith(TEMP_PREFIX))
    name = _next_generation_name(generations, previous)
    number = generation_number(name)
    with catalog.transaction():  # what the generation holds, and the catalog's record of it, in one step
        catalog.stamp_generation(number)
        text_ids, text_vectors = catalog.text_embeddings()
    images = next_image_index(catalog, model, number, prior, segments_dir, request)
    texts = _faiss_io.build_index(text_ids, text_vectors, model.embed_dim, TEXT_FACTORY)
    del text_vectors
    if request.factory != catalog.factory():
        catalog.set_factory(request.factory)
    if request.budget != catalog.memory_budget():
        catalog.set_memory_budget(request.budget)
    files = _write_segment_files(segments_dir, images, prior)
    counts = {"images": images.count, "texts": int(texts.ntotal)}
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        generation=name,
        created_at=created_at,
        model_name=model.name,
        weights_sha256=model.weights_sha256,
        embed_dim=model.embed_dim,
        preprocess=model.preprocess,
        metric=METRIC,
        factory=images.factory,
        text_factory=TEXT_FACTORY,
        counts=counts,
        files=files,
        requested_factory=request.factory,
        memory_budget=request.budget if request.factory == AUTO else None,
        index_reason=images.reason,
        search_params=images.search_params,
        recall_at_10=images.recall,
        recall_queries=images.recall_queries,
        segments=[segment.to_json() for segment in images.segments],
        trained=images.trained,
        trained_count=images.trained_count,
        auto_choice=images.auto_choice,
        calibration=images.calibration,
        text_long_text=catalog.text_long_text(),
    )
    tmp_dir = generations / f"{TEMP_PREFIX}{name}"
    manifest = _write_generation(tmp_dir, manifest, {TEXTS_FILE: texts})
    _install_generation(tmp_dir, generations / name)
    _replace_current(index_dir, name)
    keep = {name, previous}
    _remove_dirs(generations, lambda entry: GENERATION_RE.fullmatch(entry) is not None and entry not in keep)
    _remove_unreferenced(segments_dir, [manifest] + ([prior] if prior is not None else []))
    catalog.forget_before(generation_number(previous or name))
    logger.info(
        "published %s in %s: %d images in %d segment(s), %d texts (%s)",
        name,
        index_dir,
        counts["images"],
        len(images.segments),
        counts["texts"],
        images.factory,
    )
    return manifest


def _prior_manifest(index_dir: Path, previous: str | None) -> Manifest | None:
    """The published generation's manifest, which the new one updates; None (a full build) when there is none or
    it cannot be read."""
    if previous is None:
        return None
    try:
        return read_manifest(index_dir, previous)
    except (OSError, IndexFormatError) as exc:
        logger.warning("cannot read the manifest of %s (%s): building the image index anew", previous, exc)
        return None


def _write_segment_files(segments_dir: Path, images: ImageIndex, prior: Manifest | None) -> dict[str, FileDigest]:
    """Write the new segment, deletion and trained files (each durable under its final name before the generation
    that names them is published) and return the digests of every file the image index uses; unchanged files keep
    the digests the previous manifest recorded."""
    written: dict[str, FaissIndex | Ids | GroundTruth] = {**images.new_segments, **images.new_deletions}
    if images.new_calibration is not None and images.calibration is not None:
        written[images.calibration] = images.new_calibration
    if images.new_trained is not None and images.trained is not None:
        written[images.trained] = images.new_trained
    files = {}
    for file_name, staged in images.staged.items():
        files[file_name] = _digest(install_staged(staged, file_name))
    for file_name, content in written.items():
        tmp = segments_dir / f"{TEMP_PREFIX}{file_name}"
        if isinstance(content, np.ndarray):
            with tmp.open("wb") as handle:
                np.save(handle, content, allow_pickle=False)
        elif isinstance(content, GroundTruth):
            content.save(tmp)
        else:
            _faiss_io.write_index(content, tmp)
        _fsync(tmp)
        os.replace(tmp, segments_dir / file_name)
        files[file_name] = _digest(segments_dir / file_name)
    _fsync(segments_dir)
    used = [s.file for s in images.segments] + [s.deleted_file for s in images.segments if s.deleted_file]
    used += [name for name in (images.trained, images.calibration) if name]
    known = prior.files if prior is not None else {}
    for file_name in used:
        if file_name not in files:
            files[file_name] = known[file_name] if file_name in known else _digest(segments_dir / file_name)
    return files


def _remove_unreferenced(segments_dir: Path, manifests: list[Manifest]) -> None:
    """Remove the files of ``segments_dir`` that none of the kept generations uses (merged-away segments, older
    deletion files, temp files of a crashed publish)."""
    used = {name for manifest in manifests for name in manifest.files}
    for entry in segments_dir.iterdir():
        if entry.is_file() and entry.name not in used:
            logger.debug("removing %s", entry)
            entry.unlink(missing_ok=True)


def _next_generation_name(generations: Path, previous: str | None) -> str:
    names = [entry.name for entry in generations.iterdir()] + ([previous] if previous else [])
    numbers = [int(m.group(1)) for n in names if (m := GENERATION_RE.fullmatch(n.removeprefix(TEMP_PREFIX)))]
    return f"g-{max(numbers, default=0) + 1:06d}"


def _write_generation(tmp_dir: Path, manifest: Manifest, indexes: Mapping[str, FaissIndex]) -> Manifest:
    """Write the index files and manifest.json into ``tmp_dir``, all fsynced. Returns the manifest with their
    digests added to those it has."""
    tmp_dir.mkdir()
    files = {}
    for file_name, index in indexes.items():
        path = tmp_dir / file_name
        _faiss_io.write_index(index, path)
        _fsync(path)
        files[file_name] = _digest(path)
    manifest = dataclasses.replace(manifest, files={**manifest.files, **files})
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
