"""Preprocessing: pixel-exact against a restatement of torchvision's PIL pipeline (OpenAI CLIP's ``_transform``),
close to transformers' ``CLIPImageProcessor``, and correct on real files of every kind."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from clip_model import preprocess
from clip_model.constants import INCEPTION_MEAN, INCEPTION_STD, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from clip_model.errors import ImageDecodeError
from clip_model.preprocess import (
    Preprocess,
    apply_draft,
    image_to_tensor,
    normalize_pixels,
    resize_and_center_crop,
    to_rgb,
)
from tests.clip_model import images

IMAGE_SIZES = (224, 288, 336, 384, 448)
# (width, height): landscape, portrait, square, odd, smaller than every N (upscaling), extreme aspect ratios, and
# sizes whose resized long side exceeds N by 1, 3, 5 at N=224 (CenterCrop's round-half-to-even offsets).
SOURCE_SIZES = (
    (640, 480),
    (480, 640),
    (500, 500),
    (333, 777),
    (777, 333),
    (101, 99),
    (50, 30),
    (1, 1),
    (2, 3),
    (1000, 7),
    (7, 1000),
    (224, 224),
    (225, 224),
    (224, 227),
    (229, 224),
    (2000, 1500),
)
PIXEL_TOLERANCE = 1 / 255  # one 8-bit level, in [0, 1] pixel units
TENSOR_ATOL = 1e-6
STD = np.asarray(OPENAI_DATASET_STD, np.float32).reshape(3, 1, 1)
MEAN = np.asarray(OPENAI_DATASET_MEAN, np.float32).reshape(3, 1, 1)


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Uniform RGB noise: the hardest input for resampling comparisons (every rounding shows)."""
    rng = np.random.default_rng([width, height, seed])
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def torchvision_reference(
    image: Image.Image, n: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[np.ndarray, torch.Tensor]:
    """torchvision's PIL path, restated: Resize(n, BICUBIC), CenterCrop(n), convert("RGB"), ToTensor, Normalize.

    Returns the uint8 crop ``[n, n, 3]`` and the normalized float32 tensor ``[3, n, n]``.
    """
    # Resize(int): the short side becomes n, the long side int(n * long / short); skipped when the size is unchanged.
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = n, int(n * long / short)
    new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
    if (new_width, new_height) != (width, height):
        image = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    # CenterCrop: zero-pad (left/top get the floor half) when smaller than the crop, then offsets int(round(d / 2.0)).
    if n > new_width or n > new_height:
        pad_left, pad_top = max(n - new_width, 0) // 2, max(n - new_height, 0) // 2
        padded = Image.new(image.mode, (max(n, new_width), max(n, new_height)))
        padded.paste(image, (pad_left, pad_top))
        image, (new_width, new_height) = padded, padded.size
    top, left = int(round((new_height - n) / 2.0)), int(round((new_width - n) / 2.0))
    crop = image.crop((left, top, left + n, top + n)).convert("RGB")
    # ToTensor: uint8 HWC -> float CHW / 255; Normalize: (x - mean) / std, in float32.
    tensor = torch.from_numpy(np.array(crop)).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    tensor = tensor.sub(torch.tensor(mean).view(3, 1, 1)).div(torch.tensor(std).view(3, 1, 1))
    return np.asarray(crop), tensor


def to_pixels(tensor: torch.Tensor | np.ndarray) -> np.ndarray:
    """Normalized [3, H, W] (OpenAI statistics) -> float pixels [H, W, 3] in 0..255."""
    values = tensor.numpy() if isinstance(tensor, torch.Tensor) else tensor
    return ((values * STD + MEAN) * 255).transpose(1, 2, 0)


# --- equal to the reference ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", IMAGE_SIZES)
@pytest.mark.parametrize(("width", "height"), SOURCE_SIZES)
def test_pixel_exact_against_torchvision_restatement(width: int, height: int, n: int) -> None:
    image = noise_image(width, height)
    expected_crop, expected_tensor = torchvision_reference(image, n, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)

    crop = resize_and_center_crop(to_rgb(image), n)
    tensor = Preprocess(n)(image)

    assert crop.size == (n, n)
    np.testing.assert_array_equal(np.asarray(crop), expected_crop)
    assert tensor.shape == (3, n, n) and tensor.dtype == torch.float32 and tensor.is_contiguous()
    assert (tensor - expected_tensor).abs().max().item() <= TENSOR_ATOL


def test_inception_statistics_are_applied() -> None:
    image = noise_image(300, 200)
    _, expected = torchvision_reference(image, 224, INCEPTION_MEAN, INCEPTION_STD)
    assert (Preprocess(224, INCEPTION_MEAN, INCEPTION_STD)(image) - expected).abs().max().item() <= TENSOR_ATOL


def test_gray_converted_first_equals_reference_resizing_gray() -> None:
    # The reference resizes before converting to RGB; for "L" the order makes no difference (same per-band filter).
    gray = noise_image(300, 217).convert("L")
    expected_crop, _ = torchvision_reference(gray, 224, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
    np.testing.assert_array_equal(np.asarray(resize_and_center_crop(to_rgb(gray), 224)), expected_crop)


def test_rgb_input_is_returned_unchanged() -> None:
    image = noise_image(31, 17)
    np.testing.assert_array_equal(np.asarray(to_rgb(image)), np.asarray(image))


def test_oversized_resize_only_resamples_the_crop_window(monkeypatch: pytest.MonkeyPatch) -> None:
    ramp = np.linspace(0, 255, 3 * 2000, dtype=np.float32).reshape(1, -1, 3).astype(np.uint8)
    landscape = Image.fromarray(ramp).resize((2000, 5), Image.Resampling.BILINEAR)
    for smooth in (landscape, landscape.transpose(Image.Transpose.TRANSPOSE)):
        exact = np.asarray(resize_and_center_crop(smooth, 224)).astype(int)
        with monkeypatch.context() as patch:
            patch.setattr(preprocess, "MAX_RESIZED_PIXELS", 224 * 224)
            bounded = np.asarray(resize_and_center_crop(smooth, 224)).astype(int)
        assert bounded.shape == exact.shape == (224, 224, 3)
        assert np.abs(bounded - exact).max() <= 2


# --- transformers' CLIPImageProcessor --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_image_processor() -> Any:
    transformers = pytest.importorskip("transformers")
    logging.getLogger("transformers").setLevel(logging.ERROR)  # it warns that it falls back to its PIL backend
    return transformers.CLIPImageProcessor()  # shortest_edge 224, crop 224x224, bicubic, OpenAI statistics


@pytest.mark.parametrize(("width", "height"), SOURCE_SIZES)
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_close_to_transformers_clip_image_processor(
    clip_image_processor: Any, width: int, height: int, mode: str
) -> None:
    """Without torchvision, CLIPImageProcessor is its PIL backend: RGB conversion (alpha over white), Pillow BICUBIC
    resize to the same int(224 * long / short) size, then a centre crop at offset (size - 224) // 2. torchvision
    rounds that offset half-to-even instead, so when the surplus is 3 mod 4 (e.g. 227 -> 1 vs 2) the two crops are
    one pixel apart; those cases are compared against our resized image cropped at transformers' offset."""
    image = noise_image(width, height).convert(mode) if mode != "RGBA" else noise_image(width, height, 1)
    if mode == "RGBA":
        image.putalpha(Image.fromarray(np.asarray(noise_image(width, height, 2))[..., 0]))
    theirs = clip_image_processor(images=image, return_tensors="np")["pixel_values"][0]

    rgb = to_rgb(image)
    if rgb.width <= rgb.height:
        new_size = (224, int(224 * rgb.height / rgb.width))
    else:
        new_size = (int(224 * rgb.width / rgb.height), 224)
    floor_offsets = ((new_size[0] - 224) // 2, (new_size[1] - 224) // 2)
    if floor_offsets == (round((new_size[0] - 224) / 2), round((new_size[1] - 224) / 2)):
        ours = Preprocess(224)(image)
    else:
        left, top = floor_offsets
        shifted = rgb.resize(new_size, Image.Resampling.BICUBIC).crop((left, top, left + 224, top + 224))
        ours = image_to_tensor(shifted, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
    assert np.abs(to_pixels(theirs) - to_pixels(ours)).max() <= PIXEL_TOLERANCE * 255


# --- EXIF orientation ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extension", ["jpg", "png", "webp", "tif"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_undone(tmp_path: Path, orientation: int, extension: str) -> None:
    sample = images.write_oriented(tmp_path, orientation, extension)
    with Image.open(sample.path) as image:
        upright = to_rgb(image)
        tensor = Preprocess(224)(image)
    assert upright.size == images.UPRIGHT_SIZE
    assert np.abs(np.asarray(upright).astype(int) - sample.expected).max() <= sample.tolerance
    # 64x48 -> 298x224, crop from x=37: the red marker covers the top-left of the crop, the green one the top-right.
    pixels = to_pixels(tensor)
    for (row, col), colour in {(20, 15): (255, 0, 0), (20, 208): (0, 255, 0), (200, 112): (128, 128, 128)}.items():
        assert np.abs(pixels[row, col] - colour).max() <= sample.tolerance + 2, (row, col)


# --- real files of every kind ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(images.SAMPLE_WRITERS))
def test_real_files_decode_to_expected_rgb(tmp_path: Path, kind: str) -> None:
    sample = images.SAMPLE_WRITERS[kind](tmp_path)
    with Image.open(sample.path) as image:
        assert image.mode == sample.mode
        rgb = to_rgb(image)
        tensor = Preprocess(224)(image)
    assert rgb.mode == "RGB" and rgb.size == (images.WIDTH, images.HEIGHT)
    assert np.abs(np.asarray(rgb).astype(int) - sample.expected).max() <= sample.tolerance
    assert tensor.shape == (3, 224, 224) and tensor.dtype == torch.float32
    # The crop's centre lies in the middle column, far from any colour edge.
    assert np.abs(to_pixels(tensor)[112, 112] - sample.expected[16, 24]).max() <= sample.tolerance + 1


def test_sample_files_are_the_kinds_they_claim(tmp_path: Path) -> None:
    samples = images.write_all_samples(tmp_path)
    with Image.open(samples["jpeg_cmyk"].path) as cmyk:
        assert cmyk.info.get("adobe") is not None  # Pillow writes (and reads) Adobe-inverted CMYK JPEGs
    for kind in ("gif_animated", "webp_animated"):
        with Image.open(samples[kind].path) as animated:
            assert getattr(animated, "n_frames", 1) == 2
    with Image.open(samples["png_gray16"].path) as gray16:
        # Pillow's own conversion clips 16-bit values at 255 (what to_rgb avoids): near black (200 of 65535) turns
        # light grey, mid grey and near white turn white.
        assert np.asarray(gray16.convert("L"))[0, :: images.COLUMN].tolist() == [200, 255, 255]


def test_unusable_icc_profile_falls_back_to_plain_cmyk_conversion() -> None:
    image = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    image.info["icc_profile"] = b"not an ICC profile" * 10
    assert np.asarray(to_rgb(image))[0, 0].tolist() == [255, 0, 0]


# --- modes built in memory -------------------------------------------------------------------------------------------


def _flat(mode: str, value: tuple[int, ...] | int | float) -> Image.Image:
    return Image.new(mode, (4, 4), value)


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (_flat("1", 1), (255, 255, 255)),
        (_flat("L", 77), (77, 77, 77)),
        (_flat("RGBX", (1, 2, 3, 0)), (1, 2, 3)),
        (_flat("RGBa", (100, 0, 0, 128)), (227, 127, 127)),  # premultiplied: 100 + white * (1 - 128 / 255)
        (_flat("La", (50, 128)), (177, 177, 177)),
        (_flat("PA", (0, 0)), (255, 255, 255)),
        (_flat("YCbCr", (76, 85, 255)), (254, 0, 0)),
        (_flat("HSV", (85, 255, 255)), (0, 255, 0)),
        # L* 50 (128 of 255), a* = b* = 0 (stored signed). Image.new would offset a and b by 128, so frombytes.
        (Image.frombytes("LAB", (4, 4), bytes([128, 0, 0]) * 16), (119, 119, 119)),
        (_flat("I", 70000), (255, 255, 255)),  # beyond 16 bits: clipped
        (_flat("I", -5), (0, 0, 0)),
        (_flat("I;16B", 32896), (128, 128, 128)),
        (_flat("F", 0.25), (64, 64, 64)),  # within 0..1: scaled by 255
        (_flat("F", 100.0), (100, 100, 100)),  # beyond 1: taken as 0..255, like Pillow
        (_flat("F", float("nan")), (0, 0, 0)),
    ],
    ids=lambda value: value.mode if isinstance(value, Image.Image) else None,
)
def test_in_memory_modes(image: Image.Image, expected: tuple[int, int, int]) -> None:
    rgb = to_rgb(image)
    assert rgb.mode == "RGB"
    assert np.abs(np.asarray(rgb)[0, 0].astype(int) - expected).max() <= 1


def test_transparency_keys_and_custom_background() -> None:
    keyed_rgb = _flat("RGB", (9, 9, 9))
    keyed_rgb.info["transparency"] = (9, 9, 9)
    keyed_gray = _flat("L", 7)
    keyed_gray.info["transparency"] = 7
    rgba_palette = _flat("P", 0)
    rgba_palette.putpalette([255, 0, 255, 0], rawmode="RGBA")
    for image in (keyed_rgb, keyed_gray, rgba_palette):
        assert np.asarray(to_rgb(image, background=(10, 20, 30)))[0, 0].tolist() == [10, 20, 30], image.mode


def test_unconvertible_mode_names_the_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    image = _flat("HSV", (0, 0, 0))

    def refuse(*args: object, **kwargs: object) -> Image.Image:
        raise ValueError("conversion not supported")

    monkeypatch.setattr(image, "convert", refuse)
    with pytest.raises(ImageDecodeError, match="'HSV'"):
        to_rgb(image)


def test_input_image_is_not_modified(tmp_path: Path) -> None:
    sample = images.write_oriented(tmp_path, 6, "png")
    with Image.open(sample.path) as image:
        to_rgb(image)
        assert image.size == (48, 64) and image.getexif().get(images.EXIF_ORIENTATION_TAG) == 6


# --- broken input ----------------------------------------------------------------------------------------------------


def test_truncated_jpeg_raises_image_decode_error(tmp_path: Path) -> None:
    path = images.write_truncated_jpeg(tmp_path)
    with Image.open(path) as image, pytest.raises(ImageDecodeError, match="truncated"):
        to_rgb(image)
    with Image.open(path) as image, pytest.raises(ImageDecodeError):
        Preprocess(224)(image)


def test_empty_image_is_rejected() -> None:
    with pytest.raises(ImageDecodeError, match="0x5"):
        resize_and_center_crop(Image.new("RGB", (0, 5)), 224)


def test_image_to_tensor_requires_rgb() -> None:
    with pytest.raises(ValueError, match="'L'"):
        image_to_tensor(_flat("L", 0), OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)


def test_normalized_batch_items_equal_image_to_array_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (4, 24, 24, 3), dtype=np.uint8)
    batch = normalize_pixels(crops, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
    assert batch.dtype == np.float32 and batch.shape == (4, 3, 24, 24) and batch.flags.c_contiguous
    for crop, item in zip(crops, batch, strict=True):
        expected = preprocess.image_to_array(Image.fromarray(crop, "RGB"), OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
        assert np.array_equal(item, expected)


def test_normalize_pixels_rejects_other_layouts() -> None:
    with pytest.raises(ValueError, match="uint8"):
        normalize_pixels(np.zeros((2, 3, 16, 16), np.uint8), OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
    with pytest.raises(ValueError, match="uint8"):
        normalize_pixels(np.zeros((2, 16, 16, 3), np.float32), OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
    with pytest.raises(ValueError, match="uint8"):
        normalize_pixels(np.zeros((16, 3), np.uint8), OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)


# --- the JPEG draft rule ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "image_size", "expected"),
    [
        ((3000, 2000), 224, (750, 500)),  # 1/4: 1/8 would give 375x250, short side below 448
        ((2000, 3000), 336, (1000, 1500)),
        ((4000, 3000), 224, (1000, 750)),
        ((3584, 3584), 224, (448, 448)),  # exactly 2 * 224 at 1/8
        ((3583, 3583), 224, (896, 896)),  # one pixel less: 1/4
        ((447, 1000), 224, (447, 1000)),  # already below 2 * 224: full size
    ],
)
def test_draft_keeps_both_sides_at_least_twice_the_crop(
    tmp_path: Path, size: tuple[int, int], image_size: int, expected: tuple[int, int]
) -> None:
    path = tmp_path / "flat.jpg"
    Image.new("RGB", size, (90, 120, 200)).save(path)
    with Image.open(path) as image:
        apply_draft(image, image_size)
        assert image.size == expected
        image.load()
        assert image.size == expected


# --- the Preprocess object -------------------------------------------------------------------------------------------


def test_preprocess_attributes_and_repr() -> None:
    pre = Preprocess(336)
    assert (pre.image_size, pre.mean, pre.std) == (336, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
    stats = f"mean={OPENAI_DATASET_MEAN}, std={OPENAI_DATASET_STD}"
    assert repr(pre) == f"Preprocess(image_size=336, {stats}, resize_mode='shortest')"


@pytest.mark.parametrize(
    ("size", "mean", "std"),
    [(0, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD), (224, (0.5, 0.5), OPENAI_DATASET_STD), (224, (0, 0, 0), (1, 0, 1))],
)
def test_preprocess_rejects_bad_arguments(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    with pytest.raises(ValueError):
        Preprocess(size, mean, std)  # type: ignore[arg-type]  # bad on purpose
