"""Reading image-caption datasets: captions.jsonl, captions.csv, .txt sidecars, class folders, and bad records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clip_model
from clip_model.train.data import (
    DatasetError,
    PairDataset,
    PreloadedPairDataset,
    preloaded_bytes,
    read_labelled,
    read_pairs,
)


def image(path: Path, colour: tuple[int, int, int] = (200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), colour).save(path)
    return path


def test_jsonl_csv_and_sidecars(tmp_path: Path) -> None:
    image(tmp_path / "a.png")
    image(tmp_path / "sub" / "b.jpg")
    records = [{"path": "a.png", "caption": "a red box", "label": "box"}, {"path": "sub/b.jpg", "caption": "red"}]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    pairs = read_pairs(tmp_path)
    assert [(p.image.name, p.caption, p.label) for p in pairs] == [
        ("a.png", "a red box", "box"),
        ("b.jpg", "red", None),
    ]
    csv_file = tmp_path / "other.csv"
    csv_file.write_text('path,caption,label\na.png,"a box, red",box\n', encoding="utf-8")
    assert read_pairs(tmp_path, csv_file)[0].caption == "a box, red"
    sidecars = tmp_path / "sidecars"
    image(sidecars / "x.png")
    (sidecars / "x.txt").write_text("  a caption from a text file \n", encoding="utf-8")
    image(sidecars / "no_caption.png")
    assert [(p.image.name, p.caption) for p in read_pairs(sidecars)] == [("x.png", "a caption from a text file")]


def test_class_folders_give_labels(tmp_path: Path) -> None:
    image(tmp_path / "cats" / "1.png")
    image(tmp_path / "dogs" / "2.png")
    image(tmp_path / "dogs" / "3.png")
    pairs = read_labelled(tmp_path)
    assert [(p.label, p.caption) for p in pairs] == [("cats", "cats"), ("dogs", "dogs"), ("dogs", "dogs")]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"path": "a.png"}', "needs non-empty 'path' and 'caption'"),
        ('{"path": "../a.png", "caption": "x"}', "without '..'"),
        ('{"path": "missing.png", "caption": "x"}', "does not exist"),
        ("{not json", "not JSON"),
    ],
)
def test_bad_records_name_the_file_and_line(tmp_path: Path, content: str, message: str) -> None:
    image(tmp_path / "a.png")
    (tmp_path / "captions.jsonl").write_text('{"path": "a.png", "caption": "ok"}\n' + content + "\n")
    with pytest.raises(DatasetError, match=message) as info:
        read_pairs(tmp_path)
    assert "captions.jsonl:2" in str(info.value)


def test_empty_or_missing_datasets_say_what_is_expected(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        read_pairs(tmp_path / "nope")
    with pytest.raises(DatasetError, match="captions.jsonl or captions.csv"):
        read_pairs(tmp_path)
    image(tmp_path / "a.png")
    (tmp_path / "captions.csv").write_text("path,caption\na.png,x\n")
    with pytest.raises(DatasetError, match="no label"):
        read_labelled(tmp_path)


def test_pair_dataset_yields_preprocessed_pixels_and_tokens(tmp_path: Path) -> None:
    image(tmp_path / "a.png")
    (tmp_path / "captions.csv").write_text("path,caption\na.png,a red box\n")
    preprocess = clip_model.Preprocess(32)
    pixels, tokens = PairDataset(read_pairs(tmp_path), preprocess)[0]
    with Image.open(tmp_path / "a.png") as source:
        assert torch.equal(pixels, preprocess(source))
    assert torch.equal(tokens, clip_model.tokenize(["a red box"])[0])


def varied_images(root: Path) -> None:
    """Images that take every path of the preprocessing: sizes, modes, alpha, palette, 16-bit, EXIF rotation."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (45, 70, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "wide.png")
    Image.fromarray(noise).transpose(Image.Transpose.TRANSPOSE).save(root / "tall.jpg", quality=90)
    Image.fromarray(np.dstack([noise, noise[..., :1]])).save(root / "alpha.png")
    Image.fromarray(noise).convert("P").save(root / "palette.png")
    Image.fromarray(noise[..., 0].astype(np.uint16) * 257).save(root / "deep.png")  # 16-bit grey
    rotated = Image.fromarray(noise)
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotated 90 degrees clockwise
    rotated.save(root / "rotated.jpg", exif=exif, quality=90)
    Image.fromarray(noise[:8, :9]).save(root / "small.webp")  # smaller than the model's input: upsampled
    names = sorted(p.name for p in root.iterdir())
    lines = ["path,caption"] + [f"{name},caption number {i} of {name}" for i, name in enumerate(names)]
    (root / "captions.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_preloaded_items_are_bit_identical_to_decoding_each_time(tmp_path: Path) -> None:
    varied_images(tmp_path)
    pairs = read_pairs(tmp_path)
    preprocess = clip_model.Preprocess(32, mean=(0.5, 0.25, 0.125), std=(0.3, 0.2, 0.1))
    each_time, preloaded = PairDataset(pairs, preprocess, 20), PreloadedPairDataset(pairs, preprocess, 20)
    assert len(preloaded) == len(each_time) == 7
    for index in range(len(pairs)):
        (pixels, tokens), (expected_pixels, expected_tokens) = preloaded[index], each_time[index]
        assert pixels.dtype == torch.float32 and pixels.shape == (3, 32, 32)
        assert torch.equal(pixels, expected_pixels), pairs[index].image.name  # exactly: same float32 steps
        assert torch.equal(tokens, expected_tokens)
    assert preloaded_bytes(pairs, 32) == preloaded.pixels.numel() == 7 * 3 * 32 * 32


def test_a_broken_image_fails_the_preload_naming_the_file(tmp_path: Path) -> None:
    image(tmp_path / "good.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "captions.csv").write_text("path,caption\ngood.png,fine\nbroken.jpg,broken\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"cannot read training image .*broken\.jpg"):
        PreloadedPairDataset(read_pairs(tmp_path), clip_model.Preprocess(32))
