"""Retrieval recall@k (constructed features, brute force, shared captions), zero-shot accuracy and the eval command."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

import clip_model
from clip_model.train import evaluate
from clip_model.train.data import DatasetError, Pair, read_pairs
from clip_model.train.evaluate import encode_dataset, normalize_caption, retrieval_metrics, zero_shot_accuracy
from clip_model.train.synthetic import generate
from tests.support import TINY_ARCH, TINY_IMAGE_SIZE, save_tiny_model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny.safetensors", seed=0)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("shapes"), 24, "test", seed=0, image_size=TINY_IMAGE_SIZE)


def brute_force(
    images: torch.Tensor, texts: torch.Tensor, captions: list[str], names: list[str], k: int
) -> tuple[float, float]:
    """Recall@k in both directions with Python loops over sorted similarity lists."""
    similarity = (images @ texts.T).tolist()
    image_hits = []
    for i, row in enumerate(similarity):
        order = sorted(range(len(names)), key=row.__getitem__, reverse=True)[:k]
        image_hits.append(any(names[t] == captions[i] for t in order))
    text_hits = []
    for t, name in enumerate(names):
        if name not in captions:
            continue
        column = [similarity[i][t] for i in range(len(captions))]
        order = sorted(range(len(captions)), key=column.__getitem__, reverse=True)[:k]
        text_hits.append(any(captions[i] == name for i in order))
    return sum(text_hits) / len(text_hits), sum(image_hits) / len(image_hits)


def test_identity_features_give_perfect_recall() -> None:
    features = torch.eye(5)
    names = [f"caption {i}" for i in range(5)]
    metrics = retrieval_metrics(features, features, names, names)
    assert metrics == {f"{d}_recall@{k}": 1.0 for d in ("text_to_image", "image_to_text") for k in (1, 5, 10)}


def test_permuted_features_give_the_fraction_of_fixed_points() -> None:
    permutation = [0, 2, 1, 3, 5, 4]  # fixed points 0 and 3: two of six
    images = torch.eye(6)
    texts = torch.eye(6)[permutation]  # text t looks like image permutation[t]
    names = [f"t{i}" for i in range(6)]
    metrics = retrieval_metrics(images, texts, names, names, ks=(1, 6))
    assert metrics["text_to_image_recall@1"] == pytest.approx(1 / 3)
    assert metrics["image_to_text_recall@1"] == pytest.approx(1 / 3)
    assert metrics["text_to_image_recall@6"] == metrics["image_to_text_recall@6"] == 1.0


def test_a_shared_caption_counts_any_of_its_images() -> None:
    images = torch.eye(3)  # images 0 and 1 share a caption
    captions = ["a small red circle", "a small red circle", "a large blue star"]
    texts = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # text 0 finds image 1; text 1 finds image 0 (wrong)
    metrics = retrieval_metrics(images, texts, captions, ["a small red circle", "a large blue star"], ks=(1, 2))
    assert metrics["text_to_image_recall@1"] == pytest.approx(0.5)  # over 2 distinct texts, not 3 images
    assert metrics["image_to_text_recall@1"] == pytest.approx(1 / 3)  # only image 1's nearest text is its caption
    assert metrics["image_to_text_recall@2"] == 1.0


def test_matches_brute_force_with_duplicates_distractors_and_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(40, 8, generator=generator), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(15, 8, generator=generator), dim=-1)
    names = [f"caption {t}" for t in range(15)]
    captions = [names[i % 12] for i in range(40)]  # texts 12-14 describe no image
    expected = {k: brute_force(images, texts, captions, names, k) for k in (1, 3, 5)}
    for chunk in (1024, 7):
        monkeypatch.setattr(evaluate, "SIMILARITY_CHUNK", chunk)
        metrics = retrieval_metrics(images, texts, captions, names, ks=(1, 3, 5))
        for k, (text_to_image, image_to_text) in expected.items():
            assert metrics[f"text_to_image_recall@{k}"] == pytest.approx(text_to_image)
            assert metrics[f"image_to_text_recall@{k}"] == pytest.approx(image_to_text)


def test_captions_are_compared_normalized_and_bad_inputs_are_refused() -> None:
    features = torch.eye(2)
    metrics = retrieval_metrics(features, features, ["A  Red circle ", "blue"], ["a red circle", "Blue"], ks=(1,))
    assert metrics["image_to_text_recall@1"] == 1.0
    assert normalize_caption("  A\tRed  circle\n") == "a red circle"
    with pytest.raises(ValueError, match="distinct"):
        retrieval_metrics(features, features, ["a", "a"], ["a", "A "])
    with pytest.raises(ValueError, match="not among the texts"):
        retrieval_metrics(features, features, ["a", "c"], ["a", "b"])


def test_encode_dataset_encodes_each_distinct_caption_once(tiny_model: Path, shapes: Path) -> None:
    model, preprocess = clip_model.load(tiny_model)
    pairs = read_pairs(shapes)[:6]
    pairs = [*pairs, Pair(pairs[0].image, pairs[1].caption.upper()), Pair(pairs[2].image, pairs[2].caption)]
    encoded = encode_dataset(model, preprocess, pairs, batch_size=4)
    assert encoded.image_features.shape == (8, TINY_ARCH["embed_dim"])
    assert encoded.text_features.shape == (6, TINY_ARCH["embed_dim"])
    assert encoded.texts == [normalize_caption(p.caption) for p in pairs[:6]]
    image_features, text_features, texts = encoded  # unpacks as a 3-tuple
    assert texts == encoded.texts and text_features is encoded.text_features
    assert torch.allclose(encoded.image_features.norm(dim=1), torch.ones(8), atol=1e-5)
    assert torch.allclose(encoded.image_features[6], encoded.image_features[0], atol=1e-6)  # same file, same vector
    with torch.inference_mode():
        tokens = clip_model.tokenize(encoded.texts[:2], truncate=True)
        direct = model.encode_text(tokens, normalize=True)
    assert torch.allclose(encoded.text_features[:2], direct, atol=1e-5)


def test_zero_shot_accuracy_of_a_random_model_is_a_fraction(tiny_model: Path, shapes: Path) -> None:
    model, preprocess = clip_model.load(tiny_model)
    pairs = read_pairs(shapes)
    for templates in (clip_model.prompt_templates("imagenet_80"), ("a photo of a {}.",)):
        accuracy = zero_shot_accuracy(model, preprocess, pairs, templates)
        assert 0.0 <= accuracy <= 1.0
        assert accuracy * len(pairs) == pytest.approx(round(accuracy * len(pairs)))


def test_eval_command_end_to_end(
    tiny_model: Path, shapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    out = tmp_path / "report.json"
    args = parser.parse_args(
        ["--model", str(tiny_model), "--data", str(shapes), "--batch-size", "8", "--json", str(out)]
    )
    assert evaluate.run(args) == 0
    table = capsys.readouterr().out
    assert "24 images" in table and "text->image recall@1" in table and "zero-shot accuracy" in table
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["num_images"] == 24
    metrics = report["metrics"]
    expected = {f"{d}_recall@{k}" for d in ("text_to_image", "image_to_text") for k in (1, 5, 10)}
    expected |= {f"zero_shot_accuracy_{name}" for name in ("ensemble80", "photo", "plain")}
    assert set(metrics) == expected
    assert all(0.0 <= value <= 1.0 for value in metrics.values())
    assert metrics["text_to_image_recall@10"] >= metrics["text_to_image_recall@1"]

    with pytest.raises(DatasetError, match="does not exist"):
        evaluate.run(parser.parse_args(["--model", str(tiny_model), "--data", str(tmp_path / "missing")]))

    args = parser.parse_args(["--model", str(tiny_model), "--data", str(shapes), "--json"])
    assert evaluate.run(args) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == pytest.approx(metrics, abs=1e-6)
