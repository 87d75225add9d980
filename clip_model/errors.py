"""Exceptions raised by clip_model. Library code raises these; only callers (CLI, app) map them to exits or HTTP."""

from __future__ import annotations


class ClipModelError(Exception):
    """Base class for every error clip_model raises on purpose."""


class UnknownModelError(ClipModelError, ValueError):
    """A model name is neither a known architecture, a pretrained tag, nor an existing path."""


class CheckpointError(ClipModelError):
    """A checkpoint file could not be read (corrupt, truncated, unsupported container)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint asked to construct something other than tensors and inert containers (e.g. ``os.system``)."""


class CheckpointMismatchError(CheckpointError):
    """A state dict does not fit the architecture: missing/unexpected keys or wrong shapes."""


class DownloadError(ClipModelError):
    """Pretrained weights could not be fetched or failed verification."""


class ChecksumMismatchError(DownloadError):
    """A downloaded or cached file does not have the sha256 the registry records."""


class TokenizerError(ClipModelError, ValueError):
    """Text cannot be tokenized as asked (e.g. longer than the context and ``truncate=False``)."""


class ImageDecodeError(ClipModelError, ValueError):
    """An image cannot be converted to RGB for the encoder (unsupported mode, broken data)."""


class MissingDependencyError(ClipModelError, ImportError):
    """An optional package a model needs is not installed; the message names the extra that installs it."""
