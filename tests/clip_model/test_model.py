"""The CLIP module itself: configs, shape inference, the public verbs, zero-shot classification."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import clip_model
from clip_model.config import CLIPConfig, get_config, infer_config, list_configs
from clip_model.model import CLIP
from clip_model.pretrained import get_pretrained
from tests.clip_model.reference_models import random_tokens
from tests.support import tiny_arch

OPENCLIP_FAMILY = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-H-14", "ViT-g-14", "ViT-bigG-14")
OPENAI_FAMILY = ("RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32-quickgelu", "ViT-B-16-quickgelu",
                 "ViT-L-14-quickgelu", "ViT-L-14-336-quickgelu")  # fmt: skip


def tiny_config(resnet: bool = False, activation: str = "quick_gelu") -> CLIPConfig:
    """The tiny ViT (tests.support) with a narrower text tower, or a tiny ResNet in its place."""
    arch = tiny_arch(text={"width": 32}, activation=activation)
    if resnet:
        arch["vision"] = {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "heads": 8}
    return CLIPConfig.from_dict(arch)


def test_every_required_architecture_ships_a_config() -> None:
    assert set(OPENCLIP_FAMILY + OPENAI_FAMILY) <= set(list_configs())
    assert {get_config(n).activation for n in OPENAI_FAMILY} == {"quick_gelu"}
    assert {get_config(n).activation for n in OPENCLIP_FAMILY} == {"gelu"}


@pytest.mark.parametrize("name", sorted(set(OPENCLIP_FAMILY + OPENAI_FAMILY)))
def test_architecture_is_recovered_from_state_dict_shapes(name: str) -> None:
    config = get_config(name)
    with torch.device("meta"):  # shapes only: even ViT-bigG-14 costs no memory
        state_dict = CLIP(config).state_dict()
    assert infer_config(state_dict, activation=config.activation) == config


def test_known_parameter_counts() -> None:
    with torch.device("meta"):
        counts = {n: sum(p.numel() for p in CLIP(get_config(n)).parameters()) for n in ("RN50", "ViT-B-32", "ViT-L-14")}
    # published sizes of these models (OpenAI's RN50: 102.0M, ViT-B/32: 151.3M, ViT-L/14: 427.6M)
    assert counts == {"RN50": 102_007_137, "ViT-B-32": 151_277_313, "ViT-L-14": 427_616_513}


def test_unknown_shapes_fall_back_to_openai_head_rule() -> None:
    vision = {"image_size": 32, "layers": 1, "width": 128, "heads": 2, "patch_size": 16, "mlp_width": 512}
    config = CLIPConfig.from_dict({"embed_dim": 32, "vision": vision, "text": {"width": 192, "heads": 4, "layers": 1}})
    inferred = infer_config(CLIP(config).state_dict())
    assert inferred.name is None  # no shipped config has these shapes
    assert (inferred.vision.heads, inferred.text.heads) == (128 // 64, 192 // 64)
    assert inferred.activation == "quick_gelu"


@pytest.mark.parametrize("resnet", [False, True], ids=["vit", "resnet"])
def test_public_verbs_shapes_and_normalization(resnet: bool) -> None:
    model = CLIP(tiny_config(resnet)).eval()
    images = torch.randn(3, 3, model.image_size, model.image_size)
    tokens = random_tokens(batch=2)
    with torch.no_grad():
        image_features = model.encode_image(images, normalize=True)
        text_features = model.encode_text(tokens, normalize=True)
        logits_per_image, logits_per_text = model(images, tokens)
    assert image_features.shape == (3, 32) and text_features.shape == (2, 32)
    assert torch.allclose(image_features.norm(dim=-1), torch.ones(3), atol=1e-6)
    assert logits_per_image.shape == (3, 2) and torch.equal(logits_per_text, logits_per_image.t())
    expected = model.logit_scale.exp() * image_features @ text_features.t()
    assert torch.allclose(logits_per_image, expected, atol=1e-5)


def test_text_feature_ignores_tokens_after_end_of_text() -> None:
    model = CLIP(tiny_config()).eval()
    tokens = random_tokens(batch=2)
    noisy = tokens.clone()
    noisy[noisy == 0] = 7  # garbage after the end token must not leak back through the causal mask
    with torch.no_grad():
        assert torch.allclose(model.encode_text(tokens), model.encode_text(noisy), atol=1e-6)


def test_save_checkpoint_round_trip_carries_config(tmp_path: Path) -> None:
    model = CLIP(tiny_config(activation="gelu")).eval()
    path = clip_model.save_checkpoint(model, tmp_path / "tiny.safetensors")
    loaded, preprocess = clip_model.load(path)
    assert loaded.config == model.config and preprocess.image_size == 32
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), model.encode_image(images))
    assert not list(tmp_path.glob(".*partial*"))


def test_create_model_is_seeded() -> None:
    a, _ = clip_model.create_model(tiny_config(), seed=1)
    b, _ = clip_model.create_model(tiny_config(), seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_unreachable_weights_fail_instead_of_becoming_random(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    unreachable = dataclasses.replace(get_pretrained("ViT-B-32/openai"), url=(tmp_path / "gone.pt").as_uri())
    monkeypatch.setattr(clip_model.factory, "resolve_pretrained", lambda name: unreachable)
    with pytest.raises(clip_model.DownloadError, match=str(tmp_path / "cache")):
        clip_model.load("ViT-B-32", cache_dir=tmp_path / "cache")


def test_architecture_without_weights_points_to_create_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clip_model.factory, "resolve_pretrained", lambda name: None)
    with pytest.raises(clip_model.UnknownModelError, match=r"create_model\('ViT-g-14'\)"):
        clip_model.load("ViT-g-14")


def test_unknown_name_lists_known_models() -> None:
    with pytest.raises(clip_model.UnknownModelError, match="ViT-B-32/openai"):
        clip_model.load("no-such-model")


def test_zero_shot_classifier_is_mean_of_normalized_prompt_embeddings() -> None:
    model = CLIP(tiny_config()).eval()
    templates = ("a photo of a {}.", "art of the {}.")
    classifier = clip_model.build_zero_shot_classifier(model, ["cat", "dog", "car"], templates)
    assert classifier.shape == (32, 3)
    with torch.no_grad():
        per_prompt = model.encode_text(clip_model.tokenize(["a photo of a dog.", "art of the dog."]), normalize=True)
    expected = torch.nn.functional.normalize(per_prompt.mean(dim=0), dim=0)
    assert torch.allclose(classifier[:, 1], expected, atol=1e-6)
    probs = clip_model.classify(model, torch.randn(4, 3, 32, 32), classifier)
    assert probs.shape == (4, 3) and torch.allclose(probs.sum(dim=-1), torch.ones(4), atol=1e-5)


def test_shipped_prompt_templates() -> None:
    full, subset = clip_model.prompt_templates("imagenet_80"), clip_model.prompt_templates("imagenet_7")
    assert len(full) == 80 and len(subset) == 7 and set(subset) <= set(full)
    assert all(t.count("{}") == 1 for t in full)
    notice = json.loads((Path(clip_model.__file__).parent / "data" / "prompt_templates.json").read_text())["_notice"]
    assert "MIT" in notice


def test_weights_sha256_identifies_weights_not_files(tmp_path: Path) -> None:
    model = CLIP(tiny_config()).eval()
    copy = CLIP(tiny_config())
    copy.load_state_dict({k: v.half().float() if v.is_floating_point() else v for k, v in model.state_dict().items()})
    from_safetensors, _ = clip_model.load(clip_model.save_checkpoint(model, tmp_path / "w.safetensors"))
    digest = clip_model.weights_sha256(model)
    assert clip_model.weights_sha256(from_safetensors) == digest
    assert clip_model.weights_sha256(copy) != digest  # fp16-rounded weights are other weights
    with torch.no_grad():
        model.ln_final.bias[0] += 1e-6
    assert clip_model.weights_sha256(model) != digest
