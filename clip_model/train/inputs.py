"""Checks of a captioned folder before training on it: every image captioned, every image decodable.

Both read the whole folder once, so a run fails before its first step, naming how many files are wrong and the
first of them, rather than at the step that reaches a bad file. :func:`inspect_images` also fingerprints the data
(the sha256 a fine-tuned model's provenance records).
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from .data import IMAGE_SUFFIXES, DatasetError, Pair

logger = logging.getLogger(__name__)


def check_captioned(root: Path, pairs: Sequence[Pair]) -> None:
    """DatasetError when an image file under ``root`` (hidden folders aside) is in none of ``pairs``: a caption file
    that leaves it out, or a missing or empty ``.txt`` beside it. The message counts them and names the first."""
    root = Path(root)
    captioned = {pair.image.resolve() for pair in pairs}
    missing = sorted(
        path.relative_to(root)
        for path in root.rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
        and path.is_file()
        and path.resolve() not in captioned
    )
    if missing:
        raise DatasetError(
            f"{len(missing)} of the {len(missing) + len(captioned)} images in {root} have no caption (first: "
            f"{missing[0].as_posix()}): add their captions (a record in the captions file, or a non-empty .txt beside "
            "the image), or move them out of the folder"
        )


def inspect_images(root: Path, train: Sequence[Pair], held_out: Sequence[Pair]) -> str:
    """Decode every image of ``train`` and ``held_out`` (DatasetError naming how many do not decode, and the first
    with its error); returns the sha256 of the training data: each training pair's path relative to ``root``,
    caption, label and file bytes, in order."""
    digest = hashlib.sha256()
    failures: list[str] = []
    for index, pair in enumerate([*train, *held_out]):
        try:
            data = pair.image.read_bytes()
            with Image.open(io.BytesIO(data)) as image:
                image.load()
        except Exception as exc:  # Pillow raises many types for broken files; each is reported with its path
            failures.append(f"{pair.image}: {exc}")
            continue
        if index < len(train):
            relative = pair.image.relative_to(root).as_posix()  # data.read_pairs joins root and the relative path
            digest.update(f"{relative}\n{pair.caption}\n{pair.label}\n".encode())
            digest.update(hashlib.sha256(data).digest())
    if failures:
        raise DatasetError(
            f"{len(failures)} of the {len(train) + len(held_out)} images do not decode (first: {failures[0]}): "
            "replace or remove them"
        )
    logger.info("checked %d images: every one captioned and decodable", len(train) + len(held_out))
    return digest.hexdigest()
