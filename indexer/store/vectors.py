"""Append-only vector files: the embeddings of an index directory, kept beside the catalog instead of in it.

A file ``<index_dir>/vectors/<kind>-<number>.vec`` is a 64-byte header (:data:`MAGIC`, :data:`FILE_FORMAT`, the
dimension) followed by fixed-width rows, each the item's id (int64, little-endian) and its vector (float32 x dim,
little-endian, L2-normalized by the caller). The catalog says where each vector is (file number, row) and how many
rows of each file are committed.

Contracts:

* Rows are only ever appended. A committed row never changes and never moves, so readers memory-map the committed
  prefix of a file while a writer appends after it.
* Rows past the committed count are what an interrupted transaction left: a writer cuts them off when it opens the
  file (:meth:`VectorFile.cut_to`); a reader never looks at them.
* A writer makes its rows durable (:meth:`VectorFile.sync`) before the catalog transaction that points at them
  commits, so a committed pointer always finds its row.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np
import numpy.typing as npt

from ..errors import IndexFormatError
from .format import Ids, Vectors, _fsync

MAGIC = b"CLIPVEC\0"
FILE_FORMAT = 1
HEADER_BYTES = 64  # magic, format (u32), dim (u32), zero padding: rows start 64-byte aligned
_HEADER = struct.Struct("<8sII")
VECTORS_DIR = "vectors"
SUFFIX = ".vec"


def row_dtype(dim: int) -> np.dtype[np.void]:
    """One row: ``id`` int64 and ``vector`` float32[dim], little-endian, packed."""
    return np.dtype([("id", "<i8"), ("vector", "<f4", (dim,))])


def file_name(kind: str, number: int) -> str:
    """``images-000001.vec``: the file ``number`` of vectors of ``kind`` ("images" or "texts")."""
    return f"{kind}-{number:06d}{SUFFIX}"


class VectorFile:
    """One vector file. Writers: :meth:`create` or :meth:`open` with ``writable``, :meth:`cut_to` the committed
    count, :meth:`append`, :meth:`sync`. Readers: :meth:`open` and :meth:`read` within the committed rows."""

    def __init__(self, path: Path, dim: int, handle: BinaryIO | None) -> None:
        self.path = path
        self.dim = dim
        self.dtype = row_dtype(dim)
        self._handle = handle  # open for writing, or None
        self._rows = self._rows_on_disk()
        self._map: np.memmap[tuple[int], np.dtype[np.void]] | None = None

    @classmethod
    def create(cls, path: Path, dim: int) -> VectorFile:
        """A new, empty file of ``dim``-wide vectors, durable (file and directory entry) before it returns."""
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("x+b")
        handle.write(_HEADER.pack(MAGIC, FILE_FORMAT, dim).ljust(HEADER_BYTES, b"\0"))
        handle.flush()
        os.fsync(handle.fileno())
        _fsync(path.parent)
        return cls(path, dim, handle)

    @classmethod
    def open(cls, path: Path, *, writable: bool = False) -> VectorFile:
        """An existing file; IndexFormatError if it is missing or not a vector file this code reads."""
        try:
            handle = path.open("r+b" if writable else "rb")
        except FileNotFoundError as exc:
            raise IndexFormatError(f"vector file {path} is missing: the index directory is incomplete") from exc
        header = handle.read(HEADER_BYTES)
        if len(header) < HEADER_BYTES or header[: len(MAGIC)] != MAGIC:
            handle.close()
            raise IndexFormatError(f"{path} is not a vector file (bad header)")
        _, version, dim = _HEADER.unpack_from(header)
        if version != FILE_FORMAT or dim < 1:
            handle.close()
            raise IndexFormatError(
                f"{path} has vector file format {version} (dim {dim}); this code reads format {FILE_FORMAT}"
            )
        if not writable:
            handle.close()
            return cls(path, dim, None)
        return cls(path, dim, handle)

    def close(self) -> None:
        self._map = None
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    @property
    def rows(self) -> int:
        """Rows in the file, committed or not (a writer's count includes what it appended since)."""
        return self._rows

    def _rows_on_disk(self) -> int:
        size = self.path.stat().st_size
        return max(0, (size - HEADER_BYTES) // self.dtype.itemsize)

    def cut_to(self, committed: int) -> int:
        """Drop every row past ``committed`` (and a torn partial row); returns how many rows were dropped."""
        handle = self._writable()
        if committed > self._rows:
            raise IndexFormatError(
                f"{self.path} holds {self._rows} rows but the catalog committed {committed}: the file was truncated"
            )
        dropped = self._rows - committed
        handle.truncate(HEADER_BYTES + committed * self.dtype.itemsize)
        handle.flush()
        os.fsync(handle.fileno())
        self._rows, self._map = committed, None
        return dropped

    def append(self, ids: Ids, vectors: Vectors) -> int:
        """Append rows (``ids`` [N] int64, ``vectors`` [N, dim] float32); returns the first new row's number.
        Not durable until :meth:`sync`."""
        handle = self._writable()
        vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        records = np.empty(len(vectors), dtype=self.dtype)
        records["id"] = np.asarray(ids, dtype=np.int64).reshape(-1)
        records["vector"] = vectors
        first = self._rows
        handle.seek(HEADER_BYTES + first * self.dtype.itemsize)
        handle.write(records.tobytes())
        self._rows += len(records)
        return first

    def sync(self) -> None:
        """Make every appended row durable."""
        handle = self._writable()
        handle.flush()
        os.fsync(handle.fileno())

    def read(self, rows: npt.ArrayLike, committed: int) -> tuple[Ids, Vectors]:
        """(ids [N], vectors [N, dim]) of the given row numbers, each below ``committed`` (copies, in the order
        asked). IndexFormatError for a row past it: the catalog and the file disagree."""
        wanted = np.asarray(rows, dtype=np.int64).reshape(-1)
        if wanted.size and (wanted.min() < 0 or wanted.max() >= committed):
            raise IndexFormatError(f"{self.path}: row {int(wanted.max())} is past the {committed} committed rows")
        if not wanted.size:
            return np.empty(0, dtype=np.int64), np.empty((0, self.dim), dtype=np.float32)
        words = self._mapped(committed)  # [committed, 2 + dim] float32: the id's two words, then the vector
        vectors: Vectors = words[wanted, 2:]  # one gather into a new C-contiguous array
        ids: Ids = words[wanted, :2].view(np.int64)[:, 0]  # the two words of each id, read back as one int64
        return ids, vectors

    def _mapped(self, committed: int) -> npt.NDArray[np.float32]:
        """The committed rows as a [committed, 2 + dim] float32 matrix over the mapped file (a plain ndarray view:
        numpy's memmap subclass costs per indexing call)."""
        if self._map is None or len(self._map) < committed:
            if self._handle is not None:
                self._handle.flush()
            self._map = np.memmap(self.path, dtype=self.dtype, mode="r", offset=HEADER_BYTES, shape=(committed,))
        words: npt.NDArray[np.float32] = np.asarray(self._map[:committed]).view(np.float32).reshape(committed, -1)
        return words

    def _writable(self) -> BinaryIO:
        if self._handle is None:
            raise IndexFormatError(f"{self.path} is open for reading only")
        return self._handle
