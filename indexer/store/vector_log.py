"""The catalog's vector files: which file takes the next rows, what each file has committed, and reads by pointer.

The ``vector_files`` table (:mod:`indexer.store.schema`) lists every file with its kind ("images" or "texts"), its
dimension and its committed row count. A catalog row points at its vector with (vec_file, vec_row). Appends go to
the newest file of the kind and dimension (a model of another width starts a new file). The catalog's transaction
calls :meth:`VectorLog.before_commit` (rows made durable, counts recorded in the same transaction) and
:meth:`VectorLog.after_rollback` (the rows of the rolled-back transaction cut off again).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import IndexFormatError
from .format import Ids, Vectors
from .vectors import VECTORS_DIR, VectorFile, file_name

Pointer = tuple[int, int]  # (vec_file, vec_row)


class VectorLog:
    """Vector files of one index directory, used through one catalog connection (not thread-safe)."""

    def __init__(self, conn: sqlite3.Connection, index_dir: Path, *, writable: bool) -> None:
        self._conn = conn
        self._dir = index_dir / VECTORS_DIR
        self._writable = writable
        self._files: dict[int, VectorFile] = {}
        self._written: set[int] = set()  # files appended to in the open transaction

    def close(self) -> None:
        for file in self._files.values():
            file.close()
        self._files.clear()

    def append(self, kind: str, ids: Ids, vectors: Vectors) -> Pointer:
        """Append ``vectors`` [N, D] float32 with their ``ids`` [N]; returns where the first one is (the others
        follow it). Call inside the catalog's transaction: they count once it commits."""
        if not self._writable:
            raise IndexFormatError("a read-only catalog cannot append vectors")
        number = self._current(kind, int(vectors.shape[1]))
        first = self._files[number].append(ids, vectors)
        self._written.add(number)
        return number, first

    def before_commit(self) -> None:
        """Make the rows appended in this transaction durable and record them as committed (call just before
        COMMIT, inside the transaction)."""
        for number in sorted(self._written):
            file = self._files[number]
            file.sync()
            self._conn.execute("UPDATE vector_files SET rows = ? WHERE number = ?", (file.rows, number))
        self._written.clear()

    def after_rollback(self) -> None:
        """Cut off the rows of a rolled-back transaction (and remove a file the rollback un-registered)."""
        for number in sorted(self._written):
            file = self._files.pop(number)
            committed = self._committed(number)
            if committed is None:
                file.close()
                file.path.unlink(missing_ok=True)
            else:
                file.cut_to(committed)
                self._files[number] = file
        self._written.clear()

    def read(self, pointers: Sequence[Pointer]) -> Vectors:
        """The vectors at ``pointers``, in their order: [N, D] float32. IndexFormatError when a pointer is outside
        the committed rows or the files have different widths."""
        numbers = np.fromiter((p[0] for p in pointers), dtype=np.int64, count=len(pointers))
        rows = np.fromiter((p[1] for p in pointers), dtype=np.int64, count=len(pointers))
        return self.read_at(numbers, rows)

    def read_at(self, numbers: Ids, rows: Ids) -> Vectors:
        """The vectors at (``numbers[i]``, ``rows[i]``), in that order: [N, D] float32 (N = len(rows); [0, 0] when
        empty). IndexFormatError as :meth:`read`."""
        if not len(rows):
            return np.empty((0, 0), dtype=np.float32)
        files = np.unique(numbers)
        if len(files) == 1:  # the usual case: no scatter into a second array
            committed = self._committed(int(files[0]))
            return self._file(int(files[0])).read(rows, committed or 0)[1]
        out: Vectors | None = None
        for number in files:
            where = np.flatnonzero(numbers == number)
            file = self._file(int(number))
            committed = self._committed(int(number))
            _, vectors = file.read(rows[where], committed or 0)
            if out is None:
                out = np.empty((len(rows), file.dim), dtype=np.float32)
            elif out.shape[1] != file.dim:
                raise IndexFormatError(f"vectors of widths {out.shape[1]} and {file.dim} asked for together")
            out[where] = vectors
        assert out is not None
        return out

    def _current(self, kind: str, dim: int) -> int:
        """The file that takes appends of ``kind`` and ``dim``: the newest such file, or a new one."""
        row = self._conn.execute(
            "SELECT number FROM vector_files WHERE kind = ? AND dim = ? ORDER BY number DESC LIMIT 1", (kind, dim)
        ).fetchone()
        if row is not None:
            number = int(row[0])
            self._file(number)
            return number
        number = int(self._conn.execute("SELECT COALESCE(MAX(number), 0) + 1 FROM vector_files").fetchone()[0])
        self._conn.execute(
            "INSERT INTO vector_files (number, kind, dim, rows) VALUES (?, ?, ?, 0)", (number, kind, dim)
        )
        path = self._dir / file_name(kind, number)
        path.unlink(missing_ok=True)  # left by a transaction that rolled back before it registered the file
        self._files[number] = VectorFile.create(path, dim)
        return number

    def _file(self, number: int) -> VectorFile:
        file = self._files.get(number)
        if file is None:
            row = self._conn.execute("SELECT kind, rows FROM vector_files WHERE number = ?", (number,)).fetchone()
            if row is None:
                raise IndexFormatError(f"the catalog points at vector file {number}, which it does not list")
            file = VectorFile.open(self._dir / file_name(row[0], number), writable=self._writable)
            if self._writable:
                file.cut_to(int(row[1]))  # what a crashed writer appended past its last commit
            self._files[number] = file
        return file

    def _committed(self, number: int) -> int | None:
        """The committed rows of file ``number``; None when the catalog does not list it (also when a rolled-back
        upgrade took the vector_files table with it)."""
        try:
            row = self._conn.execute("SELECT rows FROM vector_files WHERE number = ?", (number,)).fetchone()
        except sqlite3.OperationalError:
            return None
        return None if row is None else int(row[0])


class StoredRows:
    """[N, D] float32 unit rows read from the vector files on demand, in the order of the catalog query that made
    them: what a numpy matrix of the same rows would give for ``len``, ``shape`` and indexing (by an int, a slice
    or an integer array of any shape, always a new array), without holding them in memory. Memory: two int64 per
    row. Valid while the catalog that made it is open; committed rows never change, so reads need no snapshot."""

    def __init__(self, log: VectorLog, files: Ids, rows: Ids, dim: int) -> None:
        self._log = log
        self._files = files
        self._rows = rows
        self.dim = dim

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self._rows), self.dim)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, key: int | slice | Ids) -> Vectors:
        if isinstance(key, slice):
            files, rows = self._files[key], self._rows[key]
        else:
            wanted = np.asarray(key)
            if wanted.dtype.kind not in "iu":
                raise TypeError(f"stored rows are indexed by integers or a slice, not {wanted.dtype}")
            files, rows = self._files[wanted.reshape(-1)], self._rows[wanted.reshape(-1)]
            vectors = self._read(files, rows)
            return vectors.reshape(*wanted.shape, self.dim)
        return self._read(files, rows)

    def part(self, start: int, stop: int) -> StoredRows:
        """Rows ``start..stop-1`` as stored rows too (no read)."""
        return StoredRows(self._log, self._files[start:stop], self._rows[start:stop], self.dim)

    def _read(self, files: Ids, rows: Ids) -> Vectors:
        if not len(rows):
            return np.empty((0, self.dim), dtype=np.float32)
        vectors = self._log.read_at(files, rows)
        if vectors.shape[1] != self.dim:
            raise IndexFormatError(f"the catalog's vectors are {vectors.shape[1]} wide, its model's {self.dim}")
        return vectors
