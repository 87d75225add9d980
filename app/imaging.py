"""Images in and out of the server: strict decoding of uploads, files and thumbnails served by id.

Uploads are untrusted: only the formats in :func:`allowed_formats` are even probed (``Image.open(formats=...)``),
the pixel count is checked from the header before any pixel is decoded, truncated data is an error (Pillow's
``LOAD_TRUNCATED_IMAGES`` stays off) and only the first frame of an animation is read. JPEGs decode at a reduced
DCT scale by the indexer's own rule (``clip_model.preprocess.apply_draft``), so an upload of an indexed file embeds like
the file did.

Files are served by catalog id only; the catalog's stored path maps to the file through
``indexer.store.reader.file_path`` and the resolved path must lie inside the image root (symlinks out of it and ``..``
are refused). Thumbnails are made once per (file, size, mtime) and cached as JPEG files. An indexed file that no
longer decodes (replaced by something else, truncated, unreadable, or with more pixels than the server decodes) is a
StaleFileError (409) that says to re-run the indexer; one that is gone is a NotFoundError (404).
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
from clip_model.preprocess import apply_draft, to_rgb
from indexer.store.reader import file_path

from .errors import InvalidImageError, NotFoundError, PayloadTooLargeError, StaleFileError, UnsupportedImageError

logger = logging.getLogger(__name__)

BASE_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF")
THUMBNAIL_QUALITY = 85
THUMBNAIL_FORMAT_SUFFIX = ".jpg"
DECODE_ERRORS = (OSError, EOFError, SyntaxError, ValueError, ImageDecodeError)
# Every way Pillow reports a file it cannot (or will not) decode; UnidentifiedImageError is an OSError
FILE_DECODE_ERRORS = (Image.DecompressionBombError, *DECODE_ERRORS)
REINDEX_HINT = "if the file changed since it was indexed, run the indexer to update the index"


@lru_cache(maxsize=1)
def allowed_formats() -> tuple[str, ...]:
    """Pillow format names uploads may have: the common photo formats, AVIF if Pillow has it, HEIF if the
    optional pillow-heif plugin is installed."""
    formats = list(BASE_FORMATS)
    if features.check("avif"):
        formats.append("AVIF")
    try:
        from pillow_heif import register_heif_opener  # type: ignore[import-not-found,unused-ignore]  # optional extra
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
    try:
        apply_draft(image, image_size)
        return to_rgb(image)
    except DECODE_ERRORS as exc:
        raise InvalidImageError(f"cannot decode the image (truncated or corrupt?): {exc}") from None


def resolve_image_path(image_root: Path, stored: str) -> Path:
    """The file of a catalog path (its stored form), which must exist inside ``image_root`` (after resolving
    symlinks). NotFoundError when it is gone or lies outside; StaleFileError for a stored form this version cannot
    read (a catalog from another version)."""
    root = image_root.resolve()
    try:
        candidate = file_path(root, stored).resolve()
    except ValueError as exc:
        raise StaleFileError(f"cannot map the catalog path to a file ({exc}): run the indexer to rebuild") from None
    if not candidate.is_relative_to(root):
        logger.warning("refusing to serve %r: it resolves outside the image root %s", stored, root)
        raise NotFoundError(f"the file of {stored!r} lies outside the image folder")
    if not candidate.is_file():
        raise NotFoundError(f"{stored!r} is no longer in the image folder (run the indexer to update the index)")
    return candidate


def stat_readable(path: Path) -> os.stat_result:
    """``path``'s stat, once it is known to be a readable regular file: NotFoundError if it went away meanwhile,
    StaleFileError if it cannot be read (permissions)."""
    try:
        stat = path.stat()
        readable = os.access(path, os.R_OK)
    except OSError:
        raise NotFoundError(f"{path.name!r} is no longer in the image folder (run the indexer)") from None
    if not readable:
        raise StaleFileError(f"cannot read {path.name!r} (permission denied): fix its permissions or re-index")
    return stat


class ThumbnailCache:
    """JPEG thumbnails on disk, keyed by the source file's path, size, mtime and the thumbnail side; sources with
    more than ``max_pixels`` pixels to decode (after JPEG drafting) are refused."""

    def __init__(self, directory: Path, max_pixels: int) -> None:
        self.directory = directory
        self.max_pixels = max_pixels

    @staticmethod
    def key(source: Path, side: int) -> str:
        """Stable name of a thumbnail: it changes whenever the source file changes."""
        stat = source.stat()
        raw = f"{source}\0{stat.st_size}\0{stat.st_mtime_ns}\0{side}"
        return hashlib.sha256(raw.encode("utf-8", "surrogateescape")).hexdigest()[:32]

    def get(self, source: Path, side: int) -> tuple[Path, str]:
        """(path of the cached thumbnail, its key) for ``source`` at ``side`` pixels, made now if missing.
        NotFoundError if the source went away, StaleFileError if it no longer decodes (see :func:`make_thumbnail`)."""
        try:
            key = self.key(source, side)
        except OSError:
            raise NotFoundError(f"{source.name!r} is no longer in the image folder (run the indexer)") from None
        path = self.directory / key[:2] / f"{key}{THUMBNAIL_FORMAT_SUFFIX}"
        if not path.is_file():
            self._write(path, make_thumbnail(source, side, self.max_pixels))
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


def make_thumbnail(source: Path, side: int, max_pixels: int) -> bytes:
    """JPEG bytes of ``source`` upright, fitted inside ``side`` x ``side`` (aspect kept, never enlarged).

    Raises StaleFileError (the message says to re-run the indexer) when the file cannot be read or decoded, or
    would decode to more than ``max_pixels`` pixels (JPEGs are drafted first, so only their reduced size counts).
    """
    try:
        with Image.open(source) as image:
            image.draft("RGB", (side, side))
            width, height = image.size
            if width * height > max_pixels:
                raise StaleFileError(
                    f"cannot make a thumbnail of {source.name!r}: it is {width} x {height} pixels, more than the "
                    f"server decodes ({max_pixels}, CLIPSEARCH_MAX_IMAGE_PIXELS); {REINDEX_HINT}"
                )
            upright = to_rgb(image)
            thumb = ImageOps.contain(upright, (side, side)) if max(upright.size) > side else upright
            out = io.BytesIO()
            thumb.save(out, "JPEG", quality=THUMBNAIL_QUALITY, optimize=True)
    except FILE_DECODE_ERRORS as exc:
        raise StaleFileError(f"cannot make a thumbnail of {source.name!r} ({exc}): {REINDEX_HINT}") from None
    return out.getvalue()
