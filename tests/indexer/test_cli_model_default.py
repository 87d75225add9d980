"""clip-index build without --model: the model the index was built with (as the server follows its index), and a
new index's default only for a new index."""

from __future__ import annotations

from pathlib import Path

import pytest

from indexer import cli
from indexer.cli import main as clip_index
from indexer.store import Catalog
from tests.indexer.conftest import write_photos


def test_a_rebuild_without_model_uses_the_indexs_own(tiny_model: Path, tmp_path: Path) -> None:
    root, index_dir = tmp_path / "photos", tmp_path / "index"
    write_photos(root, 3)
    assert (
        clip_index(["build", str(root), "--index-dir", str(index_dir), "--model", str(tiny_model), "--workers", "0"])
        == 0
    )
    write_photos(root, 2, start=3)
    assert clip_index(["build", str(root), "--index-dir", str(index_dir), "--workers", "0"]) == 0
    with Catalog.open(index_dir, readonly=True) as catalog:
        assert catalog.counts()["ok"] == 5 and catalog.model() is not None


def test_a_new_index_without_model_gets_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLIPSEARCH_MODEL", raising=False)
    args = cli._parser().parse_args(["build", str(tmp_path), "--index-dir", str(tmp_path / "new")])
    assert cli._model(args) == cli.DEFAULT_MODEL
    monkeypatch.setenv("CLIPSEARCH_MODEL", "/models/mine.pt")
    args = cli._parser().parse_args(["build", str(tmp_path), "--index-dir", str(tmp_path / "new")])
    assert cli._model(args) == "/models/mine.pt"
