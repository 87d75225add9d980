"""The image index of a new generation: updated segment by segment from the previous one, or built anew.

:func:`next_image_index` decides (:mod:`indexer.store.segments` has the policy) and returns what the publish must
write: new segment files, new deletion files and the manifest's fields. An update copies nothing that did not
change: the previous segments stay where they are, referenced by both manifests.

An update sets the search parameter (IVF nprobe, HNSW efSearch) again against the ground truth it keeps up to date
(:mod:`indexer.store.calibration`), which costs the new rows, not the collection.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import _faiss_io
from .._faiss_io import FaissIndex
from ..index_choice import AUTO, build_calibrated, choose_index
from .calibration import GroundTruth, recalibrate
from .catalog import Catalog
from .format import Ids, Manifest, ModelInfo, generation_number
from .segments import (
    RETRAIN_FACTOR,
    LoadedSegment,
    SegmentRecord,
    deleted_file,
    merges,
    new_segment,
    segment_file,
    trained_template,
)

logger = logging.getLogger(__name__)


@dataclass
class ImageIndex:
    """What a publish writes for the image index, and the manifest fields that describe it."""

    factory: str
    segments: list[SegmentRecord]
    new_segments: dict[str, FaissIndex] = field(default_factory=dict)  # file name -> index to write
    new_deletions: dict[str, Ids] = field(default_factory=dict)  # file name -> sorted ids to write
    trained: str | None = None
    new_trained: FaissIndex | None = None  # written as ``trained`` when set
    trained_count: int = 0
    auto_choice: str = ""
    calibration: str | None = None  # the ground truth the knob is set against (indexer.store.calibration)
    new_calibration: GroundTruth | None = None  # written as ``calibration`` when set
    search_params: dict[str, int] = field(default_factory=dict)
    recall: float | None = None
    recall_queries: int = 0
    reason: str = ""
    rebuilt: bool = False

    @property
    def count(self) -> int:
        return sum(s.live for s in self.segments)


@dataclass(frozen=True)
class Request:
    """What the publish was asked for: the index type ("auto" or a normalized factory), the memory budget, and
    whether to train again whatever the policy says."""

    factory: str
    budget: int | None
    flat_max_vectors: int
    retrain: bool = False


def next_image_index(
    catalog: Catalog,
    model: ModelInfo,
    generation: int,
    prior: Manifest | None,
    segments_dir: Path,
    request: Request,
) -> ImageIndex:
    """The image index of generation ``generation`` (already stamped in ``catalog``): the published generation's
    (``prior``) updated, or one segment over every row when :func:`_rebuild_reason` gives a reason. An update adds
    one segment of the rows stamped after the generations ``prior`` covers (a publish that crashed before
    replacing CURRENT may have stamped some), deletes the versions ``prior`` shows that are superseded since, and
    makes the merges due."""
    total = catalog.image_count()
    choice = choose_index(total, model.embed_dim, request.budget, flat_max_vectors=request.flat_max_vectors)
    reason = _rebuild_reason(prior, model, request, total, choice.factory)
    if reason is not None or prior is None:
        logger.info("building the image index over all %d images: %s", total, reason)
        return _rebuild(catalog, model, generation, request, choice.factory, choice.reason)
    return _update(catalog, model, generation, prior, segments_dir)


def _rebuild_reason(
    prior: Manifest | None, model: ModelInfo, request: Request, total: int, auto_choice: str
) -> str | None:
    """Why the image index must be built anew from every row, or None when the previous one can be updated."""
    if prior is None:
        return "nothing published before"
    if prior.format_version < 2:
        return "the published generation predates segments"
    if not prior.model.same_embeddings(model):
        return "the model changed"
    if request.retrain:
        return "--retrain"
    if request.factory != prior.requested_factory:
        return f"another index type was asked for ({request.factory}, before {prior.requested_factory})"
    if request.factory == AUTO and request.budget != prior.memory_budget:
        return f"another memory budget was asked for ({request.budget}, before {prior.memory_budget})"
    if request.factory == AUTO and auto_choice != prior.auto_choice:
        return f"the collection now calls for {auto_choice} (was {prior.auto_choice})"
    if prior.trained and not prior.trained_count / RETRAIN_FACTOR <= total <= prior.trained_count * RETRAIN_FACTOR:
        return f"the collection went from {prior.trained_count} to {total} images since the index was trained"
    return None


def _rebuild(
    catalog: Catalog, model: ModelInfo, generation: int, request: Request, auto_choice: str, auto_reason: str
) -> ImageIndex:
    started = time.monotonic()
    ids, vectors = catalog.embeddings()
    auto = request.factory == AUTO
    factory, reason = (auto_choice, auto_reason) if auto else (request.factory, "the factory asked for")
    built = build_calibrated(ids, vectors, model.embed_dim, factory, auto=auto, memory_budget_bytes=request.budget)
    template = trained_template(built.index, built.factory, model.embed_dim)
    truth = None if _faiss_io.search_knob(built.index) is None else GroundTruth.of(ids, vectors)
    del vectors
    name = segment_file(0, generation, generation)
    tuned = built.calibration
    logger.info(
        "built and calibrated %s over %d images in %.1fs (%s); %s, recall@10 %s on %d queries",
        built.factory,
        len(ids),
        time.monotonic() - started,
        reason + built.note,
        tuned.search_params or "no search parameters",
        "n/a" if tuned.recall is None else f"{tuned.recall:.3f}",
        tuned.queries,
    )
    return ImageIndex(
        factory=built.factory,
        segments=[SegmentRecord(name, 0, generation, int(built.index.ntotal))],
        new_segments={name: built.index},
        trained=None if template is None else f"trained.g{generation:06d}.faiss",
        new_trained=template,
        trained_count=len(ids),
        auto_choice=auto_choice if auto else "",
        calibration=None if truth is None else calibration_file(generation),
        new_calibration=truth,
        search_params=tuned.search_params,
        recall=tuned.recall,
        recall_queries=tuned.queries,
        reason=reason + built.note,
        rebuilt=True,
    )


def _update(
    catalog: Catalog,
    model: ModelInfo,
    generation: int,
    prior: Manifest,
    segments_dir: Path,
) -> ImageIndex:
    started = time.monotonic()
    covered = max((int(record["last_gen"]) for record in prior.segments), default=0)
    superseded = catalog.superseded(after=generation_number(prior.generation))
    template = _faiss_io.read_index(segments_dir / prior.trained) if prior.trained else None
    result = ImageIndex(
        factory=prior.factory,
        segments=[],
        trained=prior.trained,
        trained_count=prior.trained_count,
        auto_choice=prior.auto_choice,
        calibration=prior.calibration,
        search_params=prior.search_params,
        recall=prior.recall_at_10,
        recall_queries=prior.recall_queries,
        reason=prior.index_reason,
    )
    records = [
        _with_deletions(SegmentRecord(**s), superseded, segments_dir, generation, result) for s in prior.segments
    ]
    added = 0
    ids, vectors = catalog.stamped_embeddings(covered + 1, generation)
    changed = bool(len(ids) or superseded)
    if prior.calibration is not None and changed:
        gone = np.unique(np.array([image_id for image_id, _ in superseded], dtype=np.int64))
        result.new_calibration = (
            GroundTruth.load(segments_dir / prior.calibration).without(gone).with_added(ids, vectors)
        )
        result.calibration = calibration_file(generation)
    if len(ids):
        name = segment_file(covered + 1, generation, generation)
        result.new_segments[name] = _segment(template, prior, ids, vectors, model.embed_dim)
        records.append(SegmentRecord(name, covered + 1, generation, len(ids)))
        added = len(ids)
    for start, stop in reversed(merges(records)):
        first, last = records[start].first_gen, records[stop - 1].last_gen
        ids, vectors = catalog.stamped_embeddings(first, last)
        name = segment_file(first, last, generation)
        result.new_segments[name] = _segment(template, prior, ids, vectors, model.embed_dim)
        logger.info(
            "merged %d segments of generations %d-%d into one of %d images", stop - start, first, last, len(ids)
        )
        records[start:stop] = [SegmentRecord(name, first, last, len(ids))]
    result.segments = records
    if result.new_calibration is not None:
        loaded = _loaded_segments(segments_dir, records, result)
        result.search_params, result.recall = recalibrate(loaded, result.new_calibration, prior.factory)
        result.recall_queries = int(result.new_calibration.measurable().sum())
    kept = {r.deleted_file for r in records}
    result.new_deletions = {name: ids for name, ids in result.new_deletions.items() if name in kept}
    logger.info(
        "updated %s: %d images added, %d versions deleted, %d segments (%.1fs)",
        prior.factory,
        added,
        len(superseded),
        len(records),
        time.monotonic() - started,
    )
    return result


def _segment(template: FaissIndex | None, prior: Manifest, ids: Ids, vectors: np.ndarray, dim: int) -> FaissIndex:
    index = new_segment(template, prior.factory, ids, vectors, dim)
    if prior.search_params:
        _faiss_io.set_search_params(index, prior.search_params)
    return index


def _with_deletions(
    record: SegmentRecord,
    superseded: list[tuple[int, int]],
    segments_dir: Path,
    generation: int,
    result: ImageIndex,
) -> SegmentRecord:
    """``record`` with the superseded versions of its generations added to its deletions (a new file if any)."""
    gone = np.array([image_id for image_id, gen in superseded if record.covers(gen)], dtype=np.int64)
    if not len(gone):
        return record
    before = load_deleted(segments_dir, record)
    deleted = np.union1d(before, gone)
    if len(deleted) == len(before):
        return record
    name = deleted_file(record.file, generation)
    result.new_deletions[name] = deleted
    return SegmentRecord(record.file, record.first_gen, record.last_gen, record.count, name, len(deleted))


def _loaded_segments(segments_dir: Path, records: list[SegmentRecord], result: ImageIndex) -> list[LoadedSegment]:
    """The segments of ``records`` ready to search: the new ones from memory, the others from their files, IVF
    lists memory-mapped (only searched here, so they need not be copied into this process's memory)."""
    loaded = []
    for record in records:
        index = result.new_segments.get(record.file) or _faiss_io.read_index(segments_dir / record.file, mapped=True)
        if record.deleted_file in result.new_deletions:
            deleted = result.new_deletions[record.deleted_file]
        else:
            deleted = load_deleted(segments_dir, record)
        loaded.append(LoadedSegment.of(record, index, deleted))
    return loaded


def calibration_file(generation: int) -> str:
    return f"calibration.g{generation:06d}.npz"


def load_deleted(segments_dir: Path, record: SegmentRecord) -> Ids:
    """The ids deleted from ``record``'s segment, sorted int64 (empty when none)."""
    if record.deleted_file is None:
        return np.empty(0, dtype=np.int64)
    deleted: Ids = np.load(segments_dir / record.deleted_file, allow_pickle=False).astype(np.int64, copy=False)
    return deleted
