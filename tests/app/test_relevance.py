"""Relevance of text-query results: its two kinds (the unrelated prompts' best lifts for a CLIP, the model's own pair
probability for a SigLIP: tests/app/test_families.py serves those), the field on every text hit, what the server
says it is, min_relevance as a cut-off that agrees with it, and its refusal on image queries."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import clip_model
from app.relevance import (
    DEFAULT_MIN_RELEVANCE,
    MEAN_SAMPLE,
    SIGMOID_MIN_RELEVANCE,
    RelevanceScale,
    SigmoidRelevance,
    sample_rows,
    unrelated_prompts,
)
from clip_model.config import SigLIPConfig, TextConfig, VisionConfig
from indexer.store import Catalog
from tests.app.conftest import IndexedFolder


def test_the_scale_is_the_normal_law_of_the_unrelated_prompts_best_lifts_over_their_baselines() -> None:
    rng = np.random.default_rng(0)
    mean = rng.normal(size=8).astype(np.float32)
    prompts = rng.normal(size=(5, 8)).astype(np.float32)
    prompts /= np.linalg.norm(prompts, axis=1, keepdims=True)
    lifts = np.array([0.20, 0.21, 0.22, 0.19, 0.35])  # one prompt matches the collection
    best = (prompts @ mean + lifts).astype(np.float32)  # each prompt's best score: its baseline plus its lift
    scale = RelevanceScale.of_prompts(prompts, best, mean)
    assert scale.median == pytest.approx(0.21, abs=1e-6) and scale.spread == pytest.approx(1.4826 * 0.01, rel=1e-4)
    query = prompts[0]
    relevance = scale.for_query(query)
    baseline = float(query @ mean)
    assert relevance.relevance(baseline + scale.median) == pytest.approx(0.5, abs=1e-5)
    assert relevance.relevance(baseline + 0.21 + 2.3263 * scale.spread) == pytest.approx(0.99, abs=1e-4)
    other = scale.for_query(prompts[1])  # the same score means less for a query with a higher baseline
    assert (relevance.relevance(0.3) > other.relevance(0.3)) == (baseline < float(prompts[1] @ mean))
    scores = np.linspace(-1.0, 1.0, 81)
    values = [relevance.relevance(float(s)) for s in scores]
    assert values == sorted(values) and 0.0 <= values[0] and values[-1] <= 1.0
    for wanted in (0.01, 0.5, DEFAULT_MIN_RELEVANCE, 0.999):
        assert relevance.relevance(relevance.min_score(wanted)) == pytest.approx(wanted)
    assert (relevance.min_score(0.0), relevance.min_score(1.0)) == (-math.inf, math.inf)
    flat = RelevanceScale.of_prompts(prompts, (prompts @ mean + 0.3).astype(np.float32), mean)
    assert flat.spread > 0  # a floor: identical lifts do not make a zero spread
    with pytest.raises(ValueError, match="empty"):
        RelevanceScale.of_prompts(prompts[:0], np.empty(0, dtype=np.float32), mean)
    with pytest.raises(ValueError, match=r"\[5, 8\]"):
        RelevanceScale.of_prompts(prompts[:, :4], best, mean)


def test_a_sigmoid_relevance_is_the_pair_probability_and_its_inverse() -> None:
    pair = SigmoidRelevance(scale=100.0, bias=-12.0)
    assert pair.for_query(np.ones(4, dtype=np.float32)) is pair  # the same for every query
    for score in (-1.0, 0.0, 0.1, 0.12, 0.2, 1.0):
        assert pair.relevance(score) == pytest.approx(1.0 / (1.0 + math.exp(12.0 - 100.0 * score)), abs=1e-12)
    assert pair.relevance(0.12) == 0.5  # the model's neutral point: -bias / scale
    for wanted in (1e-6, SIGMOID_MIN_RELEVANCE, 0.5, 0.9, 0.999999):
        assert pair.relevance(pair.min_score(wanted)) == pytest.approx(wanted, rel=1e-9)
    assert pair.min_score(SIGMOID_MIN_RELEVANCE) == pytest.approx((math.log(1 / 9) + 12.0) / 100.0)
    assert (pair.min_score(0.0), pair.min_score(1.0)) == (-math.inf, math.inf)
    assert (pair.kind, pair.default_min_relevance) == ("sigmoid", SIGMOID_MIN_RELEVANCE)
    for scale, bias in ((0.0, -1.0), (-2.0, 0.0), (math.inf, 0.0), (1.0, math.nan)):
        with pytest.raises(ValueError, match="finite positive scale"):
            SigmoidRelevance(scale, bias)


def test_only_a_sigmoid_trained_model_gets_the_sigmoid(app_model: Path) -> None:
    clip, _ = clip_model.load(app_model)
    assert SigmoidRelevance.of_model(clip) is None
    vision = VisionConfig(image_size=32, layers=1, width=64, heads=4, patch_size=8, mlp_width=96)
    siglip, _ = clip_model.create_model(
        SigLIPConfig(64, vision, TextConfig(32, 4, 1, 16, 300), tokenizer="siglip"), seed=0
    )
    with torch.no_grad():
        siglip.logit_scale.fill_(math.log(117.0))
        siglip.logit_bias.fill_(-16.5)
    pair = SigmoidRelevance.of_model(siglip)
    assert pair is not None and (pair.scale, pair.bias) == (pytest.approx(117.0), pytest.approx(-16.5))


def test_the_collection_mean_comes_from_all_rows_or_an_even_sample() -> None:
    assert sample_rows(3).tolist() == [0, 1, 2]
    many = sample_rows(10 * MEAN_SAMPLE + 7)
    assert len(many) == MEAN_SAMPLE and many[0] == 0 and many[-1] == 10 * MEAN_SAMPLE + 6
    assert np.all(np.diff(many) >= 9)  # spread over the whole collection, not its start
    with pytest.raises(ValueError, match="empty"):
        sample_rows(0)


def test_the_prompts_are_many_and_name_no_attribute_every_image_has() -> None:
    prompts = unrelated_prompts()
    assert len(prompts) >= 250 and len(set(prompts)) == len(prompts)
    words = {word.strip(",.'") for prompt in prompts for word in prompt.lower().split()}
    attributes = {"red", "green", "blue", "yellow", "purple", "orange", "white", "black", "gray", "grey", "circle"}
    attributes |= {"square", "triangle", "star", "diamond", "cross", "small", "large", "top", "bottom", "left"}
    attributes |= {"right", "center", "photo", "picture", "image", "background"}
    assert not words & attributes
    assert not words & {"cat", "tax"}  # the demo test's absent queries (tests/train/test_demo_e2e.py) are held out


def test_text_hits_carry_relevance_and_min_relevance_cuts_where_it_says(client: TestClient) -> None:
    hits = client.get("/api/search", params={"q": "a red square", "k": 50}).json()["results"]
    relevance = [hit["relevance"] for hit in hits]
    assert all(0.0 <= r <= 1.0 for r in relevance) and relevance == sorted(relevance, reverse=True)
    gaps = [(a + b) / 2 for a, b in zip(relevance, relevance[1:], strict=False) if a - b > 2e-4]
    middle = gaps[len(gaps) // 2]  # halfway between two results' relevance: the cut falls between them
    cut = client.get("/api/search", params={"q": "a red square", "k": 50, "min_relevance": middle}).json()["results"]
    assert [h["id"] for h in cut] == [h["id"] for h in hits if h["relevance"] > middle] and 0 < len(cut) < len(hits)
    none = client.get("/api/search", params={"q": "a red square", "min_relevance": 1.0}).json()["results"]
    assert none == []
    body = {"parts": [{"text": "a red square"}, {"text": "a blue square"}], "min_relevance": 0.0}
    assert all(h["relevance"] is not None for h in client.post("/api/search/combined", json=body).json()["results"])


def test_image_queries_have_no_relevance_and_refuse_min_relevance(client: TestClient) -> None:
    first = client.get("/api/search", params={"q": "a red square"}).json()["results"][0]["id"]
    similar = client.get(f"/api/images/{first}/similar").json()["results"]
    assert similar and all(h["relevance"] is None for h in similar)
    data = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(data, "PNG")
    upload = client.post("/api/search/image", files={"file": ("r.png", data.getvalue())}).json()["results"]
    assert upload and all(h["relevance"] is None for h in upload)
    body = {"parts": [{"image_id": first}, {"text": "a red square"}], "min_relevance": 0.5}
    refused = client.post("/api/search/combined", json=body)
    assert refused.status_code == 422 and "text queries" in refused.json()["detail"]
    assert client.get("/api/search", params={"q": "x", "min_relevance": 1.5}).status_code == 422


def test_a_clip_keeps_the_relevance_calibrated_on_the_unrelated_prompts(
    client: TestClient, indexed: IndexedFolder
) -> None:
    """Each hit's relevance is the calibrated scale recomputed here from the model, the catalog's embeddings and the
    prompts (module docstring of app.relevance), not the model's sigmoid; stats say so and give the page's 0.99."""
    stats = client.get("/api/stats").json()
    assert (stats["relevance_kind"], stats["default_min_relevance"]) == ("calibrated", DEFAULT_MIN_RELEVANCE)
    model, _ = clip_model.load(indexed.model)
    with Catalog.open(indexed.index_dir, readonly=True) as catalog:
        ids, vectors = catalog.embeddings()
    with torch.inference_mode():
        prompts = clip_model.encode_texts(model, unrelated_prompts(), "truncate")[0].numpy()
        query = clip_model.encode_texts(model, ["a red square"], "truncate")[0].numpy()[0]
    scale = RelevanceScale.of_prompts(prompts, (prompts @ vectors.T).max(axis=1), vectors.mean(axis=0))
    relevance = scale.for_query(query)
    expected = {int(i): relevance.relevance(float(score)) for i, score in zip(ids, vectors @ query, strict=True)}
    body = client.get("/api/search", params={"q": "a red square", "k": len(ids)}).json()
    assert body["relevance_kind"] == "calibrated" and len(body["results"]) == len(ids)
    for hit in body["results"]:
        assert hit["relevance"] == pytest.approx(expected[hit["id"]], abs=1e-3)
    assert len({round(v, 2) for v in expected.values()}) > 2  # spread out: a check that could tell scales apart
