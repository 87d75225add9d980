"""indexer.store.vectors: append-only vector files, cut back to what the catalog committed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from indexer.errors import IndexFormatError
from indexer.store.vectors import HEADER_BYTES, VectorFile, file_name, row_dtype

DIM = 8


def unit_rows(n: int, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_rows_appended_and_synced_read_back_exactly_by_row_number(tmp_path: Path) -> None:
    path = tmp_path / "vectors" / file_name("images", 1)
    vectors = unit_rows(10)
    writer = VectorFile.create(path, DIM)
    assert writer.append(np.arange(100, 105), vectors[:5]) == 0
    assert writer.append(np.arange(105, 110), vectors[5:]) == 5
    writer.sync()
    reader = VectorFile.open(path)
    ids, got = reader.read([7, 0, 7], committed=10)
    assert ids.tolist() == [107, 100, 107] and got.dtype == np.float32 and got.flags.c_contiguous
    assert np.array_equal(got, vectors[[7, 0, 7]])
    assert path.stat().st_size == HEADER_BYTES + 10 * row_dtype(DIM).itemsize
    writer.close()


def test_a_reader_sees_only_committed_rows_while_the_writer_appends(tmp_path: Path) -> None:
    path = tmp_path / file_name("images", 1)
    writer = VectorFile.create(path, DIM)
    writer.append(np.arange(3), unit_rows(3))
    writer.sync()
    reader = VectorFile.open(path)
    assert reader.read([2], committed=3)[0].tolist() == [2]
    writer.append(np.arange(3, 6), unit_rows(3, seed=1))  # not committed yet
    with pytest.raises(IndexFormatError, match="past the 3 committed rows"):
        reader.read([4], committed=3)
    writer.close()


def test_a_writer_cuts_off_uncommitted_rows_and_a_torn_row(tmp_path: Path) -> None:
    path = tmp_path / file_name("texts", 2)
    writer = VectorFile.create(path, DIM)
    writer.append(np.arange(4), unit_rows(4))
    writer.sync()
    writer.close()
    with path.open("ab") as handle:  # a crash in the middle of the next row
        handle.write(b"\x01" * 13)
    reopened = VectorFile.open(path, writable=True)
    assert reopened.rows == 4  # the torn row is not counted
    assert reopened.cut_to(2) == 2
    assert path.stat().st_size == HEADER_BYTES + 2 * row_dtype(DIM).itemsize
    assert reopened.append(np.array([9]), unit_rows(1, seed=3)) == 2  # appends go after the committed rows
    reopened.close()


def test_a_file_shorter_than_the_catalog_says_is_an_error_not_a_silent_loss(tmp_path: Path) -> None:
    path = tmp_path / file_name("images", 1)
    writer = VectorFile.create(path, DIM)
    writer.append(np.arange(2), unit_rows(2))
    writer.sync()
    with pytest.raises(IndexFormatError, match="catalog committed 5"):
        writer.cut_to(5)
    writer.close()


@pytest.mark.parametrize("content", [b"", b"not a vector file at all" * 4, b"CLIPVEC\0" + b"\x07" * 56])
def test_what_is_not_a_vector_file_of_this_format_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.vec"
    path.write_bytes(content)
    with pytest.raises(IndexFormatError, match="bad.vec"):
        VectorFile.open(path)
    with pytest.raises(IndexFormatError, match="missing"):
        VectorFile.open(tmp_path / "absent.vec")


def test_a_reader_cannot_write(tmp_path: Path) -> None:
    path = tmp_path / file_name("images", 1)
    VectorFile.create(path, DIM).close()
    with pytest.raises(IndexFormatError, match="reading only"):
        VectorFile.open(path).append(np.arange(1), unit_rows(1))
