"""OpenCLIP's multilingual CLIP (XLM-RoBERTa text tower) against transformers' ``XLMRobertaModel`` plus the projection.

The reference text feature is computed as OpenCLIP's ``HFTextEncoder`` does: ``XLMRobertaModel`` (no pooling
layer) with the attention mask ``ids != <pad>``, the mean of the last hidden states over those positions, then the
MLP ``Linear(bias=False) -> GELU -> Linear(bias=False)``. The checkpoint is written in OpenCLIP's layout
(``text.transformer.*`` is the ``XLMRobertaModel`` state dict, ``text.proj.0`` / ``text.proj.2`` the MLP) with the
SentencePiece model transformers' ``XLMRobertaTokenizer`` reads beside it. The image tower is CLIP's ViT, whose
parity tests live in test_parity_hf.py and test_parity_openai.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file
from torch import nn
from transformers.initialization import no_init_weights

import clip_model
from clip_model.checkpoint import build_model, read_checkpoint
from clip_model.config import (
    VisionConfig,
    XLMRobertaCLIPConfig,
    XLMRobertaTextConfig,
    get_config,
    infer_xlm_roberta_config,
)
from clip_model.xlm_roberta import XLMRobertaCLIP
from tests.clip_model.reference_models import scramble_
from tests.clip_model.sentencepiece_models import train_xlm_roberta_model

TOLERANCE = 1e-4
PAD = 1
SIZES = {  # xlm-roberta-base and xlm-roberta-large (config.json on the hub, written out here), and a small tower
    "base": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12},
    "large": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24},
    "small": {"hidden_size": 128, "intermediate_size": 512, "num_attention_heads": 2, "num_hidden_layers": 2},
}
XLM_ROBERTA_CONFIG = {  # what xlm-roberta-base/-large's config.json sets beside the sizes
    "max_position_embeddings": 514, "type_vocab_size": 1, "layer_norm_eps": 1e-5, "pad_token_id": 1,
    "bos_token_id": 0, "eos_token_id": 2, "hidden_act": "gelu",
}  # fmt: skip
SMALL_VISION = VisionConfig(image_size=32, layers=1, width=64, heads=2, patch_size=16, mlp_width=128)


class Reference(nn.Module):
    """transformers' XLMRobertaModel, mean pooling and OpenCLIP's projection MLP."""

    def __init__(self, size: str, vocab: int, embed_dim: int) -> None:
        super().__init__()
        config = transformers.XLMRobertaConfig(
            **SIZES[size], vocab_size=vocab, **XLM_ROBERTA_CONFIG
        )  # fmt: skip
        with no_init_weights():
            self.transformer = transformers.XLMRobertaModel(config, add_pooling_layer=False)
        width, hidden = config.hidden_size, (config.hidden_size + embed_dim) // 2
        self.proj = nn.Sequential(
            nn.Linear(width, hidden, bias=False), nn.GELU(), nn.Linear(hidden, embed_dim, bias=False)
        )
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for param in self.parameters():
                if param.dim() > 1:
                    param.copy_(torch.randn(param.shape, generator=gen) * param[0].numel() ** -0.5)
        scramble_(self, seed=0)
        self.eval()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != PAD).long()
        hidden = self.transformer(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, L, W]
        pooled = (hidden * mask[..., None]).sum(dim=1) / mask.sum(dim=1, keepdim=True)
        features: torch.Tensor = self.proj(pooled)
        return features


def our_config(size: str, vocab: int, embed_dim: int, vision: VisionConfig = SMALL_VISION) -> XLMRobertaCLIPConfig:
    s = SIZES[size]
    text = XLMRobertaTextConfig(
        width=s["hidden_size"], heads=s["num_attention_heads"], layers=s["num_hidden_layers"],
        mlp_width=s["intermediate_size"], vocab_size=vocab,
    )  # fmt: skip
    return XLMRobertaCLIPConfig(embed_dim=embed_dim, vision=vision, text=text)


def open_clip_checkpoint(reference: Reference, config: XLMRobertaCLIPConfig) -> dict[str, torch.Tensor]:
    """OpenCLIP's layout: the reference's text tower, a random CLIP image tower and logit scale."""
    image_side, _ = clip_model.create_model(config, seed=1)
    state = {k: v for k, v in image_side.state_dict().items() if not k.startswith("text.")}
    state |= {f"text.{k}": v.detach().clone() for k, v in reference.state_dict().items()}
    return state


def xlmr_rows(batch: int, vocab: int, length: int, seed: int = 0) -> torch.Tensor:
    """Rows as the tokenizer writes them: <s> 0, ids, </s> 2, <pad> 1; varied lengths, one row full."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.full((batch, length), PAD, dtype=torch.long)
    for i in range(batch):
        n = length - 2 if i == 0 else int(torch.randint(1, length - 2, (1,), generator=gen))
        rows[i, 0], rows[i, n + 1] = 0, 2
        rows[i, 1 : n + 1] = torch.randint(4, vocab, (n,), generator=gen)
    return rows


def text_differences(model: XLMRobertaCLIP, reference: Reference, rows: torch.Tensor) -> tuple[float, float]:
    """Max abs difference of unit text embeddings, and of raw features relative to their largest value."""
    with torch.no_grad():
        expected, got = reference(rows), model.encode_text(rows)
    unit = (torch.nn.functional.normalize(got, dim=-1) - torch.nn.functional.normalize(expected, dim=-1)).abs().max()
    return unit.item(), ((got - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture(scope="module")
def vocabulary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_xlm_roberta_model(tmp_path_factory.mktemp("xlmr"))


def test_open_clip_checkpoint_gives_the_reference_text_features(tmp_path: Path) -> None:
    reference = Reference("small", vocab=1000, embed_dim=96)
    config = our_config("small", vocab=1000, embed_dim=96)
    save_file(open_clip_checkpoint(reference, config), str(tmp_path / "open_clip_model.safetensors"))
    model = build_model(read_checkpoint(tmp_path / "open_clip_model.safetensors"), config)
    assert isinstance(model, XLMRobertaCLIP)
    unit, raw = text_differences(model, reference, xlmr_rows(4, 1000, 77))
    assert unit <= TOLERANCE and raw <= TOLERANCE


def test_padding_does_not_change_a_rows_feature() -> None:
    model, _ = clip_model.create_model(our_config("small", vocab=1000, embed_dim=96), seed=0)
    rows = xlmr_rows(3, 1000, 20)
    longer = torch.cat([rows, torch.full((3, 57), PAD)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(rows), model.encode_text(longer), rtol=0, atol=1e-5)


def test_trimmed_rows_encode_to_the_same_features() -> None:
    model, _ = clip_model.create_model(our_config("small", vocab=1000, embed_dim=96), seed=0)
    rows = torch.full((2, 77), PAD)
    rows[:, :12] = xlmr_rows(2, 1000, 12)
    trimmed = clip_model.trim_for(model, rows)
    assert trimmed.shape == (2, 12)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(trimmed), model.eval().encode_text(rows), rtol=0, atol=1e-5)


def test_loaded_with_its_vocabulary_tokenizes_and_encodes_as_transformers(vocabulary: Path, tmp_path: Path) -> None:
    tokenizer = transformers.XLMRobertaTokenizer.from_pretrained(str(vocabulary.parent))
    reference = Reference("small", vocab=tokenizer.vocab_size, embed_dim=96)
    config = our_config("small", vocab=tokenizer.vocab_size, embed_dim=96)
    save_file(open_clip_checkpoint(reference, config), str(tmp_path / "open_clip_model.safetensors"))
    (tmp_path / "sentencepiece.bpe.model").write_bytes(vocabulary.read_bytes())
    model = build_model(read_checkpoint(tmp_path / "open_clip_model.safetensors"), config)
    assert isinstance(model, XLMRobertaCLIP)
    texts = ["a photo of a cat", "ein Foto einer Katze", "une photo d'un chat", "猫の写真 " * 30]
    tokens = clip_model.tokenizer_for(model)(texts, context_length=model.context_length, truncate=True)
    expected = tokenizer(texts, padding="max_length", truncation=True, max_length=77, return_tensors="pt").input_ids
    assert tokens.equal(expected)
    unit, raw = text_differences(model, reference, tokens)
    assert unit <= TOLERANCE and raw <= TOLERANCE


def test_saved_checkpoint_carries_the_family_and_loads_back(tmp_path: Path) -> None:
    model, _ = clip_model.create_model(our_config("small", vocab=1000, embed_dim=96), seed=0)
    loaded, preprocess = clip_model.load(clip_model.save_checkpoint(model, tmp_path / "m.safetensors"))
    assert isinstance(loaded, XLMRobertaCLIP) and loaded.config == model.config and preprocess.resize_mode == "shortest"
    rows = xlmr_rows(2, 1000, 30)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(rows), model.eval().encode_text(rows), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["xlm-roberta-base-ViT-B-32", "xlm-roberta-large-ViT-H-14"])
def test_open_clip_shapes_name_their_shipped_config(name: str) -> None:
    config = get_config(name)
    with torch.device("meta"):
        state_dict = XLMRobertaCLIP(config).state_dict()  # type: ignore[arg-type]  # an XLM-RoBERTa config
    assert infer_xlm_roberta_config(state_dict) == config


def test_inference_copies_keep_the_encoders_contracts() -> None:
    model, _ = clip_model.create_model(our_config("small", vocab=1000, embed_dim=96), seed=0)
    rows, images = xlmr_rows(3, 1000, 24), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = (model.eval().encode_text(rows, normalize=True), model.encode_image(images, normalize=True))
        for copy, tolerance in ((clip_model.pack_for_cpu(model), 1e-5), (clip_model.quantize_int8(model), 0.05)):
            assert (copy.encode_text(rows, normalize=True) - expected[0]).abs().max().item() <= tolerance
            assert (copy.encode_image(images, normalize=True) - expected[1]).abs().max().item() <= tolerance


@pytest.mark.slow
@pytest.mark.parametrize("size", ["base", "large"])
def test_full_size_text_towers_match_the_reference(size: str) -> None:
    name = {"base": "xlm-roberta-base-ViT-B-32", "large": "xlm-roberta-large-ViT-H-14"}[size]
    shipped = get_config(name)
    assert isinstance(shipped, XLMRobertaCLIPConfig)
    reference = Reference(size, vocab=shipped.text.vocab_size, embed_dim=shipped.embed_dim)
    config = dataclasses.replace(shipped, vision=SMALL_VISION)  # the image tower is CLIP's, tested elsewhere
    model = XLMRobertaCLIP(config).eval()
    model.text.load_state_dict(reference.state_dict(), strict=True)
    unit, raw = text_differences(model, reference, xlmr_rows(3, shipped.text.vocab_size, 77))
    assert unit <= TOLERANCE and raw <= TOLERANCE
