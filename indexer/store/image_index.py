"""The image index of a new generation: updated segment by segment from the previous one, or built anew.

:func:`next_image_index` decides (:mod:`indexer.store.segments` has the policy) and returns what the publish must
write: new segment files, new deletion files and the manifest's fields. An update copies nothing that did not
change: the previous segments stay where they are, referenced by both manifests.

A rebuild over more rows than one segment may hold (:func:`indexer.store.segments.max_segment_vectors`) trains once
on a sample, then fills and writes the parts one by one from the vector files, so the indexer holds one part, a
chunk of rows and the training sample at a time, whatever the collection's size.

An update sets the search parameter (IVF nprobe, HNSW efSearch) again against the ground truth it keeps up to date
(:mod:`indexer.store.calibration`), which costs the new rows, not the collection.
"""

from __future__ import annotations

import dataclasses
import logging
import math
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
    DEFAULT_MEMORY_BUDGET,
    RETRAIN_FACTOR,
    LoadedSegment,
    SegmentRecord,
    deleted_file,
    max_segment_vectors,
    merges,
    new_segment,
    segment_file,
    stage_file,
    trained_template,
)
from .vector_log import StoredRows

logger = logging.getLogger(__name__)


@dataclass
class ImageIndex:
    """What a publish writes for the image index, and the manifest fields that describe it."""

    factory: str
    segments: list[SegmentRecord]
    new_segments: dict[str, FaissIndex] = field(default_factory=dict)  # file name -> index to write
    staged: dict[str, Path] = field(default_factory=dict)  # file name -> the segment written already (stage_file)
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

    @property
    def served_budget(self) -> int | None:
        """The budget the manifest records, which readers serve under: only an auto-chosen type's."""
        return self.budget if self.factory == AUTO else None


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
        return _rebuild(catalog, model, generation, request, choice.factory, choice.reason, segments_dir)
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
    catalog: Catalog,
    model: ModelInfo,
    generation: int,
    request: Request,
    auto_choice: str,
    auto_reason: str,
    segments_dir: Path,
) -> ImageIndex:
    started = time.monotonic()
    ids, vectors = catalog.embedding_rows()
    auto = request.factory == AUTO
    factory, reason = (auto_choice, auto_reason) if auto else (request.factory, "the factory asked for")
    budget = request.served_budget
    capacity = max_segment_vectors(factory, model.embed_dim, budget)
    if len(ids) > capacity:
        return _rebuild_split(ids, vectors, model, generation, factory, reason, capacity, segments_dir, started)
    built = build_calibrated(
        ids, vectors, model.embed_dim, factory, auto=auto, memory_budget_bytes=budget or DEFAULT_MEMORY_BUDGET
    )
    template = trained_template(built.index, built.factory, model.embed_dim)
    truth = None if _faiss_io.search_knob(built.index) is None else GroundTruth.of(ids, vectors)
    name = segment_file(0, generation, generation)
    tuned = built.calibration
    _log_build(
        built.factory, len(ids), 1, started, reason + built.note, tuned.search_params, tuned.recall, tuned.queries
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


def _rebuild_split(
    ids: Ids,
    vectors: StoredRows,
    model: ModelInfo,
    generation: int,
    factory: str,
    reason: str,
    capacity: int,
    segments_dir: Path,
    started: float,
) -> ImageIndex:
    """The rebuild of more rows than a segment may hold: parts of near equal size by id, each written as soon as
    it is filled (so one is in memory at a time), all from one template trained on a sample of every row; then the
    knob is calibrated over the written parts, memory-mapped. The auto choice's switch to exact Flat does not
    apply: Flat would not fit the budget either."""
    dim = model.embed_dim
    empty = _faiss_io.trained_index(vectors, dim, factory)  # trained on a sample, if the type trains
    template = empty if _faiss_io.needs_training(factory, dim) else None
    parts = math.ceil(len(ids) / capacity)
    size = math.ceil(len(ids) / parts)
    result = ImageIndex(factory=factory, segments=[], trained_count=len(ids), reason=reason, rebuilt=True)
    for part, start in enumerate(range(0, len(ids), size)):
        stop = min(start + size, len(ids))
        name = segment_file(0, generation, generation, part)
        index = new_segment(template, factory, ids[start:stop], vectors.part(start, stop), dim)
        result.staged[name] = stage_file(segments_dir, name, index)
        del index
        first_id, last_id = int(ids[start]), int(ids[stop - 1])
        result.segments.append(SegmentRecord(name, 0, generation, stop - start, first_id=first_id, last_id=last_id))
        logger.info("wrote part %d of %d (%d images) of the image index", part + 1, parts, stop - start)
    knob = _faiss_io.search_knob(empty)
    if not _faiss_io.is_exact(factory):
        truth = GroundTruth.of(ids, vectors)
        loaded = [
            LoadedSegment.of(
                record, _faiss_io.read_index(result.staged[record.file], mapped=True), np.empty(0, np.int64)
            )
            for record in result.segments
        ]
        result.search_params, result.recall = recalibrate(loaded, truth, factory)
        result.recall_queries = int(truth.measurable().sum())
        del loaded
        if knob is not None:
            result.calibration, result.new_calibration = calibration_file(generation), truth
    else:
        result.recall = 1.0
    if template is not None:
        _faiss_io.set_search_params(template, result.search_params)
        result.trained, result.new_trained = f"trained.g{generation:06d}.faiss", template
    _log_build(factory, len(ids), parts, started, reason, result.search_params, result.recall, result.recall_queries)
    return result


def _log_build(
    factory: str,
    count: int,
    parts: int,
    started: float,
    reason: str,
    params: dict[str, int],
    recall: float | None,
    queries: int,
) -> None:
    logger.info(
        "built and calibrated %s over %d images in %d segment(s) in %.1fs (%s); %s, recall@10 %s on %d queries",
        factory,
        count,
        parts,
        time.monotonic() - started,
        reason,
        params or "no search parameters",
        "n/a" if recall is None else f"{recall:.3f}",
        queries,
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
    ids, vectors = catalog.stamped_rows(covered + 1, generation)
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
    capacity = max_segment_vectors(prior.factory, model.embed_dim, prior.memory_budget)
    for start, stop in reversed(merges(records, capacity)):
        first, last = records[start].first_gen, records[stop - 1].last_gen
        id_range = records[start].id_range  # a part of a split build is rewritten alone, within its ids
        ids, vectors = catalog.stamped_rows(first, last, id_range)
        part = None if id_range is None else _part_number(records[start].file)
        name = segment_file(first, last, generation, part)
        result.new_segments[name] = _segment(template, prior, ids, vectors, model.embed_dim)
        logger.info(
            "merged %d segments of generations %d-%d into one of %d images", stop - start, first, last, len(ids)
        )
        low, high = id_range if id_range is not None else (None, None)
        records[start:stop] = [SegmentRecord(name, first, last, len(ids), first_id=low, last_id=high)]
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


def _part_number(segment: str) -> int:
    """The part number in the name of a part of a split build (segment_file's ``.pNNNN``)."""
    return int(segment.rsplit(".p", 1)[1].removesuffix(".faiss"))


def _segment(template: FaissIndex | None, prior: Manifest, ids: Ids, vectors: StoredRows, dim: int) -> FaissIndex:
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
    gone = np.array([image_id for image_id, gen in superseded if record.holds(image_id, gen)], dtype=np.int64)
    if not len(gone):
        return record
    before = load_deleted(segments_dir, record)
    deleted = np.union1d(before, gone)
    if len(deleted) == len(before):
        return record
    name = deleted_file(record.file, generation)
    result.new_deletions[name] = deleted
    return dataclasses.replace(record, deleted_file=name, deleted=len(deleted))


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
