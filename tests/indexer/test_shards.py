"""Embedding shards (indexer.shards): the format round-trips exactly, a shard appears whole or not at all, and a bad
shard is refused whole with its file and row named; clip-retrieval's output reads into the same validated rows."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from indexer import paths, shards
from indexer.errors import IndexerError
from indexer.photo_metadata import PhotoMetadata
from indexer.shards import (
    ShardError,
    ShardRows,
    ShardWriter,
    list_shards,
    read_manifest,
    read_shard,
    write_manifest,
)
from indexer.shards_clip_retrieval import list_parts, read_clip_retrieval
from indexer.store import ModelInfo
from tests.indexer.conftest import write_photo

DIM = 4
MODEL = ModelInfo.of("tiny", "a" * 64, DIM, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
OTHER_WEIGHTS = dataclasses.replace(MODEL, weights_sha256="b" * 64)
BAD_ROW = 2


def unit_vectors(count: int, seed: int, dim: int = DIM) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def make_rows(count: int, skipped: tuple[int, ...] = (), start: int = 0) -> ShardRows:
    """``count`` valid rows; those in ``skipped`` are skipped files (no embedding, an error)."""
    numbers = range(start, start + count)
    errors = [f"corrupt: broken file {i}" if i - start in skipped else None for i in numbers]
    return ShardRows(
        paths=[f"dir/img_{i}.jpg" for i in numbers],
        sha256=[hashlib.sha256(str(i).encode()).hexdigest() for i in numbers],
        size=np.asarray([100 * i + 1 for i in numbers], dtype=np.int64),
        mtime_ns=np.asarray([1_700_000_000_000_000_000 + i for i in numbers], dtype=np.int64),
        width=[None if e else 640 + i for i, e in zip(numbers, errors, strict=True)],
        height=[None if e else 480 for e in errors],
        errors=errors,
        embeddings=unit_vectors(count - len(skipped), seed=start),
    )


def assert_same_rows(got: ShardRows, want: ShardRows) -> None:
    assert got.paths == want.paths
    assert got.sha256 == want.sha256
    assert got.size.dtype == np.int64 and np.array_equal(got.size, want.size)
    assert got.mtime_ns.dtype == np.int64 and np.array_equal(got.mtime_ns, want.mtime_ns)
    assert (got.width, got.height, got.errors) == (want.width, want.height, want.errors)
    assert got.embeddings.dtype == np.float32 and got.embeddings.flags.c_contiguous
    assert got.embeddings.shape == want.embeddings.shape
    assert got.embeddings.tobytes() == want.embeddings.tobytes()  # bit for bit


def write_shard(shards_dir: Path, partition: str, *batches: ShardRows) -> Path:
    with ShardWriter(shards_dir, partition, MODEL) as writer:
        for rows in batches:
            writer.add(rows)
    return writer.path


# --- the format, written independently of the module, for rows the writer would refuse -----------------------------


def valid_columns(count: int = 5) -> dict[str, list[Any]]:
    rows = make_rows(count)
    return {
        "path": list(rows.paths),
        "sha256": list(rows.sha256),
        "size": rows.size.tolist(),
        "mtime_ns": rows.mtime_ns.tolist(),
        "width": list(rows.width),
        "height": list(rows.height),
        "embedding": rows.embeddings.tolist(),
        "error": list(rows.errors),
    }


def model_metadata(model: ModelInfo, version: bytes = b"1") -> dict[bytes, bytes]:
    return {
        b"clip_search.model": json.dumps(dataclasses.asdict(model)).encode(),
        b"clip_search.format_version": version,
    }


def write_raw(
    path: Path, columns: dict[str, list[Any]], types: dict[str, Any] | None = None, metadata: Any = None
) -> Path:
    """A Parquet file as the module docstring specifies it (or with other ``types``), from plain Python columns; all
    columns nullable, ``metadata`` that of MODEL unless given."""
    types = (
        {"path": pa.string(), "sha256": pa.string(), "size": pa.int64(), "mtime_ns": pa.int64()}
        | {"width": pa.int32(), "height": pa.int32(), "embedding": pa.list_(pa.float32(), DIM), "error": pa.string()}
        | (types or {})
    )
    metadata = model_metadata(MODEL) if metadata is None else metadata
    schema = pa.schema([pa.field(name, types.get(name, pa.string())) for name in columns], metadata=metadata)
    pq.write_table(pa.table(columns, schema=schema), path)
    return path


# --- round trip --------------------------------------------------------------------------------------------------


def test_rows_round_trip_exactly_across_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shards, "READ_BATCH_ROWS", 3)  # rows 0-6 come back in three record batches
    first, second = make_rows(4, skipped=(1,)), make_rows(3, skipped=(2,), start=4)
    path = write_shard(tmp_path, "00000", first, second)

    back = read_shard(path, MODEL)

    assert path.name == "shard-00000.parquet" and len(back) == 7
    want = ShardRows(
        first.paths + second.paths,
        first.sha256 + second.sha256,
        np.concatenate([first.size, second.size]),
        np.concatenate([first.mtime_ns, second.mtime_ns]),
        first.width + second.width,
        first.height + second.height,
        first.errors + second.errors,
        np.concatenate([first.embeddings, second.embeddings]),
    )
    assert_same_rows(back, want)
    assert back.embedded_rows.tolist() == [0, 2, 3, 4, 5]


def test_empty_shard_reads_as_no_rows(tmp_path: Path) -> None:
    back = read_shard(write_shard(tmp_path, "empty"), MODEL)
    assert len(back) == 0 and back.embeddings.shape == (0, DIM)


def test_shard_names_its_model_wherever_it_is_moved(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    moved = write_shard(tmp_path / "a", "0", make_rows(2)).rename(tmp_path / "shard-0.parquet")

    assert len(read_shard(moved, MODEL)) == 2
    with pytest.raises(ShardError, match="another model's weights are refused"):
        read_shard(moved, OTHER_WEIGHTS)


def test_odd_file_names_round_trip(tmp_path: Path) -> None:
    names = ["a\\b.jpg", os.fsdecode(b"caf\xe9.jpg"), "line\nbreak.png", "日本/写真.jpg", " lead space.jpg"]
    rows = dataclasses.replace(make_rows(len(names)), paths=[paths.to_stored(name) for name in names])
    assert read_shard(write_shard(tmp_path, "0", rows), MODEL).paths == rows.paths


_segment = st.one_of(
    st.text(st.characters(codec="utf-8", exclude_characters="/\0"), min_size=1, max_size=6),
    st.binary(min_size=1, max_size=6).filter(lambda b: b"/" not in b and b"\0" not in b).map(os.fsdecode),
).filter(lambda segment: segment not in (".", ".."))


@st.composite
def shard_rows(draw: st.DrawFn) -> ShardRows:
    names = draw(st.lists(st.lists(_segment, min_size=1, max_size=3).map("/".join), max_size=12, unique=True))
    count = len(names)
    skipped = draw(st.lists(st.booleans(), min_size=count, max_size=count))
    errors = [draw(st.text(min_size=1, max_size=20)) if s else None for s in skipped]
    hex_digest = st.binary(min_size=32, max_size=32).map(bytes.hex)
    sha256 = [draw(st.none() | hex_digest) if e else draw(hex_digest) for e in errors]
    pixels = st.integers(1, 2**31 - 1)
    width = [draw(st.none() | pixels) if e else draw(pixels) for e in errors]
    height = [draw(st.none() | pixels) if e else draw(pixels) for e in errors]
    return ShardRows(
        paths=[paths.to_stored(name) for name in names],
        sha256=sha256,
        size=np.asarray(draw(st.lists(st.integers(0, 2**63 - 1), min_size=count, max_size=count)), dtype=np.int64),
        mtime_ns=np.asarray(draw(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=count, max_size=count))),
        width=width,
        height=height,
        errors=errors,
        embeddings=unit_vectors(errors.count(None), seed=draw(st.integers(0, 2**32 - 1))),
    )


@settings(max_examples=30, deadline=None)
@given(rows=shard_rows())
def test_any_valid_shard_round_trips(rows: ShardRows) -> None:
    with tempfile.TemporaryDirectory() as directory:
        assert_same_rows(read_shard(write_shard(Path(directory), "p", rows), MODEL), rows)


# --- atomic install ------------------------------------------------------------------------------------------------


def test_error_while_writing_leaves_no_shard_and_no_temp_file(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="encoder died"), ShardWriter(tmp_path, "00003", MODEL) as writer:
        writer.add(make_rows(3))
        raise RuntimeError("encoder died")

    assert list_shards(tmp_path) == [] and os.listdir(tmp_path) == []


def test_shard_being_written_is_invisible_until_closed(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, "00007", MODEL)
    writer.add(make_rows(3))
    assert list_shards(tmp_path) == []  # a crash here would leave only the .tmp- file
    assert [name.startswith(".tmp-shard-00007-") for name in os.listdir(tmp_path)] == [True]

    assert writer.close() == tmp_path / "shard-00007.parquet"
    assert list_shards(tmp_path) == [writer.path] and os.listdir(tmp_path) == [writer.path.name]


def test_refused_rows_leave_no_shard(tmp_path: Path) -> None:
    bad = dataclasses.replace(make_rows(3), paths=["a.jpg", "../escape.jpg", "c.jpg"])
    with pytest.raises(ShardError, match=r"shard-0\.parquet, row 4:"), ShardWriter(tmp_path, "0", MODEL) as writer:
        writer.add(make_rows(3, start=10))
        writer.add(bad)
    assert os.listdir(tmp_path) == []


def test_partition_is_written_once(tmp_path: Path) -> None:
    write_shard(tmp_path, "00001", make_rows(1))
    with pytest.raises(ShardError, match="already exists"):
        ShardWriter(tmp_path, "00001", MODEL)


@pytest.mark.parametrize("partition", ["", "../up", "a/b", ".hidden", "sp ace"])
def test_partition_name_is_plain(tmp_path: Path, partition: str) -> None:
    with pytest.raises(ShardError, match="partition name"):
        ShardWriter(tmp_path, partition, MODEL)


def test_list_shards_is_sorted_and_skips_other_files(tmp_path: Path) -> None:
    for partition in ("00002", "00000", "00001"):
        write_shard(tmp_path, partition, make_rows(1))
    for stray in (".tmp-shard-00003-x.parquet", "shard-00004.parquet.partial", "notes.txt", "shard-.parquet"):
        (tmp_path / stray).write_bytes(b"")
    assert [p.name for p in list_shards(tmp_path)] == [f"shard-0000{i}.parquet" for i in range(3)]


def test_list_shards_of_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="cannot list"):
        list_shards(tmp_path / "nope")


# --- rows refused, file and row named ----------------------------------------------------------------------------

REFUSED_ROWS = {
    "nan": ("embedding", [float("nan"), 0.0, 0.0, 1.0], "non-finite"),
    "inf": ("embedding", [float("inf"), 0.0, 0.0, 0.0], "non-finite"),
    "not unit norm": ("embedding", [0.5, 0.5, 0.5, 0.6], "L2 norm 1.053"),
    "bad sha256": ("sha256", "xyz", "not 64 lowercase hex"),
    "upper-case sha256": ("sha256", "AB" * 32, "not 64 lowercase hex"),
    "no sha256": ("sha256", None, "sha256 is missing"),
    "negative size": ("size", -1, "size is negative"),
    "absolute path": ("path", "/etc/passwd", "relative to the image root"),
    "parent path": ("path", "../outside.jpg", "without '..'"),
    "path leaving the root": ("path", "dir/../../outside.jpg", "without '..'"),
    "empty path": ("path", "", "relative to the image root"),
    "path with empty segment": ("path", "dir//img.jpg", "relative to the image root"),
    "duplicate path": ("path", "dir/img_0.jpg", "appears twice"),
    "no width": ("width", None, "width None is not a pixel count"),
    "zero height": ("height", 0, "height 0 is not a pixel count"),
}
ONLY_IN_FILES = {  # rows ShardRows cannot hold: refused by the reader
    "null path": ("path", None, "path is null"),
    "null mtime": ("mtime_ns", None, "mtime_ns is null"),
    "neither embedding nor error": ("embedding", None, "neither embedding nor error"),
    "embedding and error": ("error", "corrupt: bad", "both an embedding and an error"),
}


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [*REFUSED_ROWS.values(), *ONLY_IN_FILES.values()],
    ids=[*REFUSED_ROWS, *ONLY_IN_FILES],
)
def test_reader_refuses_a_bad_row_naming_file_and_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, column: str, value: Any, message: str
) -> None:
    monkeypatch.setattr(shards, "READ_BATCH_ROWS", 2)  # the bad row opens the second batch: numbering carries on
    columns = valid_columns()
    columns[column][BAD_ROW] = value
    path = write_raw(tmp_path / "shard-bad.parquet", columns)

    with pytest.raises(ShardError, match=rf"shard-bad\.parquet, row {BAD_ROW}: .*{re.escape(message)}"):
        read_shard(path, MODEL)


@pytest.mark.parametrize(("column", "value", "message"), REFUSED_ROWS.values(), ids=REFUSED_ROWS)
def test_writer_refuses_the_same_rows(tmp_path: Path, column: str, value: Any, message: str) -> None:
    rows = make_rows(5)
    if column == "embedding":
        embeddings = rows.embeddings.copy()
        embeddings[BAD_ROW] = value
        bad = dataclasses.replace(rows, embeddings=embeddings)
    else:
        field = {"path": "paths"}.get(column, column)
        values = getattr(rows, field).copy()
        values[BAD_ROW] = value
        bad = dataclasses.replace(rows, **{field: values})

    with pytest.raises(ShardError, match=rf"shard-w\.parquet, row {BAD_ROW}: .*{re.escape(message)}"):
        write_shard(tmp_path, "w", bad)
    assert os.listdir(tmp_path) == []


def test_wrong_dimension_names_the_first_embedded_row(tmp_path: Path) -> None:
    columns = valid_columns()
    columns["embedding"] = [None, None, *unit_vectors(3, seed=0, dim=DIM + 1).tolist()]
    columns["error"][:2] = ["corrupt: a", "missing: b"]
    columns["width"][:2] = columns["height"][:2] = [None, None]
    path = write_raw(tmp_path / "shard-dim.parquet", columns, {"embedding": pa.list_(pa.float32(), DIM + 1)})

    with pytest.raises(ShardError, match=r"shard-dim\.parquet, row 2: embedding has 5 dimensions, the model has 4"):
        read_shard(path, MODEL)


def drop_error(columns: dict[str, list[Any]]) -> dict[str, Any]:
    columns.pop("error")
    return {}


def add_caption(columns: dict[str, list[Any]]) -> dict[str, Any]:
    columns["caption"] = ["a photo"] * len(columns["path"])
    return {}


def size_as_text(columns: dict[str, list[Any]]) -> dict[str, Any]:
    columns["size"] = [str(size) for size in columns["size"]]
    return {"size": pa.string()}


def float64_embeddings(columns: dict[str, list[Any]]) -> dict[str, Any]:
    return {"embedding": pa.list_(pa.float64(), DIM)}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (drop_error, "has columns"),
        (add_caption, "has columns"),
        (size_as_text, "column 'size' has type string"),
        (float64_embeddings, "column 'embedding' has type fixed_size_list<element: double>[4]"),
    ],
)
def test_reader_refuses_another_schema(tmp_path: Path, change: Any, message: str) -> None:
    columns = valid_columns()
    path = write_raw(tmp_path / "shard-s.parquet", columns, change(columns))
    with pytest.raises(ShardError, match=rf"shard-s\.parquet.*{re.escape(message)}"):
        read_shard(path, MODEL)


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({}, "does not say which model made it"),
        (model_metadata(OTHER_WEIGHTS), "another model's weights are refused"),
        (model_metadata(MODEL, b"3"), "shard format version 3"),
        ({b"clip_search.model": b"{", b"clip_search.format_version": b"1"}, "malformed shard metadata"),
    ],
    ids=["no model", "other weights", "newer format", "garbled model"],
)
def test_reader_refuses_a_shard_of_another_model_or_format(tmp_path: Path, metadata: Any, message: str) -> None:
    path = write_raw(tmp_path / "shard-m.parquet", valid_columns(), metadata=metadata)
    with pytest.raises(ShardError, match=rf"shard-m\.parquet .*{message}"):
        read_shard(path, MODEL)


def test_reader_refuses_a_file_that_is_not_parquet(tmp_path: Path) -> None:
    whole = write_shard(tmp_path, "whole", make_rows(50)).read_bytes()
    (tmp_path / "shard-cut.parquet").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "shard-text.parquet").write_text("not parquet")
    for name in ("shard-cut.parquet", "shard-text.parquet"):
        with pytest.raises(ShardError, match=rf"{name} is not a readable Parquet file"):
            read_shard(tmp_path / name, MODEL)


# --- manifest ------------------------------------------------------------------------------------------------------


def test_manifest_round_trips_and_a_rerun_keeps_it(tmp_path: Path) -> None:
    shards_dir = tmp_path / "out"
    written = write_manifest(shards_dir, MODEL, "/photos", created_by="test 1.0")
    data = json.loads((shards_dir / "manifest.json").read_text())

    assert data == {
        "format_version": 2,
        "model": {"name": "tiny", "weights_sha256": "a" * 64, "embed_dim": DIM, "preprocess": MODEL.preprocess},
        "image_root": "/photos",
        "created_by": "test 1.0",
    }
    assert read_manifest(shards_dir, expected=MODEL) == written
    assert write_manifest(shards_dir, MODEL, "/photos") == written  # a rerun resumes in the same directory
    assert os.listdir(shards_dir) == ["manifest.json"]
    assert write_manifest(tmp_path / "other", MODEL, Path("photos")).created_by.startswith("clip-search")


def test_manifest_of_another_run_is_not_overwritten(tmp_path: Path) -> None:
    write_manifest(tmp_path, MODEL, "/photos")
    with pytest.raises(ShardError, match="use another directory"):
        write_manifest(tmp_path, OTHER_WEIGHTS, "/photos")
    with pytest.raises(ShardError, match="use another directory"):
        write_manifest(tmp_path, MODEL, "/elsewhere")


def test_manifest_of_another_model_is_refused(tmp_path: Path) -> None:
    write_manifest(tmp_path, MODEL, "/photos")
    with pytest.raises(ShardError, match=r"manifest\.json holds embeddings of model 'tiny' .*refused"):
        read_manifest(tmp_path, expected=OTHER_WEIGHTS)


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="manifest.json does not exist: .* is not a shards directory"):
        read_manifest(tmp_path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "cannot be read"),
        ("[]", "no integer format_version"),
        ('{"format_version": "1"}', "no integer format_version"),
        ('{"format_version": 3}', "format version 3; this clip-search reads (1, 2): upgrade clip-search"),
        ('{"format_version": 0}', "format version 0; this clip-search reads (1, 2): write the shards again"),
        ('{"format_version": 1, "image_root": "/p", "created_by": "x"}', "missing a field"),
    ],
    ids=["garbled", "not an object", "string version", "newer", "older", "no model"],
)
def test_unusable_manifest(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ShardError, match=re.escape(message)):
        read_manifest(tmp_path)


def test_manifest_with_a_malformed_model(tmp_path: Path) -> None:
    write_manifest(tmp_path, MODEL, "/photos")
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["model"]["embed_dim"] = "4"
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ShardError, match="malformed one"):
        read_manifest(tmp_path)


# --- pyarrow is optional -----------------------------------------------------------------------------------------


def test_missing_pyarrow_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_shard(tmp_path, "0", make_rows(1))
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes "import pyarrow" raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    hint = re.escape("install it with pip install 'clip-search[parquet]'")
    with pytest.raises(IndexerError, match=hint):
        ShardWriter(tmp_path, "1", MODEL)
    with pytest.raises(IndexerError, match=hint):
        read_shard(path, MODEL)


def test_importing_the_module_does_not_import_pyarrow() -> None:
    code = "import sys, indexer.shards; assert 'pyarrow' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


# --- clip-retrieval's inference output ---------------------------------------------------------------------------


def write_clip_retrieval(folder: Path, parts: dict[str, tuple[list[str], np.ndarray]]) -> Path:
    """clip-retrieval's layout: img_emb/img_emb_<i>.npy beside metadata/metadata_<i>.parquet (with a caption)."""
    (folder / "img_emb").mkdir(parents=True)
    (folder / "metadata").mkdir()
    for number, (image_paths, embeddings) in parts.items():
        np.save(folder / "img_emb" / f"img_emb_{number}.npy", embeddings)
        table = pa.table({"image_path": image_paths, "caption": ["a photo"] * len(image_paths)})
        pq.write_table(table, folder / "metadata" / f"metadata_{number}.parquet")
    return folder


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    write_photo(root / "a" / "one.jpg", seed=1)
    write_photo(root / "two.jpg", seed=2, size=(120, 64))
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation "rotate 90": stored 96 x 64, upright 64 x 96
    turned = write_photo(root / "turned.jpg", seed=3)
    with Image.open(turned) as image:
        image.load()
        image.save(turned, exif=exif)
    return root


def float16_vectors(count: int, seed: int) -> np.ndarray:
    return unit_vectors(count, seed).astype(np.float16)  # as clip-retrieval stores them


def test_clip_retrieval_output_reads_as_validated_rows(tmp_path: Path, image_root: Path) -> None:
    first, second = float16_vectors(2, seed=0), float16_vectors(1, seed=1)
    folder = write_clip_retrieval(
        tmp_path / "out",
        {"0": ([str(image_root / "a" / "one.jpg"), str(image_root / "turned.jpg")], first), "1": (["two.jpg"], second)},
    )

    parts = list(read_clip_retrieval(folder, image_root, MODEL))

    assert [part.partition for part, _ in parts] == ["0", "1"]
    rows = parts[0][1]
    assert rows.paths == ["a/one.jpg", "turned.jpg"] and parts[1][1].paths == ["two.jpg"]
    for row, name in enumerate(["a/one.jpg", "turned.jpg"]):
        stat = (image_root / name).stat()
        assert rows.sha256[row] == hashlib.sha256((image_root / name).read_bytes()).hexdigest()
        assert (rows.size[row], rows.mtime_ns[row]) == (stat.st_size, stat.st_mtime_ns)
    assert (rows.width, rows.height) == ([96, 64], [64, 96])
    assert (parts[1][1].width, parts[1][1].height) == ([120], [64])
    assert rows.errors == [None, None]
    assert rows.embeddings.dtype == np.float32 and rows.embeddings.flags.c_contiguous
    assert np.array_equal(rows.embeddings, first.astype(np.float32))


def test_clip_retrieval_parts_are_in_partition_order(tmp_path: Path) -> None:
    vectors = float16_vectors(1, seed=0)
    folder = write_clip_retrieval(tmp_path, {n: (["x.jpg"], vectors) for n in ("10", "9", "0")})
    assert [part.partition for part in list_parts(folder)] == ["0", "9", "10"]


@pytest.mark.parametrize(
    ("image_path", "message"),
    [
        ("{root}/../elsewhere.jpg", "is not a file under"),
        ("{root}2/a/one.jpg", "is not a file under"),
        ("../one.jpg", "without '..'"),
        ("", "is not a file under"),
        ("{root}/a/missing.jpg", "a/missing.jpg does not exist under"),
        ("{root}/a", "a cannot be read"),
        ("{root}/a/one.jpg", "appears twice"),
    ],
    ids=["leaves the root", "beside the root", "relative, leaves", "empty", "missing", "a directory", "duplicate"],
)
def test_clip_retrieval_bad_row_is_named(tmp_path: Path, image_root: Path, image_path: str, message: str) -> None:
    image_paths = [str(image_root / "a" / "one.jpg"), image_path.format(root=image_root)]
    folder = write_clip_retrieval(tmp_path / "out", {"0": (image_paths, float16_vectors(2, seed=0))})

    with pytest.raises(ShardError, match=rf"metadata_0\.parquet, row 1: .*{re.escape(message)}"):
        list(read_clip_retrieval(folder, image_root, MODEL))


def test_clip_retrieval_vectors_are_checked_before_files_are_read(tmp_path: Path, image_root: Path) -> None:
    vectors = np.concatenate([float16_vectors(1, seed=0), np.full((1, DIM), 0.25, dtype=np.float16)])
    folder = write_clip_retrieval(tmp_path / "out", {"0": (["gone.jpg", "two.jpg"], vectors)})
    with pytest.raises(ShardError, match=r"metadata_0\.parquet, row 1: embedding has L2 norm 0\.5"):
        list(read_clip_retrieval(folder, image_root, MODEL))


def test_clip_retrieval_of_another_dimension(tmp_path: Path, image_root: Path) -> None:
    folder = write_clip_retrieval(tmp_path / "out", {"0": (["two.jpg"], float16_vectors(1, seed=0))})
    wider = dataclasses.replace(MODEL, embed_dim=DIM * 2)
    with pytest.raises(ShardError, match="row 0: embedding has 4 dimensions, the model has 8"):
        list(read_clip_retrieval(folder, image_root, wider))


def test_clip_retrieval_incomplete_or_foreign_output(tmp_path: Path, image_root: Path) -> None:
    vectors = float16_vectors(2, seed=0)
    folder = write_clip_retrieval(tmp_path / "out", {"0": (["two.jpg", "a/one.jpg"], vectors)})

    (folder / "img_emb" / "img_emb_1.npy").write_bytes(b"")
    with pytest.raises(ShardError, match="img_emb_1.npy has no partner file of partition 1"):
        list_parts(folder)
    (folder / "img_emb" / "img_emb_1.npy").unlink()

    np.save(folder / "img_emb" / "img_emb_0.npy", vectors[:1])
    with pytest.raises(ShardError, match="has 1 embeddings for 2 rows"):
        list(read_clip_retrieval(folder, image_root, MODEL))

    np.save(folder / "img_emb" / "img_emb_0.npy", vectors.astype(np.float64))
    with pytest.raises(ShardError, match=r"holds float64 \[2, 4\], not float16 or float32"):
        list(read_clip_retrieval(folder, image_root, MODEL))

    np.save(folder / "img_emb" / "img_emb_0.npy", vectors)
    pq.write_table(pa.table({"caption": ["a", "b"]}), folder / "metadata" / "metadata_0.parquet")
    with pytest.raises(ShardError, match="has no readable 'image_path' column"):
        list(read_clip_retrieval(folder, image_root, MODEL))

    with pytest.raises(ShardError, match="is .* clip-retrieval's output"):
        list_parts(tmp_path / "nothing")


# --- photo metadata (format 2) -----------------------------------------------------------------------------------


def test_photo_metadata_round_trips_and_a_format_1_shard_reads_without_it(tmp_path: Path) -> None:
    rows = make_rows(4, skipped=(2,))
    taken = PhotoMetadata(taken_at=1_700_000_000, camera_make="Canon", format="jpeg").to_json()
    with_photo = dataclasses.replace(rows, photo=[taken, None, None, PhotoMetadata(format="png").to_json()])
    with shards.ShardWriter(tmp_path, "p", MODEL) as writer:
        writer.add(with_photo)
    got = shards.read_shard(tmp_path / "shard-p.parquet", MODEL)
    assert_same_rows(got, rows)
    assert got.photos == with_photo.photos
    old = write_raw(tmp_path / "shard-old.parquet", valid_columns())  # format 1: no photo column
    assert shards.read_shard(old, MODEL).photos == [None] * 5


@pytest.mark.parametrize("photo", ['{"taken_at": "noon"}', '{"colour": "red"}', "not json", "[]"])
def test_bad_photo_metadata_refuses_the_shard_naming_the_row(tmp_path: Path, photo: str) -> None:
    columns = {**valid_columns(), "photo": [None, None, photo, None, None]}
    path = write_raw(tmp_path / "shard-b.parquet", columns, metadata=model_metadata(MODEL, b"2"))
    with pytest.raises(ShardError, match=r"shard-b\.parquet.* row 2: photo metadata"):
        shards.read_shard(path, MODEL)
