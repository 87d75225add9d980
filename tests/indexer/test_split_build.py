"""A build over more rows than one segment may hold (the memory budget): parts by id, written one at a time from
the vector files, searched as one index would be, updated and rewritten within their ids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from indexer import _faiss_io, index_choice
from indexer.store import PublishedIndex, verify
from indexer.store import calibration as calibration_module
from indexer.store import segments as segments_module
from indexer.store.segments import MAX_DELETED_SHARE, MERGE_FACTOR, SegmentRecord, max_segment_vectors, merges
from indexer.store.vector_log import StoredRows
from tests.indexer.test_index_choice import clustered
from tests.indexer.test_segments import DIM, Collection, found_top, segments_of, unit

PART = 400  # vectors per segment in these tests


@pytest.fixture
def collection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Collection:
    """A collection whose segments hold at most about PART vectors of exact Flat or IVF16,Flat."""
    budget = index_choice.estimated_bytes("Flat", PART, DIM)
    monkeypatch.setattr(segments_module, "DEFAULT_MEMORY_BUDGET", budget)
    opened = Collection(tmp_path / "index")
    yield opened  # type: ignore[misc]
    opened.catalog.close()


def test_a_build_past_the_segment_limit_is_split_by_id_and_searches_as_one_index(collection: Collection) -> None:
    queries = unit(30, seed=999)
    collection.add(1000)
    collection.publish("Flat")
    parts = segments_of(collection.index_dir)
    assert len(parts) == 3 and all(p.count <= max_segment_vectors("Flat", DIM, None) for p in parts)
    assert sum(p.count for p in parts) == 1000
    ranges = [p.id_range for p in parts]
    assert all(r is not None for r in ranges)
    assert all(a[1] < b[0] for a, b in zip(ranges, ranges[1:], strict=False))  # disjoint, in id order
    assert found_top(collection.index_dir, queries, 10) == collection.expected_top(queries, 10)
    assert verify(collection.index_dir) == []


def test_changes_to_a_split_build_go_to_the_part_holding_each_id_and_stay_exact(collection: Collection) -> None:
    queries = unit(30, seed=998)
    collection.add(1000)
    collection.publish("Flat")
    rng = np.random.default_rng(3)
    for step in range(MERGE_FACTOR + 2):
        paths = sorted(collection.vectors)
        collection.add(int(rng.integers(1, 15)))
        collection.change(list(rng.choice(paths, size=4, replace=False)))
        collection.delete(list(rng.choice(sorted(set(paths) & set(collection.vectors)), size=3, replace=False)))
        collection.publish()
        assert found_top(collection.index_dir, queries, 10) == collection.expected_top(queries, 10), f"step {step}"
        assert verify(collection.index_dir) == [], f"step {step}"
    records = segments_of(collection.index_dir)
    with PublishedIndex.open(collection.index_dir) as index:
        assert index.manifest.counts["images"] == len(collection.vectors) == sum(r.live for r in records)
    ids = {r.path: r.id for r in collection.catalog.files().values()}
    parts = [r for r in records if r.id_range is not None]
    assert len(parts) == 3
    for part in parts:  # each part's deletions are ids of that part only
        if part.deleted_file is not None:
            deleted = np.load(collection.index_dir / "segments" / part.deleted_file)
            assert len(deleted) == part.deleted and ((deleted >= part.first_id) & (deleted <= part.last_id)).all()
    assert max(ids.values()) > max(p.last_id or 0 for p in parts)  # the new rows went to other segments


def test_a_worn_part_is_rewritten_alone_within_its_ids(collection: Collection) -> None:
    queries = unit(30, seed=997)
    collection.add(1000)
    collection.publish("Flat")
    first, second, third = segments_of(collection.index_dir)
    assert first.first_id is not None and first.last_id is not None
    by_id = {r.id: r.path for r in collection.catalog.files().values()}
    worn = [by_id[i] for i in range(first.first_id, first.last_id + 1)][: int(first.count * MAX_DELETED_SHARE) + 5]
    collection.delete(worn)
    collection.add(5)
    collection.publish()
    records = segments_of(collection.index_dir)
    rewritten = records[0]
    assert rewritten.file != first.file and rewritten.id_range == first.id_range and rewritten.deleted == 0
    assert rewritten.count == first.count - len(worn)
    assert records[1:3] == [second, third]  # the other parts untouched
    assert found_top(collection.index_dir, queries, 10) == collection.expected_top(queries, 10)
    assert verify(collection.index_dir) == []


def test_split_ivf_parts_share_one_quantizer_and_return_what_one_ivf_index_returns(collection: Collection) -> None:
    vectors = clustered(1200, 5, DIM)
    collection.add(len(vectors), vectors)
    collection.publish("IVF16,Flat")
    parts = segments_of(collection.index_dir)
    assert len(parts) >= 3
    ids, matrix = collection.catalog.embeddings()
    whole = _faiss_io.build_index(ids, matrix, DIM, "IVF16,Flat")  # trained on the same seeded sample
    queries = clustered(50, 6, DIM)
    with PublishedIndex.open(collection.index_dir) as index:
        _faiss_io.set_search_params(whole, index.manifest.search_params)
        assert index.manifest.recall_at_10 is not None and index.manifest.recall_at_10 >= 0.95
        found = [[hit.id for hit in hits] for hits in index.search(queries, 10)]
    _, expected = _faiss_io.search(whole, queries, 10)
    assert found == [[int(i) for i in row if i != -1] for row in expected]
    assert verify(collection.index_dir) == []


def test_a_split_build_reads_the_vectors_part_by_part(collection: Collection, monkeypatch: pytest.MonkeyPatch) -> None:
    """No step of the build holds the collection's vectors: reads are bounded by the add and ground-truth chunks
    and the training sample, and a part's index by the segment limit."""
    collection.add(2000, clustered(2000, 8, DIM))
    monkeypatch.setattr(_faiss_io, "ADD_CHUNK_ROWS", 64)
    monkeypatch.setattr(calibration_module, "GROUND_TRUTH_CHUNK", 128)
    monkeypatch.setattr(index_choice, "GROUND_TRUTH_CHUNK", 128)
    largest = 0
    original = StoredRows._read

    def counting(self: StoredRows, files: np.ndarray, rows: np.ndarray) -> np.ndarray:
        nonlocal largest
        largest = max(largest, len(rows))
        return original(self, files, rows)

    monkeypatch.setattr(StoredRows, "_read", counting)
    monkeypatch.setattr(type(collection.catalog), "embeddings", None)  # the whole matrix is never asked for
    collection.publish("IVF16,Flat")
    training_sample = 16 * _faiss_io.TRAIN_POINTS_PER_LIST
    assert 0 < largest <= max(training_sample, index_choice.RECALL_QUERIES)
    assert all(p.count <= max_segment_vectors("IVF16,Flat", DIM, None) for p in segments_of(collection.index_dir))


def test_merges_stop_at_the_segment_limit_and_leave_parts_alone() -> None:
    def record(count: int, *, deleted: int = 0, part: bool = False) -> SegmentRecord:
        ids = {"first_id": 1, "last_id": 2} if part else {}
        return SegmentRecord("s", 1, 1, count, "d" if deleted else None, deleted, **ids)  # type: ignore[arg-type]

    tail = [record(5_000) for _ in range(MERGE_FACTOR)]
    assert merges(tail) == [(0, MERGE_FACTOR)]
    assert merges(tail, max_count=MERGE_FACTOR * 5_000) == [(0, MERGE_FACTOR)]
    assert merges(tail, max_count=MERGE_FACTOR * 5_000 - 1) == []  # the merged segment would be too big
    parts = [record(5_000, part=True) for _ in range(MERGE_FACTOR)]
    assert merges(parts) == []  # parts at the limit are never merged
    worn_part = [record(5_000, part=True), record(5_000, deleted=2_000, part=True), record(10), record(10)]
    assert merges(worn_part) == [(1, 2)]  # rewritten alone
    worn = [record(5_000), record(100, deleted=50), record(10), record(10)]
    assert merges(worn) == [(1, 4)]  # with its newer neighbours, as before
    assert merges(worn, max_count=60) == [(1, 3)]  # as many as fit


def test_without_a_fit_in_memory_a_budget_gets_sq8_lists_served_from_disk() -> None:
    choice = index_choice.choose_index(10_000_000, 512, 1 << 30)
    assert choice.factory == "IDMap2,IVF8192,SQ8" and "memory-mapped" in choice.reason
    per_segment = max_segment_vectors(choice.factory, 512, 1 << 30)
    assert 1_000_000 < per_segment < 2_000_000  # the indexer builds it in parts of under 1 GiB
