"""The synthetic shapes dataset: determinism, held-out combinations, captions, visibility and the folder cache."""

from __future__ import annotations

import argparse
import itertools
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clip_model.train import synthetic
from clip_model.train.data import DatasetError, read_pairs
from clip_model.train.synthetic import (
    BACKGROUNDS,
    CAPTION_TEMPLATES,
    COLORS,
    HELD_OUT,
    POSITIONS,
    SHAPES,
    SIZES,
    attribute_query,
    generate,
    load_records,
    render,
    sample_attributes,
)

SAMPLED = 1500  # attribute draws per split: cheap (no drawing), enough to see every combination many times
SMALL = 16  # image side for tests that write files


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_arguments_give_byte_identical_files(tmp_path: Path) -> None:
    first = files(generate(tmp_path / "a", 20, "train", seed=3, image_size=SMALL))
    second = files(generate(tmp_path / "b", 20, "train", seed=3, image_size=SMALL))
    assert len(first) == 20 + 2  # images, captions.jsonl, .spec.json
    assert first == second


def test_image_does_not_depend_on_count_but_on_seed_and_split(tmp_path: Path) -> None:
    few = files(generate(tmp_path / "few", 5, "train", image_size=SMALL))
    many = files(generate(tmp_path / "many", 12, "train", image_size=SMALL))
    image = "images/000004.png"
    assert few[image] == many[image]
    assert sample_attributes("train", 0, 4)[1] == sample_attributes("train", 0, 4)[1]
    captions = {split: [sample_attributes(split, 0, i)[1] for i in range(50)] for split in ("train", "test")}
    assert captions["train"] != captions["test"]
    assert captions["train"] != [sample_attributes("train", 1, i)[1] for i in range(50)]


def test_held_out_pairs_never_in_train_or_test_and_alone_in_heldout() -> None:
    seen = {
        split: {(a["color"], a["shape"]) for a, _, _ in (sample_attributes(split, 0, i) for i in range(SAMPLED))}
        for split in ("train", "test", "heldout")
    }
    held = set(HELD_OUT)
    all_pairs = set(itertools.product(COLORS, SHAPES))
    assert seen["train"] == seen["test"] == all_pairs - held
    assert seen["heldout"] == held
    train_colors, train_shapes = zip(*seen["train"], strict=True)
    assert set(train_colors) == set(COLORS) and set(train_shapes) == set(SHAPES)  # each still seen in other pairs


def test_generated_folder_records_attributes_and_reads_as_pairs(tmp_path: Path) -> None:
    root = generate(tmp_path / "held", 12, "heldout", image_size=SMALL)
    records = load_records(root)
    assert {(r.color, r.shape) for r in records} <= set(HELD_OUT)
    pairs = read_pairs(root)
    assert synthetic.pairs_of(root) == pairs
    assert [p.label for p in pairs] == [r.shape for r in records]
    assert [p.caption for p in pairs] == [r.caption for r in records]
    assert all(r.path.is_file() for r in records)


def test_captions_mention_every_attribute_they_promise() -> None:
    for template in CAPTION_TEMPLATES:
        for field in ("shape", "color"):  # every caption names the shape and its colour; some leave the rest out
            assert f"{{{field}}}" in template, (template, field)
    assert any("{position}" not in t and "{background}" not in t for t in CAPTION_TEMPLATES)  # query-like captions
    skeletons = set()
    for index in range(400):
        attributes, caption, _ = sample_attributes("train", 0, index)
        for field in ("shape", "color"):
            assert attributes[field] in caption
        assert not re.search(r"\ba [aeiou]", caption), caption  # "an orange", never "a orange"
        for field, value in attributes.items():
            caption = caption.replace(value, f"<{field}>")
        skeletons.add(caption.replace("an <", "a <"))
    assert skeletons == {t.replace("{", "<").replace("}", ">") for t in CAPTION_TEMPLATES}  # every phrasing is used


def test_attribute_query_is_canonical() -> None:
    record = {"shape": "circle", "color": "red", "size": "small", "position": "top left", "background": "white"}
    assert attribute_query(record) == "a small red circle"
    assert attribute_query(record, ("shape", "color", "size")) == "a small red circle"
    assert attribute_query(record, ("color",)) == "a red shape"
    assert attribute_query({**record, "color": "orange"}, ("color", "shape")) == "an orange circle"
    assert attribute_query(record, synthetic.ATTRIBUTES) == "a small red circle in the top left on a white background"
    with pytest.raises(ValueError, match="subset"):
        attribute_query(record, ("texture",))


def test_every_colour_is_far_from_every_background_it_is_drawn_on() -> None:
    for color, rgb in COLORS.items():
        allowed = synthetic.backgrounds_for(color)
        assert allowed, color
        assert all(math.dist(rgb, BACKGROUNDS[b]) >= synthetic.MIN_CONTRAST for b in allowed)


@pytest.mark.parametrize("size", list(SIZES))
def test_no_shape_is_drawn_invisible(size: str) -> None:
    for shape, color in itertools.product(SHAPES, COLORS):
        for background in synthetic.backgrounds_for(color):
            pixels = np.asarray(render(shape, color, size, "center", background, image_size=64), dtype=np.float64)
            fill = np.linalg.norm(pixels - COLORS[color], axis=-1) < 1  # exactly the shape colour
            plain = np.linalg.norm(pixels - BACKGROUNDS[background], axis=-1) < 1
            assert fill[32, 32], (shape, color, background)  # the centre lies inside every shape
            assert plain[0, 0] and plain[-1, -1]
            assert fill.mean() > (0.01 if size == "small" else 0.04), (shape, color, background, fill.mean())
            assert plain.mean() > 0.5


def test_generated_images_show_their_shape_colour(tmp_path: Path) -> None:
    for record in load_records(generate(tmp_path, 40, "test", seed=5, image_size=32)):
        pixels = np.asarray(Image.open(record.path).convert("RGB"), dtype=np.float64)
        near_colour = np.linalg.norm(pixels - COLORS[record.color], axis=-1) < 40
        x, y = POSITIONS[record.position]
        assert near_colour.sum() >= 4, record
        assert near_colour[round(y * 32) - 3 : round(y * 32) + 4, round(x * 32) - 3 : round(x * 32) + 4].any(), record


def test_render_rejects_unknown_attributes() -> None:
    with pytest.raises(ValueError, match="unknown shape"):
        render("blob", "red", "small", "center", "white")
    with pytest.raises(ValueError, match="at least"):
        render("circle", "red", "small", "center", "white", image_size=4)


def test_cached_folder_is_reused_and_other_arguments_regenerate(tmp_path: Path) -> None:
    root = generate(tmp_path, 8, "train", image_size=SMALL)
    stamp = (root / "captions.jsonl").stat().st_mtime_ns
    image_stamp = (root / "images" / "000000.png").stat().st_mtime_ns
    generate(tmp_path, 8, "train", image_size=SMALL)
    assert (root / "captions.jsonl").stat().st_mtime_ns == stamp
    assert (root / "images" / "000000.png").stat().st_mtime_ns == image_stamp
    generate(tmp_path, 3, "test", image_size=SMALL)
    assert sorted(p.name for p in (root / "images").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    assert len(load_records(root)) == 3


def test_foreign_captions_file_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "captions.jsonl").write_text('{"path": "x.png", "caption": "mine"}\n', encoding="utf-8")
    with pytest.raises(DatasetError, match="not written by synth"):
        generate(tmp_path, 2, "train", image_size=SMALL)
    assert "mine" in (tmp_path / "captions.jsonl").read_text(encoding="utf-8")


def test_synth_command_writes_the_folder(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    synthetic.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path), "--count", "4", "--split", "heldout", "--image-size", "16"])
    assert synthetic.run(args) == 0
    assert len(load_records(tmp_path)) == 4
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", str(tmp_path), "--count", "0"])


def silhouette(shape: str, size: str) -> np.ndarray:
    pixels = np.asarray(render(shape, "red", size, "center", "white", image_size=64), dtype=np.float64)
    return np.linalg.norm(pixels - COLORS["red"], axis=-1) < 60  # [64, 64] bool, anti-aliased edge half counted


@pytest.mark.parametrize("size", list(SIZES))
def test_no_two_shapes_share_a_silhouette(size: str) -> None:
    # a hexagon covered 0.83 of a circle's pixels (and a thick cross 0.79 of a square's): the demo model then
    # confused them, and "a red circle" found red hexagons; every pair now overlaps by at most 0.65
    for a, b in itertools.combinations(SHAPES, 2):
        first, second = silhouette(a, size), silhouette(b, size)
        overlap = (first & second).sum() / (first | second).sum()
        assert overlap < 0.7, (a, b, size, round(float(overlap), 3))


def test_sizes_stay_apart_under_jitter() -> None:
    small, large = SIZES["small"], SIZES["large"]
    assert small * (1 + synthetic.SIZE_JITTER) < large * (1 - synthetic.SIZE_JITTER)
