"""The catalog's ``photo_metadata`` table (:mod:`indexer.store.schema`): what each file content says about the
photo, keyed by content hash, written by the indexer and read by filters (:mod:`indexer.store.filters`).

Used through ``Catalog.photos``: writes join the catalog's open transaction; reads work on catalogs whose writer
predates the table (they find nothing).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence

from ..photo_metadata import METADATA_VERSION, PhotoMetadata

_FIELDS = (
    "taken_at",
    "taken_offset_min",
    "camera_make",
    "camera_model",
    "lens",
    "gps_lat",
    "gps_lon",
    "orientation",
    "format",
)
COLUMNS = ", ".join(_FIELDS)
SQL_HASHES_PER_QUERY = 500
GPS_KEY = "photo_gps"  # meta: "1" when the photo metadata was read keeping GPS positions


class PhotoRecords:
    """Reads and writes of ``photo_metadata`` over the catalog's connection (not thread-safe, as the catalog)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def exists(self) -> bool:
        row = self._conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'photo_metadata'")
        return row.fetchone() is not None

    def record(self, items: Iterable[tuple[str, PhotoMetadata]]) -> None:
        """Store the metadata of each content hash (replacing what was there); call inside a catalog transaction."""
        self._conn.executemany(
            f"INSERT OR REPLACE INTO photo_metadata (content_hash, {COLUMNS}, extracted_by) "
            f"VALUES (?, {', '.join('?' * len(_FIELDS))}, ?)",
            [(content_hash, *(getattr(meta, f) for f in _FIELDS), METADATA_VERSION) for content_hash, meta in items],
        )

    def of(self, hashes: Sequence[str]) -> dict[str, PhotoMetadata]:
        """The stored metadata of those ``hashes`` that have some."""
        if not self.exists():
            return {}
        found: dict[str, PhotoMetadata] = {}
        unique = list(dict.fromkeys(hashes))
        for start in range(0, len(unique), SQL_HASHES_PER_QUERY):
            chunk = unique[start : start + SQL_HASHES_PER_QUERY]
            marks = ",".join("?" * len(chunk))
            query = f"SELECT content_hash, {COLUMNS} FROM photo_metadata WHERE content_hash IN ({marks})"
            rows = self._conn.execute(query, chunk).fetchall()
            found.update((row[0], PhotoMetadata(**dict(zip(_FIELDS, row[1:], strict=True)))) for row in rows)
        return found

    def missing(self, *, everything: bool = False) -> dict[str, str]:
        """content hash -> one path, for the ok images whose content has no metadata from this extractor (with
        ``everything``: all ok images): what a build reads (the file's header and EXIF only) to fill it in."""
        if not self.exists():
            return {}
        rows = self._conn.execute(
            "SELECT i.content_hash, MIN(i.path) FROM images i LEFT JOIN photo_metadata m USING (content_hash) "
            "WHERE i.status = 'ok' AND i.content_hash IS NOT NULL "
            "AND (? OR m.extracted_by IS NULL OR m.extracted_by < ?) GROUP BY i.content_hash",
            (everything, METADATA_VERSION),
        ).fetchall()
        return {str(content_hash): str(path) for content_hash, path in rows}

    def gps_recorded(self) -> bool:
        """Whether the metadata was read with GPS positions kept (the last build's ``--store-gps``)."""
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (GPS_KEY,)).fetchone()
        return row is not None and row[0] == "1"

    def set_gps_recorded(self, recorded: bool) -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (GPS_KEY, "1" if recorded else "0")
        )

    def drop_gps(self) -> int:
        """Forget every stored GPS position (the setting that allows storing them is off); returns how many."""
        cursor = self._conn.execute(
            "UPDATE photo_metadata SET gps_lat = NULL, gps_lon = NULL WHERE gps_lat IS NOT NULL OR gps_lon IS NOT NULL"
        )
        return int(cursor.rowcount)

    def forget_unused(self) -> int:
        """Drop the metadata of contents no image row (current or kept version) has any more."""
        cursor = self._conn.execute(
            "DELETE FROM photo_metadata WHERE content_hash NOT IN "
            "(SELECT content_hash FROM images WHERE content_hash IS NOT NULL UNION "
            "SELECT content_hash FROM image_versions WHERE content_hash IS NOT NULL)"
        )
        return int(cursor.rowcount)
