"""A small photo library with metadata, indexed, for the filter, facet, paging and browser tests: folders two deep,
three cameras, capture times across years (from EXIF, and from file times for scans without EXIF), and one
byte-identical copy in another folder (a duplicate group at any threshold)."""

from __future__ import annotations

import calendar
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from indexer.cli import main as clip_index


@dataclass(frozen=True)
class Photo:
    folder: str
    camera: str | None  # as the index names it: "make model"
    taken_at: str  # YYYY-MM-DDTHH:MM:SS, as the API writes it
    from_exif: bool


@dataclass(frozen=True)
class PhotoLibrary:
    root: Path
    index_dir: Path
    model: Path
    photos: dict[str, Photo]  # catalog path -> what the index should know of it
    copy: tuple[str, str]  # (original, byte-identical copy)

    def paths(self, folder: str = "", camera: str = "", after: str = "", before: str = "") -> set[str]:
        """The photos under ``folder`` whose camera contains ``camera``, captured in [after, before)."""
        return {
            path
            for path, photo in self.photos.items()
            if (path.startswith(folder + "/") if folder else True)
            and (camera.casefold() in (photo.camera or "").casefold() if camera else True)
            and (not after or photo.taken_at >= after)
            and (not before or photo.taken_at < before)
        }


# folder -> (EXIF make, EXIF model, how the index names the camera, first capture day, photos, colour)
SHOOTS = {
    "2019/Lisbon": ("Canon", "Canon EOS 5D", "Canon EOS 5D", (2019, 5, 1), 5, (200, 120, 40)),
    "2023/Holidays": ("Apple", "iPhone 12", "Apple iPhone 12", (2023, 7, 10), 6, (40, 120, 220)),
    "2023/Garden": ("FUJIFILM", "X100V", "FUJIFILM X100V", (2023, 4, 1), 4, (40, 180, 60)),
}
SCANS = 3  # PNGs without EXIF in "scans", dated by their file times, from 2010-01-01
SCAN_COLOUR = (150, 150, 150)


def _pixels(colour: tuple[int, int, int], seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 40, size=(size[1], size[0], 3))
    return Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8))


def _camera_jpeg(path: Path, image: Image.Image, make: str, model: str, taken: str) -> None:
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = make, model
    exif.get_ifd(0x8769)[0x9003] = taken.replace("-", ":").replace("T", " ")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, "JPEG", exif=exif, quality=90)


def build_photo_library(base: Path, model: Path) -> PhotoLibrary:
    """Write the library under ``base`` and index it with ``model``."""
    root, index_dir = base / "photos", base / "index"
    photos: dict[str, Photo] = {}
    seed = 0
    for folder, (make, exif_model, camera, (year, month, day), count, colour) in SHOOTS.items():
        for i in range(count):
            seed += 1
            taken = f"{year:04d}-{month:02d}-{day + i:02d}T{9 + i:02d}:15:00"
            size = (96, 64) if i % 3 else (64, 96)  # some portrait
            _camera_jpeg(root / folder / f"IMG_{i:04d}.jpg", _pixels(colour, seed, size), make, exif_model, taken)
            photos[f"{folder}/IMG_{i:04d}.jpg"] = Photo(folder, camera, taken, True)
    for i in range(SCANS):
        path = root / "scans" / f"scan_{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        _pixels(SCAN_COLOUR, 100 + i, (80, 80)).save(path)
        when = calendar.timegm((2010, 1, 1 + i, 12, 0, 0, 0, 0, 0))
        os.utime(path, (when, when))
        photos[f"scans/scan_{i}.png"] = Photo("scans", None, f"2010-01-0{1 + i}T12:00:00", False)
    original, copy = "2023/Holidays/IMG_0000.jpg", "backup/IMG_0000.jpg"
    (root / "backup").mkdir()
    shutil.copy2(root / original, root / copy)
    photos[copy] = replace(photos[original], folder="backup")
    command = ["build", str(root), "--index-dir", str(index_dir), "--model", str(model), "--workers", "0"]
    assert clip_index(command) == 0
    return PhotoLibrary(root, index_dir, model, photos, (original, copy))
