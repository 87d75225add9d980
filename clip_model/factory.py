"""``load`` and friends: turn a model name or a checkpoint path into ``(model, preprocess)``.

A name is looked up in the pretrained registry (downloaded once into the cache, sha256-verified); a path is read
by :mod:`clip_model.checkpoint`. Nothing here ever substitutes random weights for missing ones: random init is
only what :func:`create_model` gives, on purpose.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal, get_args

import torch

from .checkpoint import build_model, read_checkpoint
from .config import CLIPConfig, PreprocessConfig, get_config, list_configs
from .download import download_weights
from .errors import UnknownModelError
from .model import CLIP
from .preprocess import Preprocess
from .pretrained import list_pretrained, resolve_pretrained
from .quantize import quantize_int8

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "int8"]  # inference arithmetic: float32, or int8 linear layers on the CPU (quantize_int8)
PRECISIONS: tuple[Precision, ...] = get_args(Precision)


def available_models() -> list[str]:
    """Names :func:`load` accepts besides paths: pretrained tags (``"ViT-B-32/openai"``) and their aliases."""
    return list_pretrained()


def preprocess_for(config: CLIPConfig) -> Preprocess:
    """The image transform matching ``config``'s input size and normalization statistics."""
    return Preprocess(config.vision.image_size, mean=config.preprocess.mean, std=config.preprocess.std)


def _place(model: CLIP, device: str | torch.device, dtype: torch.dtype | None) -> CLIP:
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)


def _check_precision(precision: str, device: str | torch.device, dtype: torch.dtype | None) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}; got {precision!r}")
    if precision != "int8":
        return
    if torch.device(device).type != "cpu":
        raise ValueError(f"precision='int8' runs on the CPU only, not on {device}; use precision='fp32' (and dtype=)")
    if dtype not in (None, torch.float32):
        raise ValueError(f"precision='int8' quantizes a float32 model; leave dtype unset, not {dtype}")


def load(
    name_or_path: str | Path,
    device: str | torch.device = "cpu",
    *,
    arch: str | None = None,
    dtype: torch.dtype | None = None,
    precision: Precision = "fp32",
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[CLIP, Preprocess]:
    """Load pretrained CLIP weights.

    Args:
        name_or_path: a registry name (``"ViT-B-32"``, ``"ViT-B/32"``, ``"ViT-L-14/laion2b_s32b_b82k"``; see
            :func:`available_models`), a checkpoint file (OpenAI ``.pt``, OpenCLIP ``.pt``/``.bin``/``.safetensors``)
            or a Hugging Face CLIPModel directory.
        device: where the model goes. Weights are read as float32.
        arch: architecture config name (see :func:`clip_model.config.list_configs`) for checkpoint files that do not
            carry one; by default it is read from the file or inferred from its shapes.
        dtype: e.g. ``torch.float16`` on a GPU; default float32.
        precision: ``"fp32"`` (default) or ``"int8"``: CPU-only inference with int8 linear layers
            (:func:`clip_model.quantize.quantize_int8`); the encoders still return float32.
        cache_dir: download cache for registry names; default :func:`clip_model.download.default_cache_dir`.
        progress: show a progress bar while downloading.
    Returns:
        ``(model, preprocess)``: the model in eval mode and the PIL -> ``[3, R, R]`` transform it expects.
    Raises:
        ValueError: an unknown ``precision``, or ``"int8"`` with a non-CPU device or a dtype other than float32.
    """
    _check_precision(precision, device, dtype)
    path = Path(name_or_path).expanduser()
    config = get_config(arch) if arch is not None else None
    weights = None if path.exists() else resolve_pretrained(str(name_or_path))
    if weights is not None:
        path = download_weights(weights, Path(cache_dir) if cache_dir else None, progress=progress)
        pre = PreprocessConfig(mean=tuple(weights.mean), std=tuple(weights.std))  # type: ignore[arg-type]  # 3 floats
        config = (config or get_config(weights.config)).with_preprocess(pre)
    elif not path.exists():
        raise UnknownModelError(_unknown_message(str(name_or_path)))
    model = build_model(read_checkpoint(path), config)
    logger.info("loaded %s (%s) from %s", name_or_path, model.config.name or "inferred config", path)
    if precision == "int8":
        model = quantize_int8(model)
        logger.info("quantized %s to int8", name_or_path)
    return _place(model, device, dtype), preprocess_for(model.config)


def create_model(
    arch: str | CLIPConfig, device: str | torch.device = "cpu", *, seed: int | None = None
) -> tuple[CLIP, Preprocess]:
    """A randomly initialised CLIP of architecture ``arch`` (for training from scratch and tests), in train mode."""
    config = arch if isinstance(arch, CLIPConfig) else get_config(arch)
    if seed is not None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = CLIP(config)
    else:
        model = CLIP(config)
    return model.to(device), preprocess_for(config)


def _unknown_message(name: str) -> str:
    if name in list_configs():
        return (
            f"{name!r} is an architecture with no registered pretrained weights; pass a checkpoint path "
            f"(load('/path/to/weights', arch={name!r})) or call create_model({name!r}) for random weights"
        )
    return (
        f"{name!r} is neither an existing file or directory nor a known model; "
        f"known models: {', '.join(available_models())}"
    )
