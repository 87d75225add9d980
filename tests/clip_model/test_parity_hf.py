"""Parity with Hugging Face ``transformers.CLIPModel`` on random weights, through ``clip_model.load(<dir>)``.

The configs are those of openai/clip-vit-base-patch32 and openai/clip-vit-large-patch14 (sizes written out here,
since the hub cannot be reached), plus a GELU variant standing for OpenCLIP-trained towers.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import transformers

import clip_model
from clip_model.config import get_config
from tests.clip_model.reference_models import random_tokens, scramble_

TOLERANCE = 1e-4  # max abs difference, fp32
BASE_PATCH32 = {
    "text_config": {"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8, "num_hidden_layers": 12},
    "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                      "num_hidden_layers": 12, "image_size": 224, "patch_size": 32},
    "projection_dim": 512,
}  # fmt: skip
LARGE_PATCH14 = {
    "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12},
    "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                      "num_hidden_layers": 24, "image_size": 224, "patch_size": 14},
    "projection_dim": 768,
}  # fmt: skip


def features(output: torch.Tensor | transformers.utils.ModelOutput) -> torch.Tensor:
    """transformers 4 returns the projected tensor; 5 wraps it as ``pooler_output``."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def hf_model(spec: dict, hidden_act: str = "quick_gelu") -> transformers.CLIPModel:
    text = {**spec["text_config"], "vocab_size": 49408, "max_position_embeddings": 77, "hidden_act": hidden_act}
    vision = {**spec["vision_config"], "hidden_act": hidden_act}
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=spec["projection_dim"])
    torch.manual_seed(0)
    model = transformers.CLIPModel(config)
    scramble_(model, seed=0)
    return model.eval()


def assert_matches_transformers(model: clip_model.CLIP, reference: transformers.CLIPModel, batch: int) -> None:
    images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    tokens = random_tokens(batch=batch + 1)
    with torch.no_grad():
        image_diff = model.encode_image(images) - features(reference.get_image_features(pixel_values=images))
        text_diff = model.encode_text(tokens) - features(reference.get_text_features(input_ids=tokens))
    assert image_diff.abs().max().item() <= TOLERANCE
    assert text_diff.abs().max().item() <= TOLERANCE


@pytest.mark.parametrize(
    ("spec", "hidden_act", "expected_name"),
    [
        pytest.param(BASE_PATCH32, "quick_gelu", "ViT-B-32-quickgelu", id="clip-vit-base-patch32"),
        pytest.param(
            LARGE_PATCH14, "quick_gelu", "ViT-L-14-quickgelu", id="clip-vit-large-patch14", marks=pytest.mark.slow
        ),
        pytest.param(BASE_PATCH32, "gelu", "ViT-B-32", id="base-patch32-gelu"),
    ],
)
@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "bin"])
def test_hf_directory_gives_transformers_outputs(
    spec: dict, hidden_act: str, expected_name: str, safe_serialization: bool, tmp_path: Path
) -> None:
    if not safe_serialization and spec is LARGE_PATCH14:
        pytest.skip("one serialization of the large model is enough")
    reference = hf_model(spec, hidden_act)
    if safe_serialization:
        reference.save_pretrained(tmp_path)
    else:  # transformers 5 only writes safetensors; a pytorch_model.bin is what older exports hold
        reference.config.save_pretrained(tmp_path)
        torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    model, preprocess = clip_model.load(tmp_path)
    assert model.config.activation == hidden_act and preprocess.image_size == 224
    assert model.config.name == expected_name  # its shapes and activation match a shipped config

    assert_matches_transformers(model, reference, batch=2)


@pytest.mark.parametrize("arch", ["ViT-H-14", "ViT-g-14", "ViT-bigG-14"])
def test_openclip_large_family_widths_heads_and_mlp_match_transformers(arch: str, tmp_path: Path) -> None:
    """The shipped configs' head widths (80, 88, 104) and MLP ratios, at full width but only 2 layers deep."""
    cfg = get_config(arch)
    spec = {
        "text_config": {"hidden_size": cfg.text.width, "intermediate_size": 4 * cfg.text.width,
                        "num_attention_heads": cfg.text.heads, "num_hidden_layers": 2},
        "vision_config": {"hidden_size": cfg.vision.width, "intermediate_size": cfg.vision.mlp_width,
                          "num_attention_heads": cfg.vision.heads, "num_hidden_layers": 2,
                          "image_size": cfg.vision.image_size, "patch_size": cfg.vision.patch_size},
        "projection_dim": cfg.embed_dim,
    }  # fmt: skip
    reference = hf_model(spec, "gelu")
    reference.save_pretrained(tmp_path)
    model, _ = clip_model.load(tmp_path)
    shallow = dataclasses.replace(cfg, name=None, vision=dataclasses.replace(cfg.vision, layers=2),
                                  text=dataclasses.replace(cfg.text, layers=2))  # fmt: skip
    assert model.config == shallow
    assert_matches_transformers(model, reference, batch=1)
