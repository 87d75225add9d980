"""Images in and out of the server: strict decoding of uploads, files and thumbnails served by id.

Uploads are untrusted: only the formats in :func:`allowed_formats` are even probed (``Image.open(formats=...)``),
the pixel count is checked from the header before any pixel is decoded, truncated data is an error (Pillow's
``LOAD_TRUNCATED_IMAGES`` stays off) and only the first frame of an animation is read. JPEGs decode at a reduced
DCT scale that keeps both sides >= 2x the model's input, as the indexer does, so an upload of an indexed file
embeds like the file did.

Files are served by catalog id only; the resolved path must lie inside the image root (symlinks out of it and
``..`` are refused). Thumbnails are made once per (file, size, mtime) and cached as JPEG files.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError, features

from clip_model.errors import ImageDecodeError
from clip_model.preprocess import to_rgb

from .errors import InvalidImageError, NotFoundError, PayloadTooLargeError, UnsupportedImageError

logger = logging.getLogger(__name__)

BASE_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF")
DRAFT_MARGIN = 2  # drafted JPEG sides stay >= DRAFT_MARGIN * the model's input size (see indexer/decode.py)
THUMBNAIL_QUALITY = 85
THUMBNAIL_FORMAT_SUFFIX = ".jpg"
DECODE_ERRORS = (OSError, EOFError, SyntaxError, ValueError, ImageDecodeError)


@lru_cache(maxsize=1)
def allowed_formats() -> tuple[str, ...]:
    """Pillow format names uploads may have: the common photo formats, AVIF if Pillow has it, HEIF if the
    optional pillow-heif plugin is installed."""
    formats = list(BASE_FORMATS)
    if features.check("avif"):
        formats.append("AVIF")
    try:
        from pillow_heif import register_heif_opener  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        pass
    else:
        register_heif_opener()
        formats.append("HEIF")
    Image.init()  # registers every built-in opener; MPO files are opened by the JPEG opener
    return tuple(f for f in formats if f in Image.OPEN)


def decode_upload(data: bytes, image_size: int, max_pixels: int) -> Image.Image:
    """Upright 8-bit RGB image from uploaded bytes, JPEGs drafted for a model input of ``image_size``.

    Raises UnsupportedImageError (415) for data that is no accepted image format, PayloadTooLargeError (413) for
    more than ``max_pixels`` pixels, InvalidImageError (422) for truncated or corrupt data.
    """
    if not data:
        raise InvalidImageError("the uploaded file is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=allowed_formats())
    except UnidentifiedImageError:
        raise UnsupportedImageError(
            f"the upload is not an image in an accepted format ({', '.join(allowed_formats())})"
        ) from None
    except Image.DecompressionBombError as exc:  # over 2x Pillow's MAX_IMAGE_PIXELS
        raise PayloadTooLargeError(f"image refused as a decompression bomb: {exc}") from None
    except DECODE_ERRORS as exc:
        raise InvalidImageError(f"cannot read the image header: {exc}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise PayloadTooLargeError(
            f"image is {width} x {height} = {width * height} pixels, the limit is {max_pixels}: send a smaller one"
        )
    if image.format in ("JPEG", "MPO"):
        image.draft(image.mode, (DRAFT_MARGIN * image_size, DRAFT_MARGIN * image_size))
    try:
        return to_rgb(image)
    except DECODE_ERRORS as exc:
        raise InvalidImageError(f"cannot decode the image (truncated or corrupt?): {exc}") from None


def resolve_image_path(image_root: Path, relative: str) -> Path:
    """The file of a catalog path, which must exist inside ``image_root`` (after resolving symlinks)."""
    root = image_root.resolve()
    candidate = (root / relative).resolve()
    if not candidate.is_relative_to(root):
        logger.warning("refusing to serve %s: it resolves outside the image root %s", relative, root)
        raise NotFoundError(f"the file of {relative!r} lies outside the image folder")
    if not candidate.is_file():
        raise NotFoundError(f"{relative!r} is no longer in the image folder (run the indexer to update the index)")
    return candidate


class ThumbnailCache:
    """JPEG thumbnails on disk, keyed by the source file's path, size, mtime and the thumbnail side."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @staticmethod
    def key(source: Path, side: int) -> str:
        """Stable name of a thumbnail: it changes whenever the source file changes."""
        stat = source.stat()
        raw = f"{source}\0{stat.st_size}\0{stat.st_mtime_ns}\0{side}"
        return hashlib.sha256(raw.encode("utf-8", "surrogateescape")).hexdigest()[:32]

    def get(self, source: Path, side: int) -> tuple[Path, str]:
        """(path of the cached thumbnail, its key) for ``source`` at ``side`` pixels, made now if missing."""
        key = self.key(source, side)
        path = self.directory / key[:2] / f"{key}{THUMBNAIL_FORMAT_SUFFIX}"
        if not path.is_file():
            self._write(path, make_thumbnail(source, side))
        return path, key

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=THUMBNAIL_FORMAT_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
            os.replace(tmp, path)  # concurrent makers of one thumbnail each replace it with the same bytes
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def make_thumbnail(source: Path, side: int) -> bytes:
    """JPEG bytes of ``source`` upright, fitted inside ``side`` x ``side`` (aspect kept, never enlarged)."""
    try:
        with Image.open(source) as image:
            image.draft("RGB", (side, side))
            upright = to_rgb(image)
            thumb = ImageOps.contain(upright, (side, side)) if max(upright.size) > side else upright
            out = io.BytesIO()
            thumb.save(out, "JPEG", quality=THUMBNAIL_QUALITY, optimize=True)
    except (UnidentifiedImageError, *DECODE_ERRORS) as exc:
        raise InvalidImageError(f"cannot make a thumbnail of {source.name}: {exc}") from None
    return out.getvalue()
