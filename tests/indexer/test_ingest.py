"""clip-index ingest and export (indexer.ingest): an exported index ingests back into the same rows, vectors and search
results; a shard goes in whole or not at all, once, and only into an index of its model; kill -9 at any moment of an
ingest leaves a verifiable index holding whole shards, which a rerun completes."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import select
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_model.process_tuning import ThreadPlan
from indexer.build import BuildOptions, build_index, load_model
from indexer.cli import main as cli_main
from indexer.errors import IndexFormatError, ModelMismatchError, ShardError
from indexer.ingest import IngestOptions, export, ingest
from indexer.shards import ShardRows, ShardWriter, list_shards, read_shard, write_manifest
from indexer.store import CATALOG_FILE, Catalog, ModelInfo, PublishedIndex, current_generation, verify
from tests.indexer.conftest import write_photo, write_photos

ROOT = Path(__file__).resolve().parents[2]
DIM = 8
MODEL = ModelInfo.of("synthetic", "a" * 64, DIM, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
OTHER_WEIGHTS = dataclasses.replace(MODEL, name="other", weights_sha256="b" * 64)
IMAGE_ROOT = "/photos"  # the synthetic shards' image root: no file is read from it
IN_PROCESS = ThreadPlan.for_indexing(workers=0)
INSTALL_HINT = "pip install 'clip-search[parquet]'"


def unit_vectors(count: int, seed: int, dim: int = DIM) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def make_rows(start: int, count: int, skipped: tuple[int, ...] = (), seed: int = 0) -> ShardRows:
    """Rows of files ``dir/img_<n>.jpg`` for n from ``start``; those at offsets in ``skipped`` are skipped files."""
    numbers = range(start, start + count)
    errors = [f"corrupt: broken file {n}" if n - start in skipped else None for n in numbers]
    return ShardRows(
        paths=[f"dir/img_{n}.jpg" for n in numbers],
        sha256=[hashlib.sha256(f"{n}-{seed}".encode()).hexdigest() for n in numbers],
        size=np.asarray([1000 + n for n in numbers], dtype=np.int64),
        mtime_ns=np.asarray([1_700_000_000_000_000_000 + n + seed for n in numbers], dtype=np.int64),
        width=[None if error else 640 for error in errors],
        height=[None if error else 480 for error in errors],
        errors=errors,
        embeddings=unit_vectors(errors.count(None), seed=start * 1000 + seed),
    )


def add_shard(shards_dir: Path, partition: str, rows: ShardRows, model: ModelInfo = MODEL) -> Path:
    with ShardWriter(shards_dir, partition, model) as writer:
        writer.add(rows)
    return writer.path


def write_shards(shards_dir: Path, *shards: ShardRows, model: ModelInfo = MODEL) -> list[Path]:
    """A shards directory of ``model`` holding ``shards`` as shard-000000.parquet, shard-000001.parquet, ..."""
    write_manifest(shards_dir, model, IMAGE_ROOT)
    return [add_shard(shards_dir, f"{n:06d}", rows, model) for n, rows in enumerate(shards)]


def vector_of(rows: ShardRows, row: int) -> np.ndarray:
    return rows.embeddings[int(np.searchsorted(rows.embedded_rows, row))]


def catalog_rows(index_dir: Path) -> dict[str, tuple[Any, ...]]:
    """path -> (id, size, mtime_ns, content_hash, width, height, status, error, vector bytes or None)."""
    with Catalog.open(index_dir, readonly=True) as catalog:
        ids = [record.id for record in catalog.files().values()]
        rows = {}
        for image_id, rec in catalog.images(ids).items():
            vector = catalog.embedding(image_id)
            rows[rec.path] = (image_id, rec.size, rec.mtime_ns, rec.content_hash, rec.width, rec.height, rec.status)
            rows[rec.path] += (rec.error, None if vector is None else vector.tobytes())
    return rows


def ingested(index_dir: Path) -> dict[str, tuple[str, int]]:
    with Catalog.open(index_dir, readonly=True) as catalog:
        return catalog.ingested_shards()


# --- round trip -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built_index(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An index built from real photos with the tiny model, with skipped files (two broken, a dangling link)."""
    root = tmp_path_factory.mktemp("photos")
    write_photos(root, 9)
    write_photos(root, 4, start=9, subdir="trip")
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.png").write_text("not an image\n")
    (root / "gone.jpg").symlink_to(root / "nowhere.jpg")
    index_dir = tmp_path_factory.mktemp("built") / "index"
    build_index(BuildOptions(root=root, index_dir=index_dir, model=str(tiny_model), plan=IN_PROCESS))
    return index_dir


def search_by_path(index_dir: Path, queries: np.ndarray) -> list[list[tuple[str, float]]]:
    with PublishedIndex.open(index_dir) as index:
        hits = index.search(queries, k=6)
        records = index.images([hit.id for row in hits for hit in row])
    return [[(records[hit.id].path, hit.score) for hit in row] for row in hits]


def test_export_then_ingest_gives_the_same_rows_vectors_and_search_results(built_index: Path, tmp_path: Path) -> None:
    shards_dir, index_dir = tmp_path / "shards", tmp_path / "index"

    exported = export(built_index, shards_dir, rows_per_shard=5)
    stats = ingest(IngestOptions(shards_dir, index_dir, plan=IN_PROCESS))

    before, after = catalog_rows(built_index), catalog_rows(index_dir)
    assert (exported.shards, exported.rows, exported.skipped) == (4, 16, 3)
    assert (stats.shards, stats.rows, stats.added, stats.skipped) == (4, 16, 13, 3)
    assert {path: row[1:] for path, row in after.items()} == {path: row[1:] for path, row in before.items()}
    assert {path for path, row in after.items() if row[6] == "skipped"} == {"empty.jpg", "notes.png", "gone.jpg"}
    with Catalog.open(built_index, readonly=True) as catalog:
        _, vectors = catalog.embeddings()
        root, model = catalog.image_root(), catalog.model()
    queries = np.concatenate([vectors[[0, 5, 12]], unit_vectors(2, seed=7, dim=vectors.shape[1])])
    assert search_by_path(index_dir, queries) == search_by_path(built_index, queries)
    assert verify(index_dir) == []
    with PublishedIndex.open(index_dir) as index:  # the server's view
        assert index.image_root() == root and index.manifest.counts["images"] == 13
        assert index.manifest.model == model
        some = after["trip/photo_00010.jpg"]
        assert index.embedding(some[0]).tobytes() == some[8]  # type: ignore[union-attr]
    assert photo_metadata(index_dir) == photo_metadata(built_index) and len(photo_metadata(index_dir)) == 13


def photo_metadata(index_dir: Path) -> dict[str, object]:
    """The photo metadata of the index's ok images, by path."""
    with Catalog.open(index_dir, readonly=True) as catalog:
        files = {r.path: r.content_hash for r in catalog.files().values() if r.status == "ok"}
        found = catalog.photos.of([h for h in files.values() if h])
    return {path: found[digest] for path, digest in files.items() if digest in found}


def test_export_refuses_a_directory_that_holds_shards(built_index: Path, tmp_path: Path) -> None:
    export(built_index, tmp_path / "shards")
    with pytest.raises(ShardError, match="already holds shards"):
        export(built_index, tmp_path / "shards")


# --- reruns, new shards -----------------------------------------------------------------------------------------------


def test_a_second_ingest_changes_nothing_and_a_new_shard_adds_only_its_rows(tmp_path: Path) -> None:
    shards_dir, index_dir = tmp_path / "shards", tmp_path / "index"
    first = make_rows(0, 6, skipped=(2,))
    write_shards(shards_dir, first, make_rows(6, 6))
    stats = ingest(IngestOptions(shards_dir, index_dir))
    rows, generation = catalog_rows(index_dir), current_generation(index_dir)
    assert (stats.shards, stats.added, stats.skipped, stats.generation) == (2, 11, 1, "g-000001")

    again = ingest(IngestOptions(shards_dir, index_dir))

    assert (again.shards, again.shards_before, again.rows, again.generation) == (0, 2, 0, generation)
    assert catalog_rows(index_dir) == rows and current_generation(index_dir) == generation
    assert sorted(p.name for p in (index_dir / "generations").iterdir()) == [generation]

    newer = make_rows(12, 2)
    changed = make_rows(3, 1, seed=1)  # dir/img_3.jpg with other content
    same = make_rows(0, 1)  # dir/img_0.jpg as the first shard had it
    mixed = ShardRows(
        newer.paths + changed.paths + same.paths,
        newer.sha256 + changed.sha256 + same.sha256,
        np.concatenate([newer.size, changed.size, same.size]),
        np.concatenate([newer.mtime_ns, changed.mtime_ns, same.mtime_ns]),
        newer.width + changed.width + same.width,
        newer.height + changed.height + same.height,
        newer.errors + changed.errors + same.errors,
        np.concatenate([newer.embeddings, changed.embeddings, same.embeddings]),
    )
    add_shard(shards_dir, "000002", mixed)
    third = ingest(IngestOptions(shards_dir, index_dir))

    assert (third.shards, third.shards_before, third.added, third.modified, third.unchanged) == (1, 2, 2, 1, 1)
    now = catalog_rows(index_dir)
    assert set(now) - set(rows) == {"dir/img_12.jpg", "dir/img_13.jpg"}
    assert now["dir/img_3.jpg"][0] == rows["dir/img_3.jpg"][0]  # same id, new content
    assert now["dir/img_3.jpg"][8] == changed.embeddings[0].tobytes() != rows["dir/img_3.jpg"][8]
    assert all(now[path] == row for path, row in rows.items() if path != "dir/img_3.jpg")
    assert third.generation == "g-000002" and verify(index_dir) == []


def test_a_shard_ingested_before_whose_bytes_changed_is_refused(tmp_path: Path) -> None:
    shards_dir, index_dir = tmp_path / "shards", tmp_path / "index"
    first, _ = write_shards(shards_dir, make_rows(0, 3), make_rows(3, 3))
    ingest(IngestOptions(shards_dir, index_dir))
    first.unlink()
    add_shard(shards_dir, "000000", make_rows(0, 3, seed=1))

    with pytest.raises(ShardError, match=r"shard-000000\.parquet was ingested before with other content"):
        ingest(IngestOptions(shards_dir, index_dir))


# --- refusals ---------------------------------------------------------------------------------------------------------


def test_shards_of_another_model_are_refused_and_nothing_is_written(tmp_path: Path) -> None:
    index_dir = tmp_path / "index"
    write_shards(tmp_path / "ours", make_rows(0, 3))
    ingest(IngestOptions(tmp_path / "ours", index_dir))
    rows, shards = catalog_rows(index_dir), ingested(index_dir)
    with Catalog.open(index_dir, readonly=True) as catalog:
        last_run = catalog.last_run()
    write_shards(tmp_path / "theirs", make_rows(10, 3), model=OTHER_WEIGHTS)

    with pytest.raises(ModelMismatchError, match=r"built with model 'synthetic' .* uses 'other'"):
        ingest(IngestOptions(tmp_path / "theirs", index_dir))

    assert catalog_rows(index_dir) == rows and ingested(index_dir) == shards
    with Catalog.open(index_dir, readonly=True) as catalog:
        assert catalog.last_run() == last_run
    with pytest.raises(ShardError, match="another model's weights are refused"):  # the model the user names
        ingest(IngestOptions(tmp_path / "ours", tmp_path / "new", model=OTHER_WEIGHTS))
    assert not (tmp_path / "new").exists()


def set_column(path: Path, name: str, row: int, value: Any) -> None:
    """Rewrite the shard at ``path`` with ``value`` in column ``name`` of row ``row`` (its schema and metadata kept)."""
    table = pq.read_table(path)
    values = table.column(name).to_pylist()
    values[row] = value
    index = table.schema.get_field_index(name)
    column = pa.array(values, type=table.schema.field(name).type)
    pq.write_table(table.set_column(index, table.schema.field(name), column), path)


BAD_ROWS = {  # what breaks row 1 of the second shard: (column, value, where the error is, what it says)
    "not unit-norm": ("embedding", [0.5] + [0.0] * (DIM - 1), 1, "embedding has L2 norm 0.5"),
    "non-finite": ("embedding", [float("nan")] * DIM, 1, "embedding has a non-finite value"),
    "leaves the root": ("path", "../elsewhere.jpg", 1, "without '..'"),
    "absolute": ("path", "/etc/passwd.jpg", 1, "relative"),
}


@pytest.mark.parametrize(("column", "value", "row", "message"), BAD_ROWS.values(), ids=BAD_ROWS)
def test_a_bad_row_refuses_its_shard_and_a_rerun_after_the_fix_resumes_there(
    tmp_path: Path, column: str, value: Any, row: int, message: str
) -> None:
    shards_dir, index_dir = tmp_path / "shards", tmp_path / "index"
    shards = [make_rows(0, 4), make_rows(4, 4), make_rows(8, 4)]
    paths = write_shards(shards_dir, *shards)
    set_column(paths[1], column, row, value)

    with pytest.raises(ShardError, match=rf"shard-000001\.parquet, row {row}: .*{re.escape(message)}"):
        ingest(IngestOptions(shards_dir, index_dir))

    assert set(ingested(index_dir)) == {"shard-000000.parquet"}
    assert set(catalog_rows(index_dir)) == set(shards[0].paths)
    assert current_generation(index_dir) is None
    paths[1].unlink()
    add_shard(shards_dir, "000001", shards[1])
    stats = ingest(IngestOptions(shards_dir, index_dir))
    assert (stats.shards_before, stats.shards, stats.added) == (1, 2, 8)
    assert set(catalog_rows(index_dir)) == {path for rows in shards for path in rows.paths}
    assert verify(index_dir) == []


def test_a_shard_of_another_width_is_refused_naming_its_first_embedded_row(tmp_path: Path) -> None:
    shards_dir = tmp_path / "shards"
    _, second = write_shards(shards_dir, make_rows(0, 2), make_rows(2, 3, skipped=(0,)))
    table = pq.read_table(second)  # the same model in its metadata, vectors one value wider
    values = pa.array(unit_vectors(3, seed=1, dim=DIM + 1).ravel())
    wider = pa.FixedSizeListArray.from_arrays(values, DIM + 1, mask=pa.array([True, False, False]))
    embedding = table.schema.get_field_index("embedding")
    pq.write_table(table.set_column(embedding, pa.field("embedding", wider.type), wider), second)

    with pytest.raises(ShardError, match=r"shard-000001\.parquet, row 1: embedding has 9 dimensions, the model has 8"):
        ingest(IngestOptions(shards_dir, tmp_path / "index"))
    assert set(ingested(tmp_path / "index")) == {"shard-000000.parquet"}


# --- clip-retrieval's output ------------------------------------------------------------------------------------------


def test_clip_retrieval_output_is_ingested_for_the_model_the_user_names(
    tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root, out, index_dir = tmp_path / "images", tmp_path / "out", tmp_path / "index"
    files = [write_photo(root / "a" / "one.jpg", seed=1), write_photo(root / "two.jpg", seed=2, size=(120, 64))]
    vectors = unit_vectors(2, seed=3, dim=32).astype(np.float16)  # the tiny model's width, as clip-retrieval stores
    (out / "img_emb").mkdir(parents=True)
    (out / "metadata").mkdir()
    np.save(out / "img_emb" / "img_emb_0.npy", vectors)
    metadata = pa.table({"image_path": [str(file) for file in files], "caption": ["a photo", "a photo"]})
    pq.write_table(metadata, out / "metadata" / "metadata_0.parquet")
    args = ["ingest", str(out), "--index-dir", str(index_dir), "--from", "clip-retrieval"]

    assert cli_main([*args, "--image-root", str(root)]) == 1
    assert "name them with --model" in caplog.text and not index_dir.exists()
    assert cli_main([*args, "--model", str(tiny_model), "--image-root", str(root)]) == 0

    rows = catalog_rows(index_dir)
    assert sorted(rows) == ["a/one.jpg", "two.jpg"]
    for path, vector in zip(["a/one.jpg", "two.jpg"], vectors, strict=True):
        data = (root / path).read_bytes()
        assert rows[path][1:4] == (len(data), (root / path).stat().st_mtime_ns, hashlib.sha256(data).hexdigest())
        assert rows[path][8] == vector.astype(np.float32).tobytes()
    assert rows["two.jpg"][4:6] == (120, 64)
    assert set(ingested(index_dir)) == {"metadata_0.parquet"}
    with PublishedIndex.open(index_dir) as index:
        assert index.manifest.weights_sha256 == load_model(str(tiny_model)).info.weights_sha256
        assert index.image_root() == root.resolve()
    assert verify(index_dir) == []


# --- the command line -------------------------------------------------------------------------------------------------


def test_cli_ingest_and_export_exit_codes_and_messages(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    shards_dir, index_dir, out = tmp_path / "shards", tmp_path / "index", tmp_path / "out"
    write_shards(shards_dir, make_rows(0, 3, skipped=(1,)), make_rows(3, 3))
    caplog.set_level(logging.INFO)

    assert cli_main(["ingest", str(shards_dir), "--index-dir", str(index_dir), "--factory", "Flat"]) == 0
    summary = r"ingested .*shards into .*index: 2 shards \(0 ingested before\), 6 rows: 5 added, 0 modified, 1 skipped"
    assert re.search(summary, caplog.text)
    assert PublishedIndex.open(index_dir).manifest.factory == "IDMap2,Flat"
    assert cli_main(["export", "--index-dir", str(index_dir), "--out", str(out), "--rows-per-shard", "4"]) == 0
    assert re.search(r"exported .*index to .*out: 6 rows \(1 skipped\) in 2 shards", caplog.text)
    assert cli_main(["ingest", str(out), "--index-dir", str(tmp_path / "again")]) == 0
    assert {p: r[1:] for p, r in catalog_rows(tmp_path / "again").items()} == {
        p: r[1:] for p, r in catalog_rows(index_dir).items()
    }

    caplog.clear()
    add_shard(shards_dir, "000002", make_rows(6, 2))
    set_column(shards_dir / "shard-000002.parquet", "path", 0, "../up.jpg")
    assert cli_main(["ingest", str(shards_dir), "--index-dir", str(index_dir)]) == 1
    assert re.search(r"ERROR .*shard-000002\.parquet, row 0: .*the whole shard is refused", caplog.text)
    assert cli_main(["ingest", str(tmp_path / "nothing"), "--index-dir", str(index_dir)]) == 1
    assert "is not a shards directory" in caplog.text
    assert cli_main(["export", "--index-dir", str(tmp_path / "none"), "--out", str(out)]) == 1
    assert "no index at" in caplog.text


def test_cli_without_pyarrow_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    write_shards(tmp_path / "shards", make_rows(0, 2))
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes "import pyarrow" raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)

    assert cli_main(["ingest", str(tmp_path / "shards"), "--index-dir", str(tmp_path / "index")]) == 1
    assert INSTALL_HINT in caplog.text and not (tmp_path / "index").exists()
    caplog.clear()
    assert cli_main(["export", "--index-dir", str(tmp_path / "index"), "--out", str(tmp_path / "out")]) == 1
    assert INSTALL_HINT in caplog.text and not (tmp_path / "out").exists()


def test_a_writer_adds_the_ingested_shards_table_to_a_catalog_without_it(tmp_path: Path) -> None:
    index_dir = tmp_path / "index"
    Catalog.open(index_dir, create=True).close()
    with sqlite3.connect(index_dir / CATALOG_FILE) as conn:
        conn.execute("DROP TABLE ingested_shards")
    with Catalog.open(index_dir) as catalog:
        assert catalog.ingested_shards() == {}


# --- kill -9 ----------------------------------------------------------------------------------------------------------

KILL_ROWS = 1000  # rows per shard: about 0.1 s of catalog writes
FIRST_SHARDS, MORE_SHARDS = 10, 5  # ingested into a new index, then added to the published one
LAST = "the last shard"  # stands for the line of the last shard this run ingests (or of none left): the publish is next
NEW_INDEX_MOMENTS = (  # (log line to wait for or None, how many of them, then seconds before the kill)
    (None, 0, 0.0),  # starting up: no catalog yet
    ("ingesting", 1, 0.0),  # catalog open and the run recorded; the first shard being read
    ("ingested shard", 1, 0.0),  # just after a shard's commit
    ("ingested shard", 1, 0.03),  # inside the next shard's transaction
    ("ingested shard", 2, 0.05),
    (LAST, 1, 0.0),  # the first publish
    (LAST, 1, 0.03),
)
UPDATE_MOMENTS = (("ingested shard", 1, 0.02), (LAST, 1, 0.0), (LAST, 1, 0.02), (LAST, 1, 0.05))  # then a second one
LINE_TIMEOUT_S = 120.0  # most a run may take to log the next line on a loaded machine


def start_ingest(shards_dir: Path, index_dir: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "indexer", "-v", "ingest", str(shards_dir), "--index-dir", str(index_dir)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_for_lines(process: subprocess.Popen[bytes], pattern: str, count: int) -> bool:
    """Read the process's log until ``count`` lines matched ``pattern``; False if it ended first."""
    assert process.stderr is not None
    fd, buffered, seen = process.stderr.fileno(), b"", 0
    deadline = time.monotonic() + LINE_TIMEOUT_S
    while seen < count:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"no log line for {LINE_TIMEOUT_S}s"
        chunk = os.read(fd, 65536)
        if not chunk:
            return False
        *lines, buffered = (buffered + chunk).split(b"\n")
        seen += sum(re.search(pattern, line.decode(errors="replace")) is not None for line in lines)
    return True


def check_whole_shards(index_dir: Path, shards: dict[str, ShardRows]) -> set[str]:
    """Assert the index verifies (or is unpublished) and holds exactly the rows of the shards it records as ingested,
    each path with its own row's vector or reason; returns those shards' names."""
    if current_generation(index_dir) is not None:
        assert verify(index_dir) == []
    if not (index_dir / CATALOG_FILE).exists():
        return set()
    try:
        catalog = Catalog.open(index_dir, readonly=True)
    except IndexFormatError as exc:  # killed before the new catalog's schema was committed
        assert "format version 0" in str(exc)
        return set()
    with catalog:
        recorded = set(catalog.ingested_shards())
        files = catalog.files()
        expected = {path: (shards[name], row) for name in recorded for row, path in enumerate(shards[name].paths)}
        assert set(files) == set(expected)
        for path, record in files.items():
            rows, row = expected[path]
            vector = catalog.embedding(record.id)
            if rows.errors[row] is None:
                assert vector is not None and vector.tobytes() == vector_of(rows, row).tobytes(), path
            else:
                assert vector is None and record.status == "skipped", path
    return recorded


def kill_at(moments: tuple[tuple[str | None, int, float], ...], shards_dir: Path, index_dir: Path) -> list[Any]:
    """Start an ingest and kill it at each moment in turn, checking the index after each kill (check_whole_shards)
    and that no shard committed before was lost; returns (shards ingested, generation, killed) after each."""
    shards = {path.name: read_shard(path, MODEL) for path in list_shards(shards_dir)}
    last = rf"ingested {re.escape(max(shards))}|ingesting 0 of"
    states, recorded = [], check_whole_shards(index_dir, shards)
    for pattern, count, delay in moments:
        process = start_ingest(shards_dir, index_dir)
        try:
            running = pattern is None or wait_for_lines(process, last if pattern == LAST else pattern, count)
            time.sleep(delay)
            running = running and process.poll() is None
        finally:
            process.kill()
            process.wait(timeout=30)
        now = check_whole_shards(index_dir, shards)
        assert recorded <= now, f"committed shards lost by the kill after {pattern!r} x{count} + {delay}s"
        recorded = now
        states.append((len(now), current_generation(index_dir), running))
    return states


@pytest.mark.slow  # kills at 11 moments of ingests, each followed by a verify and a rerun
def test_kill_9_at_any_moment_of_an_ingest_keeps_whole_shards_and_a_rerun_converges(tmp_path: Path) -> None:
    shards_dir, index_dir, reference = tmp_path / "shards", tmp_path / "index", tmp_path / "reference"
    rows = [make_rows(n * KILL_ROWS, KILL_ROWS, skipped=(7, 500)) for n in range(FIRST_SHARDS + MORE_SHARDS)]
    write_shards(shards_dir, *rows[:FIRST_SHARDS])

    states = kill_at(NEW_INDEX_MOMENTS, shards_dir, index_dir)
    assert any(0 < done < FIRST_SHARDS for done, _, _ in states), states  # killed between shards
    assert any(done == FIRST_SHARDS and gen is None for done, gen, _ in states), states  # and before the publish
    assert ingest(IngestOptions(shards_dir, index_dir)).generation == current_generation(index_dir) is not None
    for number, more in enumerate(rows[FIRST_SHARDS:], FIRST_SHARDS):
        add_shard(shards_dir, f"{number:06d}", more)
    states += kill_at(UPDATE_MOMENTS, shards_dir, index_dir)
    assert sum(killed for _, _, killed in states) >= 8, states

    final = start_ingest(shards_dir, index_dir)
    stderr = final.communicate(timeout=300)[1].decode()
    assert final.returncode == 0, stderr
    ingest(IngestOptions(shards_dir, reference))  # uninterrupted
    assert catalog_rows(index_dir) == catalog_rows(reference)  # ids included
    with PublishedIndex.open(index_dir) as index:  # the rows of every shard, published
        assert index.manifest.counts["images"] == len(rows) * (KILL_ROWS - 2)
