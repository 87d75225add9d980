"""The index directory format: catalog semantics, publish atomicity (simulated crashes and real kill -9), the
reader's errors on damaged directories, verify(), and the writer lock. No torch: random unit vectors from numpy."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from indexer import store
from indexer.errors import (
    EmbeddingError,
    GenerationRetiredError,
    IndexBuildError,
    IndexFormatError,
    IndexLockedError,
    IndexNotFoundError,
    ModelMismatchError,
)
from indexer.store import (
    Catalog,
    ModelInfo,
    PublishedIndex,
    WriterLock,
    current_generation,
    publish,
    publishing,
    verify,
)
from indexer.store.format import _digest
from indexer.store.schema import CATALOG_VERSION

ROOT = Path(__file__).resolve().parents[2]
DIM = 16
MODEL = ModelInfo("test-model", "ab" * 32, DIM, {"image_size": 32, "mean": (0.5, 0.5, 0.5)})
SUBPROCESS_TIMEOUT_S = 60


class SimulatedCrash(Exception):
    pass


def unit_vectors(n: int, dim: int = DIM, seed: int = 0) -> npt.NDArray[np.float32]:
    vectors = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def add_images(catalog: Catalog, vectors: npt.NDArray[np.float32], prefix: str = "img") -> list[int]:
    with catalog.transaction():
        return [
            catalog.add_image(f"{prefix}/{i:05d}.jpg", 1000 + i, 10**9 + i, f"{prefix}-hash-{i}", 64, 48, vector)
            for i, vector in enumerate(vectors)
        ]


def make_index(
    index_dir: Path, n_images: int = 200, n_texts: int = 20, dim: int = DIM, factory: str | None = None
) -> None:
    """A catalog with images, 3 skipped files and texts, published once."""
    model = ModelInfo(MODEL.name, MODEL.weights_sha256, dim, MODEL.preprocess)
    with Catalog.open(index_dir, create=True) as catalog:
        catalog.set_model(model)
        add_images(catalog, unit_vectors(n_images, dim, seed=1))
        for i in range(3):
            catalog.add_skipped(f"bad/{i}.jpg", 10, 20, None, "truncated: image file is truncated")
        catalog.add_texts([f"text {i}" for i in range(n_texts)], unit_vectors(n_texts, dim, seed=2))
        publish(index_dir, catalog, factory)


def brute_force(
    vectors: npt.NDArray[np.float32], ids: npt.NDArray[np.int64], queries: npt.NDArray[np.float32], k: int
) -> list[list[tuple[int, float]]]:
    scores = queries @ vectors.T
    order = np.argsort(-scores, axis=1)[:, :k]
    return [[(int(ids[j]), float(row[j])) for j in top] for row, top in zip(scores, order, strict=True)]


@pytest.fixture
def index_dir(tmp_path: Path) -> Path:
    make_index(tmp_path / "index")
    return tmp_path / "index"


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    with Catalog.open(tmp_path / "index", create=True) as opened:
        opened.set_model(MODEL)
        yield opened


# --- catalog ----------------------------------------------------------------------------------------------------


def test_catalog_records_images_skipped_files_and_texts(catalog: Catalog) -> None:
    vectors = unit_vectors(5)
    ids = add_images(catalog, vectors)
    skipped_id = catalog.add_skipped("bad.jpg", 3, 4, None, "not an image: cannot identify image file")
    catalog.add_texts(["a dog", "a cat"], unit_vectors(2, seed=9))

    assert catalog.counts() == {"ok": 5, "skipped": 1, "texts": 2}
    assert catalog.skipped() == [("bad.jpg", "not an image: cannot identify image file")]
    files = catalog.files()
    assert files["img/00002.jpg"] == store.FileRecord(ids[2], "img/00002.jpg", 1002, 10**9 + 2, "img-hash-2", "ok")
    assert files["bad.jpg"].status == "skipped" and files["bad.jpg"].id == skipped_id
    record = catalog.images([ids[1], skipped_id, 999])
    assert set(record) == {ids[1], skipped_id}
    assert (record[ids[1]].width, record[ids[1]].height, record[ids[1]].error) == (64, 48, None)
    assert str(record[skipped_id].error).startswith("not an image") and record[skipped_id].width is None
    np.testing.assert_array_equal(catalog.embedding(ids[3]), vectors[3])
    assert catalog.embedding(skipped_id) is None and catalog.embedding(999) is None
    text_ids, text_vectors = catalog.text_embeddings()
    assert catalog.texts(text_ids.tolist()) == {int(text_ids[0]): "a dog", int(text_ids[1]): "a cat"}
    np.testing.assert_array_equal(text_vectors, unit_vectors(2, seed=9))


def test_embeddings_are_ok_rows_ordered_by_id(catalog: Catalog) -> None:
    first = add_images(catalog, unit_vectors(3, seed=1), prefix="a")
    catalog.add_skipped("skipped.jpg", 1, 1, None, "too large")
    second = add_images(catalog, unit_vectors(3, seed=2), prefix="b")
    ids, vectors = catalog.embeddings()
    assert ids.dtype == np.int64 and vectors.dtype == np.float32 and vectors.flags.c_contiguous
    assert ids.tolist() == first + second == sorted(first + second)
    np.testing.assert_array_equal(vectors, np.concatenate([unit_vectors(3, seed=1), unit_vectors(3, seed=2)]))


def test_add_image_for_an_existing_path_keeps_its_id(catalog: Catalog) -> None:
    [image_id] = add_images(catalog, unit_vectors(1, seed=1))
    new_vector = unit_vectors(1, seed=5)[0]
    assert catalog.add_image("img/00000.jpg", 5, 6, "new-hash", 10, 20, new_vector) == image_id
    np.testing.assert_array_equal(catalog.embedding(image_id), new_vector)
    assert catalog.add_skipped("img/00000.jpg", 7, 8, "broken-hash", "truncated") == image_id
    assert catalog.embeddings()[0].size == 0 and catalog.files()["img/00000.jpg"].status == "skipped"


def test_add_images_records_a_batch_as_add_image_would_one_by_one(tmp_path: Path, catalog: Catalog) -> None:
    [kept_id] = add_images(catalog, unit_vectors(1, seed=1))
    catalog.add_skipped("b/skipped.jpg", 1, 1, None, "truncated")
    published = publish(catalog.index_dir, catalog)
    vectors = unit_vectors(4, seed=3)
    batch = [store.NewImage(p, 9, 9, f"h-{p}", 8, 6) for p in ("b/new1.jpg", "img/00000.jpg", "b/skipped.jpg", "b/2")]
    ids = catalog.add_images(batch, vectors)
    assert ids.dtype == np.int64 and ids[1] == kept_id and ids[2] == catalog.files()["b/skipped.jpg"].id
    assert ids[0] > ids[2] and ids[3] == ids[0] + 1  # new paths get new ids, in order
    for image_id, vector in zip(ids, vectors, strict=True):
        np.testing.assert_array_equal(catalog.embedding(int(image_id)), vector)
    assert catalog.counts()["ok"] == 4 and catalog.files()["img/00000.jpg"].content_hash == "h-img/00000.jpg"
    assert catalog.superseded(after=int(published.generation.split("-")[1])) == [(kept_id, 1)]
    with pytest.raises(ValueError, match="distinct paths"):
        catalog.add_images(batch[:1] * 2, vectors[:2])
    with pytest.raises(EmbeddingError, match="float32"):
        catalog.add_images(batch, vectors[:3])
    with pytest.raises(EmbeddingError, match="L2-normalized"):
        catalog.add_images(batch[:1], vectors[:1] * 2)
    assert catalog.counts()["ok"] == 4  # refused batches write nothing


def test_move_touch_delete_and_find_by_hash(catalog: Catalog) -> None:
    ids = add_images(catalog, unit_vectors(3))
    vector = catalog.embedding(ids[0])

    catalog.move(ids[0], "renamed/x.jpg", 1000, 123)
    files = catalog.files()
    assert "img/00000.jpg" not in files and files["renamed/x.jpg"].id == ids[0]
    np.testing.assert_array_equal(catalog.embedding(ids[0]), vector)
    assert [r.path for r in catalog.find_by_hash("img-hash-0")] == ["renamed/x.jpg"]
    assert catalog.find_by_hash("no-such-hash") == []

    catalog.move(ids[1], "img/00002.jpg", 1001, 5)  # onto an existing path: that row is replaced
    assert {r.id for r in catalog.files().values()} == {ids[0], ids[1]}

    catalog.touch(ids[1], 4242, 77)
    touched = catalog.files()["img/00002.jpg"]
    assert (touched.size, touched.mtime_ns, touched.content_hash) == (4242, 77, "img-hash-1")

    assert catalog.delete([ids[0], 12345]) == 1
    assert list(catalog.files()) == ["img/00002.jpg"]


def test_ids_are_never_reused_after_delete(catalog: Catalog) -> None:
    ids = add_images(catalog, unit_vectors(3))
    catalog.delete([ids[-1]])
    [new_id] = add_images(catalog, unit_vectors(1, seed=3), prefix="new")
    assert new_id > ids[-1]


def test_transaction_rolls_back_on_exception(catalog: Catalog) -> None:
    with pytest.raises(SimulatedCrash), catalog.transaction():
        add_images(catalog, unit_vectors(3))  # nested transaction joins the outer one
        raise SimulatedCrash
    assert catalog.counts()["ok"] == 0


@pytest.mark.parametrize(
    ("embedding", "message"),
    [
        (unit_vectors(1, DIM + 1)[0], "float32 \\[16\\]"),
        (unit_vectors(1)[0].astype(np.float64), "float32"),
        (unit_vectors(1)[0] * 2, "L2-normalized"),
        (np.full(DIM, np.nan, dtype=np.float32), "L2-normalized"),
    ],
)
def test_add_image_refuses_bad_embeddings(catalog: Catalog, embedding: npt.NDArray[Any], message: str) -> None:
    with pytest.raises(EmbeddingError, match=message):
        catalog.add_image("x.jpg", 1, 1, "h", 1, 1, embedding)
    assert catalog.counts()["ok"] == 0


@pytest.mark.parametrize("path", ["/etc/passwd", "../outside.jpg", "a/../../b.jpg", "dir\\file.jpg", ""])
def test_add_image_refuses_paths_outside_the_root(catalog: Catalog, path: str) -> None:
    with pytest.raises(ValueError, match="relative to the image root"):
        catalog.add_image(path, 1, 1, "h", 1, 1, unit_vectors(1)[0])


def test_set_model_is_idempotent_and_refuses_other_weights(catalog: Catalog) -> None:
    same = ModelInfo("/models/test.safetensors", MODEL.weights_sha256, DIM, {"image_size": 32, "mean": [0.5] * 3})
    catalog.set_model(same)  # same weights and preprocessing under another name: the same model
    assert catalog.model() == MODEL
    other = ModelInfo("ViT-B-32", "cd" * 32, DIM, MODEL.preprocess)
    with pytest.raises(ModelMismatchError) as caught:
        catalog.set_model(other)
    message = str(caught.value)
    assert "'test-model'" in message and "--model test-model" in message and "--rebuild" in message


def test_reset_switches_model_and_marks_rows_for_re_encoding(catalog: Catalog) -> None:
    ids = add_images(catalog, unit_vectors(2))
    catalog.add_texts(["old text"], unit_vectors(1, seed=4))
    other = ModelInfo("other", "cd" * 32, DIM, MODEL.preprocess)
    catalog.reset(other)
    assert catalog.model() == other and catalog.counts()["texts"] == 0
    files = catalog.files()
    assert {r.id for r in files.values()} == set(ids)  # ids survive: the served generation still resolves
    assert all(r.content_hash is None and r.mtime_ns == -1 for r in files.values())


def test_runs_are_recorded(catalog: Catalog) -> None:
    assert catalog.last_run() is None
    run_id = catalog.start_run("/photos")
    catalog.finish_run(run_id, {"added": 3})
    run = catalog.last_run()
    assert run is not None and run["id"] == run_id and run["root"] == "/photos" and run["stats"] == {"added": 3}
    assert run["finished_at"] >= run["started_at"]


def test_catalog_open_errors(tmp_path: Path) -> None:
    with pytest.raises(IndexNotFoundError, match="run the indexer"):
        Catalog.open(tmp_path / "nowhere")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / store.CATALOG_FILE).write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(IndexFormatError, match="not a readable SQLite catalog"):
        Catalog.open(tmp_path / "junk", readonly=True)
    with Catalog.open(tmp_path / "future", create=True) as catalog:
        catalog._conn.execute(f"PRAGMA user_version = {CATALOG_VERSION + 1}")
    expected = f"format version {CATALOG_VERSION + 1}; this code reads format version {CATALOG_VERSION}: upgrade"
    with pytest.raises(IndexFormatError, match=expected):
        Catalog.open(tmp_path / "future", readonly=True)


def test_readonly_catalog_cannot_write(index_dir: Path) -> None:
    with Catalog.open(index_dir, readonly=True) as catalog, pytest.raises(sqlite3.OperationalError, match="readonly"):
        catalog.touch(1, 2, 3)


# --- publish and read -------------------------------------------------------------------------------------------


def test_flat_search_equals_brute_force(index_dir: Path) -> None:
    with Catalog.open(index_dir, readonly=True) as catalog:
        ids, vectors = catalog.embeddings()
        text_ids, text_vectors = catalog.text_embeddings()
    queries = unit_vectors(7, seed=42)
    with PublishedIndex.open(index_dir) as index:
        assert index.manifest.counts == {"images": 200, "texts": 20}
        assert index.manifest.factory == "IDMap2,Flat" and index.manifest.model == MODEL
        for hits, expected in zip(index.search(queries, 10), brute_force(vectors, ids, queries, 10), strict=True):
            assert [h.id for h in hits] == [i for i, _ in expected]
            np.testing.assert_allclose([h.score for h in hits], [s for _, s in expected], atol=1e-5)
        text_hits = index.search_texts(queries[:2], 5)
        assert [[h.id for h in row] for row in text_hits] == [
            [i for i, _ in row] for row in brute_force(text_vectors, text_ids, queries[:2], 5)
        ]
        assert len(index.search(queries[:1], 1000)[0]) == 200  # k beyond the collection: everything, no -1
        assert set(index.texts([text_hits[0][0].id])) == {text_hits[0][0].id}
        first = index.images([int(ids[0])])[int(ids[0])]
        assert first.path == "img/00000.jpg" and first.status == "ok"
        np.testing.assert_array_equal(index.embedding(int(ids[5])), vectors[5])
    assert verify(index_dir) == []


def test_search_validates_queries(index_dir: Path) -> None:
    with PublishedIndex.open(index_dir) as index:
        with pytest.raises(EmbeddingError, match="float32 \\[Q, 16\\]"):
            index.search(unit_vectors(1)[0], 3)
        with pytest.raises(EmbeddingError):
            index.search(unit_vectors(1).astype(np.float64), 3)
        with pytest.raises(ValueError, match="k must be at least 1"):
            index.search(unit_vectors(1), 0)
        assert len(index.search(np.asfortranarray(unit_vectors(3)), 2)) == 3  # made C-contiguous on the way in


def test_empty_collection_publishes_and_searches(tmp_path: Path) -> None:
    make_index(tmp_path / "index", n_images=0, n_texts=0)
    with PublishedIndex.open(tmp_path / "index") as index:
        assert index.search(unit_vectors(2), 5) == [[], []]
        assert index.search_texts(unit_vectors(1), 5) == [[]]
    assert verify(tmp_path / "index") == []


@pytest.mark.parametrize("factory", ["IDMap2,HNSW32,Flat", "HNSW32,Flat"])
def test_hnsw_factory_has_high_recall(tmp_path: Path, factory: str) -> None:
    make_index(tmp_path / "index", n_images=3000, dim=32, factory=factory)
    with Catalog.open(tmp_path / "index", readonly=True) as catalog:
        ids, vectors = catalog.embeddings()
        assert catalog.factory() == "IDMap2,HNSW32,Flat"  # remembered for the next publish
    queries = unit_vectors(50, 32, seed=7)
    expected = brute_force(vectors, ids, queries, 10)
    with PublishedIndex.open(tmp_path / "index") as index:
        assert index.manifest.factory == "IDMap2,HNSW32,Flat"
        found = index.search(queries, 10)
        np.testing.assert_array_equal(index.embedding(int(ids[9])), vectors[9])
    recall = np.mean([len({h.id for h in f} & {i for i, _ in e}) / 10 for f, e in zip(found, expected, strict=True)])
    assert recall >= 0.95
    assert verify(tmp_path / "index") == []


def test_ivf_factory_is_trained_and_too_many_lists_is_refused(tmp_path: Path) -> None:
    index_dir = tmp_path / "index"
    make_index(index_dir, n_images=500, factory="IVF8,Flat")
    with PublishedIndex.open(index_dir) as index:
        assert index.manifest.factory == "IDMap2,IVF8,Flat" and index.manifest.counts["images"] == 500
        assert index.embedding(1) is not None  # IVF gets a direct map, so reconstruct-by-id works
    assert verify(index_dir) == []
    with Catalog.open(index_dir) as catalog, pytest.raises(IndexBuildError, match="could not train .*500 vectors"):
        publish(index_dir, catalog, "IVF1024,Flat")
    with Catalog.open(index_dir) as catalog, pytest.raises(IndexBuildError, match="factory string"):
        publish(index_dir, catalog, "NoSuchIndex42")
    assert current_generation(index_dir) == "g-000001" and verify(index_dir) == []


def test_pq_factory_is_served_with_catalog_embeddings(tmp_path: Path) -> None:
    index_dir = tmp_path / "index"
    make_index(index_dir, n_images=600, factory="IVF4,PQ4x4")
    with Catalog.open(index_dir, readonly=True) as catalog:
        exact = catalog.embedding(3)
    with PublishedIndex.open(index_dir) as index:
        np.testing.assert_array_equal(index.embedding(3), exact)  # lossy codes: the catalog's exact vector
    assert verify(index_dir) == []


def test_republish_keeps_two_generations_and_open_readers_keep_working(index_dir: Path) -> None:
    reader = PublishedIndex.open(index_dir)
    query = unit_vectors(1, seed=3)
    before = reader.search(query, 5)
    for round_ in range(3):
        with Catalog.open(index_dir) as catalog:
            add_images(catalog, unit_vectors(10, seed=100 + round_), prefix=f"round{round_}")
            manifest = publish(index_dir, catalog)
        assert manifest.generation == f"g-{round_ + 2:06d}"
        assert current_generation(index_dir) == manifest.generation
    generations = sorted(p.name for p in (index_dir / store.GENERATIONS_DIR).iterdir())
    assert generations == ["g-000003", "g-000004"]
    assert reader.search(query, 5) == before  # g-000001 is gone from disk, but was loaded into memory
    with pytest.raises(GenerationRetiredError, match="reload the published generation"):
        reader.images([before[0][0].id])  # the catalog no longer keeps what g-000001 showed
    reader.close()
    with PublishedIndex.open(index_dir) as index:
        assert index.manifest.counts["images"] == 230
    assert verify(index_dir) == []


def test_reader_serves_from_many_threads(index_dir: Path) -> None:
    queries = unit_vectors(64, seed=11)
    with PublishedIndex.open(index_dir) as index:
        expected = [index.search(q[None], 5)[0] for q in queries]

        def lookup(i: int) -> bool:
            hits = index.search(queries[i][None], 5)[0]
            records = index.images([h.id for h in hits])
            return hits == expected[i] and len(records) == 5 and index.embedding(hits[0].id) is not None

        with ThreadPoolExecutor(max_workers=8) as pool:
            assert all(pool.map(lookup, list(range(64)) * 4))


# --- crashes ----------------------------------------------------------------------------------------------------


def _crash_after(original: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        original(*args, **kwargs)
        raise SimulatedCrash

    return wrapper


def _crash_now(*args: Any, **kwargs: Any) -> Any:
    raise SimulatedCrash


CRASH_POINTS: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "after writing the temp dir": lambda mp: mp.setattr(
        publishing, "_write_generation", _crash_after(publishing._write_generation)
    ),
    "after renaming the generation": lambda mp: mp.setattr(
        publishing, "_install_generation", _crash_after(publishing._install_generation)
    ),
    "before replacing CURRENT": lambda mp: mp.setattr(publishing, "_replace_current", _crash_now),
    "after writing CURRENT.tmp": lambda mp: mp.setattr(os, "replace", _crash_now),
}


@pytest.mark.parametrize("crash_point", sorted(CRASH_POINTS))
def test_crash_during_publish_keeps_previous_generation(
    index_dir: Path, monkeypatch: pytest.MonkeyPatch, crash_point: str
) -> None:
    with Catalog.open(index_dir) as catalog:
        add_images(catalog, unit_vectors(10, seed=5), prefix="more")
        with monkeypatch.context() as patch:
            CRASH_POINTS[crash_point](patch)
            with pytest.raises(SimulatedCrash):
                publish(index_dir, catalog)
        with PublishedIndex.open(index_dir) as index:
            assert (index.manifest.generation, index.manifest.counts["images"]) == ("g-000001", 200)
        assert verify(index_dir) == []
        manifest = publish(index_dir, catalog)  # converges, and sweeps what the crash left behind
    assert manifest.counts["images"] == 210
    assert sorted(p.name for p in (index_dir / store.GENERATIONS_DIR).iterdir()) == ["g-000001", manifest.generation]
    assert verify(index_dir) == []


PUBLISH_LOOP = """
import os, random, sys, time
from pathlib import Path
from indexer import store
from indexer.store import publishing
index_dir, seed = Path(sys.argv[1]), int(sys.argv[2])
rng = random.Random(seed)
fsync = publishing._fsync  # publishing's name for it, the one its helpers call
def slow_fsync(path):  # spread each publish over ~100 ms, so kills land at every step
    time.sleep(rng.uniform(0, 0.03))
    fsync(path)
publishing._fsync = slow_fsync
with store.Catalog.open(index_dir) as catalog:
    sys.stdout.write("ready\\n"); sys.stdout.flush()
    while True:
        store.publish(index_dir, catalog)
"""


@pytest.mark.slow  # heavy end to end (seconds): CI runs it, make check leaves it out
def test_kill_9_during_publish_never_leaves_a_torn_generation(tmp_path: Path) -> None:
    index_dir = tmp_path / "index"
    make_index(index_dir, n_images=5000, dim=64)
    script = tmp_path / "publish_loop.py"
    script.write_text(PUBLISH_LOOP)
    rng = random.Random(1234)
    generations = set()
    for round_ in range(8):
        process = _spawn(script, index_dir, str(round_))
        assert process.stdout is not None and process.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0.0, 0.6))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=SUBPROCESS_TIMEOUT_S)
        with PublishedIndex.open(index_dir) as index:  # the old or the new generation, never a torn one
            assert index.manifest.counts == {"images": 5000, "texts": 20}
            generations.add(index.manifest.generation)
        assert verify(index_dir) == [], f"after kill {round_}"
    assert len(generations) > 1  # the kills did interrupt a working publisher
    with Catalog.open(index_dir) as catalog:
        manifest = publish(index_dir, catalog)
    leftovers = sorted(p.name for p in (index_dir / store.GENERATIONS_DIR).iterdir())
    assert len(leftovers) == 2 and manifest.generation in leftovers and not (index_dir / "CURRENT.tmp").exists()
    assert verify(index_dir) == []


SQLITE_WRITER = """
import sys
import numpy as np
from pathlib import Path
from indexer.store import Catalog, ModelInfo
index_dir, start = Path(sys.argv[1]), int(sys.argv[2])
with Catalog.open(index_dir, create=True) as catalog:
    catalog.set_model(ModelInfo("test-model", "ab" * 32, 16, {}))
    vectors = np.random.default_rng(start).standard_normal((100, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    for batch in range(start, 10**9):
        with catalog.transaction():
            for i, vector in enumerate(vectors):
                catalog.add_image(f"b{batch}/{i}.jpg", i, i, f"h{batch}-{i}", 1, 1, vector)
        sys.stdout.write(f"{batch + 1}\\n"); sys.stdout.flush()
"""


def test_kill_9_during_sqlite_writes_keeps_committed_rows(tmp_path: Path) -> None:
    index_dir = tmp_path / "index"
    script = tmp_path / "writer.py"
    script.write_text(SQLITE_WRITER)
    rng = random.Random(99)
    committed = 0
    for _ in range(3):
        process = _spawn(script, index_dir, str(committed))
        assert process.stdout is not None
        for _ in range(5):
            committed = int(process.stdout.readline())
        time.sleep(rng.uniform(0, 0.05))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=SUBPROCESS_TIMEOUT_S)
        committed = max([committed, *(int(line) for line in process.stdout.read().split())])
        with Catalog.open(index_dir) as catalog:  # recovers the WAL
            assert catalog._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            ok = catalog.counts()["ok"]
            assert ok % 100 == 0 and ok >= committed * 100  # whole transactions, none of the committed lost
            ids, vectors = catalog.embeddings()
            assert len(ids) == ok and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
            committed = ok // 100


# --- damaged directories ----------------------------------------------------------------------------------------


def _generation(index_dir: Path) -> Path:
    return index_dir / store.GENERATIONS_DIR / "g-000001"


def _edit_manifest(index_dir: Path, **changes: Any) -> None:
    path = _generation(index_dir) / store.MANIFEST_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _segment(index_dir: Path) -> Path:
    """The published generation's (only) image segment file."""
    manifest = json.loads((_generation(index_dir) / store.MANIFEST_FILE).read_text())
    [segment] = manifest["segments"]
    return index_dir / "segments" / segment["file"]


def _flip_byte(index_dir: Path) -> None:
    path = _segment(index_dir)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(index_dir: Path) -> None:
    path = _segment(index_dir)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE: dict[str, tuple[Callable[[Path], object], type[Exception], str]] = {
    "corrupt manifest": (
        lambda d: (_generation(d) / store.MANIFEST_FILE).write_text("{not json"),
        IndexFormatError,
        "not valid JSON",
    ),
    "manifest missing a field": (
        lambda d: _edit_manifest(d, counts=None),
        IndexFormatError,
        "malformed",
    ),
    "future format version": (
        lambda d: _edit_manifest(d, format_version=3),
        IndexFormatError,
        "format version 3; this code reads format version 2: upgrade",
    ),
    "checksum mismatch": (_flip_byte, IndexFormatError, "sha256"),
    "truncated image segment": (_truncate, IndexFormatError, "truncated"),
    "missing CURRENT": (lambda d: (d / store.CURRENT_FILE).unlink(), IndexNotFoundError, "Run the indexer"),
    "garbage in CURRENT": (
        lambda d: (d / store.CURRENT_FILE).write_text("../../etc"),
        IndexFormatError,
        "not a generation name",
    ),
    "missing generation": (lambda d: shutil.rmtree(_generation(d)), IndexFormatError, "names g-000001"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_index_is_refused_with_a_clear_error(index_dir: Path, damage: str) -> None:
    apply, error, message = DAMAGE[damage]
    apply(index_dir)
    with pytest.raises(error, match=message):
        PublishedIndex.open(index_dir)
    problems = verify(index_dir)
    assert problems and any(word in " ".join(problems) for word in (message, "missing", "CURRENT", "does not exist")), (
        problems
    )


def test_unreadable_faiss_file_with_matching_checksum_is_refused(index_dir: Path) -> None:
    path = _segment(index_dir)
    path.write_bytes(path.read_bytes()[:100])
    digest, manifest = _digest(path), json.loads((_generation(index_dir) / store.MANIFEST_FILE).read_text())
    files = {**manifest["files"], path.name: {"sha256": digest.sha256, "bytes": digest.bytes}}
    _edit_manifest(index_dir, files=files)
    with pytest.raises(IndexFormatError, match="cannot read FAISS index"):
        PublishedIndex.open(index_dir, verify_checksums=False)
    assert any("cannot read FAISS index" in p for p in verify(index_dir))


def test_open_without_checksums_still_catches_truncation(index_dir: Path) -> None:
    _truncate(index_dir)
    with pytest.raises(IndexFormatError, match="bytes, the manifest records"):
        PublishedIndex.open(index_dir, verify_checksums=False)


def test_nothing_published_yet(tmp_path: Path) -> None:
    with pytest.raises(IndexNotFoundError, match="does not exist"):
        PublishedIndex.open(tmp_path / "nowhere")
    with Catalog.open(tmp_path / "index", create=True):
        pass
    with pytest.raises(IndexNotFoundError, match="nothing is published"):
        PublishedIndex.open(tmp_path / "index")
    assert current_generation(tmp_path / "index") is None
    assert verify(tmp_path / "index") == [f"nothing is published in {tmp_path / 'index'}: CURRENT is missing"]


def test_verify_treats_later_catalog_changes_as_info(index_dir: Path) -> None:
    with Catalog.open(index_dir) as catalog:
        catalog.start_run("/photos")
        add_images(catalog, unit_vectors(5, seed=8), prefix="later")
        catalog.delete([1, 2])
    assert verify(index_dir) == []


# --- one answer, one generation ---------------------------------------------------------------------------------


def _view(index: PublishedIndex, ids: list[int]) -> dict[int, tuple[str, int, int | None, str, bytes | None]]:
    """What a reader says about ``ids``: (path, size, width, status, embedding bytes) of each id it shows."""
    records = index.images(ids)
    return {
        i: (r.path, r.size, r.width, r.status, None if (v := index.embedding(i)) is None else v.tobytes())
        for i, r in records.items()
    }


@pytest.mark.parametrize("factory", [None, "IDMap2,SQ8"], ids=["exact", "lossy"])
def test_a_generation_shows_the_rows_it_was_built_from(tmp_path: Path, factory: str | None) -> None:
    index_dir = tmp_path / "index"
    make_index(index_dir, factory=factory)
    ids = list(range(1, 9))
    first = PublishedIndex.open(index_dir)
    shown_by_first = _view(first, ids)
    assert sorted(shown_by_first) == ids and first.texts([1]) == {1: "text 0"}
    with Catalog.open(index_dir) as catalog:
        catalog.delete([1])
        catalog.move(2, "moved/b.jpg", 1001, 5)
        catalog.touch(3, 999, 6)
        catalog.add_image("img/00004.jpg", 7, 8, "new-hash", 640, 480, unit_vectors(1, seed=40)[0])  # id 5 rewritten
        catalog.add_skipped("img/00005.jpg", 9, 9, None, "truncated: now broken")  # id 6 no longer decodes
        new_id = catalog.add_image("new.jpg", 1, 1, "n", 10, 10, unit_vectors(1, seed=41)[0])
        catalog.delete_texts([1])
        pending = PublishedIndex.open(index_dir)  # opened mid-build: still g-000001
        assert _view(first, [*ids, new_id]) == _view(pending, [*ids, new_id]) == shown_by_first
        assert first.texts([1]) == {1: "text 0"}
        publish(index_dir, catalog, factory)
        second = PublishedIndex.open(index_dir)
        assert _view(first, [*ids, new_id]) == shown_by_first  # a server still on g-000001 answers as before
        shown_by_second = _view(second, [*ids, new_id])
        assert 1 not in shown_by_second and second.texts([1]) == {}
        assert shown_by_second[2][:2] == ("moved/b.jpg", 1001) and shown_by_second[3][1] == 999
        assert shown_by_second[5][2] == 640 and shown_by_second[5][4] != shown_by_first[5][4]
        assert shown_by_second[6][3] == "skipped" and shown_by_second[6][4] is None
        assert shown_by_second[new_id][0] == "new.jpg"
        assert {i: v for i, v in shown_by_second.items() if i in (4, 7, 8)} == {i: shown_by_first[i] for i in (4, 7, 8)}
        catalog.delete([7])
        publish(index_dir, catalog, factory)  # g-000003: g-000001 is retired, g-000002 still kept
    assert _view(second, [*ids, new_id]) == shown_by_second
    with pytest.raises(GenerationRetiredError):
        first.images([4])
    for reader in (first, pending, second):
        reader.close()
    with sqlite3.connect(index_dir / store.CATALOG_FILE) as conn:  # only what g-000002 still shows is kept
        assert conn.execute("SELECT DISTINCT id FROM image_versions").fetchall() == [(7,)]
    assert verify(index_dir) == []


def test_verify_reports_catalog_rows_missing_from_faiss_and_vice_versa(index_dir: Path) -> None:
    with sqlite3.connect(index_dir / store.CATALOG_FILE) as conn:  # tampering that no writer does
        conn.execute("DELETE FROM images WHERE id = 1")
        conn.execute("UPDATE images SET vec_row = (SELECT vec_row FROM images WHERE id = 3) WHERE id = 2")
        conn.execute(
            "INSERT INTO images (path, status, vec_file, vec_row, updated_at) "
            "SELECT 'old.jpg', 'ok', vec_file, vec_row, 0 FROM images WHERE id = 4"
        )
    problems = verify(index_dir)
    assert len(problems) == 3, problems
    assert "no usable images row in the catalog: [1]" in problems[0]
    assert "missing from the image segments" in problems[1]
    assert "differ from the catalog: ids [2]" in problems[2]


def test_verify_reports_model_mismatch(index_dir: Path) -> None:
    with sqlite3.connect(index_dir / store.CATALOG_FILE) as conn:
        conn.execute("UPDATE meta SET value = 'ff' WHERE key = 'weights_sha256'")
    assert "differs from the model of generation g-000001" in verify(index_dir)[0]


# --- writer lock ------------------------------------------------------------------------------------------------


LOCK_HOLDER = """
import sys, time
from pathlib import Path
from indexer.store import WriterLock
with WriterLock(Path(sys.argv[1])):
    sys.stdout.write("locked\\n"); sys.stdout.flush()
    time.sleep(600)
"""


def test_second_writer_in_the_same_process_is_refused(tmp_path: Path) -> None:
    with WriterLock(tmp_path / "index"):
        with pytest.raises(IndexLockedError, match=f"{tmp_path / 'index'} is locked .*pid {os.getpid()}"):
            WriterLock(tmp_path / "index").acquire()
    with WriterLock(tmp_path / "index"):  # released on exit
        pass


def test_lock_of_a_killed_writer_is_released(tmp_path: Path) -> None:
    script = tmp_path / "holder.py"
    script.write_text(LOCK_HOLDER)
    process = _spawn(script, tmp_path / "index")
    assert process.stdout is not None and process.stdout.readline() == b"locked\n"
    with pytest.raises(IndexLockedError, match=f"pid {process.pid}\\)"):
        WriterLock(tmp_path / "index").acquire()
    with pytest.raises(IndexLockedError):  # publish takes the lock too
        make_index(tmp_path / "index")
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=SUBPROCESS_TIMEOUT_S)
    with WriterLock(tmp_path / "index"):
        pass


def test_publish_reuses_the_lock_its_caller_holds(tmp_path: Path) -> None:
    with WriterLock(tmp_path / "index"):
        make_index(tmp_path / "index")
    assert verify(tmp_path / "index") == []


# --- layering ---------------------------------------------------------------------------------------------------


def test_importing_the_store_does_not_import_torch() -> None:
    code = "import indexer.store, sys; assert 'torch' not in sys.modules and 'clip_model' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), check=True, timeout=SUBPROCESS_TIMEOUT_S)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _spawn(script: Path, *args: Path | str) -> subprocess.Popen[bytes]:
    command = [sys.executable, str(script), *map(str, args)]
    return subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.PIPE)


def test_a_run_over_a_folder_whose_name_is_not_utf8_records_it_losslessly(index_dir: Path) -> None:
    root = os.fsdecode(b"/photos/caf\xe9\\2024")
    with Catalog.open(index_dir) as catalog:
        catalog.finish_run(catalog.start_run(root), {"added": 0})
        run = catalog.last_run()
        assert run is not None and run["root"] == "/photos/caf\\xe9\\\\2024"  # readable text, JSON-ready
        json.dumps(run)
    with PublishedIndex.open(index_dir) as index:
        assert index.image_root() == Path(root)
