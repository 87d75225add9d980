"""The synthetic shapes dataset: one coloured shape per image, captioned with its attributes.

Each image shows one shape (:data:`SHAPES`) in one colour (:data:`COLORS`), small or large (:data:`SIZES`), in one
of five positions (:data:`POSITIONS`), on a plain background (:data:`BACKGROUNDS`). Captions say all of that in one
of several phrasings (:data:`CAPTION_TEMPLATES`), chosen per image. A few colour-shape pairs (:data:`HELD_OUT`) never
appear in the ``train`` split, so a model's compositional generalisation can be measured on the ``heldout`` split,
which holds only them; the ``test`` split holds the other pairs, drawn from another random stream than ``train``.

Novel colours (:data:`NOVEL_COLORS`, e.g. pink) appear in no split; ``generate(..., novel_color="pink")`` writes a
set in which each image has that colour with probability ``novel_share`` and otherwise one of the split's own
colour-shape pairs, with the same captions: a small captioned set that teaches an attribute a model trained on the
other splits never saw (the fine-tuning demo in docs/training.md). :func:`recall_by_color` measures, per colour,
how well attribute queries find their images in such a folder.

Invariants:
- Deterministic: image ``i`` of ``(split, seed, image_size)`` depends on nothing else (not even ``count``), and the
  same arguments give byte-identical PNG and JSONL files.
- Visible: every colour is at least :data:`MIN_CONTRAST` (Euclidean RGB distance) from every background it is drawn
  on, and the shape's centre pixel always lies inside the shape.
- Distinct: no two shapes' silhouettes overlap by more than 0.65 (intersection over union, same size and place), and
  a small shape stays smaller than a large one under any jitter.
- Shapes are drawn at :data:`SUPERSAMPLE` x the output size and box-downsampled, which anti-aliases the edges.

Layout written by :func:`generate` (readable by :func:`clip_model.train.data.read_pairs`)::

    out_dir/images/000000.png ...
    out_dir/captions.jsonl   # path, caption, label (= shape), shape, color, size, position, background
    out_dir/.spec.json       # the arguments that produced the folder; a matching spec makes generate() a no-op
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Literal, get_args

from PIL import Image, ImageDraw

from .data import CAPTION_FILES, DatasetError, Pair

if TYPE_CHECKING:
    from ..model import ImageTextModel
    from ..preprocess import Preprocess

logger = logging.getLogger(__name__)

Split = Literal["train", "test", "heldout"]
SPLITS: tuple[str, ...] = get_args(Split)

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}
NOVEL_COLORS: dict[str, tuple[int, int, int]] = {"pink": (255, 120, 190)}  # in no split: for fine-tuning demos
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (150, 150, 150)}
SIZES: dict[str, float] = {"small": 0.18, "large": 0.25}  # circumradius as a fraction of the image side
POSITIONS: dict[str, tuple[float, float]] = {  # shape centre (x, y) as fractions of the image side
    "top left": (0.28, 0.28),
    "top right": (0.72, 0.28),
    "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72),
    "center": (0.5, 0.5),
}
# Colour-shape pairs that never appear in the train split; every colour and every shape still does, in other pairs.
HELD_OUT: tuple[tuple[str, str], ...] = (
    ("purple", "star"),
    ("green", "triangle"),
    ("orange", "diamond"),
    ("blue", "cross"),
)
ATTRIBUTES = ("shape", "color", "size", "position", "background")
CAPTION_TEMPLATES = (
    "a {size} {color} {shape} in the {position} on a {background} background",
    "a {color} {shape}, {size}, {position}, {background} background",
    "{size} {color} {shape} at the {position}",
    "a {background} picture with a {size} {color} {shape} in the {position}",
    "a photo of a {size} {color} {shape} in the {position}",
    "{color} {shape}, {size}, in the {position} of a {background} image",
    "there is a {size} {color} {shape} at the {position}",
    # captions that leave attributes out, as search queries do ("a small red circle"): without them the text tower
    # never sees a caption end right after the shape, and short queries land off the training distribution
    "a {size} {color} {shape}",
    "a {color} {shape}",
    "a {size} {color} {shape} on a {background} background",
    "a {color} {shape} in the {position}",
)

DEFAULT_IMAGE_SIZE = 64  # pixels per side
MIN_IMAGE_SIZE = 16  # below this a small shape is a few pixels and the attributes stop being legible
SUPERSAMPLE = 4  # drawing resolution multiplier; box-downsampling then anti-aliases the edges
MIN_CONTRAST = 90.0  # least Euclidean RGB distance between a shape colour and the background it is drawn on
POSITION_JITTER = 0.03  # +- fraction of the image side the centre moves
SIZE_JITTER = 0.1  # +- relative change of the radius
ROTATION_JITTER_DEG = 15.0  # +- rotation of every shape but the circle
STAR_INNER_RATIO = 0.45  # inner / outer radius of the five-pointed star
CROSS_ARM_RATIO = 0.22  # half-width of a cross arm / its length (wider arms read as a notched square when small)
TRIANGLE_SCALE = 1.15  # equilateral triangles look small at the same circumradius; enlarge them a little
DIAMOND_WIDTH_RATIO = 0.6  # half-width / half-height of the diamond: a tall rhombus, not a tilted square
GENERATOR_VERSION = 5  # bump when the drawing or the captions change, so cached folders are regenerated
SPEC_FILE = ".spec.json"
CAPTIONS_FILE = CAPTION_FILES[0]  # captions.jsonl
IMAGE_DIR = "images"
LOG_EVERY = 5000  # images between progress messages

_ARTICLE = re.compile(r"\ba (?=[aeiou])")


@dataclass(frozen=True)
class ShapeRecord:
    """One generated image: its file (absolute, or relative to the dataset root), caption and attributes."""

    path: Path
    caption: str
    shape: str
    color: str
    size: str
    position: str
    background: str

    @property
    def label(self) -> str:
        """The class for zero-shot accuracy and linear probes: the shape name."""
        return self.shape

    @property
    def attributes(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in ATTRIBUTES}

    def to_pair(self) -> Pair:
        """A :class:`~clip_model.train.data.Pair` with this record's caption and shape label."""
        return Pair(self.path, self.caption, self.label)


def combinations(split: Split) -> list[tuple[str, str]]:
    """The (colour, shape) pairs images of ``split`` are drawn from: :data:`HELD_OUT` for ``heldout``, else the rest."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    pairs = [(color, shape) for color in COLORS for shape in SHAPES]
    held = set(HELD_OUT)
    return [p for p in pairs if (p in held) == (split == "heldout")]


def _rgb(color: str) -> tuple[int, int, int]:
    return COLORS[color] if color in COLORS else NOVEL_COLORS[color]


def backgrounds_for(color: str) -> list[str]:
    """Backgrounds ``color`` (of :data:`COLORS` or :data:`NOVEL_COLORS`) is visible on (RGB distance at least
    :data:`MIN_CONTRAST`)."""
    return [name for name, rgb in BACKGROUNDS.items() if math.dist(rgb, _rgb(color)) >= MIN_CONTRAST]


def caption_for(attributes: Mapping[str, str], template: str) -> str:
    """``template`` (one of :data:`CAPTION_TEMPLATES`) filled with ``attributes``, with "a" -> "an" before vowels."""
    return _ARTICLE.sub("an ", template.format(**attributes))


def attribute_query(record: ShapeRecord | Mapping[str, str], fields: Sequence[str] = ("size", "color", "shape")) -> str:
    """A canonical text naming only ``fields`` of a record, e.g. ``"a small red circle"``.

    The order is fixed whatever the order of ``fields``: size, colour, shape (``"shape"`` if the shape is not asked
    for), then ``"in the <position>"`` and ``"on a <background> background"``. Images sharing those attributes get
    the same query, so it works as a shared caption for retrieval (:func:`clip_model.train.evaluate.retrieval_metrics`
    counts every image with that caption as relevant).
    """
    unknown = set(fields) - set(ATTRIBUTES)
    if unknown or not fields:
        raise ValueError(f"fields must be a non-empty subset of {ATTRIBUTES}, got {tuple(fields)}")
    values = record.attributes if isinstance(record, ShapeRecord) else record
    words = [values[name] for name in ("size", "color") if name in fields]
    text = "a " + " ".join([*words, values["shape"] if "shape" in fields else "shape"])
    if "position" in fields:
        text += f" in the {values['position']}"
    if "background" in fields:
        text += f" on a {values['background']} background"
    return _ARTICLE.sub("an ", text)


def render(
    shape: str,
    color: str,
    size: str,
    position: str,
    background: str,
    image_size: int = DEFAULT_IMAGE_SIZE,
    rng: random.Random | None = None,
) -> Image.Image:
    """Draw one shape: an RGB image ``image_size`` x ``image_size``.

    ``rng`` adds small random jitter of position, radius and rotation (see the ``*_JITTER`` constants); ``None``
    draws the canonical, unjittered shape. ValueError for an unknown attribute value or a colour on a background it
    would be hard to see on.
    """
    for name, value, known in (
        ("shape", shape, SHAPES),
        ("color", color, {**COLORS, **NOVEL_COLORS}),
        ("size", size, SIZES),
        ("position", position, POSITIONS),
        ("background", background, BACKGROUNDS),
    ):
        if value not in known:
            raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(known)}")
    if background not in backgrounds_for(color):
        raise ValueError(f"a {color} shape is not clearly visible on a {background} background")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE} pixels, got {image_size}")
    side = image_size * SUPERSAMPLE
    cx, cy = POSITIONS[position]
    radius, rotation = SIZES[size], 0.0
    if rng is not None:
        cx += rng.uniform(-POSITION_JITTER, POSITION_JITTER)
        cy += rng.uniform(-POSITION_JITTER, POSITION_JITTER)
        radius *= 1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER)
        rotation = math.radians(rng.uniform(-ROTATION_JITTER_DEG, ROTATION_JITTER_DEG))
    canvas = Image.new("RGB", (side, side), BACKGROUNDS[background])
    draw = ImageDraw.Draw(canvas)
    center, r = (cx * side, cy * side), radius * side
    if shape == "circle":
        draw.ellipse((center[0] - r, center[1] - r, center[0] + r, center[1] + r), fill=_rgb(color))
    else:
        draw.polygon(_polygon(shape, center, r, rotation), fill=_rgb(color))
    return canvas.reduce(SUPERSAMPLE)


def _polygon(shape: str, center: tuple[float, float], r: float, rotation: float) -> list[tuple[float, float]]:
    """Vertices (pixels) of a shape of circumradius ``r`` around ``center``, rotated by ``rotation`` radians."""
    if shape == "square":
        points = _ring(4, r, math.pi / 4)
    elif shape == "triangle":
        points = _ring(3, r * TRIANGLE_SCALE, -math.pi / 2)
    elif shape == "diamond":
        points = [(0.0, -r), (r * DIAMOND_WIDTH_RATIO, 0.0), (0.0, r), (-r * DIAMOND_WIDTH_RATIO, 0.0)]
    elif shape == "star":
        outer, inner = _ring(5, r, -math.pi / 2), _ring(5, r * STAR_INNER_RATIO, -math.pi / 2 + math.pi / 5)
        points = [p for pair in zip(outer, inner, strict=True) for p in pair]
    elif shape == "cross":
        w = r * CROSS_ARM_RATIO
        points = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w)]
        points.append((-w, -w))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    cos, sin = math.cos(rotation), math.sin(rotation)
    return [(center[0] + x * cos - y * sin, center[1] + x * sin + y * cos) for x, y in points]


def _ring(n: int, r: float, start: float) -> list[tuple[float, float]]:
    return [(r * math.cos(start + 2 * math.pi * k / n), r * math.sin(start + 2 * math.pi * k / n)) for k in range(n)]


def sample_attributes(split: Split, seed: int, index: int) -> tuple[dict[str, str], str, random.Random]:
    """Attributes and caption of image ``index`` of ``(split, seed)``, plus the RNG left for drawing its jitter.

    The stream is seeded from the string ``"clip_model.synthetic/<split>/<seed>/<index>"`` (string seeds are hashed
    with SHA-512 by :class:`random.Random`, stable across processes), so splits never share a stream and an image
    does not depend on how many others are generated.
    """
    rng = random.Random(f"clip_model.synthetic/{split}/{seed}/{index}")
    color, shape = rng.choice(combinations(split))
    return _draw_attributes(rng, color, shape)


def sample_novel_attributes(
    split: Split, seed: int, index: int, color: str, share: float
) -> tuple[dict[str, str], str, random.Random]:
    """As :func:`sample_attributes`, in a set that teaches the novel ``color``: with probability ``share`` the image
    is ``color`` and any shape, else one of ``split``'s colour-shape pairs. The stream is seeded from
    ``"clip_model.synthetic/novel/<color>/<share>/<split>/<seed>/<index>"``."""
    rng = random.Random(f"clip_model.synthetic/novel/{color}/{share}/{split}/{seed}/{index}")
    if rng.random() < share:
        return _draw_attributes(rng, color, rng.choice(SHAPES))
    return _draw_attributes(rng, *rng.choice(combinations(split)))


def _draw_attributes(rng: random.Random, color: str, shape: str) -> tuple[dict[str, str], str, random.Random]:
    attributes = {
        "shape": shape,
        "color": color,
        "size": rng.choice(list(SIZES)),
        "position": rng.choice(list(POSITIONS)),
        "background": rng.choice(backgrounds_for(color)),
    }
    return attributes, caption_for(attributes, rng.choice(CAPTION_TEMPLATES)), rng


def _spec(
    count: int, split: Split, seed: int, image_size: int, novel_color: str | None, novel_share: float
) -> dict[str, object]:
    spec: dict[str, object] = {
        "generator": GENERATOR_VERSION, "split": split, "count": count, "seed": seed, "image_size": image_size
    }  # fmt: skip
    if novel_color is not None:
        spec.update(novel_color=novel_color, novel_share=novel_share)
    return spec


def _read_spec(out_dir: Path) -> dict[str, object] | None:
    try:
        data = json.loads((out_dir / SPEC_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def generate(
    out_dir: Path,
    count: int,
    split: Split,
    seed: int = 0,
    image_size: int = DEFAULT_IMAGE_SIZE,
    *,
    novel_color: str | None = None,
    novel_share: float = 0.5,
) -> Path:
    """Write ``count`` images of ``split`` and their captions to ``out_dir``; returns ``out_dir``.

    ``novel_color`` (one of :data:`NOVEL_COLORS`; ``split`` train or test): a share ``novel_share`` of the images,
    drawn per image, in that colour (:func:`sample_novel_attributes`).

    Cached: if ``out_dir`` already holds a complete dataset made with the same arguments (its ``.spec.json``), nothing
    is written. A folder made with other arguments is regenerated (its previous images are removed); a folder with a
    captions file this function did not write raises :class:`DatasetError` rather than being overwritten.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    combinations(split)  # validates split
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE} pixels, got {image_size}")
    if novel_color is not None and (novel_color not in NOVEL_COLORS or split == "heldout" or not 0 < novel_share <= 1):
        raise ValueError(
            f"a novel colour is one of {', '.join(NOVEL_COLORS)} (got {novel_color!r}), in the train or test split "
            f"(got {split!r}), with a share in (0, 1] (got {novel_share})"
        )
    out_dir = Path(out_dir)
    spec = _spec(count, split, seed, image_size, novel_color, novel_share)
    captions_path = out_dir / CAPTIONS_FILE
    previous = _read_spec(out_dir)
    if previous == spec and captions_path.is_file():
        logger.info("%s already holds %d %s images (seed %d); reusing them", out_dir, count, split, seed)
        return out_dir
    if previous is None and captions_path.exists():
        raise DatasetError(f"{captions_path} exists and was not written by synth; choose another --out folder")
    if previous is not None:
        _remove_previous(out_dir)
    (out_dir / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    lines = []
    for index in range(count):
        if novel_color is None:
            attributes, caption, rng = sample_attributes(split, seed, index)
        else:
            attributes, caption, rng = sample_novel_attributes(split, seed, index, novel_color, novel_share)
        relative = f"{IMAGE_DIR}/{index:06d}.png"
        render(**attributes, image_size=image_size, rng=rng).save(out_dir / relative, format="PNG")
        record = {"path": relative, "caption": caption, "label": attributes["shape"], **attributes}
        lines.append(json.dumps(record) + "\n")
        if (index + 1) % LOG_EVERY == 0:
            logger.info("%d / %d images", index + 1, count)
    _write_atomic(captions_path, "".join(lines))
    _write_atomic(out_dir / SPEC_FILE, json.dumps(spec, sort_keys=True) + "\n")
    logger.info("wrote %d %s images to %s in %.1f s", count, split, out_dir, time.perf_counter() - start)
    return out_dir


def _remove_previous(out_dir: Path) -> None:
    """Delete the spec, captions and images of an earlier :func:`generate` run in ``out_dir`` (and nothing else)."""
    (out_dir / SPEC_FILE).unlink(missing_ok=True)
    captions_path = out_dir / CAPTIONS_FILE
    if captions_path.is_file():
        for line in captions_path.read_text(encoding="utf-8").splitlines():
            relative = PurePosixPath(json.loads(line)["path"]) if line.strip() else None
            if relative is not None and relative.parts[:1] == (IMAGE_DIR,) and ".." not in relative.parts:
                (out_dir / relative).unlink(missing_ok=True)
        captions_path.unlink()


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def load_records(root: Path) -> list[ShapeRecord]:
    """The records of a folder written by :func:`generate`, in file order, with absolute image paths.

    Raises :class:`DatasetError` if ``root`` has no ``captions.jsonl`` or a record lacks an attribute.
    """
    root = Path(root)
    captions_path = root / CAPTIONS_FILE
    if not captions_path.is_file():
        raise DatasetError(f"{captions_path} does not exist; generate the folder with `clip-train synth`")
    records = []
    for number, line in enumerate(captions_path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            values = {name: str(row[name]) for name in ("path", "caption", *ATTRIBUTES)}
        except (ValueError, KeyError, TypeError) as exc:
            raise DatasetError(f"{captions_path}:{number}: not a synthetic shapes record ({exc!r})") from exc
        records.append(
            ShapeRecord(
                path=root / PurePosixPath(values["path"]),
                caption=values["caption"],
                **{name: values[name] for name in ATTRIBUTES},
            )
        )
    if not records:
        raise DatasetError(f"{captions_path} holds no records")
    return records


def pairs_of(root: Path) -> list[Pair]:
    """The records of a :func:`generate` folder as :class:`~clip_model.train.data.Pair` (caption, shape label)."""
    return [record.to_pair() for record in load_records(root)]


def recall_by_color(
    model: ImageTextModel, preprocess: Preprocess, root: Path, fields: Sequence[str] = ("size", "color", "shape")
) -> dict[str, dict[str, float]]:
    """Text->image recall@1 of the attribute queries (:func:`attribute_query` over ``fields``) of a :func:`generate`
    folder, per colour of the query, with the whole folder as the gallery; and its chance level.

    Returns ``{colour: {"recall@1": r, "chance": c, "queries": n}}``: ``r`` the share of the colour's distinct
    queries whose most similar image has the query's attributes, ``c`` the same share for a random image (the
    mean over those queries of the fraction of images that match).
    """
    from .evaluate import encode_dataset, normalize_caption

    records = load_records(root)
    queries = [normalize_caption(attribute_query(record, fields)) for record in records]
    pairs = [Pair(record.path, query) for record, query in zip(records, queries, strict=True)]
    image_features, text_features, texts = encode_dataset(model, preprocess, pairs)
    best = (text_features @ image_features.T).argmax(dim=1).tolist()  # [M]: each query's top image
    color_of = {query: record.color for record, query in zip(records, queries, strict=True)}
    found: dict[str, dict[str, float]] = {}
    for text, top in zip(texts, best, strict=True):
        entry = found.setdefault(color_of[text], {"recall@1": 0.0, "chance": 0.0, "queries": 0})
        entry["recall@1"] += queries[top] == text
        entry["chance"] += queries.count(text) / len(queries)
        entry["queries"] += 1
    return {
        color: {"recall@1": e["recall@1"] / e["queries"], "chance": e["chance"] / e["queries"], "queries": e["queries"]}
        for color, e in sorted(found.items())
    }


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="folder to write images/ and captions.jsonl into")
    parser.add_argument("--count", type=_at_least(1), default=1000, help="number of images")
    parser.add_argument("--split", choices=SPLITS, default="train", help="heldout: only the held-out colour-shapes")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same arguments give identical files")
    parser.add_argument(
        "--image-size", type=_at_least(MIN_IMAGE_SIZE), default=DEFAULT_IMAGE_SIZE, help="image side in pixels"
    )
    parser.add_argument(
        "--novel-color", choices=list(NOVEL_COLORS), help="a colour of no split, in --novel-share of the images"
    )
    parser.add_argument("--novel-share", type=float, default=0.5, help="share of images in --novel-color")


def run(args: argparse.Namespace) -> int:
    novel = {"novel_color": args.novel_color, "novel_share": args.novel_share}
    generate(args.out, args.count, args.split, seed=args.seed, image_size=args.image_size, **novel)
    return 0
