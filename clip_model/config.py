"""Architecture configs: frozen dataclasses, read from ``clip_model/configs/<name>.json`` or from state dict shapes.

A config says everything needed to build an uninitialised CLIP: the two towers' sizes, the shared embedding
width, the MLP activation (OpenAI checkpoints use QuickGELU, most OpenCLIP ones GELU) and the preprocessing the
weights expect. Checkpoints do not carry heads or activation in their shapes, so configs are the source of truth
for those; :func:`infer_config` falls back to OpenAI's ``width // 64`` rule only when no shipped config fits.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any, Literal

import torch

from .constants import DEFAULT_CONTEXT_LENGTH, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, VOCAB_SIZE
from .errors import CheckpointMismatchError, UnknownModelError

logger = logging.getLogger(__name__)

Activation = Literal["quick_gelu", "gelu"]
HEAD_WIDTH = 64  # OpenAI's rule: attention heads = width // 64 (ViT and text); ResNet: width * 32 // 64


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
    """Text tower: a causal transformer over BPE tokens; the end-of-text token's feature is projected."""

    width: int
    heads: int
    layers: int
    context_length: int = DEFAULT_CONTEXT_LENGTH
    vocab_size: int = VOCAB_SIZE


@dataclass(frozen=True)
class PreprocessConfig:
    """What the weights expect of an image: square side ``image_size`` plus normalization statistics."""

    mean: tuple[float, float, float] = OPENAI_DATASET_MEAN
    std: tuple[float, float, float] = OPENAI_DATASET_STD


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
        pre = data.get("preprocess") or {}
        return cls(
            embed_dim=int(data["embed_dim"]),
            vision=VisionConfig(**vision),
            text=TextConfig(**data["text"]),
            activation=data.get("activation", "quick_gelu"),
            preprocess=PreprocessConfig(**{k: tuple(v) for k, v in pre.items()}),
            name=data.get("name"),
        )

    def with_preprocess(self, preprocess: PreprocessConfig) -> CLIPConfig:
        return dataclasses.replace(self, preprocess=preprocess)


@lru_cache
def list_configs() -> tuple[str, ...]:
    """Names of the architecture configs shipped in ``clip_model/configs``, sorted."""
    folder = resources.files("clip_model") / "configs"
    return tuple(sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json")))


@lru_cache
def get_config(name: str) -> CLIPConfig:
    """The shipped config called ``name`` (e.g. ``"ViT-B-32"``, ``"RN50"``, ``"ViT-H-14"``)."""
    if name not in list_configs():
        raise UnknownModelError(f"unknown architecture {name!r}; known: {', '.join(list_configs())}")
    text = (resources.files("clip_model") / "configs" / f"{name}.json").read_text(encoding="utf-8")
    data = json.loads(text)
    data["name"] = name
    return CLIPConfig.from_dict(data)


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
    matches = [get_config(n) for n in list_configs() if _same_shapes(get_config(n), inferred)]
    return sorted(matches, key=lambda c: c.activation != "quick_gelu")


def with_known_name(config: CLIPConfig) -> CLIPConfig:
    """``config`` named after the shipped config with identical architecture (heads and activation included)."""
    if config.name is not None:
        return config
    for name in list_configs():
        known = get_config(name)
        if dataclasses.replace(known, name=None, preprocess=config.preprocess) == config:
            return dataclasses.replace(config, name=name)
    return config
