"""clip-index texts: a text corpus indexed for image -> text queries, texts longer than the model's context
truncated (the default, as before) or chunked with --long-text chunk into the vectors the server gives for the same
text; the index records which rule its texts were encoded with and the summary counts the long ones."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch
from fastapi.testclient import TestClient

import clip_model
from app.main import create_app
from app.settings import Settings
from indexer.build import load_model
from indexer.cli import main as clip_index
from indexer.store import Catalog, PublishedIndex
from tests.indexer.conftest import write_photos

Vectors = npt.NDArray[np.float32]
# ~150 tokens; stripped, as the corpus reader strips each line
LONG = ("a photo of a red square on a green lawn beside a blue pond under a yellow sun at noon " * 7).strip()
SHORT = "a red square"


@pytest.fixture
def index_dir(tiny_model: Path, tmp_path: Path) -> Path:
    """An index of two photos built with the tiny model, no texts yet."""
    root, index = tmp_path / "photos", tmp_path / "index"
    write_photos(root, 2)
    build = ["build", str(root), "--index-dir", str(index), "--model", str(tiny_model), "--workers", "0"]
    assert clip_index(build) == 0
    return index


def index_corpus(index_dir: Path, texts: list[str], *options: str) -> int:
    corpus = index_dir.parent / "corpus.txt"
    corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
    return clip_index(["texts", str(corpus), "--index-dir", str(index_dir), *options])


def indexed_vectors(index_dir: Path) -> dict[str, Vectors]:
    with Catalog.open(index_dir, readonly=True) as catalog:
        ids, vectors = catalog.text_embeddings()
        texts = catalog.texts([int(i) for i in ids])
    return {texts[int(i)]: vector for i, vector in zip(ids, vectors, strict=True)}


def recorded(index_dir: Path) -> str:
    with Catalog.open(index_dir, readonly=True) as catalog:
        in_catalog = catalog.text_long_text()
    assert PublishedIndex.open(index_dir).manifest.text_long_text == in_catalog
    return in_catalog


def test_the_long_text_is_longer_than_the_tiny_models_context(tiny_model: Path) -> None:
    text_input = clip_model.TextInput.of(load_model(str(tiny_model)).model)
    assert len(text_input.tokenizer.encode(LONG)) > text_input.capacity and len(text_input.windows(LONG)) > 2


def test_chunk_gives_the_servers_chunked_embedding(
    index_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("CLIPSEARCH_LONG_TEXT", raising=False)
    caplog.set_level(logging.INFO)
    assert index_corpus(index_dir, [LONG, SHORT], "--long-text", "chunk") == 0
    assert "long_text=chunk: 1 chunked; the index's texts: chunk" in caplog.text
    assert recorded(index_dir) == "chunk"
    settings = Settings(index_dir=index_dir, cache_dir=tmp_path / "cache")
    with TestClient(create_app(settings, watch=False)) as client:
        response = client.post("/api/embed/text", json={"texts": [LONG, SHORT], "long_text": "chunk"})
    assert response.status_code == 200, response.text
    served = response.json()
    assert served["chunks"][0] > 2 and served["chunks"][1] == 1
    indexed = indexed_vectors(index_dir)
    np.testing.assert_allclose(indexed[LONG], np.array(served["embeddings"][0], dtype=np.float32), atol=1e-5)
    np.testing.assert_allclose(indexed[SHORT], np.array(served["embeddings"][1], dtype=np.float32), atol=1e-5)


def test_truncate_is_the_default_and_encodes_as_before(
    index_dir: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("CLIPSEARCH_LONG_TEXT", raising=False)
    caplog.set_level(logging.INFO)
    assert index_corpus(index_dir, [LONG, SHORT]) == 0
    assert "long_text=truncate: 1 truncated" in caplog.text and "were truncated (--long-text chunk" in caplog.text
    assert recorded(index_dir) == "truncate"
    model = load_model(str(tiny_model)).model
    with torch.inference_mode():
        before, _ = clip_model.encode_texts(model, [LONG, SHORT])  # what the indexer wrote before --long-text
        cut = model.encode_text(clip_model.TextInput.of(model).rows([LONG]).tokens, normalize=True)[0]
    indexed = indexed_vectors(index_dir)
    assert np.array_equal(indexed[LONG], before[0].numpy()) and np.array_equal(indexed[SHORT], before[1].numpy())
    assert np.array_equal(indexed[LONG], cut.numpy())  # the text's first `capacity` tokens, one row


def test_the_servers_setting_is_the_default(index_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPSEARCH_LONG_TEXT", "chunk")
    assert index_corpus(index_dir, [LONG]) == 0
    assert recorded(index_dir) == "chunk"
    assert index_corpus(index_dir, [LONG], "--long-text", "truncate") == 0  # the flag overrides it
    assert recorded(index_dir) == "truncate"


@pytest.mark.parametrize(("env", "options"), [(None, ["--long-text", "all"]), ("cut", [])])
def test_an_unknown_mode_is_an_argparse_error(
    index_dir: Path,
    env: str | None,
    options: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if env is None:
        monkeypatch.delenv("CLIPSEARCH_LONG_TEXT", raising=False)
    else:
        monkeypatch.setenv("CLIPSEARCH_LONG_TEXT", env)
    with pytest.raises(SystemExit) as exited:
        index_corpus(index_dir, [SHORT], *options)
    assert exited.value.code == 2
    bad = options[-1] if options else env
    assert f"argument --long-text: {bad!r} is not one of truncate, chunk" in capsys.readouterr().err
    with Catalog.open(index_dir, readonly=True) as catalog:
        assert catalog.counts()["texts"] == 0


def test_runs_with_both_modes_are_recorded_as_mixed_until_one_run_encodes_every_text(
    index_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("CLIPSEARCH_LONG_TEXT", raising=False)
    assert index_corpus(index_dir, [LONG]) == 0
    assert index_corpus(index_dir, [SHORT], "--long-text", "chunk") == 0
    assert recorded(index_dir) == "mixed" and "encoded with long_text=truncate, these with chunk" in caplog.text
    assert index_corpus(index_dir, [SHORT], "--long-text", "chunk") == 0
    assert recorded(index_dir) == "mixed"
    assert index_corpus(index_dir, [LONG, SHORT], "--long-text", "chunk") == 0
    assert recorded(index_dir) == "chunk"
