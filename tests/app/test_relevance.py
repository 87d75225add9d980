"""Relevance of text-query results: its scale (the unrelated prompts' best scores), the field on every text hit,
min_relevance as a cut-off that agrees with it, and its refusal on image queries."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.relevance import DEFAULT_MIN_RELEVANCE, RelevanceScale, unrelated_prompts


def test_the_scale_is_the_normal_law_of_the_unrelated_prompts_best_scores() -> None:
    best = np.array([0.20, 0.21, 0.22, 0.19, 0.35], dtype=np.float32)  # one prompt matches the collection
    scale = RelevanceScale.of_best_scores(best)
    assert scale.median == pytest.approx(0.21) and scale.spread == pytest.approx(1.4826 * 0.01, rel=1e-4)
    assert scale.relevance(scale.median) == pytest.approx(0.5)
    scores = np.linspace(0.0, 0.5, 51)
    values = [scale.relevance(float(s)) for s in scores]
    assert values == sorted(values) and 0.0 <= values[0] and values[-1] <= 1.0
    for wanted in (0.01, 0.5, DEFAULT_MIN_RELEVANCE, 0.999):
        assert scale.relevance(scale.min_score(wanted)) == pytest.approx(wanted)
    assert (scale.min_score(0.0), scale.min_score(1.0)) == (-math.inf, math.inf)
    flat = RelevanceScale.of_best_scores(np.full(7, 0.3, dtype=np.float32))
    assert flat.spread > 0  # a floor: identical best scores do not make a zero spread
    with pytest.raises(ValueError, match="empty"):
        RelevanceScale.of_best_scores(np.empty(0, dtype=np.float32))


def test_the_prompts_are_many_and_leave_out_the_tests_absent_queries() -> None:
    prompts = unrelated_prompts()
    assert len(prompts) >= 100 and len(set(prompts)) == len(prompts)
    assert not any("cat" in p.split() or "tax" in p for p in prompts)  # the demo test's absent queries


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
