"""Read any supported checkpoint into one canonical (OpenAI-layout) float32 state dict, without executing code.

Supported inputs:
- OpenAI TorchScript archives (``ViT-B-32.pt``): read by :mod:`clip_model.torchscript`'s restricted unpickler.
- Plain state dicts (OpenCLIP ``.pt``/``.bin``, our own training checkpoints): ``torch.load(weights_only=True)``;
  ``state_dict``/``model`` wrappers and ``module.`` prefixes are removed.
- ``.safetensors`` files (OpenCLIP, and the files :func:`save_checkpoint` writes, which carry their config).
- Hugging Face ``transformers`` CLIPModel directories, converted by :mod:`clip_model.hf_convert`.
- SigLIP: OpenCLIP's layout (any of the containers above), Hugging Face ``SiglipModel`` directories and their
  ``model.safetensors`` alone, converted by :mod:`clip_model.siglip_convert`; :func:`build_model` then makes a
  :class:`~clip_model.siglip.SigLIP`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import torch

from .config import (
    Activation,
    ModelConfig,
    PreprocessConfig,
    ResizeMode,
    config_from_dict,
    infer_config,
    infer_siglip_config,
    infer_xlm_roberta_config,
    with_known_name,
)
from .errors import CheckpointError, CheckpointMismatchError
from .hf_convert import is_hf_clip_dir, read_hf_clip
from .model import CLIP, ImageTextModel, model_for
from .siglip_convert import (
    convert_hf_siglip_state_dict,
    convert_open_clip_state_dict,
    is_hf_siglip_dir,
    is_hf_siglip_state_dict,
    is_open_clip_siglip,
    read_hf_siglip,
    sentencepiece_file_in,
)
from .torchscript import OPENAI_EXTRA_KEYS, is_torchscript_archive, read_torchscript_state_dict

logger = logging.getLogger(__name__)

CONFIG_METADATA_KEY = "clip_model_config"  # safetensors metadata entry holding the architecture as JSON
WRAPPER_KEYS = ("state_dict", "model", "module")  # dict entries that wrap the real state dict in training checkpoints
PREFIXES = ("module.", "_orig_mod.")  # added by DistributedDataParallel and torch.compile
OPEN_CLIP_CONFIG = "open_clip_config.json"  # written next to the weights in OpenCLIP's hub folders
OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
NON_PERSISTENT_KEYS = ("attn_mask", "position_ids")  # buffers some writers saved (causal masks, transformers'
# position ids); rebuilt by our models
SHOWN_KEYS = 5  # keys named in a mismatch message
SAFETENSORS_SNIFF_BYTES = 9  # 8-byte header length + the header's opening brace
SIGLIP_KEY = "logit_bias"  # canonical SigLIP state dicts have it, CLIP's do not
XLM_ROBERTA_KEY = "text.transformer.embeddings.word_embeddings.weight"  # OpenCLIP's multilingual text tower


@dataclass
class Checkpoint:
    """A canonical state dict plus whatever architecture information the file carried."""

    state_dict: dict[str, torch.Tensor]
    config: ModelConfig | None
    activation: Activation | None  # known even without a full config (OpenAI archives: QuickGELU)
    source_format: str  # "torchscript", "hf", "safetensors", "state_dict"
    preprocess_cfg: dict[str, Any] | None = None  # mean, std (and resize_mode) when open_clip_config.json says
    image_size: int | None = None  # the input side, when the folder's open_clip_config.json says
    tokenizer_path: Path | None = None  # a SentencePiece vocabulary found beside the weights


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read ``path`` (file or HF directory) into float32 tensors on CPU; never runs code from the file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir() and not is_hf_clip_dir(path) and not is_hf_siglip_dir(path):
        path = _open_clip_weights_in(path)
    if path.is_dir():
        state_dict, config = read_hf_siglip(path) if is_hf_siglip_dir(path) else read_hf_clip(path)
        ckpt = Checkpoint(state_dict, config, config.activation, "hf")
    elif _looks_like_safetensors(path):
        ckpt = _read_safetensors(path)
    elif zipfile.is_zipfile(path) and is_torchscript_archive(path):
        ckpt = Checkpoint(read_torchscript_state_dict(path), None, "quick_gelu", "torchscript")
    else:
        ckpt = _read_torch_file(path)
    ckpt.state_dict = _canonical(ckpt.state_dict, path)
    folder = path if path.is_dir() else path.parent
    if ckpt.config is None and (folder / OPEN_CLIP_CONFIG).is_file():
        ckpt.activation, ckpt.preprocess_cfg, ckpt.image_size = _read_open_clip_config(folder / OPEN_CLIP_CONFIG)
    if SIGLIP_KEY in ckpt.state_dict or XLM_ROBERTA_KEY in ckpt.state_dict:
        ckpt.tokenizer_path = sentencepiece_file_in(folder)
    return ckpt


def _open_clip_weights_in(folder: Path) -> Path:
    """The weights file of an OpenCLIP hub folder (``open_clip_config.json`` + one weights file)."""
    found = [folder / name for name in OPEN_CLIP_WEIGHT_FILES if (folder / name).is_file()]
    if not (folder / OPEN_CLIP_CONFIG).is_file() or not found:
        raise CheckpointError(
            f"{folder} is a directory but neither a Hugging Face CLIPModel (config.json + model.safetensors or "
            f"pytorch_model.bin) nor an OpenCLIP folder ({OPEN_CLIP_CONFIG} + {' or '.join(OPEN_CLIP_WEIGHT_FILES)})"
        )
    return found[0]


def _read_open_clip_config(path: Path) -> tuple[Activation, dict[str, Any] | None, int | None]:
    """Activation, preprocessing and input side from OpenCLIP's ``open_clip_config.json`` (``quick_gelu`` is
    absent if false; a SigLIP's towers ignore the activation: timm and OpenCLIP do not record theirs there)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    model_cfg = data.get("model_cfg") or {}
    activation: Activation = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    pre = {k: v for k, v in (data.get("preprocess_cfg") or {}).items() if k in ("mean", "std", "resize_mode")}
    if pre.get("resize_mode", "shortest") not in get_args(ResizeMode):
        logger.warning("%s: resize_mode %r is not supported; the config's own rule is used", path, pre["resize_mode"])
        del pre["resize_mode"]
    side = (model_cfg.get("vision_cfg") or {}).get("image_size")
    return activation, pre if "mean" in pre and "std" in pre else None, side if isinstance(side, int) else None


def _looks_like_safetensors(path: Path) -> bool:
    """Sniff the content, not the name: safetensors opens with a little-endian u64 header size, then ``{``."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(SAFETENSORS_SNIFF_BYTES)
    return len(head) == SAFETENSORS_SNIFF_BYTES and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1


def _read_safetensors(path: Path) -> Checkpoint:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        state_dict = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for corrupt headers and truncation
        raise CheckpointError(f"cannot read safetensors file {path}: {exc}") from exc
    config = config_from_dict(json.loads(metadata[CONFIG_METADATA_KEY])) if CONFIG_METADATA_KEY in metadata else None
    return Checkpoint(state_dict, config, config.activation if config else None, "safetensors")


def _read_torch_file(path: Path) -> Checkpoint:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError for disallowed globals, RuntimeError for corrupt zips
        raise CheckpointError(f"cannot read {path} as a weights-only torch checkpoint: {exc}") from exc
    config = None
    if isinstance(obj, dict) and isinstance(obj.get("config"), dict):
        config = config_from_dict(obj["config"])
    while isinstance(obj, dict) and not _holds_tensors(obj):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            raise CheckpointMismatchError(f"{path}: no state dict found; top-level keys: {_first(obj)}")
        obj = inner
    if not isinstance(obj, dict):
        raise CheckpointMismatchError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return Checkpoint(obj, config, config.activation if config else None, "state_dict")


def _holds_tensors(obj: dict[str, Any]) -> bool:
    return any(isinstance(v, torch.Tensor) for v in obj.values())


def _first(keys: Any) -> str:
    keys = list(keys)
    return ", ".join(map(str, keys[:SHOWN_KEYS])) + (", ..." if len(keys) > SHOWN_KEYS else "")


def _canonical(state_dict: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes, drop known non-weights, and make floating tensors float32."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for prefix in PREFIXES:
            key = key.removeprefix(prefix)
        if key in OPENAI_EXTRA_KEYS or key.rsplit(".", 1)[-1] in NON_PERSISTENT_KEYS:
            continue
        if not isinstance(value, torch.Tensor):
            raise CheckpointMismatchError(f"{path}: {key} holds a {type(value).__name__}, not a tensor")
        out[key] = value.float() if value.is_floating_point() else value
    if is_open_clip_siglip(out):
        out = convert_open_clip_state_dict(out)
    elif is_hf_siglip_state_dict(out):
        out = convert_hf_siglip_state_dict(out)
    if "text_projection" not in out and not any(k.startswith("visual.") for k in out):
        raise CheckpointMismatchError(
            f"{path}: not a CLIP checkpoint in any known layout (OpenAI, OpenCLIP, Hugging Face); "
            f"first keys: {_first(out)}"
        )
    return out


def check_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Raise CheckpointMismatchError naming missing, unexpected or misshapen keys; silent when all fit."""
    expected = model.state_dict()
    problems = [f"{k}: missing from the checkpoint" for k in expected if k not in state_dict]
    problems += [f"{k}: not a parameter of this architecture" for k in state_dict if k not in expected]
    problems += [
        f"{k}: expected shape {tuple(expected[k].shape)}, got {tuple(v.shape)}"
        for k, v in state_dict.items()
        if k in expected and expected[k].shape != v.shape
    ]
    if problems:
        more = f" (and {len(problems) - SHOWN_KEYS} more)" if len(problems) > SHOWN_KEYS else ""
        raise CheckpointMismatchError(
            "checkpoint does not fit the architecture: " + "; ".join(problems[:SHOWN_KEYS]) + more
        )


def _implied_config(ckpt: Checkpoint) -> ModelConfig:
    """The config a checkpoint carries, or the one its shapes and its folder's open_clip_config.json imply."""
    if ckpt.config is not None:
        return ckpt.config
    if SIGLIP_KEY in ckpt.state_dict:
        config: ModelConfig = infer_siglip_config(ckpt.state_dict, image_size=ckpt.image_size)
    elif XLM_ROBERTA_KEY in ckpt.state_dict:
        config = infer_xlm_roberta_config(ckpt.state_dict)
    else:
        config = infer_config(ckpt.state_dict, activation=ckpt.activation)
        if ckpt.activation is None:
            logger.warning(
                "the checkpoint does not say which MLP activation it was trained with; assuming %s (config %s). "
                "Pass arch= to load() to choose another.",
                config.activation,
                config.name or "inferred",
            )
    if ckpt.preprocess_cfg is not None:
        config = config.with_preprocess(PreprocessConfig.from_dict(ckpt.preprocess_cfg, default=config.preprocess))
    return config


def build_model(ckpt: Checkpoint, config: ModelConfig | None = None) -> ImageTextModel:
    """A CLIP or SigLIP in eval mode holding ``ckpt``'s weights; ``config`` overrides what the file says or implies."""
    config = with_known_name(config or _implied_config(ckpt))
    with torch.device("meta"):  # no random init of weights that are about to be replaced
        model = model_for(config)
    check_state_dict(model, ckpt.state_dict)
    model.load_state_dict(ckpt.state_dict, strict=True, assign=True)
    if not isinstance(model, CLIP):
        model.tokenizer_path = ckpt.tokenizer_path
    return model.eval()


def save_checkpoint(model: ImageTextModel, path: str | Path, metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``model`` as a ``.safetensors`` file whose metadata carries its config, so it loads without arch=.

    ``metadata``: more string entries for the file's metadata (a fine-tuned model's provenance); readers ignore them.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_checkpoint writes safetensors; name the file *.safetensors, not {path.name}")
    if metadata is not None and CONFIG_METADATA_KEY in metadata:
        raise ValueError(f"metadata must not replace {CONFIG_METADATA_KEY!r}, the model's own config")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        entries = {**(metadata or {}), CONFIG_METADATA_KEY: json.dumps(model.config.to_dict())}
        save_file(state, str(partial), metadata=entries)
        os.replace(partial, path)  # readers see the old file or the complete new one, never a torn write
    finally:
        partial.unlink(missing_ok=True)
    return path


def weights_sha256(model: torch.nn.Module) -> str:
    """Fingerprint of a model's weights, independent of the file format they came from.

    sha256 over every state-dict entry in key order: its name, shape and float32 (or integer) little-endian bytes.
    Two models give the same digest exactly when they compute the same function with the same parameters, so an
    index can record which weights produced its embeddings, whether they were loaded from .pt, .safetensors or a
    Hugging Face folder.
    """
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().to("cpu")
        value = value.float() if value.is_floating_point() else value
        digest.update(f"{key}:{tuple(value.shape)}:{value.dtype}\n".encode())
        array = value.contiguous().numpy()
        digest.update(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    return digest.hexdigest()
