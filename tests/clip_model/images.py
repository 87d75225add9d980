"""Test-image factory: real image files of many kinds, written into a directory, with the RGB they must decode to.

Every ``write_*`` function takes a directory, writes one file there and returns a ``SampleImage``. The pictures
are 48x32 (width x height) columns of flat colour whose boundaries fall on 16-pixel lines, so lossy codecs
(JPEG at 4:4:4, quality 95) only perturb the colours by a few levels. ``expected`` is what
``clip_model.preprocess.to_rgb`` must produce with its default white background.
"""

from __future__ import annotations

import io
import itertools
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageCms

WIDTH, HEIGHT = 48, 32
COLUMN = 16  # every picture is made of 16-pixel-wide columns
WHITE = (255, 255, 255)
GARISH = (255, 0, 255)  # stored under fully transparent pixels: must never show
JPEG_OPTIONS = {"quality": 95, "subsampling": 0}
JPEG_TOLERANCE = 8
EXIF_ORIENTATION_TAG = 0x0112
TIFF_ORIENTATION_TAG = 274
UINT16_MAX = 65535
GRAY16_LEVELS = (200, 32768, 65500)  # near black, mid, near white in 16 bits


@dataclass(frozen=True)
class SampleImage:
    """A written image file and the upright uint8 ``[H, W, 3]`` RGB it must decode to, within ``tolerance``."""

    path: Path
    expected: np.ndarray
    tolerance: int
    mode: str  # the PIL mode the file opens in


def columns(values: Sequence[Sequence[float]] | Sequence[float], height: int = HEIGHT) -> np.ndarray:
    """Array ``[height, 16 * len(values), channels]`` (or 2-D for int values) of flat ``COLUMN``-wide columns."""
    row = np.repeat(np.asarray(values), COLUMN, axis=0)
    return np.repeat(row[np.newaxis], height, axis=0)


def naive_cmyk_to_rgb(cmyk: tuple[int, int, int, int]) -> tuple[int, int, int]:
    """RGB of a CMYK colour without colour management (ink fraction times remaining black)."""
    *inks, black = cmyk
    r, g, b = (round((255 - ink) * (255 - black) / 255) for ink in inks)
    return r, g, b


def _rgb_columns(colours: list[tuple[int, int, int]]) -> np.ndarray:
    return columns(colours).astype(np.uint8)


def _from_columns(mode: str, values: Sequence[Sequence[int]] | Sequence[int]) -> Image.Image:
    """A ``mode`` image of flat 8-bit columns (for modes ``Image.fromarray`` does not infer)."""
    return Image.frombytes(mode, (COLUMN * len(values), HEIGHT), columns(values).astype(np.uint8).tobytes())


def _sample(path: Path, image: Image.Image, expected: np.ndarray, tolerance: int = 0, **save: Any) -> SampleImage:
    image.save(path, **save)
    with Image.open(path) as reopened:
        mode = reopened.mode
    return SampleImage(path, expected, tolerance, mode)


def write_jpeg_rgb(directory: Path) -> SampleImage:
    colours = [(200, 30, 40), (20, 90, 200), (240, 220, 30)]
    pixels = _rgb_columns(colours)
    return _sample(directory / "rgb.jpg", Image.fromarray(pixels), pixels, JPEG_TOLERANCE, **JPEG_OPTIONS)


def write_jpeg_gray(directory: Path) -> SampleImage:
    levels = [30, 128, 220]
    image = Image.fromarray(columns(levels).astype(np.uint8))
    return _sample(directory / "gray.jpg", image, _rgb_columns([(v, v, v) for v in levels]), JPEG_TOLERANCE)


CMYK_COLOURS = [(0, 255, 255, 0), (255, 0, 255, 0), (0, 0, 0, 128)]  # red, green, mid grey without ICC


def _cmyk_image() -> Image.Image:
    return _from_columns("CMYK", CMYK_COLOURS)


def write_jpeg_cmyk(directory: Path) -> SampleImage:
    """CMYK JPEG; Pillow stores it with Adobe's inverted polarity and an Adobe APP14 marker."""
    expected = _rgb_columns([naive_cmyk_to_rgb(c) for c in CMYK_COLOURS])
    return _sample(directory / "cmyk.jpg", _cmyk_image(), expected, JPEG_TOLERANCE, **JPEG_OPTIONS)


def write_tiff_cmyk(directory: Path) -> SampleImage:
    expected = _rgb_columns([naive_cmyk_to_rgb(c) for c in CMYK_COLOURS])
    return _sample(directory / "cmyk.tif", _cmyk_image(), expected)


def _srgb_to_icc_lab(colours: list[tuple[int, int, int]]) -> bytes:
    """ICC 8-bit Lab encoding (L * 255 / 100, a + 128, b + 128) of sRGB colours, via LittleCMS."""
    srgb = Image.new("RGB", (len(colours), 1))
    srgb.putdata(colours)
    transform = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
    lab = np.asarray(ImageCms.applyTransform(srgb, transform))[0]  # Pillow stores a and b as signed bytes
    signed = lab.view(np.int8).astype(np.int16)
    encoded = np.stack([lab[:, 0], signed[:, 1] + 128, signed[:, 2] + 128], axis=1)
    return encoded.astype(np.uint8).tobytes()


def _s15fixed16(*values: float) -> bytes:
    return b"".join(struct.pack(">i", round(v * 65536)) for v in values)


def rotated_ink_cmyk_profile() -> bytes:
    """A minimal ICC v2 CMYK printer profile (one 2-point lut8 A2B0 table to Lab) whose inks are rotated.

    Cyan ink prints what magenta would, magenta prints yellow, yellow prints cyan; paper and black are unchanged.
    Decoding pure cyan (255, 0, 0, 0) through it gives magenta (255, 0, 255), so a test can tell the profile was used.
    """
    corners = itertools.product((0, 255), repeat=4)  # grid order: the first channel (cyan) varies slowest
    clut = _srgb_to_icc_lab([naive_cmyk_to_rgb((y, c, m, k)) for c, m, y, k in corners])
    identity_curve = bytes(range(256))
    lut = b"mft1" + bytes(4) + bytes([4, 3, 2, 0]) + _s15fixed16(1, 0, 0, 0, 1, 0, 0, 0, 1)
    lut += identity_curve * 4 + clut + identity_curve * 3
    text = b"rotated inks\x00"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(4 + 4 + 2 + 1 + 67)
    d50 = _s15fixed16(0.9642, 1.0, 0.8249)
    tags = [(b"desc", desc), (b"wtpt", b"XYZ " + bytes(4) + d50), (b"A2B0", lut)]
    data_start = 128 + 4 + 12 * len(tags)
    table, body = b"", b""
    for signature, data in tags:
        data += bytes(-len(data) % 4)
        table += signature + struct.pack(">II", data_start + len(body), len(data))
        body += data
    header = struct.pack(">I", data_start + len(body)) + bytes(4) + struct.pack(">I", 0x02100000)
    header += b"prtrCMYKLab " + bytes(12) + b"acsp" + bytes(28) + d50
    return header.ljust(128, b"\0") + struct.pack(">I", len(tags)) + table + body


def write_jpeg_cmyk_icc(directory: Path) -> SampleImage:
    """Pure cyan CMYK JPEG with ``rotated_ink_cmyk_profile`` embedded: decodes to magenta only via the profile."""
    image = Image.new("CMYK", (WIDTH, HEIGHT), (255, 0, 0, 0))
    expected = np.broadcast_to(np.array(GARISH, np.uint8), (HEIGHT, WIDTH, 3)).copy()
    path = directory / "cmyk_icc.jpg"
    return _sample(path, image, expected, JPEG_TOLERANCE, icc_profile=rotated_ink_cmyk_profile(), **JPEG_OPTIONS)


def _rgba_with_holes() -> tuple[Image.Image, np.ndarray]:
    """Opaque green | fully transparent garish magenta | half-transparent black; and its RGB over white."""
    rgba = columns([(30, 160, 60, 255), (*GARISH, 0), (0, 0, 0, 128)]).astype(np.uint8)
    expected = _rgb_columns([(30, 160, 60), WHITE, (127, 127, 127)])
    return Image.fromarray(rgba), expected


def write_png_rgba(directory: Path) -> SampleImage:
    image, expected = _rgba_with_holes()
    return _sample(directory / "rgba.png", image, expected, 1)


def write_webp_rgba(directory: Path) -> SampleImage:
    image, expected = _rgba_with_holes()
    return _sample(directory / "rgba.webp", image, expected, 1, lossless=True)


def write_png_palette_transparent(directory: Path) -> SampleImage:
    """Palette PNG (red, garish, blue) whose garish entry is transparent through a tRNS chunk."""
    image = _from_columns("P", [0, 1, 2])
    image.putpalette([255, 0, 0, *GARISH, 0, 0, 255])
    expected = _rgb_columns([(255, 0, 0), WHITE, (0, 0, 255)])
    return _sample(directory / "palette_trns.png", image, expected, transparency=1)


def write_png_la(directory: Path) -> SampleImage:
    image = _from_columns("LA", [(90, 255), (20, 0), (200, 255)])
    return _sample(directory / "la.png", image, _rgb_columns([(90,) * 3, WHITE, (200,) * 3]))


def _gray16() -> tuple[Image.Image, np.ndarray]:
    image = Image.fromarray(columns(list(GRAY16_LEVELS)).astype(np.uint16))  # mode "I;16"
    levels = [round(v * 255 / UINT16_MAX) for v in GRAY16_LEVELS]
    return image, _rgb_columns([(v, v, v) for v in levels])


def write_png_gray16(directory: Path) -> SampleImage:
    image, expected = _gray16()
    return _sample(directory / "gray16.png", image, expected)


def write_tiff_gray16(directory: Path) -> SampleImage:
    image, expected = _gray16()
    return _sample(directory / "gray16.tif", image, expected)


def write_pgm_gray16(directory: Path) -> SampleImage:
    """16-bit PGM: Pillow opens it in mode "I" (32-bit integers holding 16-bit data)."""
    image, expected = _gray16()
    return _sample(directory / "gray16.pgm", image, expected)


def write_tiff_float(directory: Path) -> SampleImage:
    """32-bit float TIFF (mode "F") with values in 0..1."""
    image = Image.fromarray(columns([0.0, 0.5, 1.0]).astype(np.float32))
    return _sample(directory / "float.tif", image, _rgb_columns([(0, 0, 0), (128, 128, 128), WHITE]))


def write_gif_palette(directory: Path) -> SampleImage:
    pixels = _rgb_columns([(255, 0, 0), (0, 0, 255), (0, 255, 0)])
    return _sample(directory / "palette.gif", Image.fromarray(pixels), pixels)


def _two_frames() -> list[Image.Image]:
    return [Image.new("RGB", (WIDTH, HEIGHT), colour) for colour in ((255, 0, 0), (0, 255, 0))]


def write_gif_animated(directory: Path) -> SampleImage:
    """Two-frame GIF, red then green: the (current) first frame is red."""
    first, second = _two_frames()
    expected = _rgb_columns([(255, 0, 0)] * 3)
    return _sample(directory / "animated.gif", first, expected, save_all=True, append_images=[second], duration=100)


def write_webp_animated(directory: Path) -> SampleImage:
    first, second = _two_frames()
    expected = _rgb_columns([(255, 0, 0)] * 3)
    path = directory / "animated.webp"
    return _sample(path, first, expected, save_all=True, append_images=[second], duration=100, lossless=True)


def write_bmp_rgb(directory: Path) -> SampleImage:
    pixels = _rgb_columns([(10, 20, 30), (128, 64, 200), (250, 250, 5)])
    return _sample(directory / "rgb.bmp", Image.fromarray(pixels), pixels)


SAMPLE_WRITERS: dict[str, Callable[[Path], SampleImage]] = {
    "jpeg_rgb": write_jpeg_rgb,
    "jpeg_gray": write_jpeg_gray,
    "jpeg_cmyk": write_jpeg_cmyk,
    "jpeg_cmyk_icc": write_jpeg_cmyk_icc,
    "png_rgba": write_png_rgba,
    "png_palette_transparent": write_png_palette_transparent,
    "png_la": write_png_la,
    "png_gray16": write_png_gray16,
    "webp_rgba": write_webp_rgba,
    "webp_animated": write_webp_animated,
    "gif_palette": write_gif_palette,
    "gif_animated": write_gif_animated,
    "tiff_gray16": write_tiff_gray16,
    "tiff_cmyk": write_tiff_cmyk,
    "tiff_float": write_tiff_float,
    "pgm_gray16": write_pgm_gray16,
    "bmp_rgb": write_bmp_rgb,
}


def write_all_samples(directory: Path) -> dict[str, SampleImage]:
    """Write one file of every kind in ``SAMPLE_WRITERS`` into ``directory``."""
    return {name: writer(directory) for name, writer in SAMPLE_WRITERS.items()}


# EXIF orientation: how a camera stores the upright picture for each tag value, stated from the EXIF definition
# (which visual side row 0 and column 0 of the stored pixels show), as numpy index operations on [H, W, C].
STORED_FOR_ORIENTATION: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda a: a,  # row 0 = top, column 0 = left
    2: lambda a: a[:, ::-1],  # row 0 = top, column 0 = right
    3: lambda a: a[::-1, ::-1],  # row 0 = bottom, column 0 = right
    4: lambda a: a[::-1, :],  # row 0 = bottom, column 0 = left
    5: lambda a: a.transpose(1, 0, 2),  # row 0 = left, column 0 = top
    6: lambda a: np.rot90(a, 1),  # row 0 = right, column 0 = top
    7: lambda a: np.rot90(a, 1)[:, ::-1],  # row 0 = right, column 0 = bottom
    8: lambda a: np.rot90(a, -1),  # row 0 = left, column 0 = bottom
}
UPRIGHT_SIZE = (64, 48)  # width, height of the upright marker picture
MARKER = 16  # side of the corner markers


def upright_marker_picture() -> np.ndarray:
    """Upright uint8 ``[48, 64, 3]``: grey, a red square top-left and a green square top-right (no symmetry)."""
    width, height = UPRIGHT_SIZE
    pixels = np.full((height, width, 3), 128, np.uint8)
    pixels[:MARKER, :MARKER] = (255, 0, 0)
    pixels[:MARKER, -MARKER:] = (0, 255, 0)
    return pixels


def write_oriented(directory: Path, orientation: int, extension: str) -> SampleImage:
    """The marker picture stored as a camera would for EXIF ``orientation`` (1-8), with the tag set.

    ``extension``: "jpg", "png", "webp" (EXIF chunk) or "tif" (TIFF Orientation tag).
    """
    upright = upright_marker_picture()
    stored = Image.fromarray(np.ascontiguousarray(STORED_FOR_ORIENTATION[orientation](upright)))
    path = directory / f"orientation{orientation}.{extension}"
    if extension == "tif":
        return _sample(path, stored, upright, tiffinfo={TIFF_ORIENTATION_TAG: orientation})
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = orientation
    options: dict[str, object] = {"lossless": True} if extension == "webp" else {}
    options.update(JPEG_OPTIONS if extension == "jpg" else {})
    tolerance = JPEG_TOLERANCE if extension == "jpg" else 0
    return _sample(path, stored, upright, tolerance, exif=exif.tobytes(), **options)


def write_truncated_jpeg(directory: Path, keep: float = 0.5) -> Path:
    """A noisy JPEG cut after ``keep`` of its bytes: it opens, but decoding its pixels fails."""
    noise = np.random.default_rng(0).integers(0, 256, (HEIGHT * 4, WIDTH * 4, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "JPEG")
    path = directory / "truncated.jpg"
    path.write_bytes(buffer.getvalue()[: int(len(buffer.getvalue()) * keep)])
    return path
