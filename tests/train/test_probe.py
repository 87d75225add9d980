"""Linear probe: separable features are fit perfectly, splits are stratified and seeded, probes round-trip on disk."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

import clip_model
from clip_model.train import probe
from clip_model.train.data import DatasetError, read_pairs
from clip_model.train.evaluate import encode_images
from clip_model.train.probe import (
    LinearProbe,
    ProbeError,
    fit_logistic_regression,
    fit_probe,
    load_probe,
    predict_images,
    stratified_split,
)
from clip_model.train.synthetic import SHAPES, generate
from tests.support import TINY_IMAGE_SIZE, save_tiny_model


def separable(per_class: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Three classes around orthogonal directions with small noise: linearly separable by construction."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.eye(3, 16)
    rows = [centres[c] + 0.15 * torch.randn(per_class, 16, generator=generator) for c in range(3)]
    names = ["cat", "dog", "emu"]
    return torch.cat(rows), [names[c] for c in range(3) for _ in range(per_class)]


def test_probe_fits_separable_features_perfectly() -> None:
    features, labels = separable(30, seed=0)
    result = fit_probe(features, labels, l2_grid=(1e-4, 1e-2), seed=0, model_sha256="abc")
    assert result.probe.classnames == ("cat", "dog", "emu")
    assert result.probe.weight.shape == (3, 16) and result.probe.bias.shape == (3,)
    assert result.train_accuracy == 1.0
    assert result.val_accuracy == 1.0
    assert result.probe.l2 == 1e-2  # ties go to the stronger regularisation
    fresh, fresh_labels = separable(20, seed=1)
    assert result.probe.predict_labels(fresh) == fresh_labels


def test_logistic_regression_weight_decay_shrinks_the_weights() -> None:
    features, labels = separable(10, seed=2)
    y = torch.tensor([["cat", "dog", "emu"].index(name) for name in labels])
    weak, _ = fit_logistic_regression(torch.nn.functional.normalize(features, dim=-1), y, 3, l2=1e-4)
    strong, _ = fit_logistic_regression(torch.nn.functional.normalize(features, dim=-1), y, 3, l2=1e-1)
    assert strong.norm() < weak.norm()


def test_stratified_split_is_seeded_and_keeps_every_class() -> None:
    labels = torch.tensor([0] * 10 + [1] * 5 + [2])
    kept, held = stratified_split(labels, 0.2, seed=3)
    again = stratified_split(labels, 0.2, seed=3)
    assert torch.equal(kept, again[0]) and torch.equal(held, again[1])
    assert sorted(kept.tolist() + held.tolist()) == list(range(16))
    assert labels[held].tolist() == [0, 0, 1]  # 20% of each class; the class of one stays in training
    assert set(labels[kept].tolist()) == {0, 1, 2}
    assert not torch.equal(held, stratified_split(labels, 0.2, seed=4)[1])


def test_probe_needs_two_classes() -> None:
    with pytest.raises(DatasetError, match="two classes"):
        fit_probe(torch.randn(4, 8), ["cat"] * 4)


def test_saved_probe_loads_back_and_refuses_another_model(tmp_path: Path) -> None:
    features, labels = separable(8, seed=5)
    model_a = clip_model.load(save_tiny_model(tmp_path / "a.safetensors", seed=0))[0]
    model_b = clip_model.load(save_tiny_model(tmp_path / "b.safetensors", seed=1))[0]
    fitted = fit_probe(features, labels, l2_grid=(1e-3,), model_sha256=clip_model.weights_sha256(model_a)).probe
    path = fitted.save(tmp_path / "probe.safetensors")
    loaded = load_probe(path, model_a)
    assert loaded.classnames == fitted.classnames and loaded.l2 == fitted.l2
    assert loaded.model_sha256 == fitted.model_sha256
    assert torch.equal(loaded.weight, fitted.weight) and torch.equal(loaded.bias, fitted.bias)
    assert loaded.predict_labels(features) == fitted.predict_labels(features)
    with pytest.raises(ProbeError, match="refit"):
        load_probe(path, model_b)
    with pytest.raises(ValueError, match="safetensors"):
        fitted.save(tmp_path / "probe.pt")
    clip_model.save_checkpoint(model_a, tmp_path / "not_a_probe.safetensors")
    with pytest.raises(ProbeError):
        load_probe(tmp_path / "not_a_probe.safetensors")


def test_probe_rejects_features_of_the_wrong_width() -> None:
    fitted = LinearProbe(torch.zeros(2, 4), torch.zeros(2), ("a", "b"))
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        fitted.predict(torch.zeros(3, 5))


def test_probe_command_writes_a_probe_that_predicts_the_same(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_path = save_tiny_model(tmp_path / "tiny.safetensors", seed=0)
    train = generate(tmp_path / "train", 36, "train", image_size=TINY_IMAGE_SIZE)
    test = generate(tmp_path / "test", 12, "test", image_size=TINY_IMAGE_SIZE)
    out, report_path = tmp_path / "probe.safetensors", tmp_path / "probe.json"
    parser = argparse.ArgumentParser()
    probe.add_arguments(parser)
    argv = ["--model", str(model_path), "--data", str(train), "--test", str(test), "--out", str(out)]
    argv += ["--l2", "1e-3", "1e-1"]
    assert probe.run(parser.parse_args([*argv, "--json", str(report_path)])) == 0
    assert "test accuracy" in capsys.readouterr().out
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert report["num_train"] == 36 and report["num_test"] == 12
    assert all(0.0 <= report[key] <= 1.0 for key in ("train_accuracy", "val_accuracy", "test_accuracy"))
    assert set(report["val_accuracy_by_l2"]) == {"0.001", "0.1"} and report["l2"] in (1e-3, 1e-1)

    model, preprocess = clip_model.load(model_path)
    loaded = load_probe(out, model)
    assert set(loaded.classnames) <= set(SHAPES) and list(loaded.classnames) == report["classes"]
    pairs = read_pairs(test)
    predicted = predict_images(loaded, model, preprocess, [p.image for p in pairs])
    assert set(predicted) <= set(loaded.classnames)
    accuracy = sum(p == pair.label for p, pair in zip(predicted, pairs, strict=True)) / len(pairs)
    assert accuracy == pytest.approx(report["test_accuracy"])
    features = encode_images(model, preprocess, [p.image for p in pairs])
    assert loaded.predict_labels(features) == predicted

    no_test = [*argv[:4], "--out", str(tmp_path / "p2.safetensors"), "--l2", "1e-2"]
    assert probe.run(parser.parse_args([*no_test, "--json"])) == 0
    held_out = json.loads(capsys.readouterr().out)
    assert held_out["num_train"] + held_out["num_test"] == 36 and held_out["num_test"] > 0

    with pytest.raises(DatasetError, match="does not exist"):
        probe.run(parser.parse_args([*argv[:3], str(tmp_path / "missing"), "--out", str(out)]))
