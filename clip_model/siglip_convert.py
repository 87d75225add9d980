"""SigLIP checkpoints in OpenCLIP's and Hugging Face's layouts, converted to the canonical one (:mod:`.siglip`).

OpenCLIP (``open_clip_model.safetensors``, ``open_clip_pytorch_model.bin``) keeps the text tower under ``text.``
with CLIP's names, and the image tower as a timm ``VisionTransformer`` under ``visual.trunk.`` (``patch_embed.proj``,
``pos_embed`` [1, N, W], ``blocks.<i>.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``, and the
pooling head ``attn_pool.{latent, q, kv, proj, norm, mlp}``, whose ``q`` and ``kv`` rows stack into ``in_proj``).

Hugging Face (``SiglipModel`` saved by ``save_pretrained``: ``config.json`` + weights) names blocks as its CLIP does
(converted by :func:`clip_model.hf_convert.convert_hf_state_dict`), the pooling head ``vision_model.head.*`` (an
``nn.MultiheadAttention``), the text projection ``text_model.head``; ``logit_scale``/``logit_bias`` have shape [1].
SigLIP 2's fixed-resolution checkpoints are ``SiglipModel`` folders too; ``Siglip2Model`` (NaFlex) is not supported.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from .config import (
    SIGLIP_PREPROCESS,
    Activation,
    PreprocessConfig,
    SentencePieceFlavor,
    SigLIPConfig,
    TextConfig,
    VisionConfig,
)
from .errors import CheckpointError, CheckpointMismatchError
from .hf_convert import (
    CONFIG_FILE,
    PREPROCESSOR_FILE,
    convert_hf_state_dict,
    hf_weight_file,
    read_hf_weights,
    read_json,
    square_side,
)

logger = logging.getLogger(__name__)

MODEL_TYPE = "siglip"
ARCHITECTURE = "SiglipModel"
NAFLEX_MODEL_TYPE = "siglip2"  # transformers' Siglip2Model: variable resolution, not supported here
TOKENIZER_CONFIG = "tokenizer_config.json"
# SiglipTokenizer's vocabulary file, Gemma's (SigLIP 2), XLMRobertaTokenizer's
SENTENCEPIECE_FILES = ("spiece.model", "tokenizer.model", "sentencepiece.bpe.model")
GEMMA_VOCAB_SIZE = 256_000  # SigLIP 2's Gemma vocabulary; SigLIP's are 32,000 (English) and 250,000 (i18n)
SIGLIP2_TOKENIZER_CLASSES = frozenset({"GemmaTokenizer", "GemmaTokenizerFast", "Siglip2Tokenizer"})
IMAGE_CHANNELS = 3
MAX_REPORTED_KEYS = 5
HF_ACTIVATIONS: dict[str, Activation] = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu"}

# HF's documented SiglipConfig defaults, for config.json files that leave fields out.
TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 64,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}
VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 16,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
    "vision_use_head": True,
}

HF_RENAMED = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "text_model.head.weight": "text_projection.weight",
    "text_model.head.bias": "text_projection.bias",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.patch_embedding.bias": "visual.conv1.bias",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "vision_model.head.attention.in_proj_weight": "visual.attn_pool.in_proj_weight",
    "vision_model.head.attention.in_proj_bias": "visual.attn_pool.in_proj_bias",
    "vision_model.head.attention.out_proj.weight": "visual.attn_pool.out_proj.weight",
    "vision_model.head.attention.out_proj.bias": "visual.attn_pool.out_proj.bias",
    "vision_model.head.layernorm.weight": "visual.attn_pool.ln.weight",
    "vision_model.head.layernorm.bias": "visual.attn_pool.ln.bias",
    "vision_model.head.mlp.fc1.weight": "visual.attn_pool.mlp.c_fc.weight",
    "vision_model.head.mlp.fc1.bias": "visual.attn_pool.mlp.c_fc.bias",
    "vision_model.head.mlp.fc2.weight": "visual.attn_pool.mlp.c_proj.weight",
    "vision_model.head.mlp.fc2.bias": "visual.attn_pool.mlp.c_proj.bias",
}
HF_MARKER = "vision_model.head.probe"  # the pooling head's probe: HF SigLIP image towers, and no other layout
HF_RESHAPED = {"logit_scale": "logit_scale", "logit_bias": "logit_bias", "vision_model.head.probe": ""}
HF_DROPPED = frozenset({"text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"})

OPEN_CLIP_MARKER = "visual.trunk.attn_pool."  # the prefix of the pooling head of OpenCLIP's timm SigLIP towers
OPEN_CLIP_RENAMED = {
    "visual.trunk.patch_embed.proj.weight": "visual.conv1.weight",
    "visual.trunk.patch_embed.proj.bias": "visual.conv1.bias",
    "visual.trunk.norm.weight": "visual.ln_post.weight",
    "visual.trunk.norm.bias": "visual.ln_post.bias",
    "visual.trunk.attn_pool.proj.weight": "visual.attn_pool.out_proj.weight",
    "visual.trunk.attn_pool.proj.bias": "visual.attn_pool.out_proj.bias",
    "visual.trunk.attn_pool.norm.weight": "visual.attn_pool.ln.weight",
    "visual.trunk.attn_pool.norm.bias": "visual.attn_pool.ln.bias",
    "visual.trunk.attn_pool.mlp.fc1.weight": "visual.attn_pool.mlp.c_fc.weight",
    "visual.trunk.attn_pool.mlp.fc1.bias": "visual.attn_pool.mlp.c_fc.bias",
    "visual.trunk.attn_pool.mlp.fc2.weight": "visual.attn_pool.mlp.c_proj.weight",
    "visual.trunk.attn_pool.mlp.fc2.bias": "visual.attn_pool.mlp.c_proj.bias",
}
# Flattened to the canonical [N, W] / [W] shapes; scalars may be saved as [1] (OpenCLIP's nonscalar_logit_scale).
OPEN_CLIP_RESHAPED = {
    "visual.trunk.pos_embed": "visual.positional_embedding",
    "visual.trunk.attn_pool.latent": "visual.attn_pool.probe",
    "logit_scale": "logit_scale",
    "logit_bias": "logit_bias",
}
TIMM_BLOCK_RENAMED = {
    "norm1.weight": "ln_1.weight",
    "norm1.bias": "ln_1.bias",
    "attn.qkv.weight": "attn.in_proj_weight",
    "attn.qkv.bias": "attn.in_proj_bias",
    "attn.proj.weight": "attn.out_proj.weight",
    "attn.proj.bias": "attn.out_proj.bias",
    "norm2.weight": "ln_2.weight",
    "norm2.bias": "ln_2.bias",
    "mlp.fc1.weight": "mlp.c_fc.weight",
    "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight",
    "mlp.fc2.bias": "mlp.c_proj.bias",
}
_TIMM_BLOCK = re.compile(r"^visual\.trunk\.blocks\.(?P<index>\d+)\.(?P<rest>.+)$")
_TIMM_POOL_QKV = re.compile(r"^visual\.trunk\.attn_pool\.(?P<part>q|kv)\.(?P<kind>weight|bias)$")


def _reshaped(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """Scalars to shape [], the probe to [W], position tables to [N, W]."""
    if key in ("logit_scale", "logit_bias"):
        return tensor.reshape(())
    return tensor.reshape(-1) if key.endswith("probe") else tensor.reshape(-1, tensor.shape[-1])


def is_open_clip_siglip(state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether ``state_dict`` is an OpenCLIP SigLIP (a timm image tower with an attention-pooling head)."""
    return any(key.startswith(OPEN_CLIP_MARKER) for key in state_dict)


def convert_open_clip_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP SigLIP tensors -> canonical keys. Raises :class:`CheckpointMismatchError` on keys it does not know."""
    converted: dict[str, torch.Tensor] = {}
    pool_qkv: dict[str, dict[str, torch.Tensor]] = {}  # weight|bias -> {q, kv}
    unknown: list[str] = []
    for key, tensor in state_dict.items():
        if key.startswith("text."):
            converted[key.removeprefix("text.")] = tensor
        elif key in OPEN_CLIP_RENAMED:
            converted[OPEN_CLIP_RENAMED[key]] = tensor
        elif key in OPEN_CLIP_RESHAPED:
            converted[OPEN_CLIP_RESHAPED[key]] = _reshaped(OPEN_CLIP_RESHAPED[key], tensor)
        elif (part := _TIMM_POOL_QKV.match(key)) is not None:
            pool_qkv.setdefault(part["kind"], {})[part["part"]] = tensor
        elif (block := _TIMM_BLOCK.match(key)) is not None and block["rest"] in TIMM_BLOCK_RENAMED:
            converted[f"visual.transformer.resblocks.{int(block['index'])}.{TIMM_BLOCK_RENAMED[block['rest']]}"] = (
                tensor
            )
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointMismatchError(
            f"not an OpenCLIP SigLIP checkpoint: {len(unknown)} unknown key(s), "
            f"e.g. {', '.join(unknown[:MAX_REPORTED_KEYS])}"
        )
    for kind, parts in pool_qkv.items():
        if set(parts) != {"q", "kv"}:
            raise CheckpointMismatchError(f"visual.trunk.attn_pool: q.{kind} and kv.{kind} must both be present")
        converted[f"visual.attn_pool.in_proj_{kind}"] = torch.cat([parts["q"], parts["kv"]], dim=0)
    return converted


def is_hf_siglip_state_dict(state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether ``state_dict`` holds HF ``SiglipModel`` keys (a lone ``model.safetensors``, without its folder)."""
    return HF_MARKER in state_dict


def convert_hf_siglip_state_dict(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ``SiglipModel`` tensors -> canonical keys. Raises :class:`CheckpointMismatchError` on unknown keys."""
    converted: dict[str, torch.Tensor] = {}
    blocks: dict[str, torch.Tensor] = {}
    for key, tensor in weights.items():
        if key in HF_DROPPED:
            continue
        if key in HF_RENAMED:
            converted[HF_RENAMED[key]] = tensor
        elif key == HF_MARKER:
            converted["visual.attn_pool.probe"] = _reshaped("probe", tensor)
        elif key in HF_RESHAPED:
            converted[key] = _reshaped(key, tensor)
        else:
            blocks[key] = tensor  # encoder layers, named as in HF's CLIP; anything else is refused there
    converted.update(convert_hf_state_dict(blocks))
    return converted


def is_hf_siglip_dir(path: Path) -> bool:
    """True for a folder with a ``SiglipModel`` (or ``Siglip2Model``) ``config.json`` and its weights."""
    config_path = path / CONFIG_FILE
    if not path.is_dir() or not config_path.is_file() or hf_weight_file(path) is None:
        return False
    try:
        config = read_json(config_path)
    except CheckpointError:
        return False
    architectures = config.get("architectures") or []
    siglip_types = (MODEL_TYPE, NAFLEX_MODEL_TYPE)
    return config.get("model_type") in siglip_types or (
        isinstance(architectures, list) and ARCHITECTURE in architectures
    )


def sentencepiece_file_in(folder: Path) -> Path | None:
    """The SentencePiece vocabulary saved beside the weights (``spiece.model``, ``tokenizer.model`` or
    ``sentencepiece.bpe.model``), if any."""
    return next((folder / name for name in SENTENCEPIECE_FILES if (folder / name).is_file()), None)


def _tower(config: dict[str, Any], tower: str, defaults: dict[str, Any]) -> dict[str, Any]:
    section = config.get(f"{tower}_config")
    return {**defaults, **({k: v for k, v in section.items() if v is not None} if isinstance(section, dict) else {})}


def _flavor(folder: Path, vocab_size: int) -> SentencePieceFlavor:
    """SigLIP 2 (Gemma) when the tokenizer config or the vocabulary size says so, else SigLIP."""
    path = folder / TOKENIZER_CONFIG
    tokenizer_class = read_json(path).get("tokenizer_class") if path.is_file() else None
    if tokenizer_class is not None:
        return "siglip2" if tokenizer_class in SIGLIP2_TOKENIZER_CLASSES else "siglip"
    return "siglip2" if vocab_size == GEMMA_VOCAB_SIZE else "siglip"


def _activation_and_eps(text: dict[str, Any], vision: dict[str, Any]) -> tuple[Activation, float]:
    acts = {tower: cfg["hidden_act"] for tower, cfg in (("text", text), ("vision", vision))}
    unknown = {t: a for t, a in acts.items() if a not in HF_ACTIVATIONS}
    if unknown:
        raise CheckpointMismatchError(f"hidden_act {unknown}: supported are {', '.join(sorted(HF_ACTIVATIONS))}")
    if HF_ACTIVATIONS[acts["text"]] != HF_ACTIVATIONS[acts["vision"]]:
        raise CheckpointMismatchError(f"the towers use different activations: {acts}; the canonical model uses one")
    if float(text["layer_norm_eps"]) != float(vision["layer_norm_eps"]):
        raise CheckpointMismatchError("the towers use different layer_norm_eps; the canonical model uses one")
    return HF_ACTIVATIONS[acts["text"]], float(text["layer_norm_eps"])


def _preprocess(folder: Path) -> PreprocessConfig:
    """SigLIP's squash resize with the statistics of ``preprocessor_config.json`` (default 0.5 / 0.5)."""
    path = folder / PREPROCESSOR_FILE
    data = read_json(path) if path.is_file() else {}
    mean, std = data.get("image_mean"), data.get("image_std")
    if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == IMAGE_CHANNELS):
        return SIGLIP_PREPROCESS
    return PreprocessConfig.from_dict({"mean": mean, "std": std}, default=SIGLIP_PREPROCESS)


def hf_siglip_config(folder: Path) -> SigLIPConfig:
    """The :class:`SigLIPConfig` of a HF ``SiglipModel`` folder (its config.json, tokenizer_config.json and
    preprocessor_config.json). Raises :class:`CheckpointMismatchError` for what the canonical model cannot express."""
    config = read_json(folder / CONFIG_FILE)
    if config.get("model_type") == NAFLEX_MODEL_TYPE:
        raise CheckpointMismatchError(
            f"{folder}: a Siglip2Model (NaFlex, variable resolution) checkpoint; only the fixed-resolution "
            "SigLIP 2 models (SiglipModel folders, e.g. google/siglip2-base-patch16-224) are supported"
        )
    text, vision = _tower(config, "text", TEXT_DEFAULTS), _tower(config, "vision", VISION_DEFAULTS)
    if not vision["vision_use_head"] or int(vision["num_channels"]) != IMAGE_CHANNELS:
        raise CheckpointMismatchError(f"{folder}: only RGB image towers with their attention-pooling head load")
    activation, eps = _activation_and_eps(text, vision)
    return SigLIPConfig(
        embed_dim=int(text.get("projection_size") or text["hidden_size"]),
        vision=VisionConfig(
            image_size=square_side(vision["image_size"], "vision_config.image_size"),
            layers=int(vision["num_hidden_layers"]),
            width=int(vision["hidden_size"]),
            heads=int(vision["num_attention_heads"]),
            patch_size=square_side(vision["patch_size"], "vision_config.patch_size"),
            mlp_width=int(vision["intermediate_size"]),
        ),
        text=TextConfig(
            width=int(text["hidden_size"]),
            heads=int(text["num_attention_heads"]),
            layers=int(text["num_hidden_layers"]),
            context_length=int(text["max_position_embeddings"]),
            vocab_size=int(text["vocab_size"]),
            mlp_width=int(text["intermediate_size"]),
        ),
        tokenizer=_flavor(folder, int(text["vocab_size"])),
        activation=activation,
        layer_norm_eps=eps,
        preprocess=_preprocess(folder),
    )


def read_hf_siglip(path: Path) -> tuple[dict[str, torch.Tensor], SigLIPConfig]:
    """Canonical state dict and config of a HF ``SiglipModel`` folder. Tensors keep their stored dtype.

    Raises :class:`CheckpointError` for unreadable folders/files and :class:`CheckpointMismatchError` for unknown
    keys and configs the canonical model cannot express; missing or surplus keys are reported when the model is built.
    """
    if not is_hf_siglip_dir(path):
        raise CheckpointError(f"{path}: not a Hugging Face SiglipModel folder ({CONFIG_FILE} + weights)")
    config = hf_siglip_config(path)
    state_dict = convert_hf_siglip_state_dict(read_hf_weights(path))
    logger.debug("converted %d HF SigLIP tensors from %s", len(state_dict), path)
    return state_dict, config
