"""Architecture configs: frozen dataclasses, read from ``clip_model/configs/<name>.json`` or from state dict shapes.

A config says everything needed to build an uninitialised model: the two towers' sizes, the shared embedding
width, the MLP activation (OpenAI checkpoints use QuickGELU, most OpenCLIP ones GELU, SigLIP GELU's tanh
approximation) and the preprocessing the weights expect. Checkpoints do not carry heads or activation in their
shapes, so configs are the source of truth for those; :func:`infer_config` falls back to OpenAI's ``width // 64``
rule only when no shipped config fits.

Two families share these tower configs: :class:`CLIPConfig` (softmax over cosine similarities; BPE tokenizer) and
:class:`SigLIPConfig` (independent sigmoid scores; SentencePiece tokenizer). A JSON config names its family in
``"family"`` (absent means ``"clip"``); :func:`config_from_dict` reads either.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any, ClassVar, Literal

import torch

from .constants import (
    DEFAULT_CONTEXT_LENGTH,
    INCEPTION_MEAN,
    INCEPTION_STD,
    OPENAI_DATASET_MEAN,
    OPENAI_DATASET_STD,
    VOCAB_SIZE,
)
from .errors import CheckpointMismatchError, UnknownModelError

logger = logging.getLogger(__name__)

Activation = Literal["quick_gelu", "gelu", "gelu_tanh"]
ResizeMode = Literal["shortest", "squash"]  # shortest side to the input size + centre crop, or both sides to it
SentencePieceFlavor = Literal["siglip", "siglip2", "xlm-roberta"]  # see clip_model.tokenizer_sentencepiece
HEAD_WIDTH = 64  # OpenAI's rule: attention heads = width // 64 (ViT and text); ResNet: width * 32 // 64
LAYER_NORM_EPS = 1e-5  # XLM-RoBERTa's (and CLIP's)
XLM_ROBERTA_VOCAB_SIZE = 250_002  # the SentencePiece model's 250,000 pieces in fairseq numbering, plus <mask>
XLM_ROBERTA_MAX_POSITIONS = 514  # 512 tokens + the 2 position ids fairseq reserves below the first token
XLM_ROBERTA_PAD_ID = 1


@dataclass(frozen=True)
class VisionConfig:
    """Image tower. ``layers`` is an int for a ViT, a 4-tuple of block counts for a ModifiedResNet."""

    image_size: int
    layers: int | tuple[int, int, int, int]
    width: int
    heads: int
    patch_size: int | None = None  # ViT only
    mlp_width: int | None = None  # ViT only; defaults to 4 * width

    @property
    def is_resnet(self) -> bool:
        return isinstance(self.layers, tuple)


@dataclass(frozen=True)
class TextConfig:
    """Text tower: a transformer over token ids (causal for CLIP, bidirectional for SigLIP) and its pooling."""

    width: int
    heads: int
    layers: int
    context_length: int = DEFAULT_CONTEXT_LENGTH
    vocab_size: int = VOCAB_SIZE
    mlp_width: int | None = None  # defaults to 4 * width


@dataclass(frozen=True)
class PreprocessConfig:
    """What the weights expect of an image besides its side: normalization statistics and how it is resized."""

    mean: tuple[float, float, float] = OPENAI_DATASET_MEAN
    std: tuple[float, float, float] = OPENAI_DATASET_STD
    resize_mode: ResizeMode = "shortest"

    @classmethod
    def from_dict(cls, data: dict[str, Any], default: PreprocessConfig | None = None) -> PreprocessConfig:
        """Read the ``"preprocess"`` section of a JSON config; missing keys keep ``default``'s values."""
        fields: dict[str, Any] = {k: tuple(data[k]) for k in ("mean", "std") if k in data}
        if "resize_mode" in data:
            fields["resize_mode"] = data["resize_mode"]
        return dataclasses.replace(default or cls(), **fields)


@dataclass(frozen=True)
class CLIPConfig:
    """A whole CLIP: ``embed_dim`` is the width of the shared image/text embedding space."""

    embed_dim: int
    vision: VisionConfig
    text: TextConfig
    activation: Activation = "quick_gelu"
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict that :meth:`from_dict` reads back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CLIPConfig:
        """Build from a dict of the shape :meth:`to_dict` writes (the JSON config format)."""
        vision = dict(data["vision"])
        if isinstance(vision["layers"], list | tuple):
            vision["layers"] = tuple(vision["layers"])
        return cls(
            embed_dim=int(data["embed_dim"]),
            vision=VisionConfig(**vision),
            text=TextConfig(**data["text"]),
            activation=data.get("activation", "quick_gelu"),
            preprocess=PreprocessConfig.from_dict(data.get("preprocess") or {}),
            name=data.get("name"),
        )

    def with_preprocess(self, preprocess: PreprocessConfig) -> CLIPConfig:
        return dataclasses.replace(self, preprocess=preprocess)


SIGLIP_LAYER_NORM_EPS = 1e-6
SIGLIP_PREPROCESS = PreprocessConfig(mean=INCEPTION_MEAN, std=INCEPTION_STD, resize_mode="squash")


@dataclass(frozen=True)
class SigLIPConfig:
    """A SigLIP or SigLIP 2 model (fixed resolution): ``embed_dim`` is the shared embedding width.

    The image tower is a ViT without class token whose patch convolution has a bias, pooled by attention to one
    learned probe (the "MAP" head) and not projected (``embed_dim == vision.width``). The text tower is a
    bidirectional transformer whose last position (padding included) is projected by a linear layer with bias.
    ``tokenizer`` names the SentencePiece text normalization and special tokens the weights were trained with.
    """

    embed_dim: int
    vision: VisionConfig
    text: TextConfig
    tokenizer: SentencePieceFlavor
    activation: Activation = "gelu_tanh"
    layer_norm_eps: float = SIGLIP_LAYER_NORM_EPS
    preprocess: PreprocessConfig = SIGLIP_PREPROCESS
    name: str | None = None

    family: ClassVar[str] = "siglip"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict that :func:`config_from_dict` reads back."""
        return {"family": self.family, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SigLIPConfig:
        """Build from a dict of the shape :meth:`to_dict` writes (the JSON config format)."""
        return cls(
            embed_dim=int(data["embed_dim"]),
            vision=VisionConfig(**data["vision"]),
            text=TextConfig(**data["text"]),
            tokenizer=data["tokenizer"],
            activation=data.get("activation", "gelu_tanh"),
            layer_norm_eps=float(data.get("layer_norm_eps", SIGLIP_LAYER_NORM_EPS)),
            preprocess=PreprocessConfig.from_dict(data.get("preprocess") or {}, default=SIGLIP_PREPROCESS),
            name=data.get("name"),
        )

    def with_preprocess(self, preprocess: PreprocessConfig) -> SigLIPConfig:
        return dataclasses.replace(self, preprocess=preprocess)


@dataclass(frozen=True)
class XLMRobertaTextConfig:
    """An XLM-RoBERTa text tower (post-LayerNorm, bidirectional), mean-pooled over its non-padding tokens.

    ``context_length`` is the row length of the tokenizer's output; the position table has ``max_positions`` rows,
    of which the first ``pad_token_id + 1`` are never used by a token (fairseq numbering).
    """

    width: int
    heads: int
    layers: int
    mlp_width: int
    vocab_size: int = XLM_ROBERTA_VOCAB_SIZE
    context_length: int = DEFAULT_CONTEXT_LENGTH
    max_positions: int = XLM_ROBERTA_MAX_POSITIONS
    pad_token_id: int = XLM_ROBERTA_PAD_ID
    type_vocab_size: int = 1
    layer_norm_eps: float = LAYER_NORM_EPS


@dataclass(frozen=True)
class XLMRobertaCLIPConfig:
    """OpenCLIP's multilingual CLIP: a CLIP image tower beside an XLM-RoBERTa text tower whose mean-pooled feature
    goes through a two-layer MLP (``width -> (width + embed_dim) // 2 -> embed_dim``, GELU, no biases)."""

    embed_dim: int
    vision: VisionConfig
    text: XLMRobertaTextConfig
    activation: Activation = "gelu"  # the image tower's; XLM-RoBERTa's MLP uses exact GELU
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    name: str | None = None

    family: ClassVar[str] = "xlm-roberta"
    tokenizer: ClassVar[SentencePieceFlavor] = "xlm-roberta"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict that :func:`config_from_dict` reads back."""
        return {"family": self.family, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> XLMRobertaCLIPConfig:
        """Build from a dict of the shape :meth:`to_dict` writes (the JSON config format)."""
        return cls(
            embed_dim=int(data["embed_dim"]),
            vision=VisionConfig(**data["vision"]),
            text=XLMRobertaTextConfig(**data["text"]),
            activation=data.get("activation", "gelu"),
            preprocess=PreprocessConfig.from_dict(data.get("preprocess") or {}),
            name=data.get("name"),
        )

    def with_preprocess(self, preprocess: PreprocessConfig) -> XLMRobertaCLIPConfig:
        return dataclasses.replace(self, preprocess=preprocess)


ModelConfig = CLIPConfig | SigLIPConfig | XLMRobertaCLIPConfig
FAMILIES: dict[str, type[ModelConfig]] = {
    "clip": CLIPConfig,
    "siglip": SigLIPConfig,
    "xlm-roberta": XLMRobertaCLIPConfig,
}


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """A :class:`CLIPConfig` or :class:`SigLIPConfig`, as the dict's ``"family"`` says (default ``"clip"``)."""
    family = data.get("family", "clip")
    if family not in FAMILIES:
        raise UnknownModelError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[family].from_dict(data)


@lru_cache
def list_configs() -> tuple[str, ...]:
    """Names of the architecture configs shipped in ``clip_model/configs``, sorted."""
    folder = resources.files("clip_model") / "configs"
    return tuple(sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json")))


@lru_cache
def get_config(name: str) -> ModelConfig:
    """The shipped config called ``name`` (e.g. ``"ViT-B-32"``, ``"RN50"``, ``"ViT-B-16-SigLIP"``)."""
    if name not in list_configs():
        raise UnknownModelError(f"unknown architecture {name!r}; known: {', '.join(list_configs())}")
    text = (resources.files("clip_model") / "configs" / f"{name}.json").read_text(encoding="utf-8")
    data = json.loads(text)
    data["name"] = name
    return config_from_dict(data)


def _shipped(family: type[ModelConfig]) -> list[ModelConfig]:
    return [c for c in map(get_config, list_configs()) if isinstance(c, family)]


def _shape(state_dict: dict[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state_dict:
        raise CheckpointMismatchError(f"{key}: expected in a CLIP state dict, but it is missing")
    return tuple(state_dict[key].shape)


def _count_blocks(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    """Number of distinct ``<prefix><i>.`` indices among the keys."""
    return len({k[len(prefix) :].split(".")[0] for k in state_dict if k.startswith(prefix)})


def _infer_vision(state_dict: dict[str, torch.Tensor]) -> VisionConfig:
    if "visual.proj" in state_dict:  # ViT
        width, _, patch_size, _ = _shape(state_dict, "visual.conv1.weight")
        tokens = _shape(state_dict, "visual.positional_embedding")[0]
        grid = round((tokens - 1) ** 0.5)
        return VisionConfig(
            image_size=grid * patch_size,
            layers=_count_blocks(state_dict, "visual.transformer.resblocks."),
            width=width,
            heads=width // HEAD_WIDTH,
            patch_size=patch_size,
            mlp_width=_shape(state_dict, "visual.transformer.resblocks.0.mlp.c_fc.weight")[0],
        )
    blocks = tuple(_count_blocks(state_dict, f"visual.layer{i}.") for i in range(1, 5))
    if len(blocks) != 4 or 0 in blocks:
        raise CheckpointMismatchError(
            "visual: neither a ViT ('visual.proj') nor a ModifiedResNet ('visual.layer1..4') was found"
        )
    width = _shape(state_dict, "visual.layer1.0.conv1.weight")[0]
    pos_tokens = _shape(state_dict, "visual.attnpool.positional_embedding")[0]
    grid = round((pos_tokens - 1) ** 0.5)
    return VisionConfig(image_size=grid * 32, layers=blocks, width=width, heads=width * 32 // HEAD_WIDTH)


def infer_config(state_dict: dict[str, torch.Tensor], activation: Activation | None = None) -> CLIPConfig:
    """Read the architecture from a canonical (OpenAI-layout) state dict's shapes.

    Where the shapes match a shipped config, that config's heads (and, unless ``activation`` is given, its
    activation) are used, preferring the OpenAI QuickGELU variant when ``activation`` is None. Otherwise heads
    follow OpenAI's ``width // 64`` rule and ``activation`` defaults to QuickGELU.
    """
    vision = _infer_vision(state_dict)
    text_width = _shape(state_dict, "ln_final.weight")[0]
    text = TextConfig(
        width=text_width,
        heads=text_width // HEAD_WIDTH,
        layers=_count_blocks(state_dict, "transformer.resblocks."),
        context_length=_shape(state_dict, "positional_embedding")[0],
        vocab_size=_shape(state_dict, "token_embedding.weight")[0],
    )
    embed_dim = _shape(state_dict, "text_projection")[1]
    inferred = CLIPConfig(embed_dim=embed_dim, vision=vision, text=text, activation=activation or "quick_gelu")
    for known in _shape_matches(inferred):
        if activation is None or known.activation == activation:
            return known
    if activation is None:
        logger.info("no shipped config matches these shapes; using width//64 heads and QuickGELU")
    return inferred


def _same_shapes(a: CLIPConfig, b: CLIPConfig) -> bool:
    strip_heads = {"heads": 0}
    return (
        a.embed_dim == b.embed_dim
        and dataclasses.replace(a.vision, **strip_heads) == dataclasses.replace(b.vision, **strip_heads)
        and dataclasses.replace(a.text, **strip_heads) == dataclasses.replace(b.text, **strip_heads)
    )


def _shape_matches(inferred: CLIPConfig) -> list[CLIPConfig]:
    """Shipped configs with the same shapes, QuickGELU ones first."""
    matches = [c for c in _shipped(CLIPConfig) if isinstance(c, CLIPConfig) and _same_shapes(c, inferred)]
    return sorted(matches, key=lambda c: c.activation != "quick_gelu")


def with_known_name(config: ModelConfig) -> ModelConfig:
    """``config`` named after the shipped config with identical architecture (heads and activation included)."""
    if config.name is not None:
        return config
    for known in _shipped(type(config)):
        if dataclasses.replace(known, name=None, preprocess=config.preprocess) == config:
            return dataclasses.replace(config, name=known.name)
    return config


def infer_siglip_config(state_dict: dict[str, torch.Tensor], image_size: int | None = None) -> SigLIPConfig:
    """The shipped SigLIP config whose shapes a canonical SigLIP state dict has.

    Heads, activation, tokenizer and the input side are not in the shapes, so the state dict must match exactly one
    shipped config (``image_size``, when the file's folder says it, separates e.g. 378 from 384 with patch 14);
    otherwise :class:`CheckpointMismatchError` asks for ``arch=``.
    """
    width, _, patch_size, _ = _shape(state_dict, "visual.conv1.weight")
    text_width = _shape(state_dict, "ln_final.weight")[0]
    shapes = {
        "embed_dim": _shape(state_dict, "text_projection.weight")[0],
        "vision": (width, patch_size, _shape(state_dict, "visual.positional_embedding")[0],
                   _count_blocks(state_dict, "visual.transformer.resblocks."),
                   _shape(state_dict, "visual.transformer.resblocks.0.mlp.c_fc.weight")[0]),
        "text": (text_width, _count_blocks(state_dict, "transformer.resblocks."),
                 _shape(state_dict, "positional_embedding")[0], _shape(state_dict, "token_embedding.weight")[0],
                 _shape(state_dict, "transformer.resblocks.0.mlp.c_fc.weight")[0]),
    }  # fmt: skip
    matches = [
        c
        for c in _shipped(SigLIPConfig)
        if isinstance(c, SigLIPConfig) and _siglip_shapes(c) == shapes and image_size in (None, c.vision.image_size)
    ]
    if len(matches) != 1:
        found = ", ".join(str(c.name) for c in matches) or "none"
        raise CheckpointMismatchError(
            f"a SigLIP state dict with shapes {shapes} matches {len(matches)} shipped configs ({found}); "
            "pass arch= to name the architecture"
        )
    return matches[0]


def infer_xlm_roberta_config(state_dict: dict[str, torch.Tensor]) -> XLMRobertaCLIPConfig:
    """The shipped multilingual (XLM-RoBERTa text tower) config whose shapes a state dict has; heads and the image
    tower's activation are not in the shapes, so exactly one must match, else :class:`CheckpointMismatchError`."""
    width, _, patch_size, _ = _shape(state_dict, "visual.conv1.weight")
    text = "text.transformer."
    shapes = {
        "embed_dim": _shape(state_dict, "text.proj.2.weight")[0],
        "vision": (width, patch_size, _shape(state_dict, "visual.positional_embedding")[0],
                   _count_blocks(state_dict, "visual.transformer.resblocks.")),
        "text": (_shape(state_dict, f"{text}embeddings.word_embeddings.weight"),
                 _shape(state_dict, f"{text}embeddings.position_embeddings.weight")[0],
                 _count_blocks(state_dict, f"{text}encoder.layer."),
                 _shape(state_dict, f"{text}encoder.layer.0.intermediate.dense.weight")[0]),
    }  # fmt: skip
    matches = [
        c for c in _shipped(XLMRobertaCLIPConfig) if isinstance(c, XLMRobertaCLIPConfig) and _xlmr_shapes(c) == shapes
    ]
    if len(matches) != 1:
        raise CheckpointMismatchError(
            f"an XLM-RoBERTa CLIP state dict with shapes {shapes} matches {len(matches)} shipped configs; "
            "pass arch= to name the architecture"
        )
    return matches[0]


def _xlmr_shapes(config: XLMRobertaCLIPConfig) -> dict[str, Any]:
    v, t = config.vision, config.text
    assert v.patch_size is not None  # the shipped multilingual configs are ViTs
    grid = v.image_size // v.patch_size
    return {
        "embed_dim": config.embed_dim,
        "vision": (v.width, v.patch_size, grid * grid + 1, v.layers),
        "text": ((t.vocab_size, t.width), t.max_positions, t.layers, t.mlp_width),
    }


def _siglip_shapes(config: SigLIPConfig) -> dict[str, Any]:
    v, t = config.vision, config.text
    assert v.patch_size is not None  # every SigLIP config is a ViT
    grid = v.image_size // v.patch_size
    return {
        "embed_dim": config.embed_dim,
        "vision": (v.width, v.patch_size, grid * grid, v.layers, v.mlp_width or 4 * v.width),
        "text": (t.width, t.layers, t.context_length, t.vocab_size, t.mlp_width or 4 * t.width),
    }
