"""The on-disk format of an index directory: the one module that writes it (indexer) and reads it (app).

Layout (the contract)::

    <index_dir>/
      catalog.sqlite3        SQLite, WAL mode, PRAGMA user_version = CATALOG_VERSION: the record of truth
      .lock                  writer lock (fcntl.flock), holds the writer's pid
      CURRENT                text: name of the published generation, e.g. "g-000003"; replaced atomically
      generations/g-000003/  immutable once published
          images.faiss       faiss.write_index of an IndexIDMap2 (factory in the manifest), ids = images.id
          texts.faiss        same for the indexed texts (ids = texts.id, always "IDMap2,Flat"); may hold 0 vectors
          manifest.json      format_version, generation, created_at, model provenance, metric, factory, counts,
                             files {name: {sha256, bytes}}; and how the image index was chosen and tuned:
                             requested_factory ("auto" or the user's), memory_budget, index_reason,
                             search_params (e.g. {"nprobe": 12}, applied on load), recall_at_10 (against exact
                             search, measured at publish on recall_queries queries; 1.0 for Flat)

Catalog tables: ``meta(key, value)`` (model provenance, ``index_type``: "auto" or a factory string,
``memory_budget``: bytes or empty, ``oldest_generation``); ``images`` (one row per file, the latest version: path
relative to the image root in the stored form of :mod:`indexer.paths`, size, mtime_ns, content_hash, width, height,
status 'ok'|'skipped', error, embedding, updated_at, gen); ``image_versions`` (superseded versions that a kept
generation still shows: the same columns plus until_gen); ``texts``; ``text_versions`` (deleted texts a kept
generation still holds); ``runs``. Ids are AUTOINCREMENT, so a deleted image's id is never given to another one.

One answer, one generation: a build commits rows long before it publishes, and a server keeps serving the
generation it loaded, so the catalog records which generation shows which version of a row. ``images.gen`` is the
number of the first generation that shows the row (NULL: written since the last publish, shown by none yet). A
writer that changes or deletes a row some generation shows first copies it into ``image_versions`` with
``until_gen`` NULL; publishing generation N sets every NULL ``gen`` and ``until_gen`` to N in the same transaction
that reads the vectors N holds. Generation g therefore shows the versions with ``gen <= g < until_gen`` (a NULL
``until_gen`` counting as infinite): exactly the rows its FAISS files were built from. Versions no kept generation
shows are dropped at publish, and ``oldest_generation`` records from which generation on lookups still resolve.

Invariants:

* Embeddings are float32 little-endian blobs of ``embed_dim`` values, L2-normalized (checked on write); FAISS
  indexes use METRIC_INNER_PRODUCT, so scores are cosine similarities. Ids are int64.
* The FAISS files are derived from the catalog and rebuilt by :func:`publish`. A generation is written under a temp
  name, fsynced, renamed into place, and only then published by atomically replacing CURRENT, so a crash at any
  point leaves the previous generation published and intact; the next publish sweeps the leftovers.
* One writer at a time (:class:`WriterLock`); readers (:class:`PublishedIndex`) never write and never block.

Being the one indexer module the app imports, it also holds what the two share beyond the format: ``ENV_PREFIX``,
the prefix of the environment variables both read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np
import numpy.typing as npt

from .. import _faiss_io, paths
from .._faiss_io import FaissIndex
from .._faiss_io import describe_backend as describe_backend  # for the server's start-up log
from ..errors import (
    EmbeddingError,
    GenerationRetiredError,
    IndexerError,
    IndexFormatError,
    IndexLockedError,
    IndexNotFoundError,
    ModelMismatchError,
)
from ..index_choice import AUTO, FLAT_MAX_VECTORS, build_calibrated, choose_index
from ..paths import file_path as file_path  # the app reaches the on-disk format only through this module

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1  # of manifest.json
CATALOG_VERSION = 2  # of the catalog (PRAGMA user_version); version 1 is upgraded in place by a writer
CATALOG_FILE = "catalog.sqlite3"
LOCK_FILE = ".lock"
CURRENT_FILE = "CURRENT"
CURRENT_TMP_FILE = "CURRENT.tmp"
GENERATIONS_DIR = "generations"
TEMP_PREFIX = ".tmp-"  # generations/.tmp-g-000004: being written, or left by a crashed publish
IMAGES_FILE = "images.faiss"
TEXTS_FILE = "texts.faiss"
MANIFEST_FILE = "manifest.json"
INDEX_FILES = (IMAGES_FILE, TEXTS_FILE)
DEFAULT_FACTORY = AUTO  # index_choice.choose_index() at every publish, from the collection's size
LEGACY_DEFAULT_FACTORY = "IDMap2,Flat"  # what catalogs before meta "index_type" recorded when nobody chose one
TEXT_FACTORY = "IDMap2,Flat"  # text corpora are small; exact search needs no training
METRIC = "inner_product"
NORM_TOLERANCE = 1e-3  # |‖v‖ - 1| allowed for a stored embedding
VECTOR_TOLERANCE = 1e-5  # max |FAISS - catalog| per component for exact (non-PQ/SQ) indexes
VERIFY_SAMPLE_SIZE = 1000  # vectors compared between FAISS and the catalog by verify()
SQLITE_TIMEOUT_S = 30.0  # how long a statement waits for another connection's lock
SQL_IDS_PER_QUERY = 500  # ids per "WHERE id IN (...)" statement
HASH_CHUNK_BYTES = 1 << 20  # 1 MiB reads when hashing a file (not clip_model.download's: that import loads torch)
OLDEST_GENERATION_KEY = "oldest_generation"  # meta: generations before this number can no longer be resolved
OPEN_ATTEMPTS = 3  # PublishedIndex.open retries when a publish swaps CURRENT while it reads
GENERATION_RE = re.compile(r"g-(\d{6,})")
ENV_PREFIX = "CLIPSEARCH_"  # of the variables the indexer's CLI and the server's settings both read (e.g. INDEX_DIR)

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT UNIQUE NOT NULL,
    size INTEGER,
    mtime_ns INTEGER,
    content_hash TEXT,
    width INTEGER,
    height INTEGER,
    status TEXT NOT NULL CHECK (status IN ('ok', 'skipped')),
    error TEXT,
    embedding BLOB,
    updated_at REAL,
    CHECK ((status = 'ok') = (embedding IS NOT NULL))
);
CREATE INDEX images_content_hash ON images (content_hash);
CREATE TABLE texts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    text TEXT UNIQUE NOT NULL,
    embedding BLOB NOT NULL,
    updated_at REAL
);
CREATE TABLE runs (id INTEGER PRIMARY KEY AUTOINCREMENT, started_at REAL, finished_at REAL, root TEXT, stats TEXT);
"""
# Generation bookkeeping (see "One answer, one generation" in the module docstring). Added to version 1 catalogs by
# _upgrade_from_1, where the existing rows get gen 0: visible to every generation.
_SCHEMA_GENERATIONS = """
ALTER TABLE images ADD COLUMN gen INTEGER;
CREATE TABLE image_versions (
    id INTEGER NOT NULL,
    path TEXT NOT NULL,
    size INTEGER,
    mtime_ns INTEGER,
    content_hash TEXT,
    width INTEGER,
    height INTEGER,
    status TEXT NOT NULL,
    error TEXT,
    embedding BLOB,
    gen INTEGER NOT NULL,
    until_gen INTEGER
);
CREATE INDEX image_versions_id ON image_versions (id);
CREATE INDEX images_pending ON images (id) WHERE gen IS NULL;
CREATE TABLE text_versions (id INTEGER NOT NULL, text TEXT NOT NULL, until_gen INTEGER);
CREATE INDEX text_versions_id ON text_versions (id);
"""
_FILE_COLUMNS = "id, path, size, mtime_ns, content_hash, status"
_IMAGE_COLUMNS = "id, path, size, mtime_ns, content_hash, width, height, status, error"
_VERSIONED_COLUMNS = f"{_IMAGE_COLUMNS}, embedding, gen"  # what image_versions keeps of an images row

Vectors = npt.NDArray[np.float32]
Ids = npt.NDArray[np.int64]


@dataclass(frozen=True)
class ModelInfo:
    """Provenance of the embeddings: which encoder, which weights, which preprocessing (JSON-able)."""

    name: str
    weights_sha256: str
    embed_dim: int
    preprocess: dict[str, Any]

    def __post_init__(self) -> None:  # canonical JSON form, so tuples and lists compare equal after a round trip
        object.__setattr__(self, "preprocess", json.loads(json.dumps(self.preprocess)))

    @classmethod
    def of(
        cls,
        name: str,
        weights_sha256: str,
        embed_dim: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> ModelInfo:
        """The provenance record of a loaded model, in the one form indexer and app both write and compare."""
        preprocess = {"image_size": int(image_size), "mean": [float(m) for m in mean], "std": [float(s) for s in std]}
        return cls(name=name, weights_sha256=weights_sha256, embed_dim=int(embed_dim), preprocess=preprocess)

    def same_embeddings(self, other: ModelInfo) -> bool:
        """Whether both produce the same vectors: same weights, dim and preprocessing (the name is only a label)."""
        return (self.weights_sha256, self.embed_dim, self.preprocess) == (
            other.weights_sha256,
            other.embed_dim,
            other.preprocess,
        )


@dataclass(frozen=True, slots=True)
class FileRecord:
    """What change detection needs about one catalog row."""

    id: int
    path: str
    size: int
    mtime_ns: int
    content_hash: str | None
    status: str


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """What the app shows about one image; ``path`` is relative to the image root, in POSIX form."""

    id: int
    path: str
    size: int
    mtime_ns: int
    content_hash: str | None
    width: int | None
    height: int | None
    status: str
    error: str | None


@dataclass(frozen=True, slots=True)
class Hit:
    """One search result: catalog id and cosine similarity."""

    id: int
    score: float


@dataclass(frozen=True)
class FileDigest:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    """manifest.json of one generation. ``created_at`` is Unix seconds; ``counts`` = {"images": n, "texts": n}."""

    format_version: int
    generation: str
    created_at: float
    model_name: str
    weights_sha256: str
    embed_dim: int
    preprocess: dict[str, Any]
    metric: str
    factory: str
    text_factory: str
    counts: dict[str, int]
    files: dict[str, FileDigest]
    requested_factory: str = ""  # "auto" or the factory string the user asked for ("": before this field)
    memory_budget: int | None = None  # bytes the image index had to fit in (auto only), None: no budget
    index_reason: str = ""  # why ``factory`` (one line)
    search_params: dict[str, int] = dataclasses.field(default_factory=dict)  # set on the image index on load
    recall_at_10: float | None = None  # image index vs exact search; None: empty or not measured
    recall_queries: int = 0  # queries behind recall_at_10 (0 for Flat: exact by construction)

    @property
    def model(self) -> ModelInfo:
        return ModelInfo(self.model_name, self.weights_sha256, self.embed_dim, self.preprocess)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: Path) -> Manifest:
        """Parse and validate; IndexFormatError names ``source`` and what is wrong (bad JSON, unknown version...)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise IndexFormatError(f"{source} is not valid JSON ({exc}): the generation is corrupt") from exc
        version = data.get("format_version") if isinstance(data, dict) else None
        if not isinstance(version, int):
            raise IndexFormatError(f"{source} has no integer format_version: the generation is corrupt")
        if version != FORMAT_VERSION:
            hint = ": upgrade clip-search to read it" if version > FORMAT_VERSION else ""
            raise IndexFormatError(
                f"{source} has format version {version}; this code reads format version {FORMAT_VERSION}{hint}"
            )
        try:
            fields = {f.name: data[f.name] for f in dataclasses.fields(cls) if _required(f) or f.name in data}
            fields["files"] = {name: FileDigest(str(d["sha256"]), int(d["bytes"])) for name, d in data["files"].items()}
            fields["counts"] = {name: int(n) for name, n in data["counts"].items()}
            fields["created_at"], fields["embed_dim"] = float(data["created_at"]), int(data["embed_dim"])
            fields["search_params"] = {name: int(v) for name, v in data.get("search_params", {}).items()}
            manifest = cls(**fields)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise IndexFormatError(f"{source} is missing a field or has a malformed one ({exc!r})") from exc
        if manifest.metric != METRIC:
            raise IndexFormatError(f"{source} has metric {manifest.metric!r}; this code reads {METRIC!r}")
        return manifest


def _required(field: dataclasses.Field[Any]) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


_HELD_LOCKS: set[Path] = set()  # resolved index dirs whose WriterLock this process holds


class WriterLock:
    """Exclusive writer lock on ``<index_dir>/.lock`` via ``fcntl.flock``; creates ``index_dir`` if needed.

    The kernel drops the lock when its holder dies, so a crashed writer never leaves a stale lock. Not reentrant: a
    second WriterLock on the same directory fails even in the same process.
    """

    def __init__(self, index_dir: Path) -> None:
        self.index_dir = Path(index_dir)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise IndexLockedError naming the holder's pid and the directory."""
        self.index_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.index_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise IndexLockedError(
                f"{self.index_dir} is locked by another indexer (pid {holder}); wait for it to finish or stop it"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd
        _HELD_LOCKS.add(self.index_dir.resolve())

    def release(self) -> None:
        if self._fd is not None:
            _HELD_LOCKS.discard(self.index_dir.resolve())
            os.close(self._fd)  # closing the only descriptor releases the flock
            self._fd = None

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class Catalog:
    """The SQLite record of truth. Writers hold a :class:`WriterLock` and group writes in :meth:`transaction`
    (each call outside one commits on its own, with an fsync). Not thread-safe; read-only catalogs may be used from
    several threads if the caller serializes the calls (as :class:`PublishedIndex` does)."""

    def __init__(self, index_dir: Path, conn: sqlite3.Connection, readonly: bool) -> None:
        self.index_dir = index_dir
        self.readonly = readonly
        self._conn = conn
        self._dim: int | None = None

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
            catalog = cls(index_dir, conn, readonly)
            catalog._check_version(create=create and not readonly)
        except sqlite3.DatabaseError as exc:
            raise IndexFormatError(f"{path} is not a readable SQLite catalog: {exc}") from exc
        return catalog

    def _check_version(self, create: bool) -> None:
        version = self._user_version()
        if not self.readonly and ((version == 0 and create) or version == 1):
            with self.transaction():
                version = self._user_version()  # as of the write lock: another writer may have done it
                if version == 0:
                    self._run_script(_SCHEMA + _SCHEMA_GENERATIONS)
                    self._conn.execute(f"PRAGMA user_version = {CATALOG_VERSION}")
                    self._set_meta({"format_version": str(CATALOG_VERSION), "index_type": DEFAULT_FACTORY})
                elif version == 1:
                    self._upgrade_from_1()
            return
        if version != CATALOG_VERSION:
            hint = ": upgrade clip-search to read it" if version > CATALOG_VERSION else ""
            if version == 1:
                hint = ": run `clip-index build` on it once to upgrade it"
            raise IndexFormatError(
                f"{self.index_dir / CATALOG_FILE} has catalog format version {version}; "
                f"this code reads format version {CATALOG_VERSION}{hint}"
            )

    def _user_version(self) -> int:
        return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    def _upgrade_from_1(self) -> None:
        """Version 1 -> 2: generation bookkeeping; every existing row becomes visible to every generation."""
        self._run_script(_SCHEMA_GENERATIONS)
        self._conn.execute("UPDATE images SET gen = 0")
        self._conn.execute(f"PRAGMA user_version = {CATALOG_VERSION}")
        self._set_meta({"format_version": str(CATALOG_VERSION)})
        logger.info("upgraded %s to catalog format version %d", self.index_dir / CATALOG_FILE, CATALOG_VERSION)

    def _run_script(self, script: str) -> None:
        for statement in script.split(";"):
            if statement.strip():
                self._conn.execute(statement)

    def close(self) -> None:
        self._conn.close()

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
        except BaseException:
            self._conn.execute("ROLLBACK")
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
        self._conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", items.items())

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
        blob = _vector_bytes(embedding, self._require_dim())
        values = {"width": width, "height": height, "status": "ok", "error": None, "embedding": blob}
        return self._upsert(path, size, mtime_ns, content_hash, values)

    def add_skipped(self, path: str, size: int, mtime_ns: int, content_hash: str | None, error: str) -> int:
        """Record a file that could not be indexed, with the reason; it holds no embedding. Returns the id."""
        values = {"width": None, "height": None, "status": "skipped", "error": error, "embedding": None}
        return self._upsert(path, size, mtime_ns, content_hash, values)

    def _upsert(
        self, path: str, size: int, mtime_ns: int, content_hash: str | None, values: Mapping[str, object]
    ) -> int:
        """Insert the row of ``path``, or replace every column but its id (an existing path keeps its id)."""
        columns = {"path": _check_path(path), "size": size, "mtime_ns": mtime_ns, "content_hash": content_hash}
        columns |= {**values, "updated_at": time.time()}
        names, marks = ", ".join(columns), ", ".join("?" * len(columns))
        updates = ", ".join(f"{name} = excluded.{name}" for name in columns if name != "path")
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

    def embedding(self, image_id: int) -> Vectors | None:
        """The stored [D] float32 vector of an ok image, or None."""
        return self._vector("images", image_id)

    def images(self, ids: Sequence[int]) -> dict[int, ImageRecord]:
        """Records of the given ids that exist (missing ids are absent from the result)."""
        rows = self._select_ids(f"SELECT {_IMAGE_COLUMNS} FROM images WHERE id IN ({{ids}})", ids)
        return {row[0]: ImageRecord(*row) for row in rows}

    # --- generations: what a published generation shows -------------------------------------------------------

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
            rows = self._select_ids(_shown_at("embedding"), [image_id], g=generation)
        blob = rows[0][0] if rows else None
        return None if blob is None else _vector_from_bytes(blob, self._require_dim(), image_id)

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
            self._conn.executemany(
                "INSERT INTO texts (text, embedding, updated_at) VALUES (?, ?, ?) ON CONFLICT (text) DO UPDATE SET "
                "embedding = excluded.embedding, updated_at = excluded.updated_at",
                ((text, _vector_bytes(vector, dim), now) for text, vector in zip(texts, matrix, strict=True)),
            )
        return len(texts)

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
        dim = self._require_dim()
        with self.snapshot():
            count = self._conn.execute(f"SELECT COUNT(*) FROM {table} {where}").fetchone()[0]
            ids = np.empty(count, dtype=np.int64)
            vectors = np.empty((count, dim), dtype=np.float32)
            rows = self._conn.execute(f"SELECT id, embedding FROM {table} {where} ORDER BY id")
            for i, (row_id, blob) in enumerate(rows):
                ids[i] = row_id
                vectors[i] = _vector_from_bytes(blob, dim, row_id)
        return ids, vectors

    def _vector(self, table: str, item_id: int) -> Vectors | None:
        row = self._conn.execute(f"SELECT embedding FROM {table} WHERE id = ?", (int(item_id),)).fetchone()
        if row is None or row[0] is None:
            return None
        return _vector_from_bytes(row[0], self._require_dim(), item_id)

    def _states(self, table: str) -> dict[int, tuple[bool, float]]:
        """id -> (has an embedding, updated_at) for verify()."""
        rows = self._conn.execute(f"SELECT id, embedding IS NOT NULL, updated_at FROM {table}").fetchall()
        return {row_id: (bool(usable), updated_at or 0.0) for row_id, usable, updated_at in rows}


def _shown_at(columns: str) -> str:
    """SELECT of ``columns`` of the image versions generation ``:g`` shows (see the module docstring), for
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


def _vector_bytes(embedding: Vectors, dim: int) -> bytes:
    vector = np.asarray(embedding)
    if vector.dtype != np.float32 or vector.shape != (dim,):
        raise EmbeddingError(f"an embedding must be float32 [{dim}], got {vector.dtype} {list(vector.shape)}")
    _check_norms(vector)
    return vector.astype("<f4", copy=False).tobytes()


def _vector_from_bytes(blob: bytes, dim: int, item_id: int) -> Vectors:
    if len(blob) != dim * 4:
        raise IndexFormatError(f"catalog embedding of id {item_id} has {len(blob)} bytes, expected {dim * 4}")
    return np.frombuffer(blob, dtype="<f4").astype(np.float32)


# --- publishing generations -------------------------------------------------------------------------------------


def publish(
    index_dir: Path,
    catalog: Catalog,
    factory: str | None = None,
    *,
    memory_budget: int | None = None,
    flat_max_vectors: int = FLAT_MAX_VECTORS,
) -> Manifest:
    """Build the FAISS indexes from ``catalog`` and publish them as a new generation of ``index_dir``.

    ``factory`` (default: the catalog's, initially "auto") is "auto" or a faiss.index_factory string; the catalog
    remembers it for later publishes. "auto" applies :func:`indexer.index_choice.choose_index` to the current
    number of images, within ``memory_budget`` bytes (default: the catalog's; 0 removes it) and with exact search
    up to ``flat_max_vectors``; so a growing collection switches type when it passes a threshold. A factory string
    gets an "IDMap2," prefix if missing, and trainable indexes are trained on a seeded sample of the vectors
    (IndexBuildError if there are too few). The search-time knob (IVF nprobe, HNSW efSearch) is then calibrated
    to recall@10 >= 0.95 against exact search (:func:`indexer.index_choice.calibrate`) and recorded, with the
    recall, in the manifest. Takes the WriterLock unless this process already holds it. The generation is written
    under a temp name, fsynced, renamed into place, then CURRENT is replaced atomically; the generation CURRENT
    named before is kept, older ones and temp dirs of crashed runs are removed. A crash at any point leaves the
    previous generation published. FAISS's thread count is left to the caller.
    """
    index_dir = Path(index_dir)
    if catalog.index_dir.resolve() != index_dir.resolve():
        raise ValueError(f"catalog of {catalog.index_dir} cannot be published into {index_dir}")
    with contextlib.ExitStack() as stack:
        if index_dir.resolve() not in _HELD_LOCKS:
            stack.enter_context(WriterLock(index_dir))
        requested, budget = resolve_index_request(catalog, factory, memory_budget)
        return _publish_locked(index_dir, catalog, requested, budget, flat_max_vectors)


def resolve_index_request(catalog: Catalog, factory: str | None, memory_budget: int | None) -> tuple[str, int | None]:
    """(index type, budget) a publish with these arguments builds: ``factory`` normalized ("auto" or "IDMap2,...")
    or else the catalog's; ``memory_budget`` bytes, or else the catalog's, with 0 meaning none (None)."""
    requested = factory or catalog.factory()
    requested = AUTO if requested.strip().lower() == AUTO else _faiss_io.normalize_factory(requested)
    budget = catalog.memory_budget() if memory_budget is None else (memory_budget or None)
    return requested, budget


def _publish_locked(
    index_dir: Path, catalog: Catalog, requested: str, budget: int | None, flat_max_vectors: int
) -> Manifest:
    model = catalog.model()
    if model is None:
        raise IndexerError(f"{index_dir / CATALOG_FILE} records no model: call Catalog.set_model() before publishing")
    created_at = time.time()
    previous = current_generation(index_dir)
    generations = index_dir / GENERATIONS_DIR
    generations.mkdir(exist_ok=True)
    _remove_dirs(generations, lambda name: name.startswith(TEMP_PREFIX))
    name = _next_generation_name(generations, previous)
    with catalog.transaction():  # what the generation holds, and the catalog's record of it, in one step
        catalog.stamp_generation(generation_number(name))
        image_ids, image_vectors = catalog.embeddings()
        text_ids, text_vectors = catalog.text_embeddings()
    started = time.monotonic()
    if requested == AUTO:
        choice = choose_index(len(image_ids), model.embed_dim, budget, flat_max_vectors=flat_max_vectors)
        factory, reason = choice.factory, choice.reason
    else:
        factory, reason = requested, "the factory asked for"
    built = build_calibrated(
        image_ids, image_vectors, model.embed_dim, factory, auto=requested == AUTO, memory_budget_bytes=budget
    )
    images, factory, tuned, reason = built.index, built.factory, built.calibration, reason + built.note
    seconds, params = time.monotonic() - started, tuned.search_params or "no search parameters"
    recall = "n/a" if tuned.recall is None else f"{tuned.recall:.3f}"
    logger.info(
        "built and calibrated %s over %d images in %.1fs (%s); %s, recall@10 %s on %d queries",
        factory,
        len(image_ids),
        seconds,
        reason,
        params,
        recall,
        tuned.queries,
    )
    indexes = {
        IMAGES_FILE: images,
        TEXTS_FILE: _faiss_io.build_index(text_ids, text_vectors, model.embed_dim, TEXT_FACTORY),
    }
    del image_vectors, text_vectors
    if requested != catalog.factory():
        catalog.set_factory(requested)
    if budget != catalog.memory_budget():
        catalog.set_memory_budget(budget)
    counts = {"images": int(indexes[IMAGES_FILE].ntotal), "texts": int(indexes[TEXTS_FILE].ntotal)}
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        generation=name,
        created_at=created_at,
        model_name=model.name,
        weights_sha256=model.weights_sha256,
        embed_dim=model.embed_dim,
        preprocess=model.preprocess,
        metric=METRIC,
        factory=factory,
        text_factory=TEXT_FACTORY,
        counts=counts,
        files={},
        requested_factory=requested,
        memory_budget=budget if requested == AUTO else None,
        index_reason=reason,
        search_params=tuned.search_params,
        recall_at_10=tuned.recall,
        recall_queries=tuned.queries,
    )
    tmp_dir = generations / f"{TEMP_PREFIX}{name}"
    manifest = _write_generation(tmp_dir, manifest, indexes)
    _install_generation(tmp_dir, generations / name)
    _replace_current(index_dir, name)
    keep = {name, previous}
    _remove_dirs(generations, lambda entry: GENERATION_RE.fullmatch(entry) is not None and entry not in keep)
    catalog.forget_before(generation_number(previous or name))
    logger.info("published %s in %s: %d images, %d texts (%s)", name, index_dir, *counts.values(), factory)
    return manifest


def generation_number(name: str) -> int:
    """The number of a generation name: "g-000007" -> 7."""
    match = GENERATION_RE.fullmatch(name)
    if match is None:
        raise IndexFormatError(f"{name[:40]!r} is not a generation name like 'g-000001'")
    return int(match.group(1))


def _next_generation_name(generations: Path, previous: str | None) -> str:
    names = [entry.name for entry in generations.iterdir()] + ([previous] if previous else [])
    numbers = [int(m.group(1)) for n in names if (m := GENERATION_RE.fullmatch(n.removeprefix(TEMP_PREFIX)))]
    return f"g-{max(numbers, default=0) + 1:06d}"


def _write_generation(tmp_dir: Path, manifest: Manifest, indexes: Mapping[str, FaissIndex]) -> Manifest:
    """Write the index files and manifest.json into ``tmp_dir``, all fsynced. Returns the manifest with digests."""
    tmp_dir.mkdir()
    files = {}
    for file_name, index in indexes.items():
        path = tmp_dir / file_name
        _faiss_io.write_index(index, path)
        _fsync(path)
        files[file_name] = _digest(path)
    manifest = dataclasses.replace(manifest, files=files)
    _write_durably(tmp_dir / MANIFEST_FILE, manifest.to_json())
    _fsync(tmp_dir)
    return manifest


def _install_generation(tmp_dir: Path, final_dir: Path) -> None:
    os.rename(tmp_dir, final_dir)
    _fsync(final_dir.parent)


def _replace_current(index_dir: Path, name: str) -> None:
    tmp = index_dir / CURRENT_TMP_FILE
    _write_durably(tmp, f"{name}\n")
    os.replace(tmp, index_dir / CURRENT_FILE)
    _fsync(index_dir)


def _remove_dirs(parent: Path, condition: Callable[[str], bool]) -> None:
    for entry in parent.iterdir():
        if entry.is_dir() and condition(entry.name):
            logger.debug("removing %s", entry)
            shutil.rmtree(entry, ignore_errors=True)


def _write_durably(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())


def _fsync(path: Path) -> None:
    """fsync a file or a directory (the latter makes renames and new entries in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(path: Path) -> FileDigest:
    sha = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(HASH_CHUNK_BYTES):
            sha.update(chunk)
    return FileDigest(sha.hexdigest(), path.stat().st_size)


# --- reading the published generation ---------------------------------------------------------------------------


def current_generation(index_dir: Path) -> str | None:
    """The published generation's name ("g-000003"), or None if nothing is published."""
    path = Path(index_dir) / CURRENT_FILE
    try:
        name = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    if not GENERATION_RE.fullmatch(name):
        raise IndexFormatError(f"{path} holds {name[:40]!r}, not a generation name like 'g-000001'")
    return name


def read_manifest(index_dir: Path, generation: str) -> Manifest:
    """The manifest of ``generation``; IndexFormatError if it is corrupt or of another format version."""
    return _read_manifest(Path(index_dir) / GENERATIONS_DIR / generation)


def _read_manifest(generation_dir: Path) -> Manifest:
    path = generation_dir / MANIFEST_FILE
    manifest = Manifest.from_json(path.read_text(encoding="utf-8"), path)
    if manifest.generation != generation_dir.name:
        raise IndexFormatError(f"{path} describes generation {manifest.generation}, not {generation_dir.name}")
    return manifest


def _check_files(generation_dir: Path, manifest: Manifest, checksums: bool) -> dict[str, str]:
    """file name -> problem with its presence, size or (if ``checksums``) sha256, for the files that have one."""
    problems = {}
    for file_name in INDEX_FILES:
        path = generation_dir / file_name
        expected = manifest.files.get(file_name)
        if expected is None:
            problems[file_name] = f"{generation_dir / MANIFEST_FILE} records no checksum for {file_name}"
        elif not path.is_file():
            problems[file_name] = f"{path} is missing"
        elif (size := path.stat().st_size) != expected.bytes:
            problems[file_name] = f"{path} has {size} bytes, the manifest records {expected.bytes} (truncated?)"
        elif checksums and (actual := _digest(path).sha256) != expected.sha256:
            problems[file_name] = f"{path} has sha256 {actual[:16]}..., the manifest records {expected.sha256[:16]}..."
    return problems


def _check_loaded(manifest: Manifest, file_name: str, index: FaissIndex) -> list[str]:
    kind = file_name.removesuffix(".faiss")
    problems = []
    if index.d != manifest.embed_dim:
        problems.append(f"{file_name} has dimension {index.d}, the manifest records {manifest.embed_dim}")
    if index.ntotal != manifest.counts.get(kind):
        problems.append(f"{file_name} holds {index.ntotal} vectors, the manifest records {manifest.counts.get(kind)}")
    return problems


def _load_generation(generation_dir: Path, verify_checksums: bool) -> tuple[Manifest, dict[str, FaissIndex]]:
    manifest = _read_manifest(generation_dir)
    problems = list(_check_files(generation_dir, manifest, verify_checksums).values())
    indexes = {} if problems else {name: _faiss_io.read_index(generation_dir / name) for name in INDEX_FILES}
    for file_name, index in indexes.items():
        problems += _check_loaded(manifest, file_name, index)
    if IMAGES_FILE in indexes and not problems:
        try:  # also saved in the file; the manifest is what the server is told to use
            _faiss_io.set_search_params(indexes[IMAGES_FILE], manifest.search_params)
        except IndexFormatError as exc:
            problems.append(f"{IMAGES_FILE}: {exc}")
    if problems:
        raise IndexFormatError(
            f"generation {generation_dir.name} is unusable: {'; '.join(problems)}. "
            "Run the indexer again to publish a fresh generation"
        )
    return manifest, indexes


class PublishedIndex:
    """The published generation, loaded into memory, plus a read-only view of the catalog. Opening never writes.

    Thread-safe: searches run concurrently (FAISS searches are read-only); catalog lookups share one read-only
    SQLite connection behind a lock. Later publishes do not affect an open instance (reopen to see them).
    """

    def __init__(self, index_dir: Path, manifest: Manifest, indexes: dict[str, FaissIndex], catalog: Catalog) -> None:
        self.index_dir = index_dir
        self.manifest = manifest
        self._images = indexes[IMAGES_FILE]
        self._texts = indexes[TEXTS_FILE]
        self._catalog = catalog
        self._generation = generation_number(manifest.generation)
        self._lock = threading.Lock()

    @classmethod
    def open(cls, index_dir: Path, *, verify_checksums: bool = True) -> PublishedIndex:
        """Load CURRENT's generation. IndexNotFoundError if nothing is published, IndexFormatError if it is unusable."""
        index_dir = Path(index_dir)
        for _ in range(OPEN_ATTEMPTS):
            name = current_generation(index_dir)
            if name is None:
                where = "does not exist" if not index_dir.is_dir() else f"has no {CURRENT_FILE}: nothing is published"
                raise IndexNotFoundError(f"no published index: {index_dir} {where}. Run the indexer to build one")
            try:
                manifest, indexes = _load_generation(index_dir / GENERATIONS_DIR / name, verify_checksums)
            except (FileNotFoundError, IndexFormatError) as exc:
                if current_generation(index_dir) != name:
                    continue  # a publish replaced the generation while we read it
                if isinstance(exc, FileNotFoundError):
                    raise IndexFormatError(f"{CURRENT_FILE} of {index_dir} names {name}, but {exc}") from exc
                raise
            return cls(index_dir, manifest, indexes, Catalog.open(index_dir, readonly=True))
        raise IndexFormatError(f"{index_dir} was republished {OPEN_ATTEMPTS} times while opening it; try again")

    def close(self) -> None:
        with self._lock:
            self._catalog.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def search(self, queries: Vectors, k: int) -> list[list[Hit]]:
        """Images nearest to ``queries`` [Q, D] float32 unit rows: Q lists of at most ``k`` hits, best first."""
        return self._search(self._images, queries, k)

    def search_texts(self, queries: Vectors, k: int) -> list[list[Hit]]:
        """Indexed texts nearest to ``queries`` [Q, D] float32 unit rows, as :meth:`search`."""
        return self._search(self._texts, queries, k)

    def _search(self, index: FaissIndex, queries: Vectors, k: int) -> list[list[Hit]]:
        matrix = np.asarray(queries)
        if matrix.dtype != np.float32 or matrix.ndim != 2 or matrix.shape[1] != self.manifest.embed_dim:
            raise EmbeddingError(
                f"queries must be float32 [Q, {self.manifest.embed_dim}], got {matrix.dtype} {list(matrix.shape)}"
            )
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        scores, ids = _faiss_io.search(index, np.ascontiguousarray(matrix), k)
        return [
            [Hit(int(i), float(s)) for s, i in zip(row_scores, row_ids, strict=True) if i != -1]
            for row_scores, row_ids in zip(scores, ids, strict=True)
        ]

    def images(self, ids: Sequence[int]) -> dict[int, ImageRecord]:
        """Records of ``ids`` as this generation shows them, whatever the catalog holds now; ids the generation does
        not show are absent. GenerationRetiredError once later publishes dropped what this generation showed."""
        with self._lock:
            return self._catalog.images_at(ids, self._generation)

    def texts(self, ids: Sequence[int]) -> dict[int, str]:
        """Texts of ``ids`` this generation holds, as :meth:`images`."""
        with self._lock:
            return self._catalog.texts_at(ids, self._generation)

    def last_run(self) -> dict[str, Any] | None:
        """The catalog's latest indexer run, as ``Catalog.last_run``."""
        with self._lock:
            return self._catalog.last_run()

    def image_root(self) -> Path | None:
        """The image folder the latest indexer run indexed, or None before any run."""
        with self._lock:
            return self._catalog.image_root()

    def embedding(self, image_id: int) -> Vectors | None:
        """The [D] float32 unit vector of an image this generation holds (None if it holds none): from FAISS if
        stored exactly there, else from the catalog's version of the image for this generation."""
        if not _faiss_io.is_lossy(self.manifest.factory):
            return _faiss_io.reconstruct(self._images, image_id)
        with self._lock:
            return self._catalog.embedding_at(image_id, self._generation)


# --- verification -----------------------------------------------------------------------------------------------


def verify(index_dir: Path, *, sample: int = VERIFY_SAMPLE_SIZE) -> list[str]:
    """Check the published generation against its manifest and the catalog. Returns the problems (empty = OK).

    Catalog rows changed after the generation was published (or a later indexer run) are reported at INFO level
    only: the next publish picks them up.
    """
    index_dir = Path(index_dir)
    try:
        name = current_generation(index_dir)
        if name is None:
            return [f"nothing is published in {index_dir}: {CURRENT_FILE} is missing"]
        generation_dir = index_dir / GENERATIONS_DIR / name
        if not generation_dir.is_dir():
            return [f"{CURRENT_FILE} names {name}, but {generation_dir} does not exist"]
        manifest = _read_manifest(generation_dir)
    except (OSError, IndexFormatError) as exc:
        return [str(exc)]
    file_problems = _check_files(generation_dir, manifest, checksums=True)
    problems = list(file_problems.values())
    indexes: dict[str, FaissIndex] = {}
    for file_name in INDEX_FILES:
        if file_name not in file_problems:
            try:
                indexes[file_name] = _faiss_io.read_index(generation_dir / file_name)
            except IndexFormatError as exc:
                problems.append(str(exc))
                continue
            problems += _check_loaded(manifest, file_name, indexes[file_name])
    if IMAGES_FILE in indexes:
        saved = _faiss_io.get_search_params(indexes[IMAGES_FILE])
        if any(saved.get(name) != value for name, value in manifest.search_params.items()):
            problems.append(
                f"{IMAGES_FILE} has search parameters {saved}, the manifest records {manifest.search_params}"
            )
    try:
        catalog = Catalog.open(index_dir, readonly=True)
    except IndexerError as exc:
        return [*problems, str(exc)]
    with catalog, catalog.snapshot():
        problems += _check_catalog(catalog, manifest, indexes, sample)
    return problems


def _check_catalog(catalog: Catalog, manifest: Manifest, indexes: Mapping[str, FaissIndex], sample: int) -> list[str]:
    last_run = catalog.last_run()
    catalog_moved_on = last_run is not None and last_run["started_at"] > manifest.created_at
    model = catalog.model()
    if model is None or not model.same_embeddings(manifest.model):
        message = f"the catalog's model {model} differs from the model of generation {manifest.generation}"
        if not catalog_moved_on:
            return [message]
        logger.info("%s: a later run (--rebuild?) switched models; its publish will replace the generation", message)
        return []
    problems = []
    for table, file_name in (("images", IMAGES_FILE), ("texts", TEXTS_FILE)):
        if file_name not in indexes:
            continue
        states = catalog._states(table)  # id -> (has an embedding, updated_at)
        newer = {i for i, (_, updated_at) in states.items() if updated_at > manifest.created_at}
        if newer:
            logger.info("%d %s rows changed after %s was published", len(newer), table, manifest.generation)
        faiss_ids = set(_faiss_io.index_ids(indexes[file_name]).tolist())
        unknown = sorted(i for i in faiss_ids - newer if not states.get(i, (False, 0.0))[0])
        if unknown and (catalog_moved_on or newer):  # deleted by a later run: the next publish drops them
            logger.info("%d ids in %s were removed from the catalog after publishing", len(unknown), file_name)
        elif unknown:
            problems.append(
                f"{len(unknown)} ids in {file_name} have no usable {table} row in the catalog: {unknown[:5]}"
            )
        missing = sorted(i for i, (usable, _) in states.items() if usable and i not in faiss_ids and i not in newer)
        if missing:
            problems.append(f"{len(missing)} {table} rows of the catalog are missing from {file_name}: {missing[:5]}")
        lossy = _faiss_io.is_lossy(manifest.factory if table == "images" else manifest.text_factory)
        checked = sorted(faiss_ids - newer - set(unknown))
        problems += _check_vectors(catalog, table, None if lossy else indexes[file_name], checked, sample)
    return problems


def _check_vectors(catalog: Catalog, table: str, index: FaissIndex | None, ids: list[int], sample: int) -> list[str]:
    """Up to ``sample`` of ``ids``: the catalog vector is unit-norm and, if ``index`` is given, equal to FAISS's."""
    if not ids:
        return []
    chosen = np.random.default_rng(0).choice(np.asarray(ids, dtype=np.int64), size=min(sample, len(ids)), replace=False)
    bad_norm, differ = [], []
    for item_id in chosen.tolist():
        stored = catalog._vector(table, item_id)
        if stored is None or abs(float(np.linalg.norm(stored)) - 1.0) > NORM_TOLERANCE:
            bad_norm.append(item_id)
        elif index is not None:
            vector = _faiss_io.reconstruct(index, item_id)
            if vector is None or float(np.max(np.abs(vector - stored))) > VECTOR_TOLERANCE:
                differ.append(item_id)
    problems = []
    if bad_norm:
        problems.append(f"{len(bad_norm)} sampled {table} embeddings are not unit-norm: ids {bad_norm[:5]}")
    if differ:
        problems.append(f"{len(differ)} sampled {table} vectors in FAISS differ from the catalog: ids {differ[:5]}")
    return problems
