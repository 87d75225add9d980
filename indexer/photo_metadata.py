"""What a photo says about itself: capture time, camera, lens, GPS position, orientation and format, read from the
image the decoder has already opened (its header and EXIF, never a second read of the file).

Contract of :func:`read_metadata`:

* Capture time is the camera's wall clock: EXIF ``DateTimeOriginal`` (else ``DateTimeDigitized``, else the IFD0
  ``DateTime``), as whole seconds since 1970-01-01T00:00:00 *of that wall clock* (``taken_at``: the local time read as
  if it were UTC, so that "taken on 2024-06-01" means the date the photographer saw), with the camera's UTC offset
  in minutes from the matching ``OffsetTime*`` tag when the file has one (``taken_offset_min``; None when unknown).
  Dates that are missing, zero ("0000:00:00 00:00:00") or malformed give None; the catalog then falls back to the
  file's mtime and says so (:mod:`indexer.store.filters`).
* Camera make and model, lens model: the EXIF strings stripped of padding and NULs, None when absent or empty.
* GPS position in decimal degrees (south and west negative), only when ``gps`` is true: people share indexes and
  screenshots of results, so a position is stored only when the user asked for it.
* Orientation: EXIF 1..8 (None when absent or out of range). Format: Pillow's format name in lowercase ("jpeg",
  "png", "webp", "heif", ...; a multi-picture JPEG from a phone, "mpo", is "jpeg").
* Never raises for a bad file: a corrupt EXIF block gives the fields that could be read, the others None.
"""

from __future__ import annotations

import calendar
import json
import logging
import math
import re
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from PIL import Image

logger = logging.getLogger(__name__)

METADATA_VERSION = 1  # of this extractor: rows extracted by an older one are read again by the next build
EXIF_IFD, GPS_IFD = 0x8769, 0x8825
MAKE, MODEL, ORIENTATION, DATE_TIME = 0x010F, 0x0110, 0x0112, 0x0132
DATE_TIME_ORIGINAL, DATE_TIME_DIGITIZED = 0x9003, 0x9004
OFFSET_TIME, OFFSET_TIME_ORIGINAL, OFFSET_TIME_DIGITIZED = 0x9010, 0x9011, 0x9012
LENS_MODEL = 0xA434
GPS_LATITUDE_REF, GPS_LATITUDE, GPS_LONGITUDE_REF, GPS_LONGITUDE = 1, 2, 3, 4
FORMAT_ALIASES = {"mpo": "jpeg"}
_DATE_RE = re.compile(r"\s*(\d{4}):(\d{2}):(\d{2})[ T](\d{2}):(\d{2}):(\d{2})")
_OFFSET_RE = re.compile(r"\s*([+-])(\d{2}):(\d{2})")


@dataclass(frozen=True)
class PhotoMetadata:
    """One image's metadata (module docstring); every field None when unknown."""

    taken_at: int | None = None  # wall-clock seconds since 1970-01-01T00:00 of the camera's clock
    taken_offset_min: int | None = None  # the camera's UTC offset, minutes
    camera_make: str | None = None
    camera_model: str | None = None
    lens: str | None = None
    gps_lat: float | None = None
    gps_lon: float | None = None
    orientation: int | None = None  # EXIF 1..8
    format: str | None = None  # lowercase Pillow format name

    def to_json(self) -> str:
        """Compact JSON of the known fields (the shard column and the catalog's record of them)."""
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> PhotoMetadata:
        """The inverse of :meth:`to_json`; ValueError naming the problem for anything else."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"photo metadata must be a JSON object, got {type(data).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown photo metadata fields {unknown}")
        for name, value in data.items():
            if value is not None and not _has_type(name, value):
                raise ValueError(f"photo metadata field {name!r} has the wrong type: {value!r}")
        return cls(**data)

    def without_gps(self) -> PhotoMetadata:
        return PhotoMetadata(**{**asdict(self), "gps_lat": None, "gps_lon": None})


def _has_type(name: str, value: Any) -> bool:
    if name in ("gps_lat", "gps_lon"):
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if name in ("taken_at", "taken_offset_min", "orientation"):
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, str)


def read_metadata(image: Image.Image, *, gps: bool = False) -> PhotoMetadata:
    """The metadata of an opened ``image`` (its pixels need not be loaded), by the module docstring's rules."""
    image_format = (image.format or "").lower() or None
    image_format = FORMAT_ALIASES.get(image_format or "", image_format)
    try:
        exif = image.getexif()
    except Exception:  # a corrupt EXIF block: the format is still known
        logger.debug("unreadable EXIF", exc_info=True)
        return PhotoMetadata(format=image_format)
    base = _ifd(exif, None)
    details = _ifd(exif, EXIF_IFD)
    taken_at, offset = None, None
    for date_tag, offset_tag, where in (
        (DATE_TIME_ORIGINAL, OFFSET_TIME_ORIGINAL, details),
        (DATE_TIME_DIGITIZED, OFFSET_TIME_DIGITIZED, details),
        (DATE_TIME, OFFSET_TIME, base),
    ):
        taken_at = _wall_clock_seconds(where.get(date_tag))
        if taken_at is not None:
            offset = _offset_minutes(details.get(offset_tag))
            break
    orientation = base.get(ORIENTATION)
    latitude, longitude = _gps(_ifd(exif, GPS_IFD)) if gps else (None, None)
    return PhotoMetadata(
        taken_at=taken_at,
        taken_offset_min=offset,
        camera_make=_text(base.get(MAKE)),
        camera_model=_text(base.get(MODEL)),
        lens=_text(details.get(LENS_MODEL)),
        gps_lat=latitude,
        gps_lon=longitude,
        orientation=orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else None,
        format=image_format,
    )


def read_file_metadata(path: Path, *, gps: bool = False) -> PhotoMetadata:
    """:func:`read_metadata` of the image file at ``path``, opening only its header (no pixel is decoded); an empty
    PhotoMetadata when the file cannot be opened as an image (the build's scan decides what happens to it)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # corrupt EXIF and the like: read_metadata keeps what it can
            with Image.open(path) as image:
                return read_metadata(image, gps=gps)
    except Exception:  # unreadable or not an image now: nothing to say about it
        logger.debug("cannot read the metadata of %s", path, exc_info=True)
        return PhotoMetadata()


def _ifd(exif: Image.Exif, tag: int | None) -> dict[int, Any]:
    try:
        return dict(exif if tag is None else exif.get_ifd(tag))
    except Exception:  # a sub-IFD that points outside the block, or loops
        logger.debug("unreadable EXIF IFD %s", tag, exc_info=True)
        return {}


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    cleaned = value.replace("\x00", "").strip()
    return cleaned[:200] or None


def _wall_clock_seconds(value: Any) -> int | None:
    """``"2024:06:01 14:03:59"`` -> seconds since 1970-01-01T00:00 of the same clock; None for anything else."""
    text = _text(value)
    match = _DATE_RE.match(text or "")
    if match is None:
        return None
    year, month, day, hour, minute, second = (int(part) for part in match.groups())
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour <= 23 and minute <= 59 and second <= 60 and year >= 1):
        return None
    try:
        return calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    except (OverflowError, ValueError):
        return None


def _offset_minutes(value: Any) -> int | None:
    """``"+02:00"`` -> 120, ``"-05:30"`` -> -330; None for anything else (or beyond +-18 h)."""
    match = _OFFSET_RE.match(_text(value) or "")
    if match is None:
        return None
    sign, hours, minutes = match.groups()
    total = int(hours) * 60 + int(minutes)
    return None if total > 18 * 60 or int(minutes) > 59 else (-total if sign == "-" else total)


def _gps(ifd: dict[int, Any]) -> tuple[float | None, float | None]:
    latitude = _degrees(ifd.get(GPS_LATITUDE), ifd.get(GPS_LATITUDE_REF), "S", 90.0)
    longitude = _degrees(ifd.get(GPS_LONGITUDE), ifd.get(GPS_LONGITUDE_REF), "W", 180.0)
    if latitude is None or longitude is None:
        return None, None
    return latitude, longitude


def _degrees(value: Any, reference: Any, negative: str, limit: float) -> float | None:
    """(degrees, minutes, seconds) rationals and "N"/"S" (or "E"/"W") -> signed decimal degrees within the limit."""
    try:
        degrees, minutes, seconds = (float(part) for part in value)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    total = degrees + minutes / 60 + seconds / 3600
    if not math.isfinite(total) or not 0 <= total <= limit:
        return None
    sign = -1.0 if _text(reference) == negative else 1.0
    return round(sign * total, 7)
