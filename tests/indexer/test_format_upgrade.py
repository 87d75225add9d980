"""An index directory written by older code (tests/fixtures/index-format-2: catalog format 2, embeddings as SQLite
BLOBs) is upgraded in place by the next `clip-index build`, refused by readers until then, and never misread."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from indexer.cli import main as cli_main
from indexer.errors import IndexFormatError
from indexer.store import Catalog, PublishedIndex, current_generation, verify
from indexer.store import schema as schema_module
from indexer.store.schema import CATALOG_VERSION
from tests.support import save_tiny_model

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "index-format-2"


@pytest.fixture
def old_index(tmp_path: Path) -> Path:
    """A copy of the format 2 fixture (photos, index, texts.txt) and the tiny model it was built with."""
    shutil.copytree(FIXTURE, tmp_path / "old")
    save_tiny_model(tmp_path / "tiny.safetensors", seed=0)
    return tmp_path / "old"


def blobs(index: Path) -> dict[str, dict[int, bytes]]:
    """The format 2 catalog's embeddings, straight from SQLite: table -> {id: BLOB} (versions keyed by id too)."""
    with sqlite3.connect(index / "catalog.sqlite3") as conn:
        return {
            table: dict(conn.execute(f"SELECT id, embedding FROM {table} WHERE embedding IS NOT NULL").fetchall())
            for table in ("images", "image_versions", "texts")
        }


def build(old: Path, model: Path) -> int:
    argv = ["build", str(old / "photos"), "--index-dir", str(old / "index"), "--model", str(model), "--workers", "0"]
    return cli_main(argv)


def test_the_next_build_upgrades_a_format_2_index_in_place_without_encoding_anything(old_index: Path) -> None:
    index, model = old_index / "index", old_index.parent / "tiny.safetensors"
    before = blobs(index)
    assert len(before["images"]) == 6 and len(before["image_versions"]) == 2 and len(before["texts"]) == 3
    with sqlite3.connect(index / "catalog.sqlite3") as conn:
        next_image_id = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'images'").fetchone()[0] + 1
    with pytest.raises(IndexFormatError, match="format version 2; .* run `clip-index build` on it once to upgrade"):
        PublishedIndex.open(index)  # a reader never guesses at an older layout

    assert build(old_index, model) == 0
    with sqlite3.connect(index / "catalog.sqlite3") as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == CATALOG_VERSION
        for table in ("images", "image_versions", "texts"):
            columns = [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]
            assert "embedding" not in columns and {"vec_file", "vec_row"} <= set(columns)
        run = conn.execute("SELECT stats FROM runs ORDER BY id DESC LIMIT 1").fetchone()[0]
    stats = json.loads(run)  # a checkout gives the photos new mtimes: same content, so touched, never re-encoded
    assert stats["encoded"] == 0 and stats["unchanged"] + stats["touched"] == 6 and stats["deleted"] == 0
    assert sorted(p.name for p in (index / "vectors").iterdir()) == ["images-000001.vec", "texts-000002.vec"]

    with Catalog.open(index, readonly=True) as catalog:
        for image_id, blob in before["images"].items():
            assert catalog.embedding(image_id) is not None
            assert catalog.embedding(image_id).tobytes() == blob  # type: ignore[union-attr]
        ids, vectors = catalog.text_embeddings()
        assert {int(i): v.tobytes() for i, v in zip(ids, vectors, strict=True)} == before["texts"]
    assert verify(index) == []
    with PublishedIndex.open(index) as published:
        first = next(iter(before["images"]))
        query = np.frombuffer(before["images"][first], dtype="<f4")[None].astype(np.float32)
        assert published.search(query, k=1)[0][0].id == first

    (old_index / "photos" / "photo_00000.jpg").unlink()
    shutil.copy(old_index / "photos" / "photo_00002.jpg", old_index / "photos" / "new.jpg")  # same content: a copy
    assert build(old_index, model) == 0
    with Catalog.open(index, readonly=True) as catalog:
        new = [r for r in catalog.files().values() if r.path == "new.jpg"][0]
    assert new.id >= next_image_id  # AUTOINCREMENT survived the table rebuild: no id is given out twice
    assert verify(index) == []


def test_the_versions_older_generations_show_keep_their_exact_vectors(old_index: Path) -> None:
    index = old_index / "index"
    before = blobs(index)
    with sqlite3.connect(index / "catalog.sqlite3") as conn:
        versions = conn.execute("SELECT id, until_gen - 1 FROM image_versions").fetchall()  # the last generation
    Catalog.open(index).close()  # what a build does first
    with Catalog.open(index, readonly=True) as catalog:
        for image_id, shown_by in versions:
            assert catalog.embedding_at(image_id, shown_by).tobytes() == before["image_versions"][image_id]  # type: ignore[union-attr]


def test_a_format_1_catalog_upgrades_to_the_current_format_in_one_step(old_index: Path) -> None:
    index = old_index / "index"
    with sqlite3.connect(index / "catalog.sqlite3") as conn:  # the fixture taken back to the format 1 layout
        conn.executescript(
            "DELETE FROM images WHERE gen IS NULL; DROP TABLE image_versions; DROP TABLE text_versions; "
            "DROP INDEX images_pending; ALTER TABLE images DROP COLUMN gen; PRAGMA user_version = 1;"
        )
    before = blobs_v1(index)
    Catalog.open(index).close()
    with Catalog.open(index, readonly=True) as catalog:
        for image_id, blob in before.items():
            assert catalog.embedding_at(image_id, int(current_generation(index)[2:])).tobytes() == blob  # type: ignore[index, union-attr]
    assert verify(index) == []


def blobs_v1(index: Path) -> dict[int, bytes]:
    with sqlite3.connect(index / "catalog.sqlite3") as conn:
        return dict(conn.execute("SELECT id, embedding FROM images WHERE embedding IS NOT NULL").fetchall())


def test_an_upgrade_that_fails_half_way_leaves_format_2_as_it_was_and_a_rerun_finishes_it(
    old_index: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = old_index / "index"
    before = blobs(index)

    def crash(*args: object) -> None:
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(schema_module, "drop_embedding_columns", crash)
        patch.setattr("indexer.store.catalog.drop_embedding_columns", crash)
        with pytest.raises(OSError, match="disk full"):
            Catalog.open(index)
    assert blobs(index) == before  # the transaction rolled back: the BLOBs are the record still
    assert not any((index / "vectors").iterdir())  # and the rows it had appended are gone
    Catalog.open(index).close()
    with Catalog.open(index, readonly=True) as catalog:
        assert all(catalog.embedding(i).tobytes() == b for i, b in before["images"].items())  # type: ignore[union-attr]
