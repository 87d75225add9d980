"""The catalog: the SQLite record of truth of an index directory (its tables, and how they record which
generation shows which version of a row: :mod:`indexer.store.schema`)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np

from .. import paths
from ..errors import (
    EmbeddingError,
    GenerationRetiredError,
    IndexerError,
    IndexFormatError,
    IndexNotFoundError,
    ModelMismatchError,
)
from .filters import PhotoColumns, photo_columns, photo_columns_query
from .format import CATALOG_FILE, NORM_TOLERANCE, FileRecord, Ids, ImageRecord, ModelInfo, NewImage, Vectors
from .photo_records import PhotoRecords
from .schema import (
    CATALOG_VERSION,
    DEFAULT_FACTORY,
    LEGACY_DEFAULT_FACTORY,
    OLDEST_GENERATION_KEY,
    UPGRADED_TABLES,
    add_missing_tables,
    add_vector_columns,
    create_schema,
    drop_embedding_columns,
    set_meta,
    upgrade_from_1,
    user_version,
)
from .vector_log import Pointer, StoredRows, VectorLog

logger = logging.getLogger(__name__)

SQLITE_TIMEOUT_S = 30.0  # how long a statement waits for another connection's lock
# pages a writer keeps in memory: inserts into the content-hash index land on random pages, which SQLite's
# default 2 MiB cache re-reads from the file once a catalog holds millions of rows
WRITER_CACHE_KIB = 256 * 1024
SQL_IDS_PER_QUERY = 500  # ids per "WHERE id IN (...)" statement
WAL_SUFFIXES = ("-wal", "-shm")  # SQLite's write-ahead log and its index, beside the database file
_FILE_COLUMNS = "id, path, size, mtime_ns, content_hash, status"
_IMAGE_COLUMNS = "id, path, size, mtime_ns, content_hash, width, height, status, error"
_VERSIONED_COLUMNS = f"{_IMAGE_COLUMNS}, vec_file, vec_row, gen"  # what image_versions keeps of an images row
_ADD_COLUMNS = (
    "id, path, size, mtime_ns, content_hash, width, height, status, error, vec_file, vec_row, updated_at".split(", ")
)
_ADD_UPDATES = ", ".join(f"{column} = excluded.{column}" for column in _ADD_COLUMNS if column not in ("id", "path"))
_ADD_IMAGE = (  # insert, or replace every column of the row at that path but its id
    f"INSERT INTO images ({', '.join(_ADD_COLUMNS)}) VALUES ({', '.join('?' * len(_ADD_COLUMNS))}) "
    f"ON CONFLICT (path) DO UPDATE SET {_ADD_UPDATES}"
)
MATRIX_CHUNK_ROWS = 65_536  # pointers resolved per read when gathering many vectors
UPGRADE_BATCH_ROWS = 4096  # embedding BLOBs moved into vector files per statement when upgrading format 2


def keep_wal_files(path: Path) -> None:
    """Create the -wal and -shm files of the catalog at ``path`` where the last connection's close removed them.

    SQLite opens a WAL database without write access to its directory (a read-only mount, a server's user without
    write permission) only when both files exist; then it reads the log and builds its index in memory. Empty files
    are an empty log, and an index SQLite rebuilds. An existing file is left as it is (never truncated)."""
    for suffix in WAL_SUFFIXES:
        os.close(os.open(f"{path}{suffix}", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))


def _read_only_hint(path: Path) -> str:
    """Why a read-only open failed, where it is the missing -wal/-shm files in a directory this process cannot write."""
    missing = [path.name + suffix for suffix in WAL_SUFFIXES if not Path(f"{path}{suffix}").exists()]
    if not missing or os.access(path.parent, os.W_OK):
        return ""
    return (
        f" ({' and '.join(missing)} missing from {path.parent}, which this process cannot write: a reader without "
        "write access needs them, and every indexer run leaves them; run `clip-index build` on it once with write "
        "access)"
    )


class Catalog:
    """The SQLite record of truth. Writers hold a :class:`WriterLock` and group writes in :meth:`transaction`
    (each call outside one commits on its own, with an fsync). Not thread-safe; read-only catalogs may be used from
    several threads if the caller serializes the calls (as :class:`PublishedIndex` does)."""

    def __init__(self, index_dir: Path, conn: sqlite3.Connection, readonly: bool) -> None:
        self.index_dir = index_dir
        self.readonly = readonly
        self._conn = conn
        self._dim: int | None = None
        self._vectors = VectorLog(conn, index_dir, writable=not readonly)

    @classmethod
    def open(cls, index_dir: Path, *, create: bool = False, readonly: bool = False) -> Catalog:
        """Open ``<index_dir>/catalog.sqlite3``; ``create`` makes the directory and schema. IndexNotFoundError if
        there is none (and not ``create``), IndexFormatError if it is not a catalog of CATALOG_VERSION (a writer
        upgrades version 1 in place)."""
        index_dir = Path(index_dir)
        path = index_dir / CATALOG_FILE
        if create and not readonly:
            index_dir.mkdir(parents=True, exist_ok=True)
        elif not path.is_file():
            raise IndexNotFoundError(
                f"no index at {index_dir} ({CATALOG_FILE} not found): run the indexer to build one"
            )
        try:
            if readonly:
                uri = f"{path.resolve().as_uri()}?mode=ro"
                conn = sqlite3.connect(
                    uri, uri=True, isolation_level=None, check_same_thread=False, timeout=SQLITE_TIMEOUT_S
                )
            else:
                conn = sqlite3.connect(path, isolation_level=None, timeout=SQLITE_TIMEOUT_S)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute(f"PRAGMA cache_size = -{WRITER_CACHE_KIB}")
            catalog = cls(index_dir, conn, readonly)
            catalog._check_version(create=create and not readonly)
            if not readonly:
                add_missing_tables(conn)
        except sqlite3.DatabaseError as exc:
            hint = _read_only_hint(path) if readonly else ""
            raise IndexFormatError(f"{path} is not a readable SQLite catalog: {exc}{hint}") from exc
        return catalog

    def _check_version(self, create: bool) -> None:
        version = user_version(self._conn)
        if not self.readonly and ((version == 0 and create) or 0 < version < CATALOG_VERSION):
            with self.transaction():
                version = user_version(self._conn)  # as of the write lock: another writer may have done it
                if version == 0:
                    create_schema(self._conn)
                if version == 1:
                    upgrade_from_1(self._conn)
                if version in (1, 2):
                    self._move_embeddings_to_vector_files()
            if version in (1, 2):
                self._conn.execute("VACUUM")  # the space the BLOBs took goes back to the file system
            return
        if version != CATALOG_VERSION:
            hint = ": upgrade clip-search to read it" if version > CATALOG_VERSION else ""
            if 0 < version < CATALOG_VERSION:
                hint = ": run `clip-index build` on it once to upgrade it"
            raise IndexFormatError(
                f"{self.index_dir / CATALOG_FILE} has catalog format version {version}; "
                f"this code reads format version {CATALOG_VERSION}{hint}"
            )

    def _move_embeddings_to_vector_files(self) -> None:
        """Catalog format 2 -> 3, inside the upgrade's transaction: every embedding BLOB (images, the versions kept
        for published generations, texts) is appended to a vector file and its row points there; then the BLOB
        columns go. A crash before the commit leaves format 2 as it was (the rows appended are cut off later)."""
        add_vector_columns(self._conn)
        for table in UPGRADED_TABLES:
            kind = "texts" if table == "texts" else "images"
            after = 0
            while rows := self._conn.execute(
                f"SELECT rowid, id, embedding FROM {table} WHERE embedding IS NOT NULL AND rowid > ? "
                f"ORDER BY rowid LIMIT {UPGRADE_BATCH_ROWS}",
                (after,),
            ).fetchall():
                after = rows[-1][0]
                for width in {len(blob) for _, _, blob in rows}:  # a --rebuild may have changed the model's width
                    same = [row for row in rows if len(row[2]) == width]
                    ids = np.array([row[1] for row in same], dtype=np.int64)
                    vectors = np.frombuffer(b"".join(row[2] for row in same), dtype="<f4").reshape(len(same), -1)
                    number, first = self._vectors.append(kind, ids, vectors.astype(np.float32))
                    self._conn.executemany(
                        f"UPDATE {table} SET vec_file = ?, vec_row = ? WHERE rowid = ?",
                        ((number, first + n, row[0]) for n, row in enumerate(same)),
                    )
        drop_embedding_columns(self._conn, self.index_dir / CATALOG_FILE)

    def close(self) -> None:
        """Close the catalog. A writer's close leaves the -wal and -shm files in place (:func:`keep_wal_files`)."""
        self._vectors.close()
        self._conn.close()
        if not self.readonly:
            keep_wal_files(self.index_dir / CATALOG_FILE)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT, ROLLBACK on an exception. Nested calls join the outer transaction."""
        if self._conn.in_transaction:
            yield
            return
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._vectors.before_commit()
        except BaseException:
            self._conn.execute("ROLLBACK")
            self._vectors.after_rollback()
            raise
        self._conn.execute("COMMIT")

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """A consistent read view across several calls (a deferred read transaction)."""
        if self._conn.in_transaction:
            yield
            return
        self._conn.execute("BEGIN")
        try:
            yield
        finally:
            self._conn.execute("COMMIT")

    def _get_meta(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _set_meta(self, items: Mapping[str, str]) -> None:
        set_meta(self._conn, items)

    def model(self) -> ModelInfo | None:
        """The model the index was built with, or None before :meth:`set_model`."""
        name = self._get_meta("model_name")
        if name is None:
            return None
        return ModelInfo(
            name=name,
            weights_sha256=self._get_meta("weights_sha256") or "",
            embed_dim=int(self._get_meta("embed_dim") or 0),
            preprocess=json.loads(self._get_meta("preprocess") or "{}"),
        )

    def set_model(self, info: ModelInfo) -> None:
        """Record the model once; the same model again is a no-op, a different one raises ModelMismatchError."""
        existing = self.model()
        if existing is None:
            self._write_model(info)
        elif not existing.same_embeddings(info):
            raise ModelMismatchError(
                f"the index in {self.index_dir} was built with model {existing.name!r} (weights sha256 "
                f"{existing.weights_sha256[:12]}, embed_dim {existing.embed_dim}, preprocess {existing.preprocess}), "
                f"not {info.name!r} (weights sha256 {info.weights_sha256[:12]}). To update it, use --model "
                f"{existing.name}, or build a new index directory / pass --rebuild"
            )

    def reset(self, info: ModelInfo) -> None:
        """Switch the catalog to another model (``--rebuild``). Image rows keep their ids and records, so the served
        generation still resolves, but are marked stale (content_hash NULL, mtime_ns -1) so that change detection
        re-encodes every file; texts are deleted, as their embeddings belong to the old model."""
        with self.transaction():
            self._keep_published("1", ())
            self._conn.execute("UPDATE images SET content_hash = NULL, mtime_ns = -1, updated_at = ?", (time.time(),))
            self._keep_published_texts("1", ())
            dropped = self._conn.execute("DELETE FROM texts").rowcount
            self._write_model(info)
        if dropped:
            logger.warning("dropped %d texts embedded with the previous model: index the text corpus again", dropped)

    def _write_model(self, info: ModelInfo) -> None:
        self._dim = None
        model = {"model_name": info.name, "weights_sha256": info.weights_sha256, "embed_dim": str(info.embed_dim)}
        preprocess = json.dumps(info.preprocess, sort_keys=True)
        with self.transaction():
            self._set_meta({**model, "preprocess": preprocess, "created_at": str(time.time())})

    def factory(self) -> str:
        """What publish() builds by default: the last index type asked for, "auto" or a normalized factory string.

        Catalogs written before the ``index_type`` key recorded the old default "IDMap2,Flat" whether or not anyone
        chose it: that reads as "auto" (which is Flat for small collections), any other factory as itself.
        """
        requested = self._get_meta("index_type")
        if requested is None:
            legacy = self._get_meta("factory")
            requested = DEFAULT_FACTORY if legacy in (None, LEGACY_DEFAULT_FACTORY) else legacy
        return requested

    def set_factory(self, factory: str) -> None:
        """Remember ``factory`` ("auto" or a factory string) for later publishes."""
        self._set_meta({"index_type": factory})

    def text_long_text(self) -> str:
        """How the indexed texts longer than the model's context were encoded (``clip-index texts --long-text``):
        "truncate", "chunk", or "mixed" (by runs with both). Catalogs written before this record read as
        "truncate", the only rule then."""
        return self._get_meta("text_long_text") or "truncate"

    def set_text_long_text(self, mode: str) -> None:
        """Record how the indexed texts were encoded (see :meth:`text_long_text`); the caller decides the value."""
        self._set_meta({"text_long_text": mode})

    def memory_budget(self) -> int | None:
        """Bytes the auto-chosen image index must fit in (the last budget asked for), None: no budget."""
        value = self._get_meta("memory_budget")
        return int(value) if value else None

    def set_memory_budget(self, budget: int | None) -> None:
        """Remember a budget in bytes for later publishes; None or 0 removes it."""
        self._set_meta({"memory_budget": str(budget) if budget else ""})

    def _require_dim(self) -> int:
        if self._dim is None:
            model = self.model()
            if model is None:
                raise IndexerError(f"{self.index_dir / CATALOG_FILE} records no model yet: call set_model() first")
            self._dim = model.embed_dim
        return self._dim

    def files(self) -> dict[str, FileRecord]:
        """Every image row (ok and skipped) keyed by path, in one query."""
        rows = self._conn.execute(f"SELECT {_FILE_COLUMNS} FROM images").fetchall()
        return {row[1]: FileRecord(*row) for row in rows}

    def files_at(self, paths: Sequence[str]) -> dict[str, FileRecord]:
        """The rows of those of ``paths`` the catalog holds, keyed by path (a lookup per chunk, not a scan)."""
        unique = list(dict.fromkeys(paths))
        found: dict[str, FileRecord] = {}
        for start in range(0, len(unique), SQL_IDS_PER_QUERY):
            chunk = unique[start : start + SQL_IDS_PER_QUERY]
            marks = ",".join("?" * len(chunk))
            rows = self._conn.execute(f"SELECT {_FILE_COLUMNS} FROM images WHERE path IN ({marks})", chunk)
            found.update((row[1], FileRecord(*row)) for row in rows.fetchall())
        return found

    def find_by_hash(self, content_hash: str) -> list[FileRecord]:
        rows = self._conn.execute(f"SELECT {_FILE_COLUMNS} FROM images WHERE content_hash = ?", (content_hash,))
        return [FileRecord(*row) for row in rows.fetchall()]

    def add_image(
        self,
        path: str,
        size: int,
        mtime_ns: int,
        content_hash: str,
        width: int,
        height: int,
        embedding: Vectors,
    ) -> int:
        """Insert or update the row for ``path`` (an existing path keeps its id). ``embedding`` [D] float32 unit-norm.
        Returns the id."""
        vector = _checked_vector(embedding, self._require_dim())
        return int(self.add_images([NewImage(path, size, mtime_ns, content_hash, width, height)], vector[None])[0])

    def add_images(self, images: Sequence[NewImage], embeddings: Vectors) -> Ids:
        """:meth:`add_image` for many files at once, in one transaction: ``images`` [N] with distinct paths and
        ``embeddings`` [N, D] float32 unit rows. Returns the ids [N] int64 (existing paths keep theirs)."""
        dim = self._require_dim()
        if embeddings.dtype != np.float32 or embeddings.shape != (len(images), dim):
            raise EmbeddingError(
                f"embeddings must be float32 [{len(images)}, {dim}], got {embeddings.dtype} {list(embeddings.shape)}"
            )
        _check_norms(embeddings)
        paths = [_check_path(image.path) for image in images]
        if len(set(paths)) != len(paths):
            raise ValueError("add_images needs distinct paths")
        now = time.time()
        with self.transaction():
            known = {path: record.id for path, record in self.files_at(paths).items()}
            replaced = sorted(known.values())
            next_id = self._next_id("images")
            ids = np.empty(len(paths), dtype=np.int64)
            for i, path in enumerate(paths):
                if path not in known:
                    known[path], next_id = next_id, next_id + 1
                ids[i] = known[path]
            number, first = self._vectors.append("images", ids, embeddings)
            for start in range(0, len(replaced), SQL_IDS_PER_QUERY):
                chunk = replaced[start : start + SQL_IDS_PER_QUERY]
                self._keep_published(f"id IN ({','.join('?' * len(chunk))})", chunk)
            self._conn.executemany(
                _ADD_IMAGE,
                [
                    (
                        int(ids[i]),
                        path,
                        image.size,
                        image.mtime_ns,
                        image.content_hash,
                        image.width,
                        image.height,
                        "ok",
                        None,
                        number,
                        first + i,
                        now,
                    )
                    for i, (path, image) in enumerate(zip(paths, images, strict=True))
                ],
            )
        return ids

    def add_skipped(self, path: str, size: int, mtime_ns: int, content_hash: str | None, error: str) -> int:
        """Record a file that could not be indexed, with the reason; it holds no embedding. Returns the id."""
        values = {"width": None, "height": None, "status": "skipped", "error": error, "vec_file": None, "vec_row": None}
        return self._upsert(path, size, mtime_ns, content_hash, values)

    def _upsert(
        self, path: str, size: int, mtime_ns: int, content_hash: str | None, values: Mapping[str, object]
    ) -> int:
        """Insert the row of ``path``, or replace every column but its id (an existing path keeps its id)."""
        columns = {"path": _check_path(path), "size": size, "mtime_ns": mtime_ns, "content_hash": content_hash}
        columns |= {**values, "updated_at": time.time()}
        names, marks = ", ".join(columns), ", ".join("?" * len(columns))
        updates = ", ".join(f"{name} = excluded.{name}" for name in columns if name not in ("path", "id"))
        with self.transaction():
            self._keep_published("path = ?", (path,))
            statement = f"INSERT INTO images ({names}) VALUES ({marks}) ON CONFLICT (path) DO UPDATE SET {updates}"
            row = self._conn.execute(f"{statement} RETURNING id", list(columns.values())).fetchone()
        return int(row[0])

    def move(self, image_id: int, new_path: str, size: int, mtime_ns: int) -> None:
        """A rename (same content hash): the row keeps its id and embedding. A row already at ``new_path`` is
        replaced."""
        with self.transaction():
            self._keep_published("path = ? AND id != ?", (_check_path(new_path), image_id))
            self._conn.execute("DELETE FROM images WHERE path = ? AND id != ?", (new_path, image_id))
            self._keep_published("id = ?", (image_id,))
            self._conn.execute(
                "UPDATE images SET path = ?, size = ?, mtime_ns = ?, updated_at = ? WHERE id = ?",
                (new_path, size, mtime_ns, time.time(), image_id),
            )

    def touch(self, image_id: int, size: int, mtime_ns: int) -> None:
        """The file's metadata changed but its content did not."""
        with self.transaction():
            self._keep_published("id = ?", (image_id,))
            self._conn.execute(
                "UPDATE images SET size = ?, mtime_ns = ?, updated_at = ? WHERE id = ?",
                (size, mtime_ns, time.time(), image_id),
            )

    def delete(self, ids: Iterable[int]) -> int:
        """Delete image rows; returns how many existed."""
        deleted = 0
        with self.transaction():
            for image_id in ids:
                self._keep_published("id = ?", (int(image_id),))
                deleted += self._conn.execute("DELETE FROM images WHERE id = ?", (int(image_id),)).rowcount
        return deleted

    def _keep_published(self, where: str, params: Sequence[Any]) -> None:
        """Before the image rows matching ``where`` change or go: copy the versions that published generations show
        into image_versions (shown until the next publish) and mark the rows pending. Call inside a transaction."""
        self._conn.execute(
            f"INSERT INTO image_versions ({_VERSIONED_COLUMNS}, until_gen) "
            f"SELECT {_VERSIONED_COLUMNS}, NULL FROM images WHERE gen IS NOT NULL AND ({where})",
            params,
        )
        self._conn.execute(f"UPDATE images SET gen = NULL WHERE gen IS NOT NULL AND ({where})", params)

    def _keep_published_texts(self, where: str, params: Sequence[Any]) -> None:
        """Before texts matching ``where`` are deleted: keep their text for the generations that hold them."""
        self._conn.execute(
            f"INSERT INTO text_versions (id, text, until_gen) SELECT id, text, NULL FROM texts WHERE {where}", params
        )

    def embeddings(self) -> tuple[Ids, Vectors]:
        """(ids [N] int64, vectors [N, D] float32 unit rows) of every ok image, ordered by id. Memory: N*D*4 bytes."""
        return self._matrix("images", "WHERE status = 'ok'")

    def embedding_rows(self) -> tuple[Ids, StoredRows]:
        """:meth:`embeddings` with the vectors left in their files, read on demand (:class:`StoredRows`)."""
        return self._stored_rows("images", "WHERE status = 'ok'")

    def embedding(self, image_id: int) -> Vectors | None:
        """The stored [D] float32 vector of an ok image, or None."""
        return self._vector("images", image_id)

    def _next_id(self, table: str) -> int:
        """The id AUTOINCREMENT gives the next row of ``table`` (asked inside the writer's transaction)."""
        row = self._conn.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).fetchone()
        return (int(row[0]) if row is not None else 0) + 1

    def images(self, ids: Sequence[int]) -> dict[int, ImageRecord]:
        """Records of the given ids that exist (missing ids are absent from the result)."""
        rows = self._select_ids(f"SELECT {_IMAGE_COLUMNS} FROM images WHERE id IN ({{ids}})", ids)
        return {row[0]: ImageRecord(*row) for row in rows}

    # --- generations: what a published generation shows -------------------------------------------------------

    def superseded(self, after: int) -> list[tuple[int, int]]:
        """(id, gen) of every image version with a vector that generation ``after`` shows and a later one (or the
        next publish) does not: the vectors to delete from the segments holding generation ``gen``."""
        rows = self._conn.execute(
            "SELECT id, gen FROM image_versions WHERE vec_row IS NOT NULL AND gen <= ? "
            "AND (until_gen IS NULL OR until_gen > ?)",
            (after, after),
        ).fetchall()
        return [(int(image_id), int(gen)) for image_id, gen in rows]

    def stamped_rows(
        self, first_gen: int, last_gen: int, id_range: tuple[int, int] | None = None
    ) -> tuple[Ids, StoredRows]:
        """(ids [N] int64, vectors as :class:`StoredRows`) of the ok images whose current version was stamped with a
        generation in ``first_gen..last_gen`` (and whose id is in ``id_range``, both ends included, if given),
        ordered by id: what a segment covering those generations (and ids) holds."""
        where = f"WHERE status = 'ok' AND gen BETWEEN {int(first_gen)} AND {int(last_gen)}"
        if id_range is not None:
            where += f" AND id BETWEEN {int(id_range[0])} AND {int(id_range[1])}"
        return self._stored_rows("images", where)

    @property
    def photos(self) -> PhotoRecords:
        """The photo metadata table (:mod:`indexer.store.photo_records`)."""
        return PhotoRecords(self._conn)

    def photo_columns_at(self, generation: int) -> PhotoColumns:
        """The filterable attributes of the ok images generation number ``generation`` shows
        (:mod:`indexer.store.filters`). Memory: about 50 bytes per image."""
        with self.snapshot():
            self._require_generation(generation)
            query = photo_columns_query(self.photos.exists())
            return photo_columns(self._conn.execute(query, {"g": generation}))

    def stored_vectors(self, files: Ids, rows: Ids) -> Vectors:
        """The [N, D] float32 vectors at (``files[i]``, ``rows[i]``) (pointers as PhotoColumns holds them)."""
        return StoredRows(self._vectors, files, rows, self._require_dim())[:]

    def image_count(self) -> int:
        """Ok images, which a published generation holds."""
        return int(self._conn.execute("SELECT COUNT(*) FROM images WHERE status = 'ok'").fetchone()[0])

    def stamp_generation(self, number: int) -> None:
        """Make every pending change part of generation ``number``: rows written since the last publish become
        visible from it, and the versions they superseded stop being visible at it. Called by publish, in the
        transaction that reads what the generation will hold."""
        self._conn.execute("UPDATE images SET gen = ? WHERE gen IS NULL", (number,))
        self._conn.execute("UPDATE image_versions SET until_gen = ? WHERE until_gen IS NULL", (number,))
        self._conn.execute("UPDATE text_versions SET until_gen = ? WHERE until_gen IS NULL", (number,))

    def forget_before(self, number: int) -> None:
        """Drop the superseded versions no generation from ``number`` on shows; generations before ``number`` can
        no longer be resolved (their lookups raise GenerationRetiredError)."""
        with self.transaction():
            self._conn.execute("DELETE FROM image_versions WHERE until_gen <= ?", (number,))
            self._conn.execute("DELETE FROM text_versions WHERE until_gen <= ?", (number,))
            self._set_meta({OLDEST_GENERATION_KEY: str(number)})

    def images_at(self, ids: Sequence[int], generation: int) -> dict[int, ImageRecord]:
        """Records of ``ids`` as generation number ``generation`` shows them (ids it does not show are absent)."""
        with self.snapshot():
            self._require_generation(generation)
            rows = self._select_ids(_shown_at(_IMAGE_COLUMNS), ids, g=generation)
        return {row[0]: ImageRecord(*row) for row in rows}

    def embedding_at(self, image_id: int, generation: int) -> Vectors | None:
        """The [D] float32 vector of an ok image as generation number ``generation`` shows it, or None."""
        with self.snapshot():
            self._require_generation(generation)
            rows = self._select_ids(_shown_at("vec_file, vec_row"), [image_id], g=generation)
            if not rows or rows[0][1] is None:
                return None
            vector: Vectors = self._vectors.read([(int(rows[0][0]), int(rows[0][1]))])[0]
        return vector

    def texts_at(self, ids: Sequence[int], generation: int) -> dict[int, str]:
        """The texts of ``ids`` that generation number ``generation`` holds (a text never changes under its id, so
        a deleted one is looked up among the kept versions)."""
        select = (
            "SELECT id, text FROM texts WHERE id IN ({ids}) UNION ALL "
            "SELECT id, text FROM text_versions WHERE (until_gen IS NULL OR until_gen > :g) AND id IN ({ids})"
        )
        with self.snapshot():
            self._require_generation(generation)
            return dict(self._select_ids(select, ids, g=generation))

    def _require_generation(self, generation: int) -> None:
        oldest = int(self._get_meta(OLDEST_GENERATION_KEY) or 0)
        if generation < oldest:
            raise GenerationRetiredError(
                f"generation {generation} of {self.index_dir} was retired by later publishes (the catalog keeps "
                f"generations from {oldest} on): reload the published generation"
            )

    def counts(self) -> dict[str, int]:
        """{"ok": n, "skipped": n, "texts": n}."""
        counts = {"ok": 0, "skipped": 0}
        counts.update(self._conn.execute("SELECT status, COUNT(*) FROM images GROUP BY status").fetchall())
        counts["texts"] = self._conn.execute("SELECT COUNT(*) FROM texts").fetchone()[0]
        return counts

    def skipped(self) -> list[tuple[str, str]]:
        """(path, error) of every skipped file, by path."""
        rows = self._conn.execute("SELECT path, error FROM images WHERE status = 'skipped' ORDER BY path")
        return [(path, error or "") for path, error in rows.fetchall()]

    def add_texts(self, texts: Sequence[str], embeddings: Vectors) -> int:
        """Insert or update texts (by text) with ``embeddings`` [N, D] float32 unit rows. Returns N."""
        dim = self._require_dim()
        matrix = np.asarray(embeddings)
        if matrix.dtype != np.float32 or matrix.shape != (len(texts), dim):
            raise EmbeddingError(
                f"text embeddings must be float32 [{len(texts)}, {dim}], got {matrix.dtype} {matrix.shape}"
            )
        _check_norms(matrix)
        now = time.time()
        with self.transaction():
            known = dict(self._select_texts(texts))
            next_id = self._next_id("texts")
            ids = []
            for text in texts:
                if text not in known:
                    known[text], next_id = next_id, next_id + 1
                ids.append(known[text])
            number, first = self._vectors.append("texts", np.array(ids, dtype=np.int64), matrix)
            self._conn.executemany(
                "INSERT INTO texts (id, text, vec_file, vec_row, updated_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (text) DO UPDATE SET vec_file = excluded.vec_file, vec_row = excluded.vec_row, "
                "updated_at = excluded.updated_at",
                (
                    (text_id, text, number, first + n, now)
                    for n, (text_id, text) in enumerate(zip(ids, texts, strict=True))
                ),
            )
        return len(texts)

    def _select_texts(self, texts: Sequence[str]) -> list[tuple[str, int]]:
        """(text, id) of those of ``texts`` the catalog holds."""
        unique = list(dict.fromkeys(texts))
        rows: list[tuple[str, int]] = []
        for start in range(0, len(unique), SQL_IDS_PER_QUERY):
            chunk = unique[start : start + SQL_IDS_PER_QUERY]
            marks = ",".join("?" * len(chunk))
            rows += self._conn.execute(f"SELECT text, id FROM texts WHERE text IN ({marks})", chunk).fetchall()
        return rows

    def delete_texts(self, ids: Iterable[int]) -> int:
        deleted = 0
        with self.transaction():
            for text_id in ids:
                self._keep_published_texts("id = ?", (int(text_id),))
                deleted += self._conn.execute("DELETE FROM texts WHERE id = ?", (int(text_id),)).rowcount
        return deleted

    def texts(self, ids: Sequence[int]) -> dict[int, str]:
        return dict(self._select_ids("SELECT id, text FROM texts WHERE id IN ({ids})", ids))

    def text_embeddings(self) -> tuple[Ids, Vectors]:
        """(ids [N] int64, vectors [N, D] float32) of every text, ordered by id."""
        return self._matrix("texts", "")

    def start_run(self, root: str) -> int:
        """Record a run over the image folder ``root`` (absolute; stored in the form of :mod:`indexer.paths`)."""
        stored = paths.to_stored(str(root))
        cursor = self._conn.execute("INSERT INTO runs (started_at, root) VALUES (?, ?)", (time.time(), stored))
        return int(cursor.lastrowid or 0)

    def finish_run(self, run_id: int, stats: Mapping[str, Any]) -> None:
        self._conn.execute(
            "UPDATE runs SET finished_at = ?, stats = ? WHERE id = ?", (time.time(), json.dumps(dict(stats)), run_id)
        )

    def last_run(self) -> dict[str, Any] | None:
        """The latest run, JSON-ready: {id, started_at, finished_at, root, stats}; times in Unix seconds, ``root`` in
        the stored form (:meth:`image_root` gives the folder itself)."""
        cursor = self._conn.execute(
            "SELECT id, started_at, finished_at, root, stats FROM runs ORDER BY id DESC LIMIT 1"
        )
        row = cursor.fetchone()
        if row is None:
            return None
        run = dict(zip(("id", "started_at", "finished_at", "root", "stats"), row, strict=True))
        run["stats"] = None if run["stats"] is None else json.loads(run["stats"])
        return run

    def image_root(self) -> Path | None:
        """The image folder of the latest run, or None before any run."""
        run = self.last_run()
        return None if run is None else Path(paths.from_stored(run["root"]))

    # --- ingest and export (indexer.ingest) ---------------------------------------------------------------------

    def ingested_shards(self) -> dict[str, tuple[str, int]]:
        """name -> (sha256, rows) of every shard ingested."""
        rows = self._conn.execute("SELECT name, sha256, rows FROM ingested_shards").fetchall()
        return {name: (sha256, int(count)) for name, sha256, count in rows}

    def record_ingested_shard(self, name: str, sha256: str, rows: int) -> None:
        """Record a shard as ingested; call in the transaction that wrote its rows. A name is recorded once."""
        self._conn.execute(
            "INSERT INTO ingested_shards (name, sha256, rows, ingested_at) VALUES (?, ?, ?, ?)",
            (name, sha256, rows, time.time()),
        )

    def has_unpublished_images(self, published: int) -> bool:
        """Whether generation number ``published`` (the one CURRENT names) shows an image row other than as it is
        now: rows written or deleted since, or stamped by a publish that never replaced CURRENT (it was killed)."""
        row = self._conn.execute(
            "SELECT EXISTS (SELECT 1 FROM images WHERE gen IS NULL OR gen > :g) "
            "OR EXISTS (SELECT 1 FROM image_versions WHERE until_gen IS NULL OR until_gen > :g)",
            {"g": published},
        ).fetchone()
        return bool(row[0])

    def image_page(self, after_id: int, limit: int) -> tuple[list[ImageRecord], Vectors]:
        """Up to ``limit`` image rows (ok and skipped) with ids above ``after_id``, by id, and the [M, D] float32
        vectors of the ok ones among them, in the same order."""
        dim = self._require_dim()
        rows = self._conn.execute(
            f"SELECT {_IMAGE_COLUMNS}, vec_file, vec_row FROM images WHERE id > ? ORDER BY id LIMIT ?",
            (after_id, limit),
        ).fetchall()
        pointers = [(int(row[-2]), int(row[-1])) for row in rows if row[-1] is not None]
        vectors = self._read_vectors(pointers, dim) if pointers else np.empty((0, dim), dtype=np.float32)
        return [ImageRecord(*row[:-2]) for row in rows], vectors

    def _select_ids(self, select: str, ids: Sequence[int], **params: int) -> list[Any]:
        """Rows of ``select`` over ``ids`` in chunks: ``{ids}`` in ``select`` stands for a chunk's placeholders,
        ``:name`` for ``params[name]``."""
        unique = list(dict.fromkeys(int(i) for i in ids))
        rows: list[Any] = []
        for start in range(0, len(unique), SQL_IDS_PER_QUERY):
            chunk = unique[start : start + SQL_IDS_PER_QUERY]
            statement = select.format(ids=",".join(f":i{n}" for n in range(len(chunk))))
            rows += self._conn.execute(statement, {**params, **{f"i{n}": i for n, i in enumerate(chunk)}}).fetchall()
        return rows

    def _matrix(self, table: str, where: str) -> tuple[Ids, Vectors]:
        ids, rows = self._stored_rows(table, where)
        vectors = np.empty(rows.shape, dtype=np.float32)
        for start in range(0, len(ids), MATRIX_CHUNK_ROWS):
            vectors[start : start + MATRIX_CHUNK_ROWS] = rows[start : start + MATRIX_CHUNK_ROWS]
        return ids, vectors

    def _stored_rows(self, table: str, where: str) -> tuple[Ids, StoredRows]:
        """(ids [N] int64, their vectors as StoredRows) of ``table``'s rows matching ``where``, ordered by id; the
        pointers are fetched in chunks, so memory is three int64 per row."""
        dim = self._require_dim()
        parts = []
        with self.snapshot():
            cursor = self._conn.execute(f"SELECT id, vec_file, vec_row FROM {table} {where} ORDER BY id")
            while chunk := cursor.fetchmany(MATRIX_CHUNK_ROWS):
                parts.append(np.array(chunk, dtype=np.int64).reshape(-1, 3))
        pointers = np.concatenate(parts) if parts else np.empty((0, 3), dtype=np.int64)
        ids = np.ascontiguousarray(pointers[:, 0])
        return ids, StoredRows(self._vectors, np.ascontiguousarray(pointers[:, 1]), pointers[:, 2].copy(), dim)

    def _read_vectors(self, pointers: list[Pointer], dim: int) -> Vectors:
        vectors = self._vectors.read(pointers)
        if len(pointers) and vectors.shape[1] != dim:
            raise IndexFormatError(f"the catalog's vectors are {vectors.shape[1]} wide, its model's {dim}")
        return vectors

    def _vector(self, table: str, item_id: int) -> Vectors | None:
        row = self._conn.execute(f"SELECT vec_file, vec_row FROM {table} WHERE id = ?", (int(item_id),)).fetchone()
        if row is None or row[1] is None:
            return None
        vector: Vectors = self._read_vectors([(int(row[0]), int(row[1]))], self._require_dim())[0]
        return vector

    def _states(self, table: str) -> dict[int, tuple[bool, float]]:
        """id -> (has an embedding, updated_at) for verify()."""
        rows = self._conn.execute(f"SELECT id, vec_row IS NOT NULL, updated_at FROM {table}").fetchall()
        return {row_id: (bool(usable), updated_at or 0.0) for row_id, usable, updated_at in rows}

    def same_content_at(self, generation: int) -> list[list[int]]:
        """The ok images generation number ``generation`` shows that share a content hash (byte-identical files):
        their ids in groups of two or more, each group by id, the groups by their first id."""
        shown = (
            "SELECT id, content_hash FROM images WHERE gen <= :g AND status = 'ok' UNION ALL "
            "SELECT id, content_hash FROM image_versions WHERE gen <= :g AND (until_gen IS NULL OR until_gen > :g) "
            "AND status = 'ok'"
        )
        with self.snapshot():
            self._require_generation(generation)
            rows = self._conn.execute(
                f"SELECT group_concat(id) FROM ({shown}) WHERE content_hash IS NOT NULL "
                "GROUP BY content_hash HAVING COUNT(*) > 1",
                {"g": generation},
            ).fetchall()
        return sorted(sorted(int(i) for i in row[0].split(",")) for row in rows)


def _shown_at(columns: str) -> str:
    """SELECT of ``columns`` of the image versions generation ``:g`` shows (see :mod:`indexer.store.schema`), for
    ``Catalog._select_ids``."""
    return (
        f"SELECT {columns} FROM images WHERE gen <= :g AND id IN ({{ids}}) UNION ALL "
        f"SELECT {columns} FROM image_versions WHERE gen <= :g AND (until_gen IS NULL OR until_gen > :g) "
        "AND id IN ({ids})"
    )


def _check_path(path: str) -> str:
    return paths.check_stored(path)


def _check_norms(matrix: Vectors) -> None:
    norms = np.linalg.norm(matrix.astype(np.float64), axis=-1).reshape(-1)
    bad = np.flatnonzero(~(np.abs(norms - 1.0) <= NORM_TOLERANCE))  # NaN counts as bad
    if bad.size:
        raise EmbeddingError(f"embeddings must be L2-normalized: row {bad[0]} has norm {norms[bad[0]]:.6f}")


def _checked_vector(embedding: Vectors, dim: int) -> Vectors:
    vector = np.asarray(embedding)
    if vector.dtype != np.float32 or vector.shape != (dim,):
        raise EmbeddingError(f"an embedding must be float32 [{dim}], got {vector.dtype} {list(vector.shape)}")
    _check_norms(vector)
    return vector
