"""Segments: a publish writes what changed (a segment for the new rows, deletions for the superseded ones, the
merges due), and searching the segments gives what one index over the same vectors would."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import numpy.typing as npt
import pytest

from indexer.store import Catalog, ModelInfo, PublishedIndex, publish, read_manifest, verify
from indexer.store.segments import MERGE_FACTOR, MIN_MERGE_VECTORS, RETRAIN_FACTOR, SegmentRecord, level, merges
from tests.indexer.test_index_choice import clustered

DIM = 16
MODEL = ModelInfo("test-model", "cd" * 32, DIM, {"image_size": 32, "mean": [0.5, 0.5, 0.5]})


def unit(n: int, seed: int) -> npt.NDArray[np.float32]:
    vectors = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


class Collection:
    """A catalog driven like a photo folder that changes between publishes, with what it should hold."""

    def __init__(self, index_dir: Path) -> None:
        self.index_dir = index_dir
        self.catalog = Catalog.open(index_dir, create=True)
        self.catalog.set_model(MODEL)
        self.vectors: dict[str, npt.NDArray[np.float32]] = {}
        self.seed = 0

    def add(self, n: int, vectors: npt.NDArray[np.float32] | None = None) -> None:
        vectors = unit(n, self._next_seed()) if vectors is None else vectors
        with self.catalog.transaction():
            for vector in vectors:
                path = f"p/{len(self.vectors) + self.seed * 100_000:08d}.jpg"
                self.catalog.add_image(path, 1, 1, path, 8, 8, vector)
                self.vectors[path] = vector

    def change(self, paths: list[str]) -> None:
        with self.catalog.transaction():
            for path, vector in zip(paths, unit(len(paths), self._next_seed()), strict=True):
                self.catalog.add_image(path, 2, 2, path + "'", 8, 8, vector)
                self.vectors[path] = vector

    def delete(self, paths: list[str]) -> None:
        ids = {r.path: r.id for r in self.catalog.files().values()}
        self.catalog.delete([ids[p] for p in paths])
        for path in paths:
            del self.vectors[path]

    def publish(self, factory: str | None = None, **options: object) -> None:
        publish(self.index_dir, self.catalog, factory, **options)  # type: ignore[arg-type]

    def _next_seed(self) -> int:
        self.seed += 1
        return self.seed

    def expected_top(self, queries: npt.NDArray[np.float32], k: int) -> list[list[int]]:
        ids = {r.path: r.id for r in self.catalog.files().values()}
        paths = sorted(self.vectors)
        matrix = np.stack([self.vectors[p] for p in paths])
        order = np.argsort(-(queries @ matrix.T), axis=1)[:, :k]
        return [[ids[paths[j]] for j in row] for row in order]


@pytest.fixture
def collection(tmp_path: Path) -> Collection:
    opened = Collection(tmp_path / "index")
    yield opened  # type: ignore[misc]
    opened.catalog.close()


def segments_of(index_dir: Path) -> list[SegmentRecord]:
    with PublishedIndex.open(index_dir) as index:
        return [SegmentRecord(**s) for s in index.manifest.segments]


def found_top(index_dir: Path, queries: npt.NDArray[np.float32], k: int) -> list[list[int]]:
    with PublishedIndex.open(index_dir) as index:
        return [[hit.id for hit in hits] for hits in index.search(queries, k)]


def test_exact_segments_return_exactly_the_top_k_of_one_index_through_adds_changes_deletes_and_merges(
    collection: Collection,
) -> None:
    queries = unit(40, seed=999)
    collection.add(300)
    collection.publish()
    rng = np.random.default_rng(7)
    for step in range(2 * MERGE_FACTOR + 3):
        paths = sorted(collection.vectors)
        collection.add(int(rng.integers(1, 20)))
        collection.change(list(rng.choice(paths, size=3, replace=False)))
        collection.delete(list(rng.choice(sorted(set(paths) & set(collection.vectors)), size=2, replace=False)))
        collection.publish()
        assert found_top(collection.index_dir, queries, 10) == collection.expected_top(queries, 10), f"step {step}"
        assert verify(collection.index_dir) == [], f"step {step}"
        assert len(segments_of(collection.index_dir)) < 2 * MERGE_FACTOR  # merged as it goes
    with PublishedIndex.open(collection.index_dir) as index:
        assert index.manifest.counts["images"] == len(collection.vectors)
        assert len(index.search(queries[:1], 10_000)[0]) == len(collection.vectors)  # nothing twice, nothing lost


def test_a_publish_writes_a_segment_of_the_new_rows_and_leaves_the_others_untouched(collection: Collection) -> None:
    collection.add(500)
    collection.publish()
    [first] = segments_of(collection.index_dir)
    segments_dir = collection.index_dir / "segments"
    before = (segments_dir / first.file).stat()
    collection.add(7)
    collection.delete(sorted(collection.vectors)[:3])
    collection.publish()
    old, new = segments_of(collection.index_dir)
    assert (old.file, old.count, old.deleted) == (first.file, 500, 3) and old.deleted_file is not None
    assert (new.count, new.deleted, new.first_gen, new.last_gen) == (7, 0, 2, 2)
    after = (segments_dir / first.file).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    collection.publish()  # nothing changed: no new segment, no new deletions
    assert segments_of(collection.index_dir) == [old, new]


def test_files_no_kept_generation_uses_are_removed(collection: Collection) -> None:
    collection.add(50)
    collection.publish()
    for _ in range(MERGE_FACTOR + 2):
        collection.add(3)
        collection.delete(sorted(collection.vectors)[:1])
        collection.publish()
    used = set(read_manifest(collection.index_dir, _current(collection.index_dir)).files)
    previous = sorted((collection.index_dir / "generations").iterdir())[0].name
    used |= set(read_manifest(collection.index_dir, previous).files)
    on_disk = {p.name for p in (collection.index_dir / "segments").iterdir()}
    assert on_disk <= used  # only what the current and the previous generation name


def _current(index_dir: Path) -> str:
    return (index_dir / "CURRENT").read_text().strip()


def test_ivf_segments_share_the_trained_quantizer_and_keep_recall(collection: Collection) -> None:
    base, extra = clustered(3000, seed=1, dim=DIM), clustered(600, seed=2, dim=DIM)
    queries = clustered(200, seed=3, dim=DIM)
    collection.add(len(base), base)
    collection.publish("IVF32,Flat")
    for chunk in np.array_split(extra, 3):
        collection.add(len(chunk), chunk)
        collection.publish()
    segments = segments_of(collection.index_dir)
    assert len(segments) == 4
    manifest = read_manifest(collection.index_dir, _current(collection.index_dir))
    assert manifest.trained is not None and manifest.trained_count == 3000
    loaded = [faiss.read_index(str(collection.index_dir / "segments" / s.file)) for s in segments]
    ivfs = [faiss.extract_index_ivf(index) for index in loaded]  # views into ``loaded``, which must stay alive
    quantizers = [ivf.quantizer.reconstruct_n(0, ivf.nlist) for ivf in ivfs]
    assert all(np.array_equal(q, quantizers[0]) for q in quantizers)
    updated = _recall(collection, queries)
    collection.publish(retrain=True)
    assert len(segments_of(collection.index_dir)) == 1
    assert abs(updated - _recall(collection, queries)) <= 0.05  # the bench measures 0.01 at scale


def _recall(collection: Collection, queries: npt.NDArray[np.float32]) -> float:
    expected = collection.expected_top(queries, 10)
    found = found_top(collection.index_dir, queries, 10)
    return float(np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, expected, strict=True)]))


def test_the_index_is_trained_again_once_the_collection_outgrows_its_training(collection: Collection) -> None:
    collection.add(1000, clustered(1000, seed=4, dim=DIM))
    collection.publish("IVF16,Flat")
    grown = int(1000 * (RETRAIN_FACTOR - 1))
    collection.add(grown, clustered(grown, seed=5, dim=DIM))
    collection.publish()
    assert len(segments_of(collection.index_dir)) == 2  # at the factor: still updated
    collection.add(10, clustered(10, seed=6, dim=DIM))
    collection.publish()
    [segment] = segments_of(collection.index_dir)  # past it: trained again, one segment
    manifest = read_manifest(collection.index_dir, _current(collection.index_dir))
    assert manifest.trained_count == len(collection.vectors) == segment.count


def test_a_format_1_generation_is_read_and_replaced_by_segments_at_the_next_publish(tmp_path: Path) -> None:
    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "index-format-2" / "index"
    import shutil

    shutil.copytree(fixture, tmp_path / "index")
    with Catalog.open(tmp_path / "index") as catalog:  # the catalog upgrade; the generation stays format 1
        manifest = read_manifest(tmp_path / "index", _current(tmp_path / "index"))
        assert manifest.format_version == 1
        with PublishedIndex.open(tmp_path / "index") as index:
            ids, vectors = catalog.embeddings()
            assert [h.id for h in index.search(vectors[:3], 1)[0]] == [int(ids[0])]
        new = publish(tmp_path / "index", catalog)
    assert new.format_version == 2 and len(new.segments) == 1
    assert verify(tmp_path / "index") == []


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        ([5] * (MERGE_FACTOR - 1), []),
        ([5] * MERGE_FACTOR, [(0, MERGE_FACTOR)]),
        ([50_000] + [5] * MERGE_FACTOR, [(1, MERGE_FACTOR + 1)]),
        ([50_000] + [5] * (MERGE_FACTOR - 1), []),
    ],
)
def test_the_newest_merge_factor_segments_of_one_level_merge(
    counts: list[int], expected: list[tuple[int, int]]
) -> None:
    records = [SegmentRecord(f"s{i}", i, i, n) for i, n in enumerate(counts)]
    assert merges(records) == expected


def test_a_worn_segment_is_rewritten_with_the_newer_ones_and_merging_settles() -> None:
    records = [
        SegmentRecord("a", 0, 0, 10_000, "a.del", 4_000),
        SegmentRecord("b", 1, 1, 10),
        SegmentRecord("c", 2, 2, 5),
    ]
    assert merges(records) == [(0, 3)]
    assert merges([SegmentRecord("a", 0, 0, 10_000, "a.del", 100)] + records[1:]) == []
    assert merges([SegmentRecord("c", 2, 2, 5, "c.del", 4)]) == [(0, 1)]
    assert level(MIN_MERGE_VECTORS - 1) == 0 and level(MIN_MERGE_VECTORS) == 1
    assert level(MIN_MERGE_VECTORS * MERGE_FACTOR) == 2


def test_clip_index_build_adds_a_segment_per_change_and_retrain_folds_them_into_one(
    tiny_model: Path, tmp_path: Path
) -> None:
    from indexer.cli import main as clip_index
    from tests.indexer.conftest import write_photos

    root, index_dir = tmp_path / "photos", tmp_path / "index"
    argv = ["build", str(root), "--index-dir", str(index_dir), "--model", str(tiny_model), "--workers", "0"]
    write_photos(root, 4)
    assert clip_index(argv) == 0
    write_photos(root, 2, start=4)
    assert clip_index(argv) == 0
    assert [s.count for s in segments_of(index_dir)] == [4, 2]
    assert clip_index([*argv, "--retrain"]) == 0  # nothing changed, but a retrain was asked for
    assert [s.count for s in segments_of(index_dir)] == [6]
    assert verify(index_dir) == []


CHANGE_AND_PUBLISH_LOOP = """
import random, sys, time
from pathlib import Path
import numpy as np
from indexer import store
from indexer.store import publishing
index_dir, seed = Path(sys.argv[1]), int(sys.argv[2])
rng = random.Random(seed)
fsync = publishing._fsync
def slow_fsync(path):  # spread each publish over its steps, so that kills land in every one of them
    time.sleep(rng.uniform(0, 0.02))
    fsync(path)
publishing._fsync = slow_fsync
def unit(n, s):
    v = np.random.default_rng(s).standard_normal((n, 16)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)
with store.Catalog.open(index_dir) as catalog:
    sys.stdout.write("ready\\n"); sys.stdout.flush()
    for step in range(10**6):
        s = seed * 10**6 + step
        paths = sorted(r.path for r in catalog.files().values())
        with catalog.transaction():  # new rows, changed rows and deleted rows: a segment, deletions, merges
            for i, vector in enumerate(unit(20, s)):
                catalog.add_image(f"k{s}/{i}.jpg", 1, 1, f"k{s}-{i}", 8, 8, vector)
            for path, vector in zip(rng.sample(paths, 5), unit(5, s + 1)):
                catalog.add_image(path, 2, 2, path + "'", 8, 8, vector)
            gone = {r.path: r.id for r in catalog.files().values()}
            catalog.delete([gone[p] for p in rng.sample(paths, 3)])
        store.publish(index_dir, catalog)
"""


@pytest.mark.slow  # kills at 10 random moments of publishing processes
def test_kill_9_during_segment_writes_deletions_and_merges_keeps_a_whole_generation(tmp_path: Path) -> None:
    """kill -9 at random moments of publishes that write segments and deletion files and merge (a merge every
    MERGE_FACTOR publishes): the server's view is always a whole generation whose every vector is its image's."""
    import random
    import signal
    import subprocess
    import sys
    import time

    from tests.indexer.test_store import ROOT, SUBPROCESS_TIMEOUT_S, _env

    index_dir = tmp_path / "index"
    collection = Collection(index_dir)
    collection.add(400)
    collection.publish()
    collection.catalog.close()
    script = tmp_path / "loop.py"
    script.write_text(CHANGE_AND_PUBLISH_LOOP)
    rng = random.Random(4321)
    generations = set()
    for round_ in range(10):
        command = [sys.executable, str(script), str(index_dir), str(round_ + 1)]
        process = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.PIPE)
        assert process.stdout is not None and process.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0.05, 1.5))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=SUBPROCESS_TIMEOUT_S)
        assert verify(index_dir) == [], f"after kill {round_}"  # every held vector is its catalog row's
        with PublishedIndex.open(index_dir) as index:
            generations.add(index.manifest.generation)
            hits = index.search(unit(1, seed=round_)[0][None], 100_000)[0]
            assert len(hits) == len({h.id for h in hits}) == index.manifest.counts["images"]  # none twice
    assert len(generations) > 3  # the kills interrupted publishers that were getting somewhere
    with Catalog.open(index_dir) as catalog:  # a rerun converges: what the catalog holds is what is served
        publish(index_dir, catalog)
        ids, vectors = catalog.embeddings()
    with PublishedIndex.open(index_dir) as index:
        found = index.search(vectors[:20], 1)
        assert [hits[0].id for hits in found] == ids[:20].tolist()
        assert index.manifest.counts["images"] == len(ids)
    assert verify(index_dir) == []
    on_disk = {p.name for p in (index_dir / "segments").iterdir()}
    assert not any(name.startswith(".tmp-") for name in on_disk)  # a crashed publish's temp files are swept


def test_the_ground_truth_kept_up_to_date_equals_one_computed_afresh() -> None:
    from indexer.store.calibration import GroundTruth

    vectors = clustered(3000, seed=11, dim=DIM)
    ids = np.arange(1, 3001, dtype=np.int64)
    truth = GroundTruth.of(ids[:2500], vectors[:2500])
    rng = np.random.default_rng(3)
    deleted = rng.choice(ids[:2500], size=200, replace=False)
    updated = truth.without(deleted).with_added(ids[2500:], vectors[2500:])
    keep = ~np.isin(ids, deleted)
    exact = np.argsort(-(truth.queries @ vectors[keep].T), axis=1)[:, :10]
    usable = updated.measurable()
    assert usable.sum() > 150
    np.testing.assert_array_equal(updated.ids[usable, :10], ids[keep][exact][usable])


def test_an_update_sets_the_knob_again_against_the_ground_truth_it_keeps(collection: Collection) -> None:
    import json

    collection.add(3000, clustered(3000, seed=1, dim=DIM))
    collection.publish("IVF32,Flat")
    generation = collection.index_dir / "generations" / _current(collection.index_dir)
    data = json.loads((generation / "manifest.json").read_text())
    assert data["calibration"] is not None and data["search_params"]["nprobe"] > 1
    data["search_params"] = {"nprobe": 1}  # a knob far too low, as a model of a collection that drifted
    (generation / "manifest.json").write_text(json.dumps(data))
    collection.add(300, clustered(300, seed=2, dim=DIM))
    collection.delete(sorted(collection.vectors)[:100])
    collection.publish()
    manifest = read_manifest(collection.index_dir, _current(collection.index_dir))
    assert manifest.search_params["nprobe"] > 1 and manifest.recall_at_10 is not None
    assert manifest.recall_at_10 >= 0.95 and manifest.calibration != data["calibration"]
    assert _recall(collection, clustered(200, seed=3, dim=DIM)) >= 0.93  # fresh queries agree
    assert verify(collection.index_dir) == []
