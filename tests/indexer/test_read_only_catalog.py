"""A catalog is readable from a directory its reader cannot write (a server replica's read-only volume): every
writer leaves SQLite's -wal and -shm files in place, which a reader without write access needs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from indexer.store import CATALOG_FILE, Catalog
from indexer.store.catalog import WAL_SUFFIXES
from tests.read_only import read_only, unavailable_reason

READ = (
    "import sys; from indexer.store import Catalog; from indexer.errors import IndexerError\n"
    "try:\n    Catalog.open(sys.argv[1], readonly=True).close()\n"
    "except IndexerError as exc:\n    sys.exit(str(exc))\n"
)


def wal_files(index_dir: Path) -> list[Path]:
    return [index_dir / f"{CATALOG_FILE}{suffix}" for suffix in WAL_SUFFIXES]


def open_read_only(index_dir: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    reason = unavailable_reason(tmp_path / "probe")
    if reason is not None:
        pytest.skip(reason)
    command = read_only([sys.executable, "-c", READ, str(index_dir)], index_dir)
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def test_a_writer_leaves_the_wal_files_and_readers_keep_them(tmp_path: Path) -> None:
    Catalog.open(tmp_path / "index", create=True).close()
    assert all(path.is_file() for path in wal_files(tmp_path / "index"))
    Catalog.open(tmp_path / "index", readonly=True).close()
    assert all(path.is_file() for path in wal_files(tmp_path / "index"))
    (tmp_path / "index" / f"{CATALOG_FILE}-wal").write_bytes(b"kept")
    Catalog.open(tmp_path / "index").close()  # checkpoints and deletes the log, then creates an empty one
    assert [path.stat().st_size for path in wal_files(tmp_path / "index")] == [0, 0]


def test_a_read_only_directory_opens_with_the_wal_files_and_says_what_is_missing_without(tmp_path: Path) -> None:
    index_dir = tmp_path / "index"
    Catalog.open(index_dir, create=True).close()
    opened = open_read_only(index_dir, tmp_path)
    assert opened.returncode == 0, opened.stderr
    for path in wal_files(index_dir):
        path.unlink()
    refused = open_read_only(index_dir, tmp_path)
    assert refused.returncode == 1
    assert f"{CATALOG_FILE}-wal and {CATALOG_FILE}-shm missing from {index_dir}" in refused.stderr, refused.stderr
    assert "run `clip-index build` on it once with write access" in refused.stderr
