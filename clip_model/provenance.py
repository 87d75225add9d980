"""What an index records about how inputs reach a model, beside the fingerprint of its weights.

:func:`input_provenance` names the model's family (``"clip"``, ``"siglip"``, ``"xlm-roberta"``: the keys of
:data:`clip_model.config.FAMILIES`), its tokenizer (``"clip-bpe"``, or the SentencePiece flavor: ``"siglip"``,
``"siglip2"``, ``"xlm-roberta"``) and the resize rule of its preprocessing (``"shortest"`` or ``"squash"``). The
weights' sha256 already tells two models apart; these say what kind of model built an index and how its images were
resized, so a server or a later run that would resize or tokenize otherwise sees the difference.
"""

from __future__ import annotations

from typing import TypedDict

from .config import FAMILIES
from .model import CLIP, ImageTextModel
from .preprocess import Preprocess

CLIP_TOKENIZER = "clip-bpe"  # CLIP's byte-level BPE (clip_model.tokenizer)


class InputProvenance(TypedDict):
    """What :func:`input_provenance` returns."""

    family: str
    tokenizer: str
    resize_mode: str


def family_of(model: ImageTextModel) -> str:
    """The family name of ``model``'s config (a key of :data:`clip_model.config.FAMILIES`)."""
    return next(name for name, config_type in FAMILIES.items() if isinstance(model.config, config_type))


def tokenizer_name(model: ImageTextModel) -> str:
    """Which tokenizer ``model`` reads text through: ``"clip-bpe"`` or its SentencePiece flavor."""
    return CLIP_TOKENIZER if isinstance(model, CLIP) else str(model.config.tokenizer)


def input_provenance(model: ImageTextModel, preprocess: Preprocess) -> InputProvenance:
    """``{"family", "tokenizer", "resize_mode"}`` of ``model`` and its ``preprocess`` (module docstring)."""
    return {"family": family_of(model), "tokenizer": tokenizer_name(model), "resize_mode": preprocess.resize_mode}
