"""Per-file decode step of the indexer, run in worker processes: file bytes -> content hash + uint8 model-input crop.

Contract of ``decode_file(root, scanned, spec)``:

- ``scanned.path`` is in the stored form of :mod:`indexer.paths`; the file opened is ``paths.file_path(root, path)``
  and results carry the stored form unchanged. Logs show it through ``paths.display`` (one line, whatever the name).
- The file is read once, in full, unless ``fstat`` says it exceeds ``spec.max_bytes``; ``content_hash`` is the
  sha256 of exactly the bytes decoded, and ``size``/``mtime_ns`` describe the file as it was read.
- The image's pixel count is checked against ``spec.max_pixels`` from its header, before any pixel is decoded.
- JPEGs are decoded at a reduced size through the decoder's DCT scaling when ``spec.draft``, by
  ``clip_model.preprocess.apply_draft``: the largest of the 1/2, 1/4, 1/8 scales that keeps BOTH sides
  >= ``DRAFT_MARGIN * image_size``, so the bicubic resize that follows still reduces each side by >= 2x. The crop then
  differs from the full decode by about one 8-bit level on average (see tests/indexer/test_decode.py).
  ``width``/``height`` are always the upright ORIGINAL size.
- The photo's metadata (:func:`indexer.photo_metadata.read_metadata`: capture time, camera, GPS only with
  ``spec.gps``, ...) is read from the same opened image once it is decoded (a PNG's EXIF chunk may follow its
  pixel data), so a file is read once.
- Then ``clip_model.preprocess.to_rgb`` (EXIF orientation, alpha over white, first frame of animations) and
  ``resize_for`` with ``spec.resize_mode`` (CLIP's shortest side + centre crop, or SigLIP's squash of the whole
  image) -> ``pixels`` uint8 ``[R, R, 3]``; the main process normalizes batches with
  ``clip_model.preprocess.normalize_pixels``, which equals ``Preprocess(R, mean, std, resize_mode)`` exactly. After a
  draft both rules still shrink every side by >= ``DRAFT_MARGIN``, so the draft rule above holds for either.
- Any failure gives a ``DecodeFailure`` whose ``reason`` starts with one of ``REASON_CATEGORIES`` and a colon (or is
  exactly "empty file"); nothing raises. Results are plain dataclasses of str/int/numpy: they pickle across
  spawned processes, and no torch tensor is created here.

Pillow warnings raised while decoding (decompression-bomb warnings, corrupt EXIF) are recorded and logged at debug
level with ``warnings.catch_warnings``, which is process-global: call ``decode_file`` from one thread at a time per
process. Pillow's own hard limit (``2 * PIL.Image.MAX_IMAGE_PIXELS``, ~179 M pixels by default) still applies on top
of ``max_pixels``; above it the reason quotes Pillow's message instead of the width and height.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import numpy as np
import numpy.typing as npt
from PIL import Image, UnidentifiedImageError, features

from clip_model.config import ResizeMode
from clip_model.preprocess import (
    DRAFT_FORMATS,
    EXIF_ORIENTATION_TAG,
    Triple,
    apply_draft,
    resize_for,
    to_rgb,
)

from . import paths
from .photo_metadata import PhotoMetadata, read_metadata
from .scan import AVIF_EXTENSIONS, HEIF_EXTENSIONS, ScannedFile, enable_heif, extension_of

logger = logging.getLogger(__name__)

# 150 MP medium-format cameras (Phase One IQ4: 14204 x 10652 = 151.3 M pixels) pass; a non-JPEG image at the limit
# needs ~480 MB of RGB per worker while decoding (JPEGs are drafted to 1/8 of that).
DEFAULT_MAX_PIXELS = 160_000_000
DEFAULT_MAX_BYTES = 512 * 1024 * 1024  # 512 MiB: larger files are skipped without being read
RESIZE_MODES: tuple[ResizeMode, ...] = get_args(ResizeMode)
TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})  # EXIF orientations whose upright image swaps width and height
REASON_CATEGORIES = (
    "empty file",
    "missing",
    "unreadable",
    "too large",
    "not an image",
    "unsupported format",
    "decompression bomb",
    "truncated",
    "corrupt",
)
TRUNCATED_MARKER = "truncated"  # Pillow's messages for data that ends early: "image file is truncated ..."
UNSUPPORTED_MARKERS = ("not available", "cannot convert image mode", "unsupported")


@dataclass(frozen=True)
class DecodeSpec:
    """How to turn a file into model input: side ``image_size``, ``mean``/``std``, the model's resize rule
    (``"shortest"``: resize and centre crop; ``"squash"``: the whole image to the square) and the safety limits."""

    image_size: int
    mean: Triple
    std: Triple
    resize_mode: ResizeMode = "shortest"
    draft: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    gps: bool = False  # read GPS positions into the metadata (off unless the user asked)

    def __post_init__(self) -> None:
        if self.image_size < 1 or self.max_pixels < 1 or self.max_bytes < 0 or self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"invalid DecodeSpec: {self}")


@dataclass(frozen=True, eq=False)  # eq=False: comparing numpy fields with == is ambiguous
class Decoded:
    """A decoded file: ``pixels`` is the uint8 ``[R, R, 3]`` RGB crop, not normalized; ``width``/``height`` upright."""

    path: str
    size: int
    mtime_ns: int
    content_hash: str  # sha256 hex of the file bytes
    width: int
    height: int
    pixels: npt.NDArray[np.uint8]
    metadata: PhotoMetadata = PhotoMetadata()


@dataclass(frozen=True)
class DecodeFailure:
    """A file that was skipped; ``reason`` starts with a stable category (``REASON_CATEGORIES``)."""

    path: str
    size: int
    mtime_ns: int
    content_hash: str | None  # None when the bytes were never read
    reason: str


class _Rejected(Exception):
    """Internal: a file refused on purpose, with its final ``reason``."""


def decode_file(root: Path, scanned: ScannedFile, spec: DecodeSpec) -> Decoded | DecodeFailure:
    """Read, hash, check and decode the file ``scanned.path`` (stored form) names under ``root`` into model-input
    pixels; never raises for a bad file."""
    shown = paths.display(scanned.path)
    size, mtime_ns, content_hash = scanned.size, scanned.mtime_ns, None
    try:
        with open(paths.file_path(root, scanned.path), "rb") as file:
            stat = os.fstat(file.fileno())
            size, mtime_ns = stat.st_size, stat.st_mtime_ns
            if size > spec.max_bytes:
                raise _Rejected(f"too large: {size} bytes exceeds the limit of {spec.max_bytes}")
            data = file.read(spec.max_bytes + 1)
        size = len(data)
        if size > spec.max_bytes:  # grew after the fstat
            raise _Rejected(f"too large: more than {spec.max_bytes} bytes")
        content_hash = hashlib.sha256(data).hexdigest()
        if not data:
            raise _Rejected("empty file")
        width, height, pixels, metadata = _decode_pixels(data, scanned.path, spec)
        return Decoded(scanned.path, size, mtime_ns, content_hash, width, height, pixels, metadata)
    except _Rejected as rejected:
        reason = str(rejected)
    except Exception as exc:  # the per-file skip boundary: whatever goes wrong skips this file only
        reason = _failure_reason(exc, scanned.path, read=content_hash is not None)
        logger.debug("decoding %s failed", shown, exc_info=True)
    logger.debug("skipping %s: %s", shown, reason)
    return DecodeFailure(scanned.path, size, mtime_ns, content_hash, reason)


def _decode_pixels(
    data: bytes, relative: str, spec: DecodeSpec
) -> tuple[int, int, npt.NDArray[np.uint8], PhotoMetadata]:
    """(upright original width, height, uint8 crop [R, R, 3], metadata) of an encoded image."""
    if extension_of(relative) in HEIF_EXTENSIONS:
        enable_heif()  # registers the opener in this (worker) process if pillow-heif is installed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size  # from the header: nothing decoded yet
            if width * height > spec.max_pixels:
                raise _Rejected(
                    f"decompression bomb: {width} x {height} = {width * height} pixels "
                    f"exceeds the limit of {spec.max_pixels}"
                )
            drafting = spec.draft and image.format in DRAFT_FORMATS
            if drafting:  # the JPEG header gives the stored size; EXIF says how it stands upright
                if image.getexif().get(EXIF_ORIENTATION_TAG, 1) in TRANSPOSED_ORIENTATIONS:
                    width, height = height, width
                apply_draft(image, spec.image_size)
            upright = to_rgb(image)
            metadata = read_metadata(image, gps=spec.gps)  # after decoding: PNG's EXIF may follow the pixels
            if not drafting:
                width, height = upright.size  # full size (TIFF, for one, turns upright inside Pillow's loader)
            crop = resize_for(upright, spec.image_size, spec.resize_mode)
            pixels = np.array(crop, dtype=np.uint8)  # [R, R, 3], owned and C-contiguous
    for warning in caught:
        logger.debug("%s: %s", paths.display(relative), warning.message)
    return width, height, pixels, metadata


def _failure_reason(exc: Exception, relative: str, read: bool) -> str:
    """Map an exception from reading (``read`` False) or decoding to a reason with a stable category prefix."""
    if not read:
        if isinstance(exc, FileNotFoundError):
            return "missing: the file disappeared after the scan"
        if isinstance(exc, PermissionError):
            return "unreadable: permission denied"
        if isinstance(exc, OSError):
            return f"unreadable: {exc.strerror or exc}"
        return f"unreadable: {type(exc).__name__}: {exc}"
    extension = extension_of(relative)
    if isinstance(exc, Image.DecompressionBombError):
        return f"decompression bomb: {exc}"
    if isinstance(exc, UnidentifiedImageError):
        if extension in HEIF_EXTENSIONS and not enable_heif():
            return f"unsupported format: .{extension} needs the optional pillow-heif package"
        if extension in AVIF_EXTENSIONS and not features.check("avif"):
            return "unsupported format: this Pillow build cannot decode AVIF"
        return "not an image: Pillow recognises no image format in the data"
    if isinstance(exc, MemoryError):
        return "too large: out of memory while decoding"
    message = str(exc)
    if isinstance(exc, OSError | EOFError | SyntaxError | ValueError):  # Pillow's errors; ImageDecodeError too
        if TRUNCATED_MARKER in message or isinstance(exc, EOFError):
            return f"truncated: {message}"
        if any(marker in message for marker in UNSUPPORTED_MARKERS):
            return f"unsupported format: {message}"
        return f"corrupt: {message}"
    return f"corrupt: {type(exc).__name__}: {message}"
