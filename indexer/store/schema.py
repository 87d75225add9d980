"""The catalog's SQLite schema (PRAGMA user_version = CATALOG_VERSION) and the in-place upgrade of older catalogs.

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
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Mapping
from pathlib import Path

from ..index_choice import AUTO

logger = logging.getLogger(__name__)

CATALOG_VERSION = 2  # of the catalog (PRAGMA user_version); version 1 is upgraded in place by a writer
DEFAULT_FACTORY = AUTO  # index_choice.choose_index() at every publish, from the collection's size
LEGACY_DEFAULT_FACTORY = "IDMap2,Flat"  # what catalogs before meta "index_type" recorded when nobody chose one
OLDEST_GENERATION_KEY = "oldest_generation"  # meta: generations before this number can no longer be resolved

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
# upgrade_from_1, where the existing rows get gen 0: visible to every generation.
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


def user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def create_schema(conn: sqlite3.Connection) -> None:
    """Version 0 (a new catalog) -> CATALOG_VERSION: every table, and the meta a new catalog starts with."""
    _run_script(conn, _SCHEMA + _SCHEMA_GENERATIONS)
    conn.execute(f"PRAGMA user_version = {CATALOG_VERSION}")
    set_meta(conn, {"format_version": str(CATALOG_VERSION), "index_type": DEFAULT_FACTORY})


def upgrade_from_1(conn: sqlite3.Connection, path: Path) -> None:
    """Version 1 -> 2: generation bookkeeping; every existing row becomes visible to every generation."""
    _run_script(conn, _SCHEMA_GENERATIONS)
    conn.execute("UPDATE images SET gen = 0")
    conn.execute(f"PRAGMA user_version = {CATALOG_VERSION}")
    set_meta(conn, {"format_version": str(CATALOG_VERSION)})
    logger.info("upgraded %s to catalog format version %d", path, CATALOG_VERSION)


def set_meta(conn: sqlite3.Connection, items: Mapping[str, str]) -> None:
    conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", items.items())


def _run_script(conn: sqlite3.Connection, script: str) -> None:
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)
