"""Relevance of text-query results: its scale (the unrelated prompts' best lifts), the field on every text hit,
min_relevance as a cut-off that agrees with it, and its refusal on image queries."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.relevance import DEFAULT_MIN_RELEVANCE, MEAN_SAMPLE, RelevanceScale, sample_rows, unrelated_prompts


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
