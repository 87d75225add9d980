"""Keeping the search knob calibrated as segments come and go, without scanning the collection again.

When the image index is built anew, the publish also keeps the calibration's queries (near stored vectors, as
:func:`indexer.index_choice.recall_queries` makes them) with their exact ``RESERVE`` nearest images over the whole
collection: ids and scores, in ``calibration.g<N>.npz`` beside the segments. An update keeps that ground truth exact
from what it already has in hand: the ids it deletes drop out of each list, and the vectors of its new segment are
scored against the queries and merged in. Every image outside a list scores at most the list's last score, so the
first 10 of a list stay the exact top 10 as long as at least 10 of its entries are left; a query with fewer left is
no longer measured (a retrain, :data:`indexer.store.segments.RETRAIN_FACTOR`, starts over long before many are).

With that ground truth the knob (IVF ``nprobe``, HNSW ``efSearch``) is set again on every update: the smallest
value of :data:`indexer.index_choice.KNOB_LADDER` whose recall@10 over the segments reaches the target. The cost is
the queries times the new vectors, plus a few searches of the calibration queries.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from .. import _faiss_io
from .._faiss_io import VectorRows
from ..index_choice import GROUND_TRUTH_CHUNK, KNOB_LADDER, RECALL_K, RECALL_MARGIN, TARGET_RECALL, recall_queries
from .format import Ids, Vectors
from .segments import LoadedSegment, search_segments

logger = logging.getLogger(__name__)

RESERVE = 50  # exact neighbours kept per query: room for deletions before a query drops out
MIN_QUERIES = 50  # fewer measurable queries than this: the knob stays as it is


@dataclass(frozen=True)
class GroundTruth:
    """Calibration queries [Q, D] float32 and their exact nearest images over the collection: ``ids`` [Q, R] int64
    (-1 past the end) and ``scores`` [Q, R] float32, best first."""

    queries: Vectors
    ids: Ids
    scores: npt.NDArray[np.float32]

    @classmethod
    def of(cls, ids: Ids, vectors: VectorRows) -> GroundTruth:
        """The ground truth of the collection ``ids`` [N] / ``vectors`` [N, D] (a pass over it, in chunks)."""
        queries = recall_queries(vectors)
        empty = cls(queries, np.full((len(queries), 0), -1, dtype=np.int64), np.empty((len(queries), 0), np.float32))
        return empty.with_added(ids, vectors)

    def with_added(self, ids: Ids, vectors: VectorRows) -> GroundTruth:
        """The ground truth once ``vectors`` [N, D] (with their ``ids``, read ``GROUND_TRUTH_CHUNK`` rows at a time)
        are in the collection too."""
        truth = self
        for start in range(0, len(ids), GROUND_TRUTH_CHUNK):
            stop = start + GROUND_TRUTH_CHUNK
            truth = truth._with_chunk(ids[start:stop], np.asarray(vectors[start:stop], dtype=np.float32))
        return truth

    def _with_chunk(self, ids: Ids, vectors: Vectors) -> GroundTruth:
        scores = np.concatenate([self.scores, self.queries @ vectors.T], axis=1)
        all_ids = np.concatenate([self.ids, np.broadcast_to(ids, (len(self.queries), len(ids)))], axis=1)
        scores = np.where(all_ids == -1, -np.inf, scores)
        if scores.shape[1] > RESERVE:  # the best RESERVE of each row first (linear), then only those sorted
            best = np.argpartition(-scores, RESERVE - 1, axis=1)[:, :RESERVE]
            all_ids, scores = np.take_along_axis(all_ids, best, axis=1), np.take_along_axis(scores, best, axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")
        return GroundTruth(
            self.queries,
            np.take_along_axis(all_ids, order, axis=1),
            np.take_along_axis(scores, order, axis=1).astype(np.float32),
        )

    def without(self, deleted: Ids) -> GroundTruth:
        """The ground truth once the images ``deleted`` are gone (their entries move to the end as -1)."""
        if not len(deleted):
            return self
        gone = np.isin(self.ids, deleted) | (self.ids == -1)
        order = np.argsort(gone, axis=1, kind="stable")
        ids = np.where(np.take_along_axis(gone, order, axis=1), -1, np.take_along_axis(self.ids, order, axis=1))
        scores = np.take_along_axis(self.scores, order, axis=1)
        return GroundTruth(self.queries, ids, np.where(ids == -1, -np.inf, scores).astype(np.float32))

    def measurable(self) -> npt.NDArray[np.bool_]:
        """[Q] bool: the queries whose top ``RECALL_K`` is still known exactly."""
        return (
            (self.ids[:, :RECALL_K] != -1).all(axis=1)
            if self.ids.shape[1] >= RECALL_K
            else np.zeros(len(self.queries), dtype=bool)
        )

    def save(self, path: Path) -> None:
        with path.open("wb") as handle:
            np.savez(handle, queries=self.queries, ids=self.ids, scores=self.scores)

    @classmethod
    def load(cls, path: Path) -> GroundTruth:
        with np.load(path, allow_pickle=False) as data:
            return cls(data["queries"], data["ids"], data["scores"])


def recall(segments: Sequence[LoadedSegment], truth: GroundTruth) -> float | None:
    """Recall@10 of a search over ``segments`` against ``truth``: the share of its hits among the exact top 10 (a
    hit that ties the 10th score counts too); None with fewer than ``MIN_QUERIES`` measurable queries."""
    usable = truth.measurable()
    if usable.sum() < MIN_QUERIES:
        return None
    queries = np.ascontiguousarray(truth.queries[usable])
    _, found = search_segments(segments, queries, RECALL_K)
    exact_ids, exact_scores = truth.ids[usable], truth.scores[usable]
    kth = exact_scores[:, RECALL_K - 1]
    hits = 0
    for row, ids, scores, threshold in zip(found, exact_ids, exact_scores, kth, strict=True):
        known = dict(zip(ids.tolist(), scores.tolist(), strict=True))
        hits += sum(1 for i in row.tolist() if i != -1 and known.get(i, -np.inf) >= threshold - 1e-5)
    return hits / (len(queries) * RECALL_K)


def recalibrate(segments: Sequence[LoadedSegment], truth: GroundTruth, factory: str) -> tuple[dict[str, int], float]:
    """Set the knob of every segment to the smallest ladder value whose recall reaches the target, and return the
    search parameters and that recall; ({}, 1.0) for exact Flat, the current parameters and their recall when the
    truth has too few measurable queries or the index has no knob."""
    if _faiss_io.is_exact(factory) or not segments:
        return {}, 1.0
    params = _faiss_io.get_search_params(segments[0].index)
    knob = _faiss_io.search_knob(segments[0].index)
    measured = recall(segments, truth)
    if knob is None or measured is None:
        return params, measured if measured is not None else float("nan")
    name, lowest, highest = knob
    values = [v for v in KNOB_LADDER if lowest <= v < highest] + [min(highest, KNOB_LADDER[-1])]
    target = TARGET_RECALL + RECALL_MARGIN
    for value in values:
        _set(segments, {**params, name: value})
        measured = recall(segments, truth) or 0.0
        if measured >= target:
            break
    else:
        logger.warning("%s reaches recall@%d %.3f at most, below the target %.3f", factory, RECALL_K, measured, target)
    return _faiss_io.get_search_params(segments[0].index), measured


def _set(segments: Sequence[LoadedSegment], params: dict[str, int]) -> None:
    for segment in segments:
        _faiss_io.set_search_params(segment.index, params)
