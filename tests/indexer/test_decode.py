"""Per-file decode: every sample kind, EXIF orientation, failure reasons, hashing, normalization parity, JPEG draft
accuracy, and a round trip through spawned worker processes."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import io
import logging
import multiprocessing
import os
import struct
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch
from PIL import Image

from clip_model.config import ResizeMode
from clip_model.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from clip_model.preprocess import (
    DRAFT_MARGIN,
    Preprocess,
    apply_draft,
    normalize_pixels,
    resize_and_center_crop,
    to_rgb,
)
from indexer import decode, paths
from indexer.decode import (
    DEFAULT_MAX_BYTES,
    REASON_CATEGORIES,
    Decoded,
    DecodeFailure,
    DecodeSpec,
    decode_file,
)
from indexer.scan import ScannedFile
from tests.clip_model import images

SIZE = 16  # crop side for the 48x32 samples
SPEC = DecodeSpec(SIZE, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
EXACT = DecodeSpec(SIZE, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, draft=False)
ATOL = 1e-6
# Draft on vs off for the 3000x2000 photo-like JPEGs below, measured: mean abs 0.13-0.28 levels, max 2-8 levels
# (both resize rules).
DRAFT_MEAN_ABS_BOUND = 1.0 / 255
DRAFT_MAX_ABS_BOUND = 24.0 / 255


def scanned(root: Path, relative: str) -> ScannedFile:
    stat = (root / relative).stat()
    return ScannedFile(relative, stat.st_size, stat.st_mtime_ns)


def decode_ok(path: Path, spec: DecodeSpec = SPEC) -> Decoded:
    result = decode_file(path.parent, scanned(path.parent, path.name), spec)
    assert isinstance(result, Decoded), result
    return result


def decode_failure(path: Path, spec: DecodeSpec = SPEC) -> DecodeFailure:
    result = decode_file(path.parent, scanned(path.parent, path.name), spec)
    assert isinstance(result, DecodeFailure), result
    assert result.reason == "empty file" or result.reason.split(":")[0] in REASON_CATEGORIES
    return result


def reference_crop(path: Path, size: int) -> npt.NDArray[np.uint8]:
    """The uint8 crop ``Preprocess`` normalizes, by the clip_model functions on a fully decoded image."""
    with Image.open(path) as image:
        return np.asarray(resize_and_center_crop(to_rgb(image), size))


@pytest.mark.parametrize("kind", sorted(images.SAMPLE_WRITERS))
def test_every_sample_kind_decodes_to_its_colours(tmp_path: Path, kind: str) -> None:
    sample = images.SAMPLE_WRITERS[kind](tmp_path)
    decoded = decode_ok(sample.path)
    assert (decoded.width, decoded.height) == (images.WIDTH, images.HEIGHT)
    assert decoded.pixels.shape == (SIZE, SIZE, 3) and decoded.pixels.dtype == np.uint8
    assert decoded.pixels.flags.c_contiguous
    np.testing.assert_array_equal(decoded.pixels, reference_crop(sample.path, SIZE))
    expected = np.asarray(resize_and_center_crop(Image.fromarray(sample.expected), SIZE)).astype(int)
    assert np.abs(decoded.pixels.astype(int) - expected).max() <= 2 * sample.tolerance + 1


@pytest.mark.parametrize("extension", ["jpg", "png", "webp", "tif"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_gives_upright_pixels_and_original_size(
    tmp_path: Path, orientation: int, extension: str
) -> None:
    sample = images.write_oriented(tmp_path, orientation, extension)
    width, height = images.UPRIGHT_SIZE
    decoded = decode_ok(sample.path, DecodeSpec(height, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD))
    assert (decoded.width, decoded.height) == (width, height)
    left = (width - height) // 2  # the centre crop of the 64x48 picture drops 8 columns each side
    expected = sample.expected[:, left : left + height].astype(int)
    assert np.abs(decoded.pixels.astype(int) - expected).max() <= 2 * sample.tolerance


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """A synthetic photo: smooth colour gradients, fine texture, sensor noise and hard-edged shapes."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y, x = y / height, x / width
    pixels = np.empty((height, width, 3), np.float32)
    for channel in range(3):
        fx, fy, phase = rng.uniform(0.5, 2.0), rng.uniform(0.5, 2.0), rng.uniform(0, 2 * np.pi)
        pixels[..., channel] = 128 + 70 * np.sin(2 * np.pi * (fx * x + fy * y) + phase)
    pixels += 18 * (np.sin(x * width / 7.0) * np.sin(y * height / 5.0))[..., None]  # texture, periods of ~40 px
    pixels += rng.normal(0, 6, (height, width, 1)).astype(np.float32)
    for _ in range(12):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.03, 0.15)
        disk = ((x - cx) * width / height) ** 2 + (y - cy) ** 2 < r * r
        box = (np.abs(x - cx) < r) & (np.abs(y - cy) < 0.7 * r)
        pixels[disk if rng.random() < 0.5 else box] = rng.uniform(0, 255, 3)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("resize_mode", ["shortest", "squash"])
@pytest.mark.parametrize(("width", "height", "image_size"), [(3000, 2000, 224), (2000, 3000, 336)])
def test_jpeg_draft_stays_close_to_the_full_decode(
    tmp_path: Path, width: int, height: int, image_size: int, resize_mode: ResizeMode
) -> None:
    path = tmp_path / "photo.jpg"
    photo_like(width, height, seed=width).save(path, quality=90)
    with Image.open(path) as image:
        apply_draft(image, image_size)
        assert min(image.size) >= DRAFT_MARGIN * image_size
        assert max(image.size) < max(width, height)  # the draft did reduce
    spec = DecodeSpec(image_size, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, resize_mode=resize_mode, draft=True)
    drafted = decode_ok(path, spec)
    exact = decode_ok(path, dataclasses.replace(spec, draft=False))
    assert (drafted.width, drafted.height) == (exact.width, exact.height) == (width, height)
    difference = np.abs(drafted.pixels.astype(np.float32) - exact.pixels.astype(np.float32)) / 255
    assert difference.mean() < DRAFT_MEAN_ABS_BOUND
    assert difference.max() < DRAFT_MAX_ABS_BOUND


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_draft_keeps_exif_orientation_and_original_size(tmp_path: Path, orientation: int) -> None:
    """A 1600x1200 upright picture stored rotated/flipped: drafted 1/8, still upright, original size reported."""
    upright = np.kron(images.upright_marker_picture(), np.ones((25, 25, 1), np.uint8))  # [1200, 1600, 3]
    stored = np.ascontiguousarray(images.STORED_FOR_ORIENTATION[orientation](upright))
    exif = Image.Exif()
    exif[images.EXIF_ORIENTATION_TAG] = orientation
    path = tmp_path / f"big{orientation}.jpg"
    Image.fromarray(stored).save(path, exif=exif.tobytes(), quality=95)
    side = 48  # 2 * 48 = 96: 1/8 scale (150 x 200) is allowed
    decoded = decode_ok(path, DecodeSpec(side, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD))
    assert (decoded.width, decoded.height) == (1600, 1200)
    resized = np.asarray(Image.fromarray(upright).resize((64, 48), Image.Resampling.BICUBIC)).astype(int)
    assert np.abs(decoded.pixels.astype(int) - resized[:, 8:56]).mean() < 4
    assert tuple(decoded.pixels[4, 4]) == pytest.approx((255, 0, 0), abs=12)  # red marker top-left


def test_animations_give_their_first_frame(tmp_path: Path) -> None:
    for writer in (images.write_gif_animated, images.write_webp_animated):
        decoded = decode_ok(writer(tmp_path).path)
        assert np.abs(decoded.pixels.astype(int) - (255, 0, 0)).max() <= 1


def test_content_hash_size_and_mtime_describe_the_bytes_read(tmp_path: Path) -> None:
    path = images.write_jpeg_rgb(tmp_path).path
    decoded = decode_ok(path)
    data = path.read_bytes()
    stat = path.stat()
    assert decoded.content_hash == hashlib.sha256(data).hexdigest()
    assert (decoded.path, decoded.size, decoded.mtime_ns) == (path.name, len(data), stat.st_mtime_ns)


def test_zero_byte_file(tmp_path: Path) -> None:
    (tmp_path / "empty.jpg").write_bytes(b"")
    failure = decode_failure(tmp_path / "empty.jpg")
    assert failure.reason == "empty file"
    assert failure.content_hash == hashlib.sha256(b"").hexdigest()
    assert failure.size == 0


def test_text_file_named_jpg_is_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "notes.jpg").write_text("shopping list: milk, eggs\n")
    failure = decode_failure(tmp_path / "notes.jpg")
    assert failure.reason.startswith("not an image: ")
    assert failure.content_hash == hashlib.sha256(b"shopping list: milk, eggs\n").hexdigest()


def test_random_bytes_png_is_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "noise.png").write_bytes(np.random.default_rng(0).bytes(4096))
    assert decode_failure(tmp_path / "noise.png").reason.startswith("not an image: ")


def test_truncated_jpeg(tmp_path: Path) -> None:
    failure = decode_failure(images.write_truncated_jpeg(tmp_path))
    assert failure.reason.startswith("truncated: ")
    assert failure.content_hash is not None


def test_corrupt_png_data_stream(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[2000:2100] = bytes(100)  # zeroes inside the IDAT zlib stream
    (tmp_path / "corrupt.png").write_bytes(bytes(data))
    assert decode_failure(tmp_path / "corrupt.png").reason.startswith("corrupt: ")


def png_claiming_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR is patched to claim ``width`` x ``height`` (CRC fixed): a decompression bomb."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    ihdr = 8  # after the signature: length (4), b"IHDR" (4), data (13), CRC (4)
    data[ihdr + 8 : ihdr + 16] = struct.pack(">II", width, height)
    data[ihdr + 21 : ihdr + 25] = struct.pack(">I", zlib.crc32(bytes(data[ihdr + 4 : ihdr + 21])))
    return bytes(data)


def test_decompression_bomb_refused_by_pillow_before_decoding(tmp_path: Path) -> None:
    (tmp_path / "bomb.png").write_bytes(png_claiming_size(100_000, 100_000))
    assert decode_failure(tmp_path / "bomb.png").reason.startswith("decompression bomb: ")


def test_decompression_bomb_refused_by_max_pixels_before_decoding(tmp_path: Path) -> None:
    (tmp_path / "bomb.png").write_bytes(png_claiming_size(2000, 2000))
    spec = DecodeSpec(SIZE, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, max_pixels=1_000_000)
    failure = decode_failure(tmp_path / "bomb.png", spec)
    assert failure.reason == "decompression bomb: 2000 x 2000 = 4000000 pixels exceeds the limit of 1000000"


def test_file_removed_after_the_scan_is_missing(tmp_path: Path) -> None:
    path = images.write_jpeg_rgb(tmp_path).path
    entry = scanned(tmp_path, path.name)
    path.unlink()
    failure = decode_file(tmp_path, entry, SPEC)
    assert isinstance(failure, DecodeFailure)
    assert failure.reason.startswith("missing: ")
    assert (failure.size, failure.mtime_ns, failure.content_hash) == (entry.size, entry.mtime_ns, None)


def test_permission_denied_is_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = images.write_jpeg_rgb(tmp_path).path

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(decode, "open", denied, raising=False)  # shadows the builtin there; root ignores chmod
    assert decode_failure(path).reason == "unreadable: permission denied"


def test_file_over_max_bytes_is_skipped(tmp_path: Path) -> None:
    path = images.write_jpeg_rgb(tmp_path).path
    size = path.stat().st_size
    failure = decode_failure(path, DecodeSpec(SIZE, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, max_bytes=size - 1))
    assert failure.reason == f"too large: {size} bytes exceeds the limit of {size - 1}"
    assert (failure.size, failure.content_hash) == (size, None)


def test_file_over_the_default_max_bytes_is_not_read(tmp_path: Path) -> None:
    path = tmp_path / "huge.jpg"
    with open(path, "wb") as file:  # sparse: no disk space used, and reading it would take seconds
        file.truncate(DEFAULT_MAX_BYTES + 1)
    failure = decode_failure(path)
    assert failure.reason == f"too large: {DEFAULT_MAX_BYTES + 1} bytes exceeds the limit of {DEFAULT_MAX_BYTES}"


@pytest.mark.skipif(importlib.util.find_spec("pillow_heif") is not None, reason="pillow-heif is installed")
def test_heic_without_pillow_heif_is_unsupported(tmp_path: Path) -> None:
    (tmp_path / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic")
    assert decode_failure(tmp_path / "photo.heic").reason.startswith("unsupported format: ")


@pytest.mark.parametrize("resize_mode", ["shortest", "squash"])
def test_normalized_batch_equals_preprocess(tmp_path: Path, resize_mode: ResizeMode) -> None:
    samples = images.write_all_samples(tmp_path)
    paths = [samples[kind].path for kind in ("jpeg_rgb", "png_rgba", "gif_palette", "tiff_cmyk", "webp_animated")]
    paths.append(images.write_oriented(tmp_path, 6, "jpg").path)
    preprocess = Preprocess(SIZE, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, resize_mode)
    spec = DecodeSpec(SIZE, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, resize_mode=resize_mode, draft=False)
    batch = normalize_pixels(np.stack([decode_ok(p, spec).pixels for p in paths]), spec.mean, spec.std)
    assert batch.dtype == np.float32 and batch.shape == (len(paths), 3, SIZE, SIZE) and batch.flags.c_contiguous
    for path, item in zip(paths, batch, strict=True):
        with Image.open(path) as image:
            expected = preprocess(image)
        torch.testing.assert_close(torch.from_numpy(item), expected, atol=ATOL, rtol=0)


def test_decode_spec_validates() -> None:
    with pytest.raises(ValueError, match="DecodeSpec"):
        DecodeSpec(0, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
    with pytest.raises(ValueError, match="DecodeSpec"):
        DecodeSpec(SIZE, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, resize_mode="longest")  # type: ignore[arg-type]


def test_squash_keeps_the_whole_picture_where_the_crop_drops_its_sides(tmp_path: Path) -> None:
    """A 48x16 picture, red | green | blue thirds: the squash shows all three, the centre crop only green."""
    pixels = np.zeros((16, 48, 3), np.uint8)
    for third, channel in enumerate((0, 1, 2)):
        pixels[:, 16 * third : 16 * (third + 1), channel] = 255
    Image.fromarray(pixels).save(tmp_path / "thirds.png")
    squash = DecodeSpec(SIZE, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, resize_mode="squash")
    squashed, cropped = decode_ok(tmp_path / "thirds.png", squash).pixels, decode_ok(tmp_path / "thirds.png").pixels
    assert squashed[:, 1, 0] == pytest.approx(255, abs=8) and squashed[:, -2, 2] == pytest.approx(255, abs=8)
    assert (cropped[:, :, 1] == 255).all() and (cropped[:, :, [0, 2]] == 0).all()


def test_decode_file_works_in_spawned_worker_processes(tmp_path: Path) -> None:
    paths = [images.write_jpeg_rgb(tmp_path).path, images.write_png_rgba(tmp_path).path]
    paths.append(images.write_truncated_jpeg(tmp_path))
    entries = [scanned(tmp_path, p.name) for p in paths]
    local = [decode_file(tmp_path, entry, SPEC) for entry in entries]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        remote = list(pool.map(decode_file, [tmp_path] * len(entries), entries, [SPEC] * len(entries)))
    assert [type(r) for r in remote] == [Decoded, Decoded, DecodeFailure]
    for here, there in zip(local, remote, strict=True):
        if isinstance(here, Decoded):
            assert isinstance(there, Decoded)
            assert (here.path, here.content_hash, here.width, here.height) == (
                there.path, there.content_hash, there.width, there.height,
            )  # fmt: skip
            np.testing.assert_array_equal(here.pixels, there.pixels)
        else:
            assert here == there


@pytest.mark.parametrize("name", [b"a\\b.png", b"caf\xe9.png", b"new\nline.png", b"\\xe9.png"])
def test_decode_opens_the_file_its_stored_path_names(
    tmp_path: Path, name: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    real = Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), name)))
    Image.new("RGB", (9, 9), (200, 10, 10)).save(real, format="PNG")
    stored = paths.to_stored(os.fsdecode(name))
    stat = real.stat()
    result = decode_file(tmp_path, ScannedFile(stored, stat.st_size, stat.st_mtime_ns), SPEC)
    assert isinstance(result, Decoded) and result.path == stored
    assert result.content_hash == hashlib.sha256(real.read_bytes()).hexdigest()
    real.write_bytes(b"")
    caplog.set_level(logging.DEBUG, logger="indexer.decode")
    failure = decode_file(tmp_path, ScannedFile(stored, 0, 0), SPEC)
    assert isinstance(failure, DecodeFailure) and (failure.path, failure.reason) == (stored, "empty file")
    assert f"skipping {paths.display(stored)}: empty file" in caplog.messages  # one line, whatever the name
