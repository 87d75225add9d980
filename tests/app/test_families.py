"""Every model family through the same indexer and server: a tiny random SigLIP, SigLIP 2 and XLM-RoBERTa CLIP, each
with a SentencePiece vocabulary trained here, build an index and serve it; text search, image search, classify,
describe and embed answer over HTTP with the vectors clip_model itself gives for the same inputs; the index records
the family, tokenizer and resize rule; a server pinned to a CLIP refuses a SigLIP's index and the other way round."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import clip_model
from app.main import create_app
from app.relevance import DEFAULT_MIN_RELEVANCE, SIGMOID_MIN_RELEVANCE
from clip_model.config import (
    SigLIPConfig,
    TextConfig,
    VisionConfig,
    XLMRobertaCLIPConfig,
    XLMRobertaTextConfig,
)
from indexer.store import Catalog
from indexer.store.reader import current_generation, read_manifest
from tests.app.conftest import CAPTIONS, IndexedFolder, build_folder
from tests.clip_model.sentencepiece_models import train_gemma_model, train_siglip_model, train_xlm_roberta_model

Vectors = npt.NDArray[np.float32]
CONTEXT = 16  # short rows: the long-text test needs only a sentence to chunk
VISION = VisionConfig(image_size=32, layers=1, width=64, heads=4, patch_size=8, mlp_width=96)
QUERIES = ("a red square", "ein blaues Quadrat", "une photo d'un chat")
LONG = "a photo of the red house by the river at night with people on the street " * 3
TOLERANCE = 1e-5
SIGLIP_PAIR_SCALE, SIGLIP_PAIR_BIAS = 40.0, -2.0  # the tiny SigLIPs' exp(logit_scale) and logit_bias


@dataclass(frozen=True)
class Family:
    """A tiny model of one family: its config, the vocabulary trainer, and what the index must record."""

    config: SigLIPConfig | XLMRobertaCLIPConfig
    train: Callable[[Path], Path]
    family: str
    tokenizer: str
    resize_mode: str


FAMILIES = {
    "siglip": Family(
        SigLIPConfig(64, VISION, TextConfig(width=32, heads=4, layers=1, context_length=CONTEXT, vocab_size=300),
                     tokenizer="siglip"),
        train_siglip_model, "siglip", "siglip", "squash",
    ),
    "siglip2": Family(
        SigLIPConfig(64, VISION, TextConfig(width=32, heads=4, layers=1, context_length=CONTEXT, vocab_size=800),
                     tokenizer="siglip2"),
        train_gemma_model, "siglip", "siglip2", "squash",
    ),
    "xlm-roberta": Family(
        XLMRobertaCLIPConfig(32, VISION, XLMRobertaTextConfig(width=32, heads=4, layers=1, mlp_width=64,
                             vocab_size=302, context_length=CONTEXT, max_positions=CONTEXT + 2 + 2)),
        train_xlm_roberta_model, "xlm-roberta", "xlm-roberta", "shortest",
    ),
}  # fmt: skip


def save_family_model(folder: Path, family: Family) -> Path:
    """Random weights of ``family`` saved beside the SentencePiece vocabulary trained in ``folder``. A SigLIP's pair
    logit gets a scale and bias that spread its probabilities over (0, 1) for these random cosines (about -0.12 to
    0.23): at SigLIP's initial ones (10, -10) every pair would score about 5e-5, which would test nothing."""
    family.train(folder)
    model, _ = clip_model.create_model(family.config, seed=3)
    if isinstance(model, clip_model.SigLIP):
        with torch.no_grad():
            model.logit_scale.fill_(math.log(SIGLIP_PAIR_SCALE))
            model.logit_bias.fill_(SIGLIP_PAIR_BIAS)
    return clip_model.save_checkpoint(model.eval(), folder / "model.safetensors")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Family, IndexedFolder]:
    """An image folder indexed with a tiny model of each family (texts included), as the CLI builds it."""
    family = FAMILIES[request.param]
    base = tmp_path_factory.mktemp(request.param)
    return family, build_folder(base, save_family_model(base / "model", family))


@pytest.fixture(scope="module")
def library(built: tuple[Family, IndexedFolder]) -> tuple[clip_model.ImageTextModel, clip_model.Preprocess]:
    """The same checkpoint as clip_model loads it: the reference every answer is checked against."""
    return clip_model.load(built[1].model)


@pytest.fixture
def client(built: tuple[Family, IndexedFolder], tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(built[1].settings(tmp_path), watch=False)) as test_client:
        yield test_client


def texts_of(
    model: clip_model.ImageTextModel, texts: list[str], long_text: clip_model.LongText = "truncate"
) -> Vectors:
    with torch.inference_mode():
        return clip_model.encode_texts(model, texts, long_text)[0].numpy()


def image_of(library: tuple[clip_model.ImageTextModel, clip_model.Preprocess], image: Image.Image) -> Vectors:
    model, preprocess = library
    with torch.inference_mode():
        return model.encode_image(preprocess(image)[None], normalize=True)[0].numpy()


def catalog_vectors(folder: IndexedFolder) -> tuple[dict[int, str], npt.NDArray[np.int64], Vectors]:
    with Catalog.open(folder.index_dir, readonly=True) as catalog:
        ids, vectors = catalog.embeddings()
        paths = {record.id: record.path for record in catalog.images(ids.tolist()).values()}
    return paths, ids, vectors


def ranked(ids: npt.NDArray[np.int64], vectors: Vectors, query: Vectors, k: int) -> tuple[list[int], Vectors]:
    scores = vectors @ query
    order = np.argsort(-scores, kind="stable")[:k]
    return [int(ids[i]) for i in order], scores[order]


def upload(colour: tuple[int, int, int] = (30, 60, 220), size: tuple[int, int] = (90, 40)) -> tuple[bytes, Image.Image]:
    rng = np.random.default_rng(7)
    pixels = np.clip(np.array(colour) + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue(), Image.fromarray(pixels)


def test_the_index_records_the_family_tokenizer_and_resize_rule(built: tuple[Family, IndexedFolder]) -> None:
    family, folder = built
    generation = current_generation(folder.index_dir)
    assert generation is not None
    recorded = read_manifest(folder.index_dir, generation).preprocess
    expected = {"family": family.family, "tokenizer": family.tokenizer, "resize_mode": family.resize_mode}
    assert {key: recorded[key] for key in expected} == expected
    with Catalog.open(folder.index_dir, readonly=True) as catalog:
        info = catalog.model()
    assert info is not None and {key: info.preprocess[key] for key in expected} == expected


def test_indexed_images_and_texts_are_the_librarys_embeddings(
    built: tuple[Family, IndexedFolder],
    library: tuple[clip_model.ImageTextModel, clip_model.Preprocess],
) -> None:
    """The decode workers resize by the model's rule (squash for SigLIP) and the corpus goes through its tokenizer."""
    _, folder = built
    paths, ids, vectors = catalog_vectors(folder)
    for image_id, vector in zip(ids.tolist(), vectors, strict=True):
        with Image.open(folder.files[paths[image_id]]) as image:
            np.testing.assert_allclose(vector, image_of(library, image), atol=TOLERANCE)
    with Catalog.open(folder.index_dir, readonly=True) as catalog:
        text_ids, text_vectors = catalog.text_embeddings()
        texts = catalog.texts(text_ids.tolist())
    expected = texts_of(library[0], [texts[i] for i in text_ids.tolist()])
    np.testing.assert_allclose(text_vectors, expected, atol=TOLERANCE)
    assert sorted(texts.values()) == sorted(CAPTIONS)


def test_text_and_image_search_answer_with_the_librarys_vectors(
    built: tuple[Family, IndexedFolder],
    library: tuple[clip_model.ImageTextModel, clip_model.Preprocess],
    client: TestClient,
) -> None:
    _, ids, vectors = catalog_vectors(built[1])
    for query, vector in zip(QUERIES, texts_of(library[0], list(QUERIES)), strict=True):
        body = client.get("/api/search", params={"q": query, "k": 5}).json()
        expected_ids, expected_scores = ranked(ids, vectors, vector, 5)
        assert [hit["id"] for hit in body["results"]] == expected_ids
        np.testing.assert_allclose([hit["score"] for hit in body["results"]], expected_scores, atol=TOLERANCE)
    data, image = upload()
    response = client.post("/api/search/image", params={"k": 4}, files={"file": ("blue.png", data, "image/png")})
    assert response.status_code == 200, response.text
    expected_ids, expected_scores = ranked(ids, vectors, image_of(library, image), 4)
    assert [hit["id"] for hit in response.json()["results"]] == expected_ids
    np.testing.assert_allclose([hit["score"] for hit in response.json()["results"]], expected_scores, atol=TOLERANCE)


def test_embed_gives_the_librarys_text_and_image_vectors(
    library: tuple[clip_model.ImageTextModel, clip_model.Preprocess], client: TestClient
) -> None:
    response = client.post("/api/embed/text", json={"texts": list(QUERIES)})
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(response.json()["embeddings"], texts_of(library[0], list(QUERIES)), atol=TOLERANCE)
    data, image = upload((220, 30, 30))
    response = client.post("/api/embed/image", files={"file": ("red.png", data, "image/png")})
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(response.json()["embeddings"][0], image_of(library, image), atol=TOLERANCE)


def test_long_text_is_cut_or_chunked_by_the_familys_tokenizer(
    library: tuple[clip_model.ImageTextModel, clip_model.Preprocess], client: TestClient
) -> None:
    text_input = clip_model.TextInput.of(library[0])
    assert len(text_input.tokenizer.encode(LONG)) > text_input.capacity
    cut = client.post("/api/embed/text", json={"texts": [LONG, QUERIES[0]]}).json()
    assert cut["truncated"] == [True, False]
    chunked = client.post("/api/embed/text", json={"texts": [LONG, QUERIES[0]], "long_text": "chunk"}).json()
    assert chunked["chunks"] == [len(text_input.windows(LONG)), 1] and chunked["chunks"][0] > 1
    np.testing.assert_allclose(chunked["embeddings"], texts_of(library[0], [LONG, QUERIES[0]], "chunk"), atol=TOLERANCE)
    assert chunked["embeddings"][1] == cut["embeddings"][1]  # a text that fits: the same vector either way


def test_classify_and_describe_rank_by_the_librarys_vectors(
    built: tuple[Family, IndexedFolder],
    library: tuple[clip_model.ImageTextModel, clip_model.Preprocess],
    client: TestClient,
) -> None:
    _, ids, vectors = catalog_vectors(built[1])
    labels, templates = ["red", "green", "blue", "yellow"], ["a photo of a {} square", "{}"]
    response = client.post("/api/classify", json={"image_id": int(ids[0]), "labels": labels, "templates": templates})
    assert response.status_code == 200, response.text
    with torch.inference_mode():
        prompts = torch.from_numpy(texts_of(library[0], clip_model.zero_shot_prompts(labels, templates)))
        classifier = clip_model.ensemble_prompts(prompts, len(labels)).numpy()  # [D, C]
    by_cosine = [labels[i] for i in np.argsort(-(vectors[0] @ classifier), kind="stable")]
    body = response.json()
    assert [item["label"] for item in body["labels"]] == by_cosine and body["templates"] == len(templates)
    model = library[0]
    logits = (model.logit_scale.detach().exp() * torch.from_numpy(vectors[0] @ classifier)).double()
    if isinstance(model, clip_model.SigLIP):  # sigmoid-trained: the model's own probability of each match
        expected_probability = (logits + model.logit_bias.detach().double()).sigmoid()
    else:
        expected_probability = logits.softmax(dim=-1)
    assert body["independent"] is isinstance(model, clip_model.SigLIP)
    for item in body["labels"]:
        expected = float(expected_probability[labels.index(item["label"])])
        assert item["probability"] == pytest.approx(expected, abs=TOLERANCE)
    described = client.post("/api/describe", json={"image_id": int(ids[0]), "k": len(CAPTIONS)}).json()
    expected = dict(zip(CAPTIONS, texts_of(library[0], list(CAPTIONS)) @ vectors[0], strict=True))
    assert described["source"] == "index" and len(described["results"]) == len(CAPTIONS)
    for hit in described["results"]:
        assert hit["score"] == pytest.approx(float(expected[hit["text"]]), abs=TOLERANCE)
    candidates = client.post("/api/describe", json={"image_id": int(ids[0]), "candidates": list(QUERIES)}).json()
    expected = dict(zip(QUERIES, texts_of(library[0], list(QUERIES)) @ vectors[0], strict=True))
    for hit in candidates["results"]:
        assert hit["score"] == pytest.approx(float(expected[hit["text"]]), abs=TOLERANCE)


def test_a_siglips_relevance_is_its_own_pair_probability_and_min_relevance_cuts_there(
    built: tuple[Family, IndexedFolder],
    library: tuple[clip_model.ImageTextModel, clip_model.Preprocess],
    client: TestClient,
) -> None:
    """SigLIP: relevance is sigmoid(exp(logit_scale) * score + logit_bias) from the checkpoint's own scalars, and
    min_relevance r keeps exactly the results at r or above; the others (XLM-R CLIP) keep the calibrated scale."""
    model = library[0]
    bias = clip_model.pair_logit_bias(model)  # None: not sigmoid-trained
    sigmoid = bias is not None
    stats = client.get("/api/stats").json()
    expected_kind = ("sigmoid", SIGMOID_MIN_RELEVANCE) if sigmoid else ("calibrated", DEFAULT_MIN_RELEVANCE)
    assert (stats["relevance_kind"], stats["default_min_relevance"]) == expected_kind
    _, ids, vectors = catalog_vectors(built[1])
    straddled: list[bool] = []  # whether the default cut-off fell inside a query's results
    for query, vector in zip(QUERIES, texts_of(model, list(QUERIES)), strict=True):
        body = client.get("/api/search", params={"q": query, "k": len(ids)}).json()
        assert body["relevance_kind"] == stats["relevance_kind"] and len(body["results"]) == len(ids)
        if bias is None:
            continue
        logits = model.logit_scale.detach().double().exp() * torch.from_numpy(vectors @ vector).double()
        probabilities = (logits + bias.double()).sigmoid().tolist()
        probability = dict(zip(ids.tolist(), probabilities, strict=True))
        for hit in body["results"]:
            assert hit["relevance"] == pytest.approx(probability[hit["id"]], abs=1e-4)
        values = sorted({hit["relevance"] for hit in body["results"]})
        assert values[0] < 0.5 < values[-1]  # the cut-offs below fall inside the results
        straddled.append(values[0] < SIGMOID_MIN_RELEVANCE < values[-1])
        middles = [(a + b) / 2 for a, b in zip(values, values[1:], strict=False) if b - a > 2e-4]
        for cut in (SIGMOID_MIN_RELEVANCE, 0.5, *middles):
            kept = client.get("/api/search", params={"q": query, "k": len(ids), "min_relevance": cut}).json()
            wanted = [hit["id"] for hit in body["results"] if probability[hit["id"]] >= cut]
            assert [hit["id"] for hit in kept["results"]] == wanted, cut
    assert any(straddled) or not sigmoid
    if sigmoid:  # the checkpoint's own scalars, as saved, not SigLIP's initial ones
        assert math.exp(float(model.logit_scale.detach())) == pytest.approx(SIGLIP_PAIR_SCALE)


@pytest.mark.parametrize("built", ["siglip"], indirect=True)
def test_a_server_pinned_to_a_clip_refuses_a_siglip_index_and_the_other_way_round(
    built: tuple[Family, IndexedFolder], indexed: IndexedFolder, app_model: Path, tmp_path: Path
) -> None:
    _, folder = built
    for index, pinned, built_with in ((folder, app_model, folder.model), (indexed, folder.model, app_model)):
        settings = index.settings(tmp_path / index.index_dir.name, model=str(pinned))
        with TestClient(create_app(settings, watch=False)) as client:
            ready = client.get("/readyz")
            assert ready.status_code == 503, ready.text
            reason = ready.json()["reason"]
            assert str(built_with) in reason and "CLIPSEARCH_MODEL" in reason and "--rebuild" in reason
            assert client.get("/api/search", params={"q": "a red square"}).status_code == 503
    manifests = [
        json.loads((i / "generations" / str(current_generation(i)) / "manifest.json").read_text())["preprocess"]
        for i in (folder.index_dir, indexed.index_dir)
    ]
    assert [m["family"] for m in manifests] == ["siglip", "clip"]
    assert [m["resize_mode"] for m in manifests] == ["squash", "shortest"]
