"""Text longer than the model's context through real HTTP requests: truncated by default (said so), chunked into
pooled windows with CLIPSEARCH_LONG_TEXT=chunk or a request's long_text, on every text input (search, combined,
classify labels, describe candidates, embed); a text that fits embeds the same either way."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import clip_model
from app.main import create_app
from indexer.store import Catalog
from tests.app.conftest import IndexedFolder

Vectors = npt.NDArray[np.float32]
LONG = "a photo of a red square on a green lawn beside a blue pond under a yellow sun at noon " * 7  # ~150 tokens
SHORT = "a red square"
TEMPLATES = ["a photo of {}.", "{}"]


@pytest.fixture(scope="module")
def model(app_model: Path) -> clip_model.ImageTextModel:
    return clip_model.load(app_model)[0]


@pytest.fixture(scope="module")
def chunk_client(indexed: IndexedFolder, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The app with CLIPSEARCH_LONG_TEXT=chunk."""
    settings = indexed.settings(tmp_path_factory.mktemp("chunk"), long_text="chunk")
    with TestClient(create_app(settings, watch=False)) as test_client:
        yield test_client


def library(model: clip_model.ImageTextModel, texts: list[str], long_text: clip_model.LongText) -> Vectors:
    """clip_model's own embeddings of ``texts`` (the library the server wraps)."""
    with torch.inference_mode():
        vectors, _ = clip_model.encode_texts(model, texts, long_text)
    return vectors.numpy()


def embed(client: TestClient, texts: list[str], long_text: str | None = None) -> dict[str, object]:
    body: dict[str, object] = {"texts": texts} | ({"long_text": long_text} if long_text else {})
    response = client.post("/api/embed/text", json=body)
    assert response.status_code == 200, response.text
    result: dict[str, object] = response.json()
    return result


def catalog(indexed: IndexedFolder) -> tuple[npt.NDArray[np.int64], Vectors]:
    with Catalog.open(indexed.index_dir, readonly=True) as opened:
        return opened.embeddings()


def test_embed_truncates_by_default_and_chunks_on_request(client: TestClient, model: clip_model.ImageTextModel) -> None:
    windows = len(clip_model.TextInput.of(model).windows(LONG))
    truncated = embed(client, [LONG, SHORT])
    assert truncated["truncated"] == [True, False] and truncated["chunks"] == [1, 1]
    chunked = embed(client, [LONG, SHORT], "chunk")
    assert chunked["truncated"] == [False, False] and chunked["chunks"] == [windows, 1] and windows > 2
    got = np.array(chunked["embeddings"], dtype=np.float32)
    np.testing.assert_allclose(got, library(model, [LONG, SHORT], "chunk"), atol=1e-5)
    np.testing.assert_allclose(np.array(truncated["embeddings"]), library(model, [LONG, SHORT], "truncate"), atol=1e-5)
    assert not np.allclose(got[0], np.array(truncated["embeddings"])[0], atol=1e-3)  # the cache keeps modes apart


def test_a_text_that_fits_embeds_identically_in_both_modes(client: TestClient) -> None:
    for text in (SHORT, "two dogs playing in the snow at dusk"):
        chunked, truncated = embed(client, [text], "chunk"), embed(client, [text], "truncate")
        assert chunked["embeddings"] == truncated["embeddings"] and chunked["chunks"] == [1]


def test_the_server_setting_is_the_default_and_a_request_overrides_it(chunk_client: TestClient) -> None:
    assert embed(chunk_client, [LONG])["truncated"] == [False]
    overridden = embed(chunk_client, [LONG], "truncate")
    assert overridden["truncated"] == [True] and overridden["chunks"] == [1]


def test_text_search_with_chunks_ranks_by_the_pooled_vector(
    client: TestClient, model: clip_model.ImageTextModel, indexed: IndexedFolder
) -> None:
    ids, vectors = catalog(indexed)
    query = library(model, [LONG], "chunk")[0]
    response = client.get("/api/search", params={"q": LONG, "k": 5, "long_text": "chunk"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["truncated"] is False and body["chunks"] == len(clip_model.TextInput.of(model).windows(LONG))
    expected = np.argsort(-(vectors @ query), kind="stable")[:5]
    assert [hit["id"] for hit in body["results"]] == [int(ids[i]) for i in expected]
    np.testing.assert_allclose([hit["score"] for hit in body["results"]], (vectors @ query)[expected], atol=1e-5)
    default = client.get("/api/search", params={"q": LONG, "k": 5}).json()
    assert default["truncated"] is True and default["chunks"] == 1
    assert client.get("/api/search", params={"q": SHORT}).json()["chunks"] == 1
    image_query = client.post("/api/search/image", files={"file": ("red.png", png(), "image/png")}).json()
    assert image_query["chunks"] is None


def test_combined_search_counts_the_chunks_of_its_texts(client: TestClient, model: clip_model.ImageTextModel) -> None:
    windows = len(clip_model.TextInput.of(model).windows(LONG))
    parts = [{"text": LONG, "weight": 1.0}, {"text": SHORT, "weight": 0.5}]
    body = client.post("/api/search/combined", json={"parts": parts, "long_text": "chunk"}).json()
    assert body["chunks"] == windows + 1 and body["truncated"] is False
    body = client.post("/api/search/combined", json={"parts": parts}).json()
    assert body["chunks"] == 2 and body["truncated"] is True


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (220, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_classify_labels_are_chunked_as_the_library_embeds_them(
    client: TestClient, model: clip_model.ImageTextModel, indexed: IndexedFolder
) -> None:
    ids, vectors = catalog(indexed)
    labels = [LONG, SHORT]
    body = {"image_id": int(ids[0]), "labels": labels, "templates": TEMPLATES, "long_text": "chunk"}
    response = client.post("/api/classify", json=body)
    assert response.status_code == 200, response.text
    scores = {item["label"]: item for item in response.json()["labels"]}
    prompts = clip_model.zero_shot_prompts(labels, TEMPLATES)
    with torch.inference_mode():
        embedded, rows = clip_model.encode_texts(model, prompts, "chunk")
        classifier = clip_model.ensemble_prompts(embedded, len(labels))
        expected = clip_model.zero_shot_probabilities(torch.from_numpy(vectors[0])[None], classifier, model.logit_scale)
    assert scores[LONG]["chunks"] == max(rows.chunks[:2]) > 1 and scores[SHORT]["chunks"] == 1
    np.testing.assert_allclose([scores[label]["probability"] for label in labels], expected[0].numpy(), atol=1e-5)
    form = {"labels": labels, "templates": TEMPLATES, "long_text": "chunk"}
    upload = client.post("/api/classify/upload", files={"file": ("red.png", png(), "image/png")}, data=form)
    assert upload.status_code == 200, upload.text
    assert {item["label"]: item["chunks"] for item in upload.json()["labels"]} == {LONG: scores[LONG]["chunks"],
                                                                                   SHORT: 1}  # fmt: skip
    plain = client.post("/api/classify", json=body | {"long_text": "truncate"}).json()
    assert [item["chunks"] for item in plain["labels"]] == [1, 1]


def test_describe_candidates_are_chunked_and_scored_by_the_pooled_vector(
    client: TestClient, model: clip_model.ImageTextModel, indexed: IndexedFolder
) -> None:
    ids, vectors = catalog(indexed)
    candidates = [LONG, SHORT, "a blue square"]
    response = client.post(
        "/api/describe", json={"image_id": int(ids[0]), "candidates": candidates, "k": 3, "long_text": "chunk"}
    )
    assert response.status_code == 200, response.text
    hits = {hit["text"]: hit for hit in response.json()["results"]}
    expected = library(model, candidates, "chunk") @ vectors[0]
    np.testing.assert_allclose([hits[t]["score"] for t in candidates], expected, atol=1e-5)
    assert hits[LONG]["chunks"] > 1 and hits[SHORT]["chunks"] == 1
    form = {"candidates": candidates, "long_text": "chunk"}
    upload = client.post("/api/describe/upload", files={"file": ("red.png", png(), "image/png")}, data=form)
    assert upload.status_code == 200, upload.text
    assert {hit["text"]: hit["chunks"] for hit in upload.json()["results"]}[LONG] == hits[LONG]["chunks"]
    indexed_texts = client.post("/api/describe", json={"image_id": int(ids[0]), "k": 2}).json()
    assert all(hit["chunks"] is None for hit in indexed_texts["results"])  # the corpus was embedded when indexed


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    [
        ("get", "/api/search", {"params": {"q": SHORT, "long_text": "split"}}),
        ("post", "/api/embed/text", {"json": {"texts": [SHORT], "long_text": "split"}}),
        ("post", "/api/search/combined", {"json": {"parts": [{"text": SHORT}], "long_text": "split"}}),
        (
            "post",
            "/api/classify/upload",
            {"files": {"file": ("a.png", b"x", "image/png")}, "data": {"labels": ["a"], "long_text": "split"}},
        ),  # fmt: skip
    ],
)
def test_an_unknown_mode_is_a_422_naming_the_choices(
    client: TestClient, method: str, path: str, kwargs: dict[str, object]
) -> None:
    response = getattr(client, method)(path, **kwargs)
    assert response.status_code == 422
    assert "truncate" in response.text and "chunk" in response.text
