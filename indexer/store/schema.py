"""The catalog's SQLite schema (PRAGMA user_version = CATALOG_VERSION) and the in-place upgrade of older catalogs.

Catalog tables: ``meta(key, value)`` (model provenance, ``index_type``: "auto" or a factory string,
``memory_budget``: bytes or empty, ``oldest_generation``); ``images`` (one row per file, the latest version: path
relative to the image root in the stored form of :mod:`indexer.paths`, size, mtime_ns, content_hash, width, height,
status 'ok'|'skipped', error, where its vector is (vec_file, vec_row), updated_at, gen); ``image_versions``
(superseded versions that a kept generation still shows: the same columns plus until_gen); ``texts``;
``text_versions`` (deleted texts a kept generation still holds); ``runs``; ``vector_files`` (each vector file of
:mod:`indexer.store.vectors` and its committed rows). Ids are AUTOINCREMENT, so a deleted
image's id is never given to another one.
``ingested_shards``: the embedding shards :mod:`indexer.ingest` brought in. ``photo_metadata``: what each file
content says about the photo (:mod:`indexer.photo_metadata`), keyed by content hash, so it needs no versions: a
generation's row version names its content, and the content its metadata.

One answer, one generation: a build commits rows long before it publishes, and a server keeps serving the
generation it loaded, so the catalog records which generation shows which version of a row. ``images.gen`` is the
number of the first generation that shows the row (NULL: written since the last publish, shown by none yet). A
writer that changes or deletes a row some generation shows first copies it into ``image_versions`` with
``until_gen`` NULL; publishing generation N sets every NULL ``gen`` and ``until_gen`` to N in the same transaction
that reads the vectors N holds. Generation g therefore shows the versions with ``gen <= g < until_gen`` (a NULL
``until_gen`` counting as infinite): exactly the rows its FAISS files were built from. Versions no kept generation
shows are dropped at publish, and ``oldest_generation`` records from which generation on lookups still resolve.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Mapping
from pathlib import Path

from ..index_choice import AUTO

logger = logging.getLogger(__name__)

CATALOG_VERSION = 3  # of the catalog (PRAGMA user_version); versions 1 and 2 are upgraded in place by a writer
DEFAULT_FACTORY = AUTO  # index_choice.choose_index() at every publish, from the collection's size
LEGACY_DEFAULT_FACTORY = "IDMap2,Flat"  # what catalogs before meta "index_type" recorded when nobody chose one
OLDEST_GENERATION_KEY = "oldest_generation"  # meta: generations before this number can no longer be resolved

# Where a vector is: (vec_file, vec_row) of a file in vector_files (indexer.store.vectors); NULL for a skipped image.
_IMAGES = """
CREATE TABLE {name} (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT UNIQUE NOT NULL,
    size INTEGER,
    mtime_ns INTEGER,
    content_hash TEXT,
    width INTEGER,
    height INTEGER,
    status TEXT NOT NULL CHECK (status IN ('ok', 'skipped')),
    error TEXT,
    vec_file INTEGER,
    vec_row INTEGER,
    updated_at REAL,
    gen INTEGER,
    CHECK ((status = 'ok') = (vec_row IS NOT NULL))
)"""
_IMAGE_VERSIONS = """
CREATE TABLE {name} (
    id INTEGER NOT NULL,
    path TEXT NOT NULL,
    size INTEGER,
    mtime_ns INTEGER,
    content_hash TEXT,
    width INTEGER,
    height INTEGER,
    status TEXT NOT NULL,
    error TEXT,
    vec_file INTEGER,
    vec_row INTEGER,
    gen INTEGER NOT NULL,
    until_gen INTEGER
)"""
_TEXTS = """
CREATE TABLE {name} (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    text TEXT UNIQUE NOT NULL,
    vec_file INTEGER NOT NULL,
    vec_row INTEGER NOT NULL,
    updated_at REAL
)"""
_INDEXES = """
CREATE INDEX images_content_hash ON images (content_hash);
CREATE INDEX images_gen ON images (gen);
CREATE INDEX image_versions_id ON image_versions (id);
"""
# The committed rows of each vector file: rows past ``rows`` are not part of the index (indexer.store.vectors).
_VECTOR_FILES = """
CREATE TABLE vector_files (
    number INTEGER PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('images', 'texts')),
    dim INTEGER NOT NULL,
    rows INTEGER NOT NULL
)"""
# One row per shard `clip-index ingest` committed, written in the shard's own transaction: a rerun skips it.
# A format 3 catalog may lack the table, so writers create it on open (add_missing_tables).
_INGESTED_SHARDS = """
CREATE TABLE IF NOT EXISTS ingested_shards (
    name TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL,
    rows INTEGER NOT NULL,
    ingested_at REAL NOT NULL
)"""
# Keyed by content: rows of equal content share it, and a row's version at any generation finds it through its hash.
# ``extracted_by``: the METADATA_VERSION of the extractor; a build reads older ones again. A format 3 catalog may lack
# the table, so writers create it on open (add_missing_tables).
_PHOTO_METADATA = """
CREATE TABLE IF NOT EXISTS photo_metadata (
    content_hash TEXT PRIMARY KEY,
    taken_at INTEGER,
    taken_offset_min INTEGER,
    camera_make TEXT,
    camera_model TEXT,
    lens TEXT,
    gps_lat REAL,
    gps_lon REAL,
    orientation INTEGER,
    format TEXT,
    extracted_by INTEGER NOT NULL
)"""
_SCHEMA = f"""
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
{_IMAGES.format(name="images")};
{_IMAGE_VERSIONS.format(name="image_versions")};
{_TEXTS.format(name="texts")};
CREATE TABLE text_versions (id INTEGER NOT NULL, text TEXT NOT NULL, until_gen INTEGER);
CREATE INDEX text_versions_id ON text_versions (id);
CREATE TABLE runs (id INTEGER PRIMARY KEY AUTOINCREMENT, started_at REAL, finished_at REAL, root TEXT, stats TEXT);
{_VECTOR_FILES};
{_INGESTED_SHARDS};
{_PHOTO_METADATA};
{_INDEXES}
"""
# Version 1 -> 2: generation bookkeeping (see "One answer, one generation" above); the existing rows get gen 0,
# visible to every generation. Version 2 catalogs kept embeddings as BLOB columns.
_GENERATIONS_V2 = """
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
CREATE TABLE text_versions (id INTEGER NOT NULL, text TEXT NOT NULL, until_gen INTEGER);
CREATE INDEX text_versions_id ON text_versions (id);
"""
# Version 2 -> 3, per table: its columns kept (the embedding BLOB gives way to vec_file, vec_row), its new definition.
UPGRADED_TABLES = {
    "images": (
        "id, path, size, mtime_ns, content_hash, width, height, status, error, vec_file, vec_row, updated_at, gen",
        _IMAGES,
    ),
    "image_versions": (
        "id, path, size, mtime_ns, content_hash, width, height, status, error, vec_file, vec_row, gen, until_gen",
        _IMAGE_VERSIONS,
    ),
    "texts": ("id, text, vec_file, vec_row, updated_at", _TEXTS),
}


def user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def create_schema(conn: sqlite3.Connection) -> None:
    """Version 0 (a new catalog) -> CATALOG_VERSION: every table, and the meta a new catalog starts with."""
    _run_script(conn, _SCHEMA)
    conn.execute(f"PRAGMA user_version = {CATALOG_VERSION}")
    set_meta(conn, {"format_version": str(CATALOG_VERSION), "index_type": DEFAULT_FACTORY})


def add_missing_tables(conn: sqlite3.Connection) -> None:
    """The tables of format CATALOG_VERSION that a catalog of that format may lack (a no-op when it has them)."""
    conn.execute(_INGESTED_SHARDS)
    conn.execute(_PHOTO_METADATA)


def upgrade_from_1(conn: sqlite3.Connection) -> None:
    """Version 1 -> 2: generation bookkeeping; every existing row becomes visible to every generation."""
    _run_script(conn, _GENERATIONS_V2)
    conn.execute("UPDATE images SET gen = 0")
    conn.execute("PRAGMA user_version = 2")


def add_vector_columns(conn: sqlite3.Connection) -> None:
    """The first step of version 2 -> 3: the vector_files table, and vec_file, vec_row beside each embedding BLOB
    (which the caller then copies into vector files)."""
    _run_script(conn, _VECTOR_FILES)
    for table in UPGRADED_TABLES:
        conn.execute(f"ALTER TABLE {table} ADD COLUMN vec_file INTEGER")
        conn.execute(f"ALTER TABLE {table} ADD COLUMN vec_row INTEGER")


def drop_embedding_columns(conn: sqlite3.Connection, path: Path) -> None:
    """The last step of version 2 -> 3: each table rebuilt without its embedding BLOB (SQLite cannot drop a column a
    CHECK constraint names), keeping ids and AUTOINCREMENT counters, so that no id is ever given out twice."""
    for table, (columns, definition) in UPGRADED_TABLES.items():
        sequence = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).fetchone()
        conn.execute(definition.format(name=f"{table}_v3"))
        conn.execute(f"INSERT INTO {table}_v3 ({columns}) SELECT {columns} FROM {table}")
        conn.execute(f"DROP TABLE {table}")
        conn.execute(f"ALTER TABLE {table}_v3 RENAME TO {table}")
        if sequence is not None:
            conn.execute("UPDATE sqlite_sequence SET seq = MAX(seq, ?) WHERE name = ?", (sequence[0], table))
    _run_script(conn, _INDEXES)
    conn.execute(f"PRAGMA user_version = {CATALOG_VERSION}")
    set_meta(conn, {"format_version": str(CATALOG_VERSION)})
    logger.info("upgraded %s to catalog format version %d", path, CATALOG_VERSION)


def set_meta(conn: sqlite3.Connection, items: Mapping[str, str]) -> None:
    conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", items.items())


def _run_script(conn: sqlite3.Connection, script: str) -> None:
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)
