"""The model families :mod:`bench.bench_encoders` times: each one's configs, its transformers reference and vocabulary.

A :class:`Family` builds, for one of its configs, a :class:`Pair`: our model (a ``clip_model`` model, as
:func:`clip_model.load` returns it) and the transformers model it is checked and timed against, holding the same
random weights, converted by the repository's own converter:

- ``clip``: ``transformers.CLIPModel`` at its own random init, :func:`clip_model.hf_convert.convert_hf_state_dict`
  (OpenAI's quick-GELU ViT-B/32 and ViT-L/14, as before families existed);
- ``siglip``: ``transformers.SiglipModel`` from the matching ``SiglipConfig``,
  :func:`clip_model.siglip_convert.convert_hf_siglip_state_dict` (SigLIP ``ViT-B-16-SigLIP``, SigLIP 2
  ``ViT-B-16-SigLIP2``: the same towers, Gemma's 256k vocabulary);
- ``xlm-roberta``: OpenCLIP's multilingual text tower, ``transformers.XLMRobertaModel`` with the mean over
  non-padding tokens and the projection MLP (:class:`XLMRobertaReference`, whose state dict is OpenCLIP's ``text.*``
  layout, the one :class:`clip_model.XLMRobertaCLIP` reads). Its image tower is CLIP's ViT, timed by ``clip``: the
  pair has no image reference and only the text is compared and timed.

SigLIP's and XLM-RoBERTa's references skip transformers' initialisation (slow at these sizes, and it leaves biases
at zero, so a conversion that dropped one would go unseen): :func:`randomize_` gives every tensor a value. A
SentencePiece-tokenized model gets a vocabulary trained at run time (:func:`give_vocabulary`; the real files cannot
be downloaded here), so its text goes through :func:`clip_model.tokenizer_for` as the indexer's and server's does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers.initialization import no_init_weights

import clip_model
from clip_model.config import (
    CLIPConfig,
    ModelConfig,
    SigLIPConfig,
    TextConfig,
    VisionConfig,
    XLMRobertaCLIPConfig,
    XLMRobertaTextConfig,
    get_config,
)
from clip_model.hf_convert import convert_hf_state_dict
from clip_model.siglip_convert import convert_hf_siglip_state_dict
from tests.clip_model.sentencepiece_models import train_gemma_model, train_siglip_model, train_xlm_roberta_model
from tests.support import TINY_ARCH

HF_ATTENTION = "sdpa"  # transformers' default with torch >= 2.1, spelled out: the same kernel as ours
HF_SIGLIP_ACTIVATIONS = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}  # ours -> transformers' hidden_act
NORM_SPREAD = 0.1  # randomize_: LayerNorm weights 1 + N(0, this), biases N(0, this)
SIGLIP_LOGIT_SCALE, SIGLIP_LOGIT_BIAS = math.log(10.0), -10.0  # SigLIP's initial values (not used by the features)
XLM_ROBERTA_BOS, XLM_ROBERTA_EOS = 0, 2  # xlm-roberta-base's config.json
VOCABULARY_TRAINERS: dict[str, Callable[[Path], Path]] = {  # clip_model's SentencePiece flavor -> a small model
    "siglip": train_siglip_model,
    "siglip2": train_gemma_model,
    "xlm-roberta": train_xlm_roberta_model,
}
Features = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Pair:
    """Our model and its transformers reference with the same weights, both in eval mode.

    ``image_features`` / ``text_features``: the reference's unnormalized features of ``[B, 3, R, R]`` images / of
    token rows ``[B, context_length]`` as our tokenizer writes them (``image_features`` None: not compared or timed).
    """

    ours: clip_model.ImageTextModel
    reference: nn.Module
    image_features: Features | None
    text_features: Features


@dataclass(frozen=True)
class Family:
    """One model family: ``archs`` maps an ``--archs`` name to its clip_model config, ``smoke`` the tiny configs of
    ``--smoke``; ``build(config, seed)`` gives the :class:`Pair`."""

    archs: dict[str, str]
    default_archs: tuple[str, ...]
    smoke: dict[str, ModelConfig]
    build: Callable[[ModelConfig, int], Pair]

    def configs(self, archs: tuple[str, ...], smoke: bool) -> dict[str, ModelConfig]:
        return dict(self.smoke) if smoke else {a: get_config(self.archs[a]) for a in archs}


def hf_features(output: Any) -> torch.Tensor:
    """transformers 4 returns the projected tensor; 5 wraps it as ``pooler_output``."""
    features: torch.Tensor = output if isinstance(output, torch.Tensor) else output.pooler_output
    return features


def randomize_(module: nn.Module, seed: int) -> None:
    """Random values in every floating tensor of ``module``: matrices (embeddings, the probe too) normal with std
    ``fan_in ** -0.5``, LayerNorm weights near 1 and biases near 0 (:data:`NORM_SPREAD`), so every parameter moves the
    output and activations stay finite through 12 layers."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=gen)
            if tensor.dim() > 1:
                tensor.copy_(noise * tensor[0].numel() ** -0.5)
            elif name.endswith("weight"):
                tensor.copy_(1 + NORM_SPREAD * noise)
            else:
                tensor.copy_(NORM_SPREAD * noise)


def give_vocabulary(model: clip_model.ImageTextModel, folder: Path) -> None:
    """Train the SentencePiece vocabulary of ``model``'s flavor in ``folder`` and set ``model.tokenizer_path``
    (CLIP: nothing to do, its BPE ships with the package)."""
    if isinstance(model, clip_model.CLIP):
        return
    folder.mkdir(parents=True, exist_ok=True)
    model.tokenizer_path = VOCABULARY_TRAINERS[model.config.tokenizer](folder)


# ------------------------------------------------------------------------------------------------------------ CLIP


def hf_clip_config(config: CLIPConfig) -> transformers.CLIPConfig:
    """The ``transformers.CLIPConfig`` with ``config``'s sizes (a ViT CLIP)."""
    v, t = config.vision, config.text
    vision = {"hidden_size": v.width, "intermediate_size": v.mlp_width or 4 * v.width, "num_attention_heads": v.heads,
              "num_hidden_layers": v.layers, "image_size": v.image_size, "patch_size": v.patch_size,
              "hidden_act": config.activation}  # fmt: skip
    text = {"hidden_size": t.width, "intermediate_size": 4 * t.width, "num_attention_heads": t.heads,
            "num_hidden_layers": t.layers, "vocab_size": t.vocab_size, "max_position_embeddings": t.context_length,
            "hidden_act": config.activation}  # fmt: skip
    return transformers.CLIPConfig(
        text_config=text, vision_config=vision, projection_dim=config.embed_dim, attn_implementation=HF_ATTENTION
    )


def clip_pair(config: ModelConfig, seed: int) -> Pair:
    """HF's init, converted to our layout."""
    assert isinstance(config, CLIPConfig)
    torch.manual_seed(seed)
    reference = transformers.CLIPModel(hf_clip_config(config)).eval()
    ours = clip_model.CLIP(config)
    ours.load_state_dict(convert_hf_state_dict(reference.state_dict()), strict=True)
    return Pair(
        ours.eval(),
        reference,
        lambda images: hf_features(reference.get_image_features(pixel_values=images)),
        lambda tokens: hf_features(reference.get_text_features(input_ids=tokens)),
    )


# ---------------------------------------------------------------------------------------------------------- SigLIP


def hf_siglip_config(config: SigLIPConfig) -> transformers.SiglipConfig:
    """The ``transformers.SiglipConfig`` with ``config``'s sizes."""
    v, t = config.vision, config.text
    common = {"hidden_act": HF_SIGLIP_ACTIVATIONS[config.activation], "layer_norm_eps": config.layer_norm_eps}
    vision = {"hidden_size": v.width, "intermediate_size": v.mlp_width or 4 * v.width, "num_attention_heads": v.heads,
              "num_hidden_layers": v.layers, "image_size": v.image_size, "patch_size": v.patch_size,
              **common}  # fmt: skip
    text = {"hidden_size": t.width, "intermediate_size": t.mlp_width or 4 * t.width, "num_attention_heads": t.heads,
            "num_hidden_layers": t.layers, "vocab_size": t.vocab_size, "max_position_embeddings": t.context_length,
            "projection_size": config.embed_dim, **common}  # fmt: skip
    return transformers.SiglipConfig(text_config=text, vision_config=vision, attn_implementation=HF_ATTENTION)


def siglip_pair(config: ModelConfig, seed: int) -> Pair:
    """:func:`randomize_`'s weights in a ``SiglipModel``, converted to our layout."""
    assert isinstance(config, SigLIPConfig)
    with no_init_weights():
        reference = transformers.SiglipModel(hf_siglip_config(config))
    randomize_(reference, seed)
    with torch.no_grad():
        reference.logit_scale.fill_(SIGLIP_LOGIT_SCALE)
        reference.logit_bias.fill_(SIGLIP_LOGIT_BIAS)
    with torch.device("meta"):  # no init of weights that are about to be replaced
        ours = clip_model.SigLIP(config)
    ours.load_state_dict(convert_hf_siglip_state_dict(reference.state_dict()), strict=True, assign=True)
    reference.eval()
    return Pair(
        ours.eval(),
        reference,
        lambda images: hf_features(reference.get_image_features(pixel_values=images)),
        lambda tokens: hf_features(reference.get_text_features(input_ids=tokens)),
    )


# ----------------------------------------------------------------------------------------------------- XLM-RoBERTa


class XLMRobertaReference(nn.Module):
    """OpenCLIP's ``HFTextEncoder`` for ``xlm-roberta-*``, on transformers' ``XLMRobertaModel`` (no pooling layer):
    attention mask ``ids != <pad>``, the mean of the last hidden states over those positions, then the MLP
    ``Linear(bias=False) -> GELU -> Linear(bias=False)``. Module names as OpenCLIP's (``transformer``, ``proj``)."""

    def __init__(self, config: XLMRobertaCLIPConfig) -> None:
        super().__init__()
        t = config.text
        hf = transformers.XLMRobertaConfig(
            hidden_size=t.width, intermediate_size=t.mlp_width, num_attention_heads=t.heads,
            num_hidden_layers=t.layers, vocab_size=t.vocab_size, max_position_embeddings=t.max_positions,
            type_vocab_size=t.type_vocab_size, layer_norm_eps=t.layer_norm_eps, pad_token_id=t.pad_token_id,
            bos_token_id=XLM_ROBERTA_BOS, eos_token_id=XLM_ROBERTA_EOS, hidden_act="gelu",
            attn_implementation=HF_ATTENTION,
        )  # fmt: skip
        self.pad_token_id = t.pad_token_id
        with no_init_weights():
            self.transformer = transformers.XLMRobertaModel(hf, add_pooling_layer=False)
        hidden = (t.width + config.embed_dim) // 2
        self.proj = nn.Sequential(
            nn.Linear(t.width, hidden, bias=False), nn.GELU(), nn.Linear(hidden, config.embed_dim, bias=False)
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids: [B, L] -> [B, embed_dim]
        keep = (ids != self.pad_token_id).long()  # [B, L]
        hidden = self.transformer(input_ids=ids, attention_mask=keep).last_hidden_state  # [B, L, W]
        pooled = (hidden * keep[..., None]).sum(dim=1) / keep.sum(dim=1, keepdim=True)  # [B, W]
        features: torch.Tensor = self.proj(pooled)
        return features


def xlm_roberta_pair(config: ModelConfig, seed: int) -> Pair:
    """:func:`randomize_`'s weights in :class:`XLMRobertaReference`, loaded as our ``text.*``; our own random image
    tower (not compared: CLIP's ViT, the ``clip`` family's)."""
    assert isinstance(config, XLMRobertaCLIPConfig)
    reference = XLMRobertaReference(config)
    randomize_(reference, seed)
    torch.manual_seed(seed)
    ours = clip_model.XLMRobertaCLIP(config)
    state = {k: v for k, v in ours.state_dict().items() if not k.startswith("text.")}
    state |= {f"text.{k}": v for k, v in reference.state_dict().items()}
    ours.load_state_dict(state, strict=True)
    return Pair(ours.eval(), reference.eval(), None, reference)


# -------------------------------------------------------------------------------------------------------- families

TINY_VISION = VisionConfig(image_size=32, layers=1, width=64, heads=2, patch_size=16, mlp_width=128)
TINY_TEXT = TextConfig(width=64, heads=2, layers=2, context_length=16, vocab_size=1000, mlp_width=128)
FAMILIES: dict[str, Family] = {
    "clip": Family(
        archs={"ViT-B-32": "ViT-B-32-quickgelu", "ViT-L-14": "ViT-L-14-quickgelu"},  # openai/clip-vit-*: quick GELU
        default_archs=("ViT-B-32", "ViT-L-14"),
        smoke={"tiny": CLIPConfig.from_dict(TINY_ARCH)},
        build=clip_pair,
    ),
    "siglip": Family(
        archs={"ViT-B-16-SigLIP": "ViT-B-16-SigLIP", "ViT-B-16-SigLIP2": "ViT-B-16-SigLIP2"},
        default_archs=("ViT-B-16-SigLIP",),
        smoke={  # both tokenizers: SigLIP's T5-like one, SigLIP 2's Gemma
            f"tiny-{flavor}": SigLIPConfig(embed_dim=64, vision=TINY_VISION, text=TINY_TEXT, tokenizer=flavor)
            for flavor in ("siglip", "siglip2")
        },
        build=siglip_pair,
    ),
    "xlm-roberta": Family(
        archs={"xlm-roberta-base-ViT-B-32": "xlm-roberta-base-ViT-B-32"},
        default_archs=("xlm-roberta-base-ViT-B-32",),
        smoke={
            "tiny": XLMRobertaCLIPConfig(
                embed_dim=48,
                vision=TINY_VISION,
                text=XLMRobertaTextConfig(width=64, heads=2, layers=2, mlp_width=128, vocab_size=1000),
            )
        },
        build=xlm_roberta_pair,
    ),
}
