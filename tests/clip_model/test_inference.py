"""clip_model.load_for_inference: the one way the indexer, the server and the bench get a model ready."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import clip_model
from tests.support import save_tiny_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("inference") / "tiny.safetensors", seed=0)


def test_fp32_and_int8_share_the_float32_fingerprint_and_encode_like_the_plain_model(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain, preprocess = clip_model.load(checkpoint)
    monkeypatch.chdir(checkpoint.parent)
    fp32 = clip_model.load_for_inference(checkpoint.name)
    int8 = clip_model.load_for_inference(checkpoint.name, precision="int8")
    assert fp32.weights_sha256 == int8.weights_sha256 == clip_model.weights_sha256(plain)
    assert fp32.name == int8.name == str(checkpoint.resolve())  # valid from any working directory
    assert clip_model.is_packed(fp32.model) and clip_model.is_quantized(int8.model)
    assert not fp32.model.training and not any(p.requires_grad for p in fp32.model.parameters())
    assert (fp32.embed_dim, fp32.context_length) == (plain.config.embed_dim, plain.config.text.context_length)
    assert fp32.provenance() == {
        "name": str(checkpoint.resolve()),
        "weights_sha256": fp32.weights_sha256,
        "embed_dim": plain.config.embed_dim,
        "image_size": preprocess.image_size,
        "mean": preprocess.mean,
        "std": preprocess.std,
    }
    pixels = torch.rand(2, 3, preprocess.image_size, preprocess.image_size)
    tokens = clip_model.tokenize(["a red square", "a photo of a cat"])
    with torch.inference_mode():
        torch.testing.assert_close(fp32.model.encode_image(pixels), plain.encode_image(pixels), atol=1e-5, rtol=0)
        torch.testing.assert_close(fp32.model.encode_text(tokens), plain.encode_text(tokens), atol=1e-5, rtol=0)
        agreement = torch.cosine_similarity(int8.model.encode_image(pixels), plain.encode_image(pixels))
    assert agreement.min().item() > 0.99


def test_an_unknown_precision_device_or_model_is_refused(checkpoint: Path) -> None:
    with pytest.raises(ValueError, match=r"precision 'int4' \(--precision / CLIPSEARCH_PRECISION\) is not one of"):
        clip_model.load_for_inference(checkpoint, precision="int4")
    with pytest.raises(ValueError, match=r"device 'tpu' \(--device / CLIPSEARCH_DEVICE\) is not one of"):
        clip_model.load_for_inference(checkpoint, device="tpu")
    with pytest.raises(clip_model.UnknownModelError):
        clip_model.load_for_inference(os.fspath(checkpoint.parent / "missing.safetensors"))
