"""``load`` and friends: turn a model name or a checkpoint path into ``(model, preprocess)``, and a model into its
tokenizer (:func:`tokenizer_for`).

A name is looked up in the pretrained registry (downloaded once into the cache, sha256-verified, with a SigLIP's
SentencePiece vocabulary); a path is read by :mod:`clip_model.checkpoint`. Nothing here ever substitutes random
weights for missing ones: random init is only what :func:`create_model` gives, on purpose.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal, get_args

import torch

from .checkpoint import build_model, read_checkpoint
from .config import ModelConfig, PreprocessConfig, get_config, list_configs
from .download import download_tokenizer, download_weights
from .errors import TokenizerError, UnknownModelError
from .model import CLIP, ImageTextModel, model_for
from .preprocess import Preprocess
from .pretrained import list_pretrained, resolve_pretrained
from .quantize import quantize_int8
from .siglip import SigLIP
from .tokenizer import Tokenizer, get_tokenizer, trim_tokens
from .tokenizer_sentencepiece import SentencePieceTokenizer, load_sentencepiece

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "int8"]  # inference arithmetic: float32, or int8 linear layers on the CPU (quantize_int8)
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
TextTokenizer = Tokenizer | SentencePieceTokenizer  # both: (texts, context_length, truncate) -> LongTensor [N, L]


def available_models() -> list[str]:
    """Names :func:`load` accepts besides paths: pretrained tags (``"ViT-B-32/openai"``) and their aliases."""
    return list_pretrained()


def preprocess_for(config: ModelConfig) -> Preprocess:
    """The image transform matching ``config``'s input size, normalization statistics and resize rule."""
    pre = config.preprocess
    return Preprocess(config.vision.image_size, mean=pre.mean, std=pre.std, resize_mode=pre.resize_mode)


def _place(model: ImageTextModel, device: str | torch.device, dtype: torch.dtype | None) -> ImageTextModel:
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
) -> tuple[ImageTextModel, Preprocess]:
    """Load pretrained CLIP or SigLIP weights.

    Args:
        name_or_path: a registry name (``"ViT-B-32"``, ``"ViT-B/32"``, ``"ViT-L-14/laion2b_s32b_b82k"``,
            ``"ViT-B-16-SigLIP/webli"``; see :func:`available_models`), a checkpoint file (OpenAI ``.pt``, OpenCLIP
            ``.pt``/``.bin``/``.safetensors``), an OpenCLIP hub folder, or a Hugging Face CLIPModel or SiglipModel
            directory. A SigLIP's SentencePiece vocabulary is read from beside the weights (``spiece.model``,
            ``tokenizer.model``) or downloaded with registry weights; see :func:`tokenizer_for`.
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
    tokenizer_path = None
    if weights is not None:
        cache = Path(cache_dir) if cache_dir else None
        path = download_weights(weights, cache, progress=progress)
        tokenizer_path = download_tokenizer(weights, cache, progress=progress) if weights.tokenizer else None
        config = config or get_config(weights.config)
        config = config.with_preprocess(PreprocessConfig(weights.mean, weights.std, config.preprocess.resize_mode))
    elif not path.exists():
        raise UnknownModelError(_unknown_message(str(name_or_path)))
    model = build_model(read_checkpoint(path), config)
    if not isinstance(model, CLIP) and tokenizer_path is not None:
        model.tokenizer_path = tokenizer_path
    logger.info("loaded %s (%s) from %s", name_or_path, model.config.name or "inferred config", path)
    if precision == "int8":
        model = quantize_int8(model)
        logger.info("quantized %s to int8", name_or_path)
    return _place(model, device, dtype), preprocess_for(model.config)


def create_model(
    arch: str | ModelConfig, device: str | torch.device = "cpu", *, seed: int | None = None
) -> tuple[ImageTextModel, Preprocess]:
    """A randomly initialised CLIP or SigLIP of architecture ``arch`` (for training from scratch and tests), in
    train mode."""
    config = get_config(arch) if isinstance(arch, str) else arch
    with torch.random.fork_rng(enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        model = model_for(config)
    return model.to(device), preprocess_for(config)


def tokenizer_for(model: ImageTextModel) -> TextTokenizer:
    """The tokenizer whose rows ``model.encode_text`` expects; call it with ``context_length=model.context_length``.

    CLIP: the shared BPE tokenizer. SigLIP and XLM-RoBERTa CLIP: the SentencePiece tokenizer of
    ``model.config.tokenizer``'s flavor over ``model.tokenizer_path``, read once per file. Raises
    :class:`TokenizerError` for such a model without a vocabulary file (random weights, or a checkpoint with no
    ``spiece.model`` / ``tokenizer.model`` / ``sentencepiece.bpe.model`` beside it: set ``model.tokenizer_path``)
    or with one larger than its embedding table, and
    :class:`~clip_model.errors.MissingDependencyError` when sentencepiece is not installed.
    """
    if isinstance(model, CLIP):
        return get_tokenizer()
    if model.tokenizer_path is None:
        raise TokenizerError(
            f"this {type(model).__name__} ({model.config.name or 'unnamed config'}) has no SentencePiece vocabulary: "
            "put the file its weights were published with (spiece.model, tokenizer.model for SigLIP 2, "
            "sentencepiece.bpe.model for XLM-RoBERTa) beside the checkpoint, or set model.tokenizer_path"
        )
    tokenizer = load_sentencepiece(Path(model.tokenizer_path), model.config.tokenizer)
    if tokenizer.vocab_size > model.config.text.vocab_size:
        raise TokenizerError(
            f"{model.tokenizer_path} has {tokenizer.vocab_size} pieces, more than the {model.config.text.vocab_size} "
            "token embeddings of the model: not the vocabulary these weights were trained with"
        )
    return tokenizer


def trim_for(model: ImageTextModel, tokens: torch.Tensor) -> torch.Tensor:
    """``tokens [B, L]`` from :func:`tokenizer_for` cut to the columns ``model.encode_text`` needs: the same features
    for less work. CLIP: after the batch's last end-of-text token (:func:`~clip_model.tokenizer.trim_tokens`; the
    causal mask hides what follows); XLM-RoBERTa: after the last column holding a non-padding token (padding is
    masked out); SigLIP: not cut, since it reads the last position of the full row."""
    if isinstance(model, CLIP):
        return trim_tokens(tokens)
    if isinstance(model, SigLIP):
        return tokens
    used = (tokens != model.config.text.pad_token_id).any(dim=0).nonzero()
    return tokens[:, : int(used.max()) + 1] if used.numel() else tokens


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
