"""Segments: the image index of a generation as immutable FAISS files, shared by the generations that hold them,
each with the ids deleted from it since it was written.

A segment covers the image rows stamped with generations ``first_gen..last_gen`` (:mod:`indexer.store.schema`: a
row's ``gen`` is the first generation that shows its current version). It is written once into
``<index_dir>/segments/`` and never changed. A later generation that stops showing a version (the image changed,
moved, was touched or deleted) lists the image's id among the segment's deletions: a sorted int64 ``.npy`` file,
written anew whenever the set grows. So a publish costs what changed: one new segment for the rows stamped with the
new generation, new deletion files for the segments that lost rows, and the merges below.

Search runs on every segment with its deletions excluded (a FAISS ``IDSelector``) and keeps the best ``k`` of the
union by score. Over exact segments this is exactly the top-k of one index over the same vectors.

Merge policy (log-structured, as Lucene's ``LogMergePolicy``): a segment's level is
``floor(log(count / MIN_MERGE_VECTORS) / log(MERGE_FACTOR))`` (0 below ``MIN_MERGE_VECTORS``). Whenever the
newest ``MERGE_FACTOR`` segments share a level they are merged into one, which is then one level up; and a segment
more than ``MAX_DELETED_SHARE`` deleted is rewritten together with its newer neighbours. Merged segments are built
from the catalog's current rows of their generations, so deletions are dropped there. Each vector is rewritten
about ``log(N) / log(MERGE_FACTOR)`` times over the collection's life, and a collection has at most
``MERGE_FACTOR - 1`` segments per level.

Size: no segment holds more vectors than fit the memory budget (:func:`max_segment_vectors`, by the index type's
estimated bytes per vector; the generation's budget or else ``DEFAULT_MEMORY_BUDGET``), so that building one never
holds more than that in the indexer's memory. A build over more rows than that is split by id into parts of near
equal size, each written as soon as it is filled; a part records its id range, is never merged with others
(Lucene's segments at the maximum size are not either) and, when worn, is rewritten alone. Merges stop below the
limit too.

Training: an index type that trains (IVF's coarse quantizer, a codec) is trained once; the trained, empty index is
kept as ``trained-*.faiss`` and every new segment starts from a copy of it, so all segments share one quantizer.
It is trained again (all rows into one segment) when the collection has grown or shrunk by ``RETRAIN_FACTOR``
since, when the index type changes, and on ``clip-index build --retrain``.

Serving (:func:`served_mapped`): a reader keeps the segments in its own memory while their files together fit the
memory budget, the generation's (``--memory-budget``, recorded for an auto-chosen type) or else
``DEFAULT_MEMORY_BUDGET``; past it, it memory-maps the inverted lists of IVF segments from their files, so that
the server's own memory holds only each segment's coarse centroids and id maps (tens of bytes per vector) and the
codes are pages of the kernel's file cache, shared between the server's processes and evicted under pressure.
Index types without plain inverted lists (Flat, HNSW, fast-scan PQ) are read into memory whatever their size.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from .. import _faiss_io
from .._faiss_io import FaissIndex, VectorRows
from ..index_choice import estimated_bytes
from .filters import SegmentPlan
from .format import TEMP_PREFIX, Ids, Vectors, _fsync

SEGMENTS_DIR = "segments"
MERGE_FACTOR = 10
MIN_MERGE_VECTORS = 1_000  # segments below this size are all level 0
MAX_DELETED_SHARE = 0.3
RETRAIN_FACTOR = 2.0
DEFAULT_MEMORY_BUDGET = 2 << 30  # bytes of segment files a reader keeps in memory when the generation sets no budget


@dataclass(frozen=True)
class SegmentRecord:
    """One segment as a manifest lists it: its FAISS file, the generations it covers, the vectors the file holds,
    its deletions (file and count; None and 0: none) and, for a part of a build split by size, the ids it covers
    (``first_id..last_id``, both included; None: every id)."""

    file: str
    first_gen: int
    last_gen: int
    count: int
    deleted_file: str | None = None
    deleted: int = 0
    first_id: int | None = None
    last_id: int | None = None

    @property
    def live(self) -> int:
        return self.count - self.deleted

    @property
    def id_range(self) -> tuple[int, int] | None:
        return None if self.first_id is None or self.last_id is None else (self.first_id, self.last_id)

    def holds(self, image_id: int, generation: int) -> bool:
        """Whether a version of ``image_id`` stamped with ``generation`` belongs in this segment."""
        in_range = self.first_id is None or self.last_id is None or self.first_id <= image_id <= self.last_id
        return self.first_gen <= generation <= self.last_gen and in_range

    def to_json(self) -> dict[str, object]:
        """The manifest's entry (the id range only when there is one)."""
        entry = dataclasses.asdict(self)
        return {key: value for key, value in entry.items() if key not in ("first_id", "last_id") or value is not None}


def segment_file(first_gen: int, last_gen: int, written_by: int, part: int | None = None) -> str:
    """Name of a segment: the generations it covers, the generation that wrote it and, for a build split by size,
    its part number (unique in an index)."""
    suffix = "" if part is None else f".p{part:04d}"
    return f"s-{first_gen:06d}-{last_gen:06d}.g{written_by:06d}{suffix}.faiss"


def written_by(segment: str) -> int | None:
    """The generation that wrote the segment file ``segment`` (None for a format 1 ``images.faiss``)."""
    match = _SEGMENT_RE.fullmatch(segment)
    return None if match is None else int(match.group(1))


_SEGMENT_RE = re.compile(r"s-\d{6,}-\d{6,}\.g(\d{6,})(?:\.p\d{4,})?\.faiss")


def deleted_file(segment: str, written_by: int) -> str:
    """Name of the deletions of ``segment`` as of generation ``written_by``."""
    return f"{segment.removesuffix('.faiss')}.del-g{written_by:06d}.npy"


def level(count: int) -> int:
    """The merge level of a segment of ``count`` vectors (module docstring)."""
    if count < MIN_MERGE_VECTORS:
        return 0
    return 1 + int(math.log(count / MIN_MERGE_VECTORS) / math.log(MERGE_FACTOR))


def merges(segments: Sequence[SegmentRecord], max_count: int | None = None) -> list[tuple[int, int]]:
    """Ranges ``[start, stop)`` of ``segments`` (in generation order) to rewrite as one segment each, by the policy
    of the module docstring, never into one of more than ``max_count`` vectors (None: no limit): non-overlapping
    and in order; applying them and asking again gives none."""
    most = math.inf if max_count is None else max_count
    groups = [_Group(i, i + 1, s.live, sealed=s.id_range is not None) for i, s in enumerate(segments)]
    worn = next((i for i, s in enumerate(segments) if s.deleted > MAX_DELETED_SHARE * s.count), None)
    if worn is not None:
        stop = worn + 1
        if not groups[worn].sealed:
            while (
                stop < len(groups) and not groups[stop].sealed and sum(g.count for g in groups[worn : stop + 1]) <= most
            ):
                stop += 1
        merged = _Group(worn, stop, sum(g.count for g in groups[worn:stop]), rewrite=True, sealed=groups[worn].sealed)
        groups[worn:stop] = [merged]
    while len(groups) >= MERGE_FACTOR and len({level(g.count) for g in groups[-MERGE_FACTOR:]}) == 1:
        tail = groups[-MERGE_FACTOR:]
        count = sum(g.count for g in tail)
        if any(g.sealed for g in tail) or count > most:
            break
        groups[-MERGE_FACTOR:] = [_Group(tail[0].start, tail[-1].stop, count, rewrite=True)]
    return [(g.start, g.stop) for g in groups if g.rewrite]


@dataclass
class _Group:
    start: int
    stop: int
    count: int
    rewrite: bool = False
    sealed: bool = False  # a part of a split build: rewritten alone, never merged with others


def max_segment_vectors(factory: str, dim: int, budget: int | None) -> int:
    """The most vectors one segment of ``factory`` may hold so that it takes at most the memory budget ``budget``
    bytes (None: ``DEFAULT_MEMORY_BUDGET``), by :func:`indexer.index_choice.estimated_bytes`; at least 1."""
    limit = DEFAULT_MEMORY_BUDGET if budget is None else budget
    fixed = estimated_bytes(factory, 0, dim)
    per_vector = max(1, estimated_bytes(factory, 1_000_000, dim) - fixed) / 1_000_000
    return max(1, int((limit - fixed) / per_vector))


def stage_file(directory: Path, name: str, index: FaissIndex) -> Path:
    """Write ``index`` durably as ``<TEMP_PREFIX><name>`` in ``directory`` (fsynced; renamed to ``name`` by the
    publish that lists it, swept by the next one if it never is) and return that path."""
    path = directory / f"{TEMP_PREFIX}{name}"
    _faiss_io.write_index(index, path)
    _fsync(path)
    return path


def install_staged(staged: Path, name: str) -> Path:
    """Rename a file :func:`stage_file` wrote to its final ``name`` (the caller fsyncs the directory)."""
    final = staged.parent / name
    os.replace(staged, final)
    return final


def new_segment(template: FaissIndex | None, factory: str, ids: Ids, vectors: VectorRows, dim: int) -> FaissIndex:
    """A segment over ``ids`` [N] / ``vectors`` [N, dim] (read part by part): a copy of the trained ``template``
    with the vectors added, or, for an index type that needs no training (``template`` None), a fresh index of
    ``factory``."""
    if template is None:
        return _faiss_io.build_index(ids, vectors, dim, factory)
    index = faiss.clone_index(template)
    _faiss_io.add_rows(index, ids, vectors)
    _faiss_io.prepare_for_queries(index)
    return index


def trained_template(index: FaissIndex, factory: str, dim: int) -> FaissIndex | None:
    """An empty copy of ``index`` of ``factory`` (its trained quantizer and codec, its search parameters), or None
    when that type needs no training."""
    if not _faiss_io.needs_training(factory, dim):
        return None
    template = faiss.clone_index(index)
    template.reset()
    return template


def served_mapped(segment_bytes: int, budget: int | None) -> bool:
    """Whether a reader memory-maps segments whose files hold ``segment_bytes`` in all, under the memory budget
    ``budget`` (None: ``DEFAULT_MEMORY_BUDGET``), by the rule of the module docstring."""
    return segment_bytes > (DEFAULT_MEMORY_BUDGET if budget is None else budget)


@dataclass(frozen=True)
class LoadedSegment:
    """A segment's index and its deletions (None: none), ready to search."""

    record: SegmentRecord
    index: FaissIndex
    deleted: _faiss_io.Exclusion | None

    @classmethod
    def of(cls, record: SegmentRecord, index: FaissIndex, deleted_ids: Ids) -> LoadedSegment:
        exclusion = _faiss_io.exclusion(index, deleted_ids) if len(deleted_ids) else None
        return cls(record, index, exclusion)

    def search(
        self,
        queries: Vectors,
        k: int,
        allowed: _faiss_io.Allowed | None = None,
        params: dict[str, int] | None = None,
    ) -> tuple[Vectors, Ids]:
        """Top-k of this segment without its deleted ids: among the positions ``allowed`` (None: all; one made with
        this segment's deletions, :mod:`indexer.store.filters`), with the search parameters ``params`` (None: its
        own): (scores, ids) [Q, k'], -1 ids where fewer."""
        exclude = self.deleted if allowed is None else None
        return _faiss_io.search(self.index, queries, k, exclude=exclude, allowed=allowed, params=params)


def search_segments(
    segments: Sequence[LoadedSegment],
    queries: Vectors,
    k: int,
    plans: Sequence[SegmentPlan | None] | None = None,
) -> tuple[Vectors, Ids]:
    """The best ``k`` of the union of the segments' results: (scores, ids) [Q, k'] best first, -1 ids where fewer
    than k' were found (k' = min(k, live vectors)). With ``plans`` (one per segment, a filter's:
    :class:`indexer.store.filters.FilteredPlan`), each segment is searched by its plan and skipped without one."""
    found = []
    for i, segment in enumerate(segments):
        planned = plans[i] if plans is not None else None
        if not segment.record.live or (plans is not None and planned is None):
            continue
        if planned is None:
            found.append(segment.search(queries, k))
        elif planned.subset is not None:
            found.append(_faiss_io.search_subset(planned.subset, queries, k, planned.params))
        else:
            found.append(segment.search(queries, k, planned.allowed, planned.params))
    if not found:
        empty = np.empty((len(queries), 0))
        return empty.astype(np.float32), empty.astype(np.int64)
    if len(found) == 1:
        return found[0]
    scores = np.concatenate([f[0] for f in found], axis=1)
    ids = np.concatenate([f[1] for f in found], axis=1)
    scores = np.where(ids == -1, -np.inf, scores)
    width = min(k, sum(s.record.live for s in segments))
    order = np.argsort(-scores, axis=1, kind="stable")[:, :width]
    best_ids = np.take_along_axis(ids, order, axis=1)
    best_scores = np.take_along_axis(scores, order, axis=1).astype(np.float32)
    return best_scores, best_ids
