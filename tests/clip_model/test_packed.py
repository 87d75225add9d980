"""float32 CPU inference with oneDNN-packed linear layers: which layers are packed, the same features as the float
model to float rounding, the float model left alone, and a torch without oneDNN running the float model as it is."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

import clip_model
from clip_model import packed as packed_module
from clip_model.packed import PackedLinear, PackedSelfAttention, pack_for_cpu
from clip_model.transformer import SelfAttention
from tests.clip_model.reference_models import random_images, random_tokens
from tests.clip_model.test_model import tiny_config
from tests.clip_model.test_quantize import linear_layers_and_blocks, random_model

TOLERANCE = 1e-5  # max abs difference of unit features, packed vs float (measured <= 1e-6: summation order only)


@pytest.fixture(scope="module", params=["vit", "resnet"])
def pair(request: pytest.FixtureRequest) -> tuple[clip_model.CLIP, clip_model.CLIP]:
    """(float32 model, its packed copy) for a tiny ViT and a tiny ResNet CLIP."""
    model = random_model(tiny_config(resnet=request.param == "resnet"))
    return model, pack_for_cpu(model)


def test_every_linear_layer_is_packed_and_the_float_model_keeps_its_own(
    pair: tuple[clip_model.CLIP, clip_model.CLIP],
) -> None:
    model, packed = pair
    assert not any(isinstance(m, nn.Linear | SelfAttention) for m in packed.modules())
    expected, blocks = linear_layers_and_blocks(model)
    assert sum(isinstance(m, PackedLinear) for m in packed.modules()) == expected
    assert sum(isinstance(m, PackedSelfAttention) for m in packed.modules()) == blocks
    assert clip_model.is_packed(packed) and not clip_model.is_packed(model)
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == expected - blocks  # in_proj is no Linear
    assert not packed.training and not any(p.requires_grad for p in packed.parameters())
    assert not [k for k in packed.state_dict() if k.endswith(("c_fc.weight", "out_proj.weight"))]  # not saved


@pytest.mark.parametrize("batch", [1, 3, 16])
def test_packed_features_equal_the_float_models(pair: tuple[clip_model.CLIP, clip_model.CLIP], batch: int) -> None:
    model, packed = pair
    images = random_images(model.config, batch=batch, seed=batch)
    tokens = random_tokens(batch, seed=batch)[:, :11]  # a real-length batch, as the server sends
    with torch.inference_mode():
        for encode in ("encode_image", "encode_text"):
            inputs = images if encode == "encode_image" else tokens
            want = getattr(model, encode)(inputs, normalize=True)
            got = getattr(packed, encode)(inputs, normalize=True)
            assert got.dtype == torch.float32 and got.shape == want.shape
            assert torch.allclose(got.norm(dim=-1), torch.ones(batch), atol=1e-5)
            assert (got - want).abs().max().item() <= TOLERANCE, encode


def test_threads_share_one_packed_model(pair: tuple[clip_model.CLIP, clip_model.CLIP]) -> None:
    model, packed = pair  # the indexer's encode streams call one model from several threads
    images = [random_images(model.config, batch=4, seed=seed) for seed in range(6)]
    with torch.inference_mode():
        want = [model.encode_image(x) for x in images]
        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(packed.encode_image, images))
    assert all((g - w).abs().max().item() <= TOLERANCE for g, w in zip(got, want, strict=True))


def test_only_float32_cpu_models_are_packed() -> None:
    model = random_model(tiny_config())
    with pytest.raises(ValueError, match="float32 model, not torch.float64"):
        pack_for_cpu(model.to(torch.float64))
    with pytest.raises(ValueError, match="CPU only; the model is on meta"):
        pack_for_cpu(random_model(tiny_config()).to("meta"))


def test_without_onednn_the_float_model_runs_and_the_log_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model = random_model(tiny_config()).train()
    monkeypatch.setattr(packed_module, "packing_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="clip_model.packed"):
        assert pack_for_cpu(model) is model
    assert not model.training and "no oneDNN" in caplog.text
