"""Parity with OpenAI's reference model code on random weights, for all nine OpenAI architectures.

The reference model's weights reach our model through the public loader twice: as a plain state dict file
(how OpenCLIP and most fine-tunes ship), for all nine, and as a TorchScript archive made by ``torch.jit.trace`` +
``torch.jit.save`` (how OpenAI ships), read by the restricted reader, for the five smaller ones: the reader does
not depend on the architecture (both families, and a 288 px input with RN50x4, are among the five), and tracing
the four large ones took ~100 s of the CI's time. Outputs must agree to 1e-4 (max abs, fp32).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import clip_model
from clip_model.config import get_config
from tests.clip_model.reference_models import random_images, random_tokens, reference_clip

TOLERANCE = 1e-4  # max abs difference, fp32
OPENAI_ARCHS = (
    "RN50", "RN101", "RN50x4", "RN50x16", "RN50x64",
    "ViT-B-32-quickgelu", "ViT-B-16-quickgelu", "ViT-L-14-quickgelu", "ViT-L-14-336-quickgelu",
)  # fmt: skip
# Tracing OpenAI's code warns about its Python control flow; the traced graph is only used for these inputs.
pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
LARGE_ARCHS = {"RN50x16", "RN50x64", "ViT-L-14-quickgelu", "ViT-L-14-336-quickgelu"}
TORCHSCRIPT_ARCHS = tuple(name for name in OPENAI_ARCHS if name not in LARGE_ARCHS)


@dataclass
class Reference:
    name: str
    model: nn.Module
    images: torch.Tensor
    tokens: torch.Tensor
    image_features: torch.Tensor
    text_features: torch.Tensor


@pytest.fixture(scope="module")
def reference(request: pytest.FixtureRequest) -> Iterator[Reference]:
    name = request.param
    cfg = get_config(name)
    model = reference_clip(cfg)
    images = random_images(cfg, batch=1 if name in LARGE_ARCHS else 2)
    tokens = random_tokens()
    with torch.no_grad():
        yield Reference(name, model, images, tokens, model.encode_image(images), model.encode_text(tokens))
    del model
    gc.collect()


def assert_same_outputs(ours: clip_model.CLIP, ref: Reference) -> None:
    with torch.no_grad():
        image_diff = (ours.encode_image(ref.images) - ref.image_features).abs().max().item()
        text_diff = (ours.encode_text(ref.tokens) - ref.text_features).abs().max().item()
    assert image_diff <= TOLERANCE, f"{ref.name} encode_image differs by {image_diff:.3g}"
    assert text_diff <= TOLERANCE, f"{ref.name} encode_text differs by {text_diff:.3g}"


@pytest.mark.parametrize(
    "reference",
    [pytest.param(name, marks=pytest.mark.slow) if name in LARGE_ARCHS else name for name in OPENAI_ARCHS],
    indirect=True,
)
def test_state_dict_file_gives_reference_outputs(reference: Reference, tmp_path: Path) -> None:
    path = tmp_path / f"{reference.name}.pt"
    torch.save(reference.model.state_dict(), path)
    model, preprocess = clip_model.load(path)
    assert model.config.name == reference.name  # architecture recognised from the shapes alone
    assert preprocess.image_size == get_config(reference.name).vision.image_size
    assert_same_outputs(model, reference)


@pytest.mark.parametrize("reference", TORCHSCRIPT_ARCHS, indirect=True)
def test_torchscript_archive_gives_reference_outputs(reference: Reference, tmp_path: Path) -> None:
    path = tmp_path / f"{reference.name}.pt"
    traced = torch.jit.trace(reference.model, (reference.images, reference.tokens), check_trace=False)
    torch.jit.save(traced, str(path))
    del traced
    model, _ = clip_model.load(path)
    assert model.config.name == reference.name
    assert_same_outputs(model, reference)


def test_fp16_archive_loads_as_float32(tmp_path: Path) -> None:
    cfg = get_config("ViT-B-32-quickgelu")
    ref = reference_clip(cfg)
    path = tmp_path / "half.pt"
    torch.save({k: v.half() for k, v in ref.state_dict().items()}, path)
    model, _ = clip_model.load(path)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    images, tokens = random_images(cfg), random_tokens()
    with torch.no_grad():
        ref.half().float()  # the reference with the same fp16-rounded weights
        diff = (model.encode_image(images) - ref.encode_image(images)).abs().max().item()
    assert diff <= TOLERANCE
    with torch.no_grad():
        assert (model.encode_text(tokens) - ref.encode_text(tokens)).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize(
    "break_model",
    [
        pytest.param(lambda m: setattr(m.transformer.resblocks[0].mlp, "gelu", nn.GELU()), id="wrong-activation"),
        pytest.param(lambda m: setattr(m.visual.transformer.resblocks[1].attn, "heads", 6), id="wrong-heads"),
        pytest.param(lambda m: m.ln_final.bias.data.add_(1e-3), id="perturbed-weight"),
    ],
)
def test_parity_check_detects_a_broken_model(break_model: Callable[[nn.Module], object], tmp_path: Path) -> None:
    cfg = get_config("ViT-B-32-quickgelu")
    ref = reference_clip(cfg)
    images, tokens = random_images(cfg), random_tokens()
    path = tmp_path / "m.pt"
    torch.save(ref.state_dict(), path)
    model, _ = clip_model.load(path)
    break_model(model)
    with torch.no_grad():
        image_diff = (model.encode_image(images) - ref.encode_image(images)).abs().max().item()
        text_diff = (model.encode_text(tokens) - ref.encode_text(tokens)).abs().max().item()
    assert max(image_diff, text_diff) > 10 * TOLERANCE
