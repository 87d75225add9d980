"""Image-caption datasets on disk, for training, fine-tuning and evaluation.

A dataset is an image folder plus captions, in one of three layouts (first match wins):

1. a captions file given explicitly, or ``captions.jsonl`` / ``captions.csv`` in the folder: one record per image,
   ``path`` (relative to the folder, POSIX), ``caption``, optionally ``label`` (a class name, for zero-shot accuracy
   and linear probes). JSONL: one object per line. CSV: a header row naming those columns.
2. images with same-named ``.txt`` files beside them (``cat.jpg`` + ``cat.txt``): the text file is the caption.
3. (labels only, for :func:`read_labelled`) one sub-folder per class: ``dogs/a.jpg`` has label ``dogs``.

Bad records raise :class:`DatasetError` naming the file and line, never a KeyError deep in a training run.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image

from ..errors import ImageDecodeError
from ..preprocess import UINT8_MAX, Preprocess, image_to_array, resize_and_center_crop, to_rgb
from ..tokenizer import tokenize

CAPTION_FILES = ("captions.jsonl", "captions.csv")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
REQUIRED_FIELDS = ("path", "caption")
TextTokenizer = Callable[..., torch.Tensor]  # (texts, context_length=, truncate=) -> [N, context_length] int64


class DatasetError(ValueError):
    """A dataset folder or captions file that cannot be read as described in this module."""


@dataclass(frozen=True)
class Pair:
    """One training example: an image file, its caption and optionally a class label."""

    image: Path
    caption: str
    label: str | None = None


def read_pairs(root: Path, captions: Path | None = None) -> list[Pair]:
    """Every (image, caption[, label]) of the dataset at ``root``, in file order (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    if captions is None:
        captions = next((root / name for name in CAPTION_FILES if (root / name).is_file()), None)
    if captions is not None:
        pairs = _read_records(root, Path(captions))
    else:
        pairs = _read_sidecars(root)
    if not pairs:
        raise DatasetError(
            f"no image-caption pairs in {root}: add captions.jsonl or captions.csv (path, caption[, label]) "
            "or a same-named .txt caption beside each image"
        )
    return pairs


def read_labelled(root: Path, captions: Path | None = None) -> list[Pair]:
    """Pairs that carry labels: from a captions file with a ``label`` column, else one sub-folder per class (the
    caption is then the class name)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    has_file = captions is not None or any((root / name).is_file() for name in CAPTION_FILES)
    if has_file:
        pairs = read_pairs(root, captions)
        missing = [p.image.name for p in pairs if p.label is None]
        if missing:
            raise DatasetError(f"{len(missing)} records of {root} have no label (e.g. {missing[0]})")
        return pairs
    pairs = [
        Pair(path, folder.name, folder.name)
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        for path in sorted(folder.rglob("*"))
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not pairs:
        raise DatasetError(
            f"no labelled images in {root}: use one sub-folder per class, or a captions file with labels"
        )
    return pairs


def _read_records(root: Path, captions: Path) -> list[Pair]:
    if not captions.is_file():
        raise DatasetError(f"captions file {captions} does not exist")
    if captions.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(captions.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((number, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise DatasetError(f"{captions}:{number}: not JSON ({exc})") from exc
    elif captions.suffix == ".csv":
        with captions.open(encoding="utf-8", newline="") as file:
            rows = list(enumerate(csv.DictReader(file), start=2))
    else:
        raise DatasetError(f"captions file {captions} must be .jsonl or .csv")
    return [_pair(root, captions, number, row) for number, row in rows]


def _pair(root: Path, source: Path, number: int, row: object) -> Pair:
    if not isinstance(row, dict) or any(not isinstance(row.get(f), str) or not row.get(f) for f in REQUIRED_FIELDS):
        raise DatasetError(f"{source}:{number}: each record needs non-empty 'path' and 'caption' strings")
    relative = PurePosixPath(row["path"])
    if relative.is_absolute() or ".." in relative.parts:
        raise DatasetError(f"{source}:{number}: path {row['path']!r} must be relative to {root} without '..'")
    image = root / relative
    if not image.is_file():
        raise DatasetError(f"{source}:{number}: image {image} does not exist")
    label = row.get("label")
    return Pair(image, row["caption"], str(label) if label not in (None, "") else None)


def _read_sidecars(root: Path) -> list[Pair]:
    pairs = []
    for image in sorted(root.rglob("*")):
        if image.suffix.lower() in IMAGE_SUFFIXES and image.with_suffix(".txt").is_file():
            caption = image.with_suffix(".txt").read_text(encoding="utf-8").strip()
            if caption:
                pairs.append(Pair(image, caption))
    return pairs


class PairDataset(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """``(image [3, R, R] float32, tokens [context_length] int64)`` per pair, for a DataLoader. ``tokenizer``:
    the model's (:func:`clip_model.tokenizer_for`); default CLIP's BPE."""

    def __init__(
        self,
        pairs: Sequence[Pair],
        preprocess: Preprocess,
        context_length: int = 77,
        tokenizer: TextTokenizer | None = None,
    ) -> None:
        self.pairs = list(pairs)
        self.preprocess = preprocess
        self.context_length = context_length
        self.tokenizer = tokenizer or tokenize

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        pair = self.pairs[index]
        with Image.open(pair.image) as image:
            pixels = self.preprocess(image)
        tokens = self.tokenizer([pair.caption], context_length=self.context_length, truncate=True)[0]
        return pixels, tokens


def preloaded_bytes(pairs: Sequence[Pair], image_size: int) -> int:
    """The memory :class:`PreloadedPairDataset` holds for ``pairs`` at ``image_size``: uint8 pixels (tokens aside)."""
    return len(pairs) * 3 * image_size * image_size


class PreloadedPairDataset(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """:class:`PairDataset` with every image decoded once, up front, and kept in memory as uint8.

    Items are bit-identical to ``PairDataset(pairs, preprocess, context_length, tokenizer)``'s: the pixels are the same
    ``to_rgb`` + ``resize_and_center_crop`` output, normalized through a per-channel table that
    :func:`clip_model.preprocess.image_to_array` itself computes for every uint8 level, and the captions are
    tokenized the same way. For a training set small enough to hold (:func:`preloaded_bytes`), this removes the
    per-step decoding, and with it the loader processes that compete with the training threads for the cores. A
    broken image fails here, before training.
    """

    def __init__(
        self,
        pairs: Sequence[Pair],
        preprocess: Preprocess,
        context_length: int = 77,
        tokenizer: TextTokenizer | None = None,
    ) -> None:
        size = preprocess.image_size
        self.pixels = torch.empty((len(pairs), 3, size, size), dtype=torch.uint8)  # [N, 3, R, R]
        for index, pair in enumerate(pairs):
            try:
                with Image.open(pair.image) as image:
                    rgb = resize_and_center_crop(to_rgb(image), size)
            except (OSError, ImageDecodeError) as exc:  # Pillow's UnidentifiedImageError is an OSError
                raise DatasetError(f"cannot read training image {pair.image}: {exc}") from exc
            self.pixels[index] = torch.from_numpy(np.asarray(rgb).transpose(2, 0, 1).copy())
        levels = np.repeat(np.arange(UINT8_MAX + 1, dtype=np.uint8), 3).reshape(1, UINT8_MAX + 1, 3)  # every level
        table = image_to_array(Image.fromarray(levels, "RGB"), preprocess.mean, preprocess.std)  # [3, 1, 256]
        self.table = torch.from_numpy(table.reshape(3, UINT8_MAX + 1))  # [3, 256] float32: channel c, uint8 level v
        captions = [pair.caption for pair in pairs]
        self.tokens = (tokenizer or tokenize)(captions, context_length=context_length, truncate=True)  # [N, L]

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = self.pixels[index]  # [3, R, R] uint8
        image = torch.gather(self.table, 1, pixels.reshape(3, -1).long()).view(pixels.shape)  # [3, R, R] float32
        return image, self.tokens[index]
