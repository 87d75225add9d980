"""Any file name the OS allows is indexed losslessly or passed over with a reason, through the real CLI.

The folder holds names with a backslash, a newline, a tab, bytes that are not UTF-8, a literal "\\xe9", a 255-byte
name, a path near PATH_MAX and two names that differ only by Unicode normalization, beside entries the scan passes
over (a FIFO with a non-UTF-8 name, links dangling, looping and leaving the folder, a directory named like an image).
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from clip_model.process_tuning import ThreadPlan
from indexer import paths
from indexer.build import BuildOptions, build_index
from indexer.cli import main as cli_main
from indexer.store import CATALOG_FILE, Catalog, PublishedIndex, current_generation, verify
from tests.indexer.conftest import write_photo

PATH_MAX = os.pathconf("/", "PC_PATH_MAX") if hasattr(os, "pathconf") else 4096
NAME_MAX = 255
DEEP_DIR_NAME_BYTES = 200
NFC, NFD = "caf\u00e9.jpg".encode(), "cafe\u0301.jpg".encode()

ODD_NAMES = [
    b"a\\b.png",  # the issue's repro: a backslash
    b"line\nbreak.jpg",
    b"tab\there.jpg",
    b"caf\xe9.png",  # Latin-1: not UTF-8
    b"caf\\xe9.png",  # literally backslash-x-e-9: must not collide with the one above
    b"\xff\xfe\xfd.jpg",
    b"sub\xe9dir/inner.jpg",  # a directory with a non-UTF-8 name
    b"L" * (NAME_MAX - 4) + b".jpg",
    NFC,
    NFD,
]


def deep_relative(root: Path) -> bytes:
    """A relative path that makes the absolute one 100 bytes short of PATH_MAX, in directories of 200-byte names."""
    remaining = PATH_MAX - 100 - len(os.fsencode(root)) - 1
    parts: list[bytes] = []
    while remaining > NAME_MAX:
        parts.append(b"d" * DEEP_DIR_NAME_BYTES)
        remaining -= DEEP_DIR_NAME_BYTES + 1
    return b"/".join([*parts, b"f" * (remaining - 4) + b".jpg"])


def write_at(root: Path, relative: bytes, seed: int) -> None:
    write_photo(Path(os.fsdecode(os.path.join(os.fsencode(root), relative))), seed=seed)


def make_folder(root: Path, outside: Path) -> tuple[dict[bytes, bytes], dict[str, str]]:
    """Write the folder; returns (relative bytes -> content of each image, stored path -> reason of each entry
    passed over)."""
    names = [*ODD_NAMES, deep_relative(root), b"album.jpg/in.jpg"]
    for seed, relative in enumerate(names):
        write_at(root, relative, seed)
    if len([n for n in os.listdir(root) if n.startswith("caf")]) != 4:
        pytest.skip("this file system normalizes Unicode names: NFC and NFD name one file")
    bad = os.path.join(os.fsencode(root), b"bad\nname.png")
    open(bad, "wb").close()  # an empty file: skipped by the decoder, with a newline in its name
    os.mkfifo(os.path.join(os.fsencode(root), b"pipe\xe9.jpg"))
    (root / "dangling.jpg").symlink_to(root / "nowhere.jpg")
    (root / "loop.jpg").symlink_to(root / "loop.jpg")
    write_photo(outside / "secret.jpg", seed=99)
    (root / "outside.jpg").symlink_to(outside / "secret.jpg")
    contents = {relative: open(os.path.join(os.fsencode(root), relative), "rb").read() for relative in names}
    passed = {
        "bad\nname.png": "empty file",
        "pipe\\xe9.jpg": "not a regular file: a FIFO",
        "dangling.jpg": "dangling symlink",
        "loop.jpg": "symlink loop",
        "outside.jpg": "symlink outside the folder",
        "album.jpg": "not a regular file: a directory",
    }
    return contents, passed


def catalog_rows(index_dir: Path) -> dict[str, tuple[Any, ...]]:
    """Every images row as stored (path -> id, status, error, updated_at), read with plain SQL."""
    with sqlite3.connect(f"file:{index_dir / CATALOG_FILE}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT path, id, status, error, updated_at FROM images").fetchall()
    return {row[0]: tuple(row[1:]) for row in rows}


def info_of(index_dir: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> str:
    capsys.readouterr()
    assert cli_main(["info", "--index-dir", str(index_dir), *flags]) == 0
    return capsys.readouterr().out


def test_every_name_is_indexed_losslessly_or_passed_over_with_a_reason(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, index_dir = tmp_path / "photos", tmp_path / "index"
    contents, passed = make_folder(root, tmp_path / "outside")
    args = ["--index-dir", str(index_dir), "--model", str(tiny_model)]
    assert cli_main(["build", str(root), *args, "--workers", "1"]) == 0  # decoded in a spawned worker

    rows = catalog_rows(index_dir)
    ok = {path: row for path, row in rows.items() if row[1] == "ok"}
    assert {paths.stored_bytes(path) for path in ok} == set(contents)  # every image, byte-exact names
    for path in ok:
        assert paths.file_path(root, path).read_bytes() == contents[paths.stored_bytes(path)]
        path.encode("utf-8")  # valid text: SQLite, JSON and HTML hold it
    assert ok[NFC.decode()][0] != ok[NFD.decode()][0]  # two files, two ids
    skipped = {path: row[2] for path, row in rows.items() if row[1] == "skipped"}
    assert set(skipped) == set(passed)
    for path, reason in passed.items():
        assert skipped[path].startswith(reason), (path, skipped[path])
    assert verify(index_dir) == []
    assert PublishedIndex.open(index_dir).manifest.counts["images"] == len(contents)

    text = info_of(index_dir, capsys)
    listed = text[text.index("skipped files (path: reason):") :].splitlines()[1:]
    assert len(listed) == len(passed)  # a newline in a name cannot forge a line
    for path, reason in passed.items():
        assert any(line.startswith(f"  {paths.display(path)}: {reason}") for line in listed), (path, listed)
    assert "  bad\\nname.png: empty file" in listed
    info = json.loads(info_of(index_dir, capsys, "--json"))
    assert {path for path, _ in info["skipped_files"]} == set(passed)  # the stored form, lossless

    options = BuildOptions(
        root=root, index_dir=index_dir, model=str(tiny_model), plan=ThreadPlan.for_indexing(workers=0)
    )
    published = current_generation(index_dir)
    noop = build_index(options)
    assert (noop.encoded, noop.added, noop.modified, noop.skipped, noop.deleted) == (0, 0, 0, 0, 0)
    assert noop.unchanged == len(rows) and noop.generation == published  # nothing republished
    assert catalog_rows(index_dir) == rows  # not one row written again

    (root / "dangling.jpg").unlink()
    os.unlink(os.path.join(os.fsencode(root), b"pipe\xe9.jpg"))
    os.unlink(os.path.join(os.fsencode(root), b"caf\xe9.png"))
    removed = build_index(options)
    assert (removed.deleted, removed.encoded) == (3, 0)
    after = catalog_rows(index_dir)
    assert set(rows) - set(after) == {"dangling.jpg", "pipe\\xe9.jpg", "caf\\xe9.png"}
    assert all(after[path] == row for path, row in rows.items() if path in after)
    text = info_of(index_dir, capsys)
    assert "dangling.jpg" not in text and "pipe\\xe9.jpg" not in text and "outside.jpg: symlink outside" in text


def test_the_issue_repro_a_backslash_name_builds_and_publishes(tiny_model: Path, tmp_path: Path) -> None:
    root, index_dir = tmp_path / "f", tmp_path / "idx"
    write_photo(root / "a\\b.png", seed=1)
    args = ["build", str(root), "--index-dir", str(index_dir), "--model", str(tiny_model), "--workers", "0"]
    assert cli_main(args) == 0
    assert cli_main(args) == 0  # and every later run too
    with Catalog.open(index_dir, readonly=True) as catalog:
        assert [(path, rec.status) for path, rec in catalog.files().items()] == [("a\\\\b.png", "ok")]
    assert PublishedIndex.open(index_dir).manifest.counts["images"] == 1
