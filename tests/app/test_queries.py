"""Every query endpoint through real HTTP requests over a real index: results checked against the library itself
(the same model encoding the same inputs) and against brute-force numpy search over the catalog's vectors."""

from __future__ import annotations

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
from tests.app.conftest import CAPTIONS, IndexedFolder

Vectors = npt.NDArray[np.float32]


@pytest.fixture(scope="module")
def model(app_model: Path) -> clip_model.CLIP:
    return clip_model.load(app_model)[0]


@pytest.fixture(scope="module")
def catalog_vectors(indexed: IndexedFolder) -> tuple[dict[str, int], npt.NDArray[np.int64], Vectors]:
    """(path -> id, ids [N], vectors [N, D]) of the ok images, read straight from the SQLite file."""
    with Catalog.open(indexed.index_dir, readonly=True) as catalog:
        ids, vectors = catalog.embeddings()
        paths = {record.path: record.id for record in catalog.images(ids.tolist()).values()}
    return paths, ids, vectors


def encode_text(model: clip_model.CLIP, text: str) -> Vectors:
    with torch.no_grad():
        return model.encode_text(clip_model.tokenize([text]), normalize=True)[0].numpy()


def brute_force(ids: npt.NDArray[np.int64], vectors: Vectors, query: Vectors, k: int) -> list[int]:
    scores = vectors @ query
    return [int(ids[i]) for i in np.argsort(-scores, kind="stable")[:k]]


def test_text_search_returns_the_exact_nearest_images(
    client: TestClient, model: clip_model.CLIP, catalog_vectors: tuple[dict[str, int], npt.NDArray[np.int64], Vectors]
) -> None:
    paths, ids, vectors = catalog_vectors
    response = client.get("/api/search", params={"q": "a red square", "k": 5})
    assert response.status_code == 200
    body = response.json()
    got = [hit["id"] for hit in body["results"]]
    assert got == brute_force(ids, vectors, encode_text(model, "a red square"), 5)
    scores = [hit["score"] for hit in body["results"]]
    assert scores == sorted(scores, reverse=True) and all(-1.0 <= s <= 1.0 for s in scores)
    first = body["results"][0]
    assert paths[first["path"]] == first["id"]
    assert first["url"] == f"/api/images/{first['id']}/file"
    assert first["thumbnail_url"] == f"/api/images/{first['id']}/thumbnail"
    assert (first["width"], first["height"]) == (120, 80)
    assert body["generation"].startswith("g-") and body["truncated"] is False


def test_k_and_min_score_bound_the_results(client: TestClient) -> None:
    everything = client.get("/api/search", params={"q": "blue", "k": 1000}).json()["results"]
    assert len(everything) == 12  # the corrupt file is not indexed
    threshold = everything[5]["score"]
    kept = client.get("/api/search", params={"q": "blue", "k": 1000, "min_score": threshold}).json()["results"]
    assert [hit["id"] for hit in kept] == [hit["id"] for hit in everything if hit["score"] >= threshold]
    assert len(client.get("/api/search", params={"q": "blue", "k": 3}).json()["results"]) == 3


def test_overlong_query_is_truncated_and_says_so(client: TestClient) -> None:
    body = client.get("/api/search", params={"q": "word " * 150, "k": 3}).json()
    assert body["truncated"] is True and len(body["results"]) == 3


def test_uploaded_file_finds_itself_first(client: TestClient, indexed: IndexedFolder) -> None:
    for relative in ("green/green_1.png", "yellow/yellow_0.jpg", "blue/blue_2.webp"):
        data = indexed.files[relative].read_bytes()
        response = client.post("/api/search/image", params={"k": 3}, files={"file": ("query", data, "image/*")})
        assert response.status_code == 200, response.text
        top = response.json()["results"][0]
        assert top["path"] == relative and top["score"] == pytest.approx(1.0, abs=1e-5)


def test_more_like_this_uses_the_stored_vector_and_leaves_the_image_out(
    client: TestClient, catalog_vectors: tuple[dict[str, int], npt.NDArray[np.int64], Vectors]
) -> None:
    paths, ids, vectors = catalog_vectors
    image_id = paths["red/red_0.jpg"]
    body = client.get(f"/api/images/{image_id}/similar", params={"k": 4}).json()
    expected = [i for i in brute_force(ids, vectors, vectors[list(ids).index(image_id)], 5) if i != image_id][:4]
    assert [hit["id"] for hit in body["results"]] == expected


def test_combined_query_is_the_normalized_weighted_sum(
    client: TestClient,
    model: clip_model.CLIP,
    catalog_vectors: tuple[dict[str, int], npt.NDArray[np.int64], Vectors],
) -> None:
    paths, ids, vectors = catalog_vectors
    image_id = paths["blue/blue_0.jpg"]
    parts = [
        {"text": "beach", "weight": 1.0},
        {"text": "sunset", "weight": 0.5},
        {"image_id": image_id, "weight": -0.7},
    ]
    response = client.post("/api/search/combined", json={"parts": parts, "k": 6})
    assert response.status_code == 200, response.text
    total = encode_text(model, "beach") + 0.5 * encode_text(model, "sunset")
    total = total - 0.7 * vectors[list(ids).index(image_id)]
    expected = brute_force(ids, vectors, (total / np.linalg.norm(total)).astype(np.float32), 6)
    assert [hit["id"] for hit in response.json()["results"]] == expected


def test_describe_ranks_the_indexed_corpus_and_given_candidates(
    client: TestClient,
    model: clip_model.CLIP,
    indexed: IndexedFolder,
    catalog_vectors: tuple[dict[str, int], npt.NDArray[np.int64], Vectors],
) -> None:
    paths, ids, vectors = catalog_vectors
    image_id = paths["green/green_0.jpg"]
    image = vectors[list(ids).index(image_id)]
    expected = sorted(CAPTIONS, key=lambda text: -float(encode_text(model, text) @ image))
    body = client.post("/api/describe", json={"image_id": image_id, "k": 3}).json()
    assert body["source"] == "index" and [hit["text"] for hit in body["results"]] == expected[:3]
    assert all(hit["id"] is not None for hit in body["results"])
    candidates = ["a cat", "a dog", "a green field"]
    body = client.post("/api/describe", json={"image_id": image_id, "candidates": candidates, "k": 2}).json()
    ranked = sorted(candidates, key=lambda text: -float(encode_text(model, text) @ image))
    assert body["source"] == "candidates" and [hit["text"] for hit in body["results"]] == ranked[:2]
    upload = indexed.files["green/green_0.jpg"].read_bytes()
    body = client.post(
        "/api/describe/upload", files={"file": ("g.jpg", upload)}, data={"candidates": candidates}, params={"k": 3}
    ).json()
    assert [hit["text"] for hit in body["results"]] == ranked


def test_zero_shot_matches_the_library_classifier(
    client: TestClient, model: clip_model.CLIP, indexed: IndexedFolder
) -> None:
    labels = ["red", "green", "blue", "yellow"]
    source = indexed.files["yellow/yellow_1.png"]
    preprocess = clip_model.preprocess_for(model.config)
    images = preprocess(Image.open(source))[None]
    for templates in (None, ["a photo of {}.", "a {} thing"]):
        classifier = clip_model.build_zero_shot_classifier(model, labels, templates)
        expected = dict(zip(labels, clip_model.classify(model, images, classifier)[0].tolist(), strict=True))
        data: dict[str, list[str]] = {"labels": labels} | ({"templates": templates} if templates else {})
        response = client.post("/api/classify/upload", files={"file": ("y.png", source.read_bytes())}, data=data)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["templates"] == (len(templates) if templates else 80)
        got = {entry["label"]: entry["probability"] for entry in body["labels"]}
        assert got == pytest.approx(expected, abs=1e-5)
        assert sum(got.values()) == pytest.approx(1.0, abs=1e-5)
        probabilities = [entry["probability"] for entry in body["labels"]]
        assert probabilities == sorted(probabilities, reverse=True)


def test_zero_shot_of_an_indexed_image(client: TestClient, indexed: IndexedFolder) -> None:
    image_id = client.get("/api/search", params={"q": "x", "k": 1}).json()["results"][0]["id"]
    body = client.post("/api/classify", json={"image_id": image_id, "labels": ["cat", "dog"]}).json()
    assert {entry["label"] for entry in body["labels"]} == {"cat", "dog"}


def test_embeddings_equal_the_library_encoders(
    client: TestClient, model: clip_model.CLIP, indexed: IndexedFolder
) -> None:
    body = client.post("/api/embed/text", json={"texts": ["a photo of a cat", "a dog"]}).json()
    assert body["dim"] == model.config.embed_dim and body["truncated"] == [False, False]
    for row, text in zip(body["embeddings"], ["a photo of a cat", "a dog"], strict=True):
        np.testing.assert_allclose(row, encode_text(model, text), atol=1e-5)
    source = indexed.files["red/red_1.png"]
    with torch.no_grad():
        expected = model.encode_image(clip_model.preprocess_for(model.config)(Image.open(source))[None], normalize=True)
    body = client.post("/api/embed/image", files={"file": ("r.png", source.read_bytes())}).json()
    np.testing.assert_allclose(body["embeddings"][0], expected[0].numpy(), atol=1e-5)
    assert float(np.linalg.norm(body["embeddings"][0])) == pytest.approx(1.0, abs=1e-5)


def test_stored_embedding_by_id(
    client: TestClient, catalog_vectors: tuple[dict[str, int], npt.NDArray[np.int64], Vectors]
) -> None:
    paths, ids, vectors = catalog_vectors
    image_id = paths["blue/blue_1.png"]
    body = client.get(f"/api/images/{image_id}/embedding").json()
    np.testing.assert_allclose(body["embedding"], vectors[list(ids).index(image_id)], atol=1e-6)


def test_an_fp32_server_encodes_with_packed_layers(client: TestClient) -> None:
    encoder = client.app.state.runtime.state.encoder  # type: ignore[attr-defined]
    assert clip_model.is_packed(encoder.model) and not clip_model.is_quantized(encoder.model)


def test_repeated_text_queries_hit_the_cache(client: TestClient) -> None:
    client.get("/api/search", params={"q": "a cached query"})
    client.get("/api/search", params={"q": "a cached query"})
    metrics = client.get("/metrics").text
    hits = [line for line in metrics.splitlines() if line.startswith('clipsearch_text_cache_total{result="hit"}')]
    assert hits and float(hits[0].split()[-1]) >= 1


def test_an_int8_server_serves_the_fp32_index_with_the_int8_library_encoders(
    indexed: IndexedFolder, tmp_path: Path, model: clip_model.CLIP
) -> None:
    int8 = clip_model.quantize_int8(model)
    settings = indexed.settings(tmp_path, precision="int8")
    with TestClient(create_app(settings, watch=False)) as int8_client:
        stats = int8_client.get("/api/stats").json()
        assert stats["ready"] and stats["precision"] == "int8"  # the index's fp32 fingerprint was accepted
        assert clip_model.is_quantized(int8_client.app.state.runtime.state.encoder.model)  # type: ignore[attr-defined]
        body = int8_client.post("/api/embed/text", json={"texts": ["a photo of a cat"]}).json()
        with torch.no_grad():
            expected = int8.encode_text(clip_model.tokenize(["a photo of a cat"]), normalize=True)[0].numpy()
        np.testing.assert_allclose(body["embeddings"][0], expected, atol=1e-5)  # the int8 model, not the fp32 one
        assert not np.allclose(body["embeddings"][0], encode_text(model, "a photo of a cat"), atol=1e-5)
        source = indexed.files["red/red_1.png"]
        found = int8_client.post("/api/search/image", files={"file": ("r.png", source.read_bytes())}).json()
        assert found["results"][0]["path"] == "red/red_1.png"  # an int8 upload still finds its fp32-indexed self
        assert found["results"][0]["score"] > 0.99
