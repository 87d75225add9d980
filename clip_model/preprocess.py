"""CLIP and SigLIP image preprocessing on Pillow and NumPy (no torchvision).

Contract of ``Preprocess(n, mean, std, resize_mode)(image)``, a float32 tensor ``[3, n, n]``:

1. ``to_rgb``: decode the pixels (``load()`` is forced, so broken files raise ``ImageDecodeError`` here), apply the
   EXIF orientation, convert any mode to 8-bit RGB (see ``to_rgb`` for alpha, 16-bit, float and CMYK data).
2. ``resize_and_center_crop``: Pillow BICUBIC resize of the shortest side to ``n``, the other side to
   ``int(n * long / short)``; then the ``n x n`` window at top ``round((H - n) / 2)`` and left ``round((W - n) / 2)``
   (Python ``round``: exact halves go to the even integer). These are torchvision's ``Resize(n)`` and
   ``CenterCrop(n)`` rules for PIL images; CenterCrop's zero padding of images smaller than the crop never applies,
   since the resized short side is ``n`` and the long side at least ``n``. With ``resize_mode="squash"`` (SigLIP's
   rule: OpenCLIP's ``resize_mode='squash'``, transformers' ``SiglipImageProcessor``) the whole image is instead
   resized to ``n x n`` with Pillow BICUBIC, aspect ratio not kept: ``resize_squash``. ``resize_for`` picks the rule.
3. ``image_to_tensor``: uint8 HWC -> float32 CHW, ``(pixel / 255 - mean) / std``, each step in float32
   (``normalize_pixels``, which the indexer also applies to its batches of decoded crops).

For RGB input this equals OpenAI CLIP's ``_transform(n)`` pixel for pixel. The reference resizes before it converts
to RGB, which ``to_rgb`` deliberately does not copy: it resizes palette images with nearest neighbour (Pillow forces
that filter for mode "P"), shows the colour hidden under transparent pixels, clips 16-bit images to white, ignores
ICC profiles of CMYK images and ignores EXIF orientation.

Callers that open the file themselves (the indexer, the server's uploads) may call ``apply_draft`` before step 1:
JPEGs then decode at the smallest DCT scale that keeps both sides >= ``DRAFT_MARGIN`` times the model's input, so
an upload of an indexed file embeds like the file did.
"""

from __future__ import annotations

import io

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image, ImageOps

from .config import ResizeMode
from .constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from .errors import ImageDecodeError

RESAMPLE = Image.Resampling.BICUBIC
WHITE = (255, 255, 255)
UINT8_MAX = 255
UINT16_MAX = 65535
EXIF_ORIENTATION_TAG = 0x0112
DRAFT_MARGIN = 2  # drafted JPEG sides stay >= DRAFT_MARGIN * the model's input size
DRAFT_FORMATS = frozenset({"JPEG", "MPO"})  # the Pillow formats whose decoder implements draft()
# Beyond this many pixels in the resized (pre-crop) image only the crop window is resampled: resize_and_center_crop.
MAX_RESIZED_PIXELS = 1 << 25
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "La", "RGBa"})
HIGH_DEPTH_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})
# What Pillow raises for truncated or corrupt data when the pixels are decoded.
DECODE_ERRORS = (OSError, EOFError, SyntaxError, ValueError)

Triple = tuple[float, float, float]


def to_rgb(image: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Decode ``image``, turn it upright and return it as 8-bit "RGB" (an upright opaque RGB input is returned as is).

    - EXIF orientations 2-8 are undone (``ImageOps.exif_transpose``); animated images give their current frame.
    - Transparency (alpha band, premultiplied alpha, palette or colour-key transparency) is composited over
      ``background``, white by default as an image viewer shows it: a fully transparent pixel becomes exactly the
      background, never the colour stored under it.
    - 16-bit ("I;16*") and "I" data are read as 0..65535 and rounded to 0..255 (values outside are clipped);
      "F" data as 0..1 when no finite value exceeds 1, else as 0..255 like Pillow (NaN -> 0).
    - "CMYK" goes through its embedded ICC profile to sRGB when LittleCMS can use it, else through Pillow's
      conversion. Pillow reads CMYK JPEGs with Adobe's inverted polarity, the convention of Adobe-written files.
    - Every other mode ("1", "L", "P", "YCbCr", "LAB", "HSV", ...) uses Pillow's conversion.

    Raises ImageDecodeError for undecodable data or a mode that cannot be converted (the message names the mode).
    """
    try:
        image.load()
        if image.getexif().get(EXIF_ORIENTATION_TAG, 1) != 1:
            image = ImageOps.exif_transpose(image)
    except DECODE_ERRORS as exc:
        raise ImageDecodeError(f"cannot decode {image.mode!r} image: {exc}") from exc
    mode = image.mode
    if mode in HIGH_DEPTH_MODES:
        return _high_depth_to_gray(image).convert("RGB")
    if mode == "CMYK":
        return _cmyk_to_rgb(image)
    try:
        if _has_transparency(image):
            rgba = _unpremultiplied_rgba(image)
            canvas = Image.new("RGBA", rgba.size, (*background, UINT8_MAX))
            return Image.alpha_composite(canvas, rgba).convert("RGB")
        return image if mode == "RGB" else image.convert("RGB")
    except ValueError as exc:
        raise ImageDecodeError(f"cannot convert image mode {mode!r} to RGB: {exc}") from exc


def apply_draft(image: Image.Image, image_size: int) -> None:
    """Make a JPEG decode at its smallest DCT scale (1/2, 1/4, 1/8) keeping both sides >= DRAFT_MARGIN * image_size.

    Call before the pixels are loaded. A no-op for other formats and for images already that small. Metadata is
    untouched, so ``to_rgb`` still applies the file's EXIF orientation to the drafted pixels.
    """
    if image.format in DRAFT_FORMATS:
        side = DRAFT_MARGIN * image_size
        image.draft(image.mode, (side, side))


def _has_transparency(image: Image.Image) -> bool:
    palette_alpha = image.mode == "P" and image.palette is not None and image.palette.mode == "RGBA"
    return image.mode in ALPHA_MODES or "transparency" in image.info or palette_alpha


def _unpremultiplied_rgba(image: Image.Image) -> Image.Image:
    if image.mode == "La":  # Pillow has no La -> RGBA conversion; RGBa (also premultiplied) has one
        luminance, alpha = image.split()
        image = Image.merge("RGBa", (luminance, luminance, luminance, alpha))
    return image.convert("RGBA")


def _high_depth_to_gray(image: Image.Image) -> Image.Image:
    values = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        finite = values[np.isfinite(values)]
        full_scale = 1.0 if finite.size == 0 or finite.max() <= 1.0 else float(UINT8_MAX)
        values = np.nan_to_num(values, nan=0.0, posinf=full_scale, neginf=0.0)
    else:
        full_scale = float(UINT16_MAX)
    gray = np.clip(np.rint(values * (UINT8_MAX / full_scale)), 0, UINT8_MAX).astype(np.uint8)
    return Image.fromarray(gray)


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    icc = image.info.get("icc_profile")
    if not icc:
        return image.convert("RGB")
    try:
        from PIL import ImageCms
    except ImportError:  # Pillow built without LittleCMS
        return image.convert("RGB")
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        return ImageCms.buildTransform(profile, ImageCms.createProfile("sRGB"), "CMYK", "RGB").apply(image)
    except (OSError, ImageCms.PyCMSError):  # unusable profile: the pixels are still fine
        return image.convert("RGB")


def resize_and_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Bicubic shortest-side resize to ``size`` then the centred ``size x size`` crop, by torchvision's rules.

    ``image`` should come from ``to_rgb`` (Pillow resamples "P" and "1" with nearest neighbour). If the resized
    image would exceed ``MAX_RESIZED_PIXELS`` (aspect ratios beyond ~600:1 at 224), only the crop window is resampled
    (``Image.resize(box=...)``): bounded memory, but Pillow may then run its two passes in the other order, so
    pixels can differ from the reference by a few levels.
    """
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageDecodeError(f"cannot preprocess an empty {width}x{height} image")
    if width <= height:
        new_width, new_height = size, int(size * height / width)
    else:
        new_width, new_height = int(size * width / height), size
    top, left = round((new_height - size) / 2), round((new_width - size) / 2)
    if new_width * new_height > MAX_RESIZED_PIXELS:
        scale_x, scale_y = width / new_width, height / new_height
        box = (left * scale_x, top * scale_y, (left + size) * scale_x, (top + size) * scale_y)
        return image.resize((size, size), RESAMPLE, box=box)
    resized = image.resize((new_width, new_height), RESAMPLE)
    return resized.crop((left, top, left + size, top + size))


def resize_squash(image: Image.Image, size: int) -> Image.Image:
    """Bicubic resize of the whole image to ``size x size`` (aspect ratio not kept), as SigLIP's weights expect."""
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageDecodeError(f"cannot preprocess an empty {width}x{height} image")
    return image.resize((size, size), RESAMPLE)


def resize_for(image: Image.Image, size: int, resize_mode: ResizeMode) -> Image.Image:
    """``image`` (from ``to_rgb``) as a ``size x size`` model input by ``resize_mode``'s rule (module docstring)."""
    if resize_mode == "squash":
        return resize_squash(image, size)
    if resize_mode == "shortest":
        return resize_and_center_crop(image, size)
    raise ValueError(f"unknown resize_mode {resize_mode!r}; expected 'shortest' or 'squash'")


def image_to_array(image: Image.Image, mean: Triple, std: Triple) -> npt.NDArray[np.float32]:
    """RGB image -> C-contiguous float32 array ``[3, H, W]``: :func:`normalize_pixels` of its pixels."""
    if image.mode != "RGB":
        raise ValueError(f"image_to_array expects an RGB image, got mode {image.mode!r}")
    return normalize_pixels(np.asarray(image), mean, std)


def normalize_pixels(pixels: npt.NDArray[np.uint8], mean: Triple, std: Triple) -> npt.NDArray[np.float32]:
    """uint8 RGB ``[H, W, 3]`` or ``[B, H, W, 3]`` -> C-contiguous float32 ``[3, H, W]`` or ``[B, 3, H, W]`` holding
    ``(pixel / 255 - mean) / std`` per channel.

    Each step runs in float32, so a batch of crops gives, item for item, the bits ``Preprocess`` gives.
    """
    if pixels.dtype != np.uint8 or pixels.ndim not in (3, 4) or pixels.shape[-1] != 3:
        raise ValueError(f"normalize_pixels expects uint8 [H, W, 3] or [B, H, W, 3], got {pixels.dtype} {pixels.shape}")
    out = np.ascontiguousarray(np.moveaxis(pixels, -1, -3), dtype=np.float32)  # [..., 3, H, W]
    out /= np.float32(UINT8_MAX)
    out -= np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    out /= np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    return out


def image_to_tensor(image: Image.Image, mean: Triple, std: Triple) -> torch.Tensor:
    """RGB image -> float32 tensor ``[3, H, W]``: ``image_to_array`` wrapped without a copy."""
    return torch.from_numpy(image_to_array(image, mean, std))


class Preprocess:
    """Callable PIL image -> float32 tensor ``[3, image_size, image_size]``, normalized with ``mean``/``std``,
    resized by ``resize_mode``'s rule (``"shortest"``: CLIP's resize and centre crop; ``"squash"``: SigLIP's)."""

    def __init__(
        self,
        image_size: int,
        mean: Triple = OPENAI_DATASET_MEAN,
        std: Triple = OPENAI_DATASET_STD,
        resize_mode: ResizeMode = "shortest",
    ) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if len(mean) != 3 or len(std) != 3 or 0 in std:
            raise ValueError(f"mean and std need 3 values each and std no zero, got {mean} and {std}")
        if resize_mode not in ("shortest", "squash"):
            raise ValueError(f"resize_mode must be 'shortest' or 'squash', got {resize_mode!r}")
        self.image_size = image_size
        self.mean: Triple = (float(mean[0]), float(mean[1]), float(mean[2]))
        self.std: Triple = (float(std[0]), float(std[1]), float(std[2]))
        self.resize_mode: ResizeMode = resize_mode

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return image_to_tensor(resize_for(to_rgb(image), self.image_size, self.resize_mode), self.mean, self.std)

    def __repr__(self) -> str:
        name, mode = type(self).__name__, self.resize_mode
        return f"{name}(image_size={self.image_size}, mean={self.mean}, std={self.std}, resize_mode={mode!r})"
