"""Hugging Face ``transformers`` CLIPModel checkpoints, converted to the canonical (OpenAI) state dict layout.

A ``save_pretrained`` folder holds ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``, or shards
listed in a ``*.index.json``). HF keeps query/key/value as three Linear layers where OpenAI packs them into one
``in_proj`` matrix, stores the two projections as bias-free Linear weights (``[out, in]``) where OpenAI keeps plain
``[in, out]`` matrices, and names everything else differently; :func:`read_hf_clip` maps all of it and builds the
:class:`CLIPConfig` from ``config.json``. HF CLIP is always a ViT.

Text pooling: HF picks the first position holding ``eos_token_id`` (49407 in current configs), or ``argmax`` of the
ids when ``eos_token_id`` is the legacy value 2. OpenAI pools at ``argmax`` of the ids. CLIP's end-of-text token is
the largest id of its vocabulary and ``argmax`` returns the first maximum, so for rows from CLIP's tokenizer (each
holding an end-of-text token) both rules pick the same position.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .config import Activation, CLIPConfig, PreprocessConfig, TextConfig, VisionConfig
from .errors import CheckpointError, CheckpointMismatchError, UnsafeCheckpointError

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS_FILE, SAFETENSORS_INDEX, PICKLE_FILE, PICKLE_INDEX)  # in order of preference
MODEL_TYPE = "clip"
ARCHITECTURE = "CLIPModel"
LEGACY_EOS_TOKEN_ID = 2  # HF configs from before the eos fix; HF then pools at argmax like OpenAI
LAYER_NORM_EPS = 1e-5  # what the canonical model uses
MLP_RATIO = 4  # the canonical text tower's MLP width is 4 x its width
IMAGE_CHANNELS = 3
MAX_REPORTED_KEYS = 5
ACTIVATIONS: dict[str, Activation] = {"quick_gelu": "quick_gelu", "gelu": "gelu"}  # HF hidden_act -> ours

# HF's documented defaults, for config.json files that leave fields out.
TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "eos_token_id": 49407,
}
VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
DEFAULT_PROJECTION_DIM = 512

# HF key -> canonical key, for the tensors that only change name.
RENAMED = {
    "logit_scale": "logit_scale",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",  # sic: HF's spelling
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
}
# HF bias-free Linear weight ([out, in]) -> canonical projection matrix ([in, out]).
TRANSPOSED = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}
DROPPED = frozenset({"text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"})
TOWER_BLOCKS = {"text_model": "transformer.resblocks", "vision_model": "visual.transformer.resblocks"}
BLOCK_RENAMED = {
    "self_attn.out_proj.weight": "attn.out_proj.weight",
    "self_attn.out_proj.bias": "attn.out_proj.bias",
    "layer_norm1.weight": "ln_1.weight",
    "layer_norm1.bias": "ln_1.bias",
    "layer_norm2.weight": "ln_2.weight",
    "layer_norm2.bias": "ln_2.bias",
    "mlp.fc1.weight": "mlp.c_fc.weight",
    "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight",
    "mlp.fc2.bias": "mlp.c_proj.bias",
}
QKV_ORDER = ("q", "k", "v")  # the order OpenAI's packed in_proj rows follow
_BLOCK_KEY = re.compile(r"^(?P<tower>text_model|vision_model)\.encoder\.layers\.(?P<index>\d+)\.(?P<rest>.+)$")
_QKV_KEY = re.compile(r"^self_attn\.(?P<part>[qkv])_proj\.(?P<kind>weight|bias)$")
_BLOCKED_GLOBAL = re.compile(r"GLOBAL:?\s+([\w.]+)")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def hf_weight_file(folder: Path) -> Path | None:
    return next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)


def is_hf_clip_dir(path: Path) -> bool:
    """True for a folder with a CLIPModel ``config.json`` and its weights (single file or sharded index)."""
    config_path = path / CONFIG_FILE
    if not path.is_dir() or not config_path.is_file() or hf_weight_file(path) is None:
        return False
    try:
        config = read_json(config_path)
    except CheckpointError:
        return False
    architectures = config.get("architectures") or []
    return config.get("model_type") == MODEL_TYPE or (isinstance(architectures, list) and ARCHITECTURE in architectures)


def _load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if path.name.endswith(".safetensors"):
        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: cannot read safetensors: {exc}") from exc
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        blocked = _BLOCKED_GLOBAL.search(str(exc))
        if blocked:
            raise UnsafeCheckpointError(f"{path}: refusing to load global {blocked.group(1)}") from exc
        raise CheckpointError(f"{path}: cannot read checkpoint: {exc}") from exc
    except (OSError, EOFError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint: {exc}") from exc
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(loaded).__name__}")
    return loaded


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, from one file or from the shards an index lists."""
    weight_file = hf_weight_file(folder)
    if weight_file is None:
        raise CheckpointError(f"{folder}: no {' / '.join(WEIGHT_FILES)} found")
    if not weight_file.name.endswith(".index.json"):
        return _load_weight_file(weight_file)
    weight_map = read_json(weight_file).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{weight_file}: no weight_map")
    weights: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if not isinstance(shard, str) or Path(shard).name != shard:  # shards live beside the index, nowhere else
            raise CheckpointError(f"{weight_file}: shard name {shard!r} is not a plain file name")
        weights.update(_load_weight_file(folder / shard))
    missing = sorted(set(weight_map) - set(weights))
    if missing:
        raise CheckpointError(f"{weight_file}: the shards lack {', '.join(missing[:MAX_REPORTED_KEYS])}")
    return weights


def _tower_config(config: dict[str, Any], tower: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """HF defaults, then ``<tower>_config``, then the older ``<tower>_config_dict`` (which HF lets win)."""
    merged = dict(defaults)
    for key in (f"{tower}_config", f"{tower}_config_dict"):
        section = config.get(key)
        if isinstance(section, dict):
            merged.update({k: v for k, v in section.items() if v is not None})
    return merged


def square_side(value: Any, what: str) -> int:
    if isinstance(value, list | tuple):
        if len(value) != 2 or value[0] != value[1]:
            raise CheckpointMismatchError(f"{what} {value!r}: only square images and patches are supported")
        value = value[0]
    return int(value)


def _activation(text: dict[str, Any], vision: dict[str, Any]) -> Activation:
    acts = {tower: cfg["hidden_act"] for tower, cfg in (("text", text), ("vision", vision))}
    for tower, act in acts.items():
        if act not in ACTIVATIONS:
            raise CheckpointMismatchError(
                f"{tower}_config.hidden_act {act!r}: supported are {', '.join(sorted(ACTIVATIONS))}"
            )
    if acts["text"] != acts["vision"]:
        raise CheckpointMismatchError(f"the towers use different activations: {acts}; the canonical model uses one")
    return ACTIVATIONS[acts["text"]]


def _preprocess(folder: Path) -> PreprocessConfig:
    """Normalization statistics from ``preprocessor_config.json`` when present, else OpenAI's."""
    path = folder / PREPROCESSOR_FILE
    if not path.is_file():
        return PreprocessConfig()
    data = read_json(path)
    mean, std = data.get("image_mean"), data.get("image_std")
    if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == IMAGE_CHANNELS):
        return PreprocessConfig()
    return PreprocessConfig(
        mean=(float(mean[0]), float(mean[1]), float(mean[2])), std=(float(std[0]), float(std[1]), float(std[2]))
    )


def _clip_config(folder: Path) -> CLIPConfig:
    config = read_json(folder / CONFIG_FILE)
    text = _tower_config(config, "text", TEXT_DEFAULTS)
    vision = _tower_config(config, "vision", VISION_DEFAULTS)
    activation = _activation(text, vision)
    if int(vision["num_channels"]) != IMAGE_CHANNELS:
        raise CheckpointMismatchError(f"vision_config.num_channels {vision['num_channels']}: only RGB is supported")
    if int(text["intermediate_size"]) != MLP_RATIO * int(text["hidden_size"]):
        raise CheckpointMismatchError(
            f"text_config.intermediate_size {text['intermediate_size']}: the canonical text MLP is "
            f"{MLP_RATIO} x hidden_size ({MLP_RATIO * int(text['hidden_size'])})"
        )
    for tower, cfg in (("text", text), ("vision", vision)):
        if float(cfg["layer_norm_eps"]) != LAYER_NORM_EPS:
            logger.warning(
                "%s_config.layer_norm_eps is %s; the canonical model uses %s",
                tower,
                cfg["layer_norm_eps"],
                LAYER_NORM_EPS,
            )
    eos = text.get("eos_token_id")
    if eos not in (LEGACY_EOS_TOKEN_ID, int(text["vocab_size"]) - 1):
        logger.warning("text_config.eos_token_id is %r: HF pools there, the canonical model at the largest id", eos)
    return CLIPConfig(
        embed_dim=int(config.get("projection_dim") or DEFAULT_PROJECTION_DIM),
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
        ),
        activation=activation,
        preprocess=_preprocess(folder),
    )


def _expected_keys(text_layers: int, vision_layers: int) -> set[str]:
    """The canonical ViT CLIP keys for towers of these depths."""
    block = (
        "ln_1.weight ln_1.bias attn.in_proj_weight attn.in_proj_bias attn.out_proj.weight attn.out_proj.bias "
        "ln_2.weight ln_2.bias mlp.c_fc.weight mlp.c_fc.bias mlp.c_proj.weight mlp.c_proj.bias"
    ).split()
    keys = set(RENAMED.values()) | set(TRANSPOSED.values())
    for tower, layers in (("text_model", text_layers), ("vision_model", vision_layers)):
        keys |= {f"{TOWER_BLOCKS[tower]}.{i}.{name}" for i in range(layers) for name in block}
    return keys


def convert_hf_state_dict(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIPModel tensors -> canonical keys. Raises :class:`CheckpointMismatchError` on any key it does not know."""
    converted: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # (block prefix, weight|bias) -> {q, k, v}
    unknown: list[str] = []
    for key, tensor in weights.items():
        if key in DROPPED:
            continue
        if key in RENAMED:
            converted[RENAMED[key]] = tensor
        elif key in TRANSPOSED:
            converted[TRANSPOSED[key]] = tensor.t().contiguous()
        elif block := _BLOCK_KEY.match(key):
            prefix = f"{TOWER_BLOCKS[block['tower']]}.{int(block['index'])}"
            if block["rest"] in BLOCK_RENAMED:
                converted[f"{prefix}.{BLOCK_RENAMED[block['rest']]}"] = tensor
            elif part := _QKV_KEY.match(block["rest"]):
                qkv.setdefault((prefix, part["kind"]), {})[part["part"]] = tensor
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointMismatchError(
            f"not a HF CLIPModel checkpoint: {len(unknown)} unknown key(s), "
            f"e.g. {', '.join(unknown[:MAX_REPORTED_KEYS])}"
        )
    for (prefix, kind), parts in qkv.items():
        lacking = [p for p in QKV_ORDER if p not in parts]
        if lacking:
            raise CheckpointMismatchError(f"{prefix}: {'/'.join(lacking)}_proj.{kind} missing beside the others")
        target = "attn.in_proj_weight" if kind == "weight" else "attn.in_proj_bias"
        converted[f"{prefix}.{target}"] = torch.cat([parts[p] for p in QKV_ORDER], dim=0)
    return converted


def read_hf_clip(path: Path) -> tuple[dict[str, torch.Tensor], CLIPConfig]:
    """Canonical state dict and config of a HF CLIPModel folder. Tensors keep their stored dtype.

    Raises :class:`CheckpointError` for unreadable folders/files, :class:`UnsafeCheckpointError` for a
    ``pytorch_model.bin`` that names non-tensor globals, :class:`CheckpointMismatchError` for unknown, missing or
    surplus keys and for configs the canonical model cannot express.
    """
    if not is_hf_clip_dir(path):
        raise CheckpointError(f"{path}: not a Hugging Face CLIPModel folder ({CONFIG_FILE} + weights)")
    config = _clip_config(path)
    state_dict = convert_hf_state_dict(read_hf_weights(path))
    vision_layers = config.vision.layers if isinstance(config.vision.layers, int) else 0  # always a ViT here
    expected = _expected_keys(config.text.layers, vision_layers)
    missing, surplus = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or surplus:
        raise CheckpointMismatchError(
            f"{path}: weights do not fit config.json: missing {missing[:MAX_REPORTED_KEYS]}, "
            f"surplus {surplus[:MAX_REPORTED_KEYS]}"
        )
    logger.debug("converted %d HF CLIP tensors from %s", len(state_dict), path)
    return state_dict, config
