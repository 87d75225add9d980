"""Photo-like test images and the copies a photo library collects of them.

:func:`write_scene` draws a landscape from a seed: a sky gradient, a sun, two ranges of hills, houses and trees,
grain. Two seeds give two unrelated photos; :func:`write_burst` redraws a seed's scene with its objects moved and the
light changed a little, as a second exposure of the same scene would be (distinct photos that look alike).

The copy functions each write one copy of a file the way photo libraries get them: scaled down, recompressed as a
low-quality JPEG, slightly cropped, or stored rotated with an EXIF orientation that turns it upright again.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SCENE_SIZE = (320, 240)  # width, height in pixels
ORIGINAL_QUALITY = 92
LOW_QUALITY = 30  # of a recompressed copy
SCALE_DOWN = 0.5  # of a resized copy
CROP_FRACTION = 0.04  # cut from each side of a cropped copy
EXIF_ORIENTATION_TAG = 0x0112
ROTATE_90_CW = 6  # EXIF orientation: the stored pixels are shown turned 90 degrees clockwise


def _colour(rng: np.random.Generator, low: int = 0, high: int = 256) -> tuple[int, int, int]:
    r, g, b = (int(v) for v in rng.integers(low, high, size=3))
    return r, g, b


def _draw_scene(seed: int, jitter: int = 0) -> Image.Image:
    """The scene of ``seed``; ``jitter`` > 0 moves its objects and shifts its light (another exposure)."""
    rng = np.random.default_rng(seed)
    moved = np.random.default_rng([seed, jitter])
    width, height = SCENE_SIZE
    shift = 12 * jitter
    top, bottom = np.array(_colour(rng, 40, 256)), np.array(_colour(rng, 40, 256))
    light = 1.0 + 0.06 * jitter * moved.standard_normal()
    rows = np.linspace(0.0, 1.0, height)[:, None, None]
    sky = (top * (1 - rows) + bottom * rows) * light
    pixels = np.broadcast_to(sky, (height, width, 3)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    sun_x, sun_y = int(rng.integers(20, width - 20)), int(rng.integers(15, height // 3))
    sun_x += int(moved.integers(-shift, shift + 1)) if shift else 0
    radius = int(rng.integers(10, 30))
    draw.ellipse((sun_x - radius, sun_y - radius, sun_x + radius, sun_y + radius), fill=_colour(rng, 180))
    for layer in range(2):
        horizon = int(rng.integers(height // 3, 2 * height // 3)) + 30 * layer
        xs = np.linspace(0, width, 9)
        ys = horizon + rng.integers(-35, 35, size=9)
        draw.polygon([*zip(xs.tolist(), ys.tolist(), strict=True), (width, height), (0, height)], fill=_colour(rng))
    for _ in range(int(rng.integers(3, 7))):
        x, y = int(rng.integers(0, width - 40)), int(rng.integers(height // 2, height - 30))
        if shift:
            x += int(moved.integers(-shift, shift + 1))
        w, h = int(rng.integers(20, 50)), int(rng.integers(20, 45))
        if rng.random() < 0.5:  # a house: walls and roof
            draw.rectangle((x, y, x + w, y + h), fill=_colour(rng))
            draw.polygon([(x - 4, y), (x + w + 4, y), (x + w // 2, y - h // 2)], fill=_colour(rng, 0, 160))
        else:  # a tree: trunk and crown
            draw.rectangle((x + w // 2 - 3, y, x + w // 2 + 3, y + h), fill=(90, 60, 30))
            draw.ellipse((x, y - h, x + w, y + h // 3), fill=_colour(rng, 0, 200))
    grain = np.random.default_rng([seed, jitter, 1]).normal(0, 7, size=(height, width, 3))
    noisy = (np.asarray(image, dtype=np.float64) + grain).clip(0, 255).astype(np.uint8)
    return Image.fromarray(noisy).filter(ImageFilter.GaussianBlur(0.6))


def _save(image: Image.Image, path: Path, **options: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return path


def write_scene(path: Path, seed: int) -> Path:
    """The scene of ``seed`` as a JPEG at ``path``."""
    return _save(_draw_scene(seed), path, quality=ORIGINAL_QUALITY)


def write_burst(path: Path, seed: int, frame: int = 1) -> Path:
    """Another exposure of the scene of ``seed``: objects moved, light changed (``frame`` >= 1 picks which)."""
    return _save(_draw_scene(seed, jitter=frame), path, quality=ORIGINAL_QUALITY)


def exact_copy(source: Path, path: Path) -> Path:
    """The same bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, path)
    return path


def resized_copy(source: Path, path: Path) -> Path:
    """Scaled to half its width and height (as a phone shares a photo), saved as PNG."""
    with Image.open(source) as image:
        size = (round(image.width * SCALE_DOWN), round(image.height * SCALE_DOWN))
        return _save(image.resize(size, Image.Resampling.LANCZOS), path.with_suffix(".png"))


def recompressed_copy(source: Path, path: Path) -> Path:
    """Re-encoded as a low-quality JPEG."""
    with Image.open(source) as image:
        return _save(image.convert("RGB"), path, quality=LOW_QUALITY)


def cropped_copy(source: Path, path: Path) -> Path:
    """``CROP_FRACTION`` of each side cut away."""
    with Image.open(source) as image:
        dx, dy = round(image.width * CROP_FRACTION), round(image.height * CROP_FRACTION)
        return _save(image.crop((dx, dy, image.width - dx, image.height - dy)), path, quality=ORIGINAL_QUALITY)


def rotated_copy(source: Path, path: Path) -> Path:
    """Stored turned a quarter anticlockwise, with the EXIF orientation that shows it upright again."""
    with Image.open(source) as image:
        exif = Image.Exif()
        exif[EXIF_ORIENTATION_TAG] = ROTATE_90_CW
        turned = image.transpose(Image.Transpose.ROTATE_90)
        return _save(turned, path, quality=ORIGINAL_QUALITY, exif=exif.tobytes())


COPIES: dict[str, Callable[[Path, Path], Path]] = {
    "resized": resized_copy,
    "recompressed": recompressed_copy,
    "cropped": cropped_copy,
    "rotated": rotated_copy,
}


@dataclass(frozen=True)
class PlantedLibrary:
    """A folder of unrelated scenes, some with copies planted beside them: ``groups`` maps each planted original's
    path (relative to ``root``, POSIX) to the paths of it and its copies; ``copies`` says which copy each path is."""

    root: Path
    groups: dict[str, frozenset[str]]
    copies: dict[str, str]  # path -> "original", "exact" or a key of COPIES

    def unrelated(self) -> list[str]:
        """The scenes without copies."""
        planted = set().union(*self.groups.values())
        return sorted(path for path in self.copies if path not in planted)


def plant_library(root: Path, scenes: int, planted: int, exact: int = 2) -> PlantedLibrary:
    """``scenes`` scenes under ``camera/``; the first ``planted`` each get one copy of every kind of COPIES under
    ``copies/<kind>/``, and the first ``exact`` of these a byte-identical copy under ``backup/``."""
    copies: dict[str, str] = {}
    groups: dict[str, frozenset[str]] = {}

    def relative(path: Path, kind: str) -> str:
        name = path.relative_to(root).as_posix()
        copies[name] = kind
        return name

    for seed in range(scenes):
        original = write_scene(root / "camera" / f"scene_{seed:03d}.jpg", seed)
        members = {relative(original, "original")}
        if seed < planted:
            for kind, copy in COPIES.items():
                members.add(relative(copy(original, root / "copies" / kind / original.name), kind))
        if seed < min(exact, planted):
            members.add(relative(exact_copy(original, root / "backup" / original.name), "exact"))
        if len(members) > 1:
            groups[relative(original, "original")] = frozenset(members)
    return PlantedLibrary(root, groups, copies)


def index_library(library: PlantedLibrary, index_dir: Path, model: Path) -> Path:
    """``library`` indexed into ``index_dir`` with ``model`` by ``clip-index build``; returns ``index_dir``."""
    from indexer.cli import main as clip_index

    command = ["build", str(library.root), "--index-dir", str(index_dir), "--model", str(model), "--workers", "0"]
    if clip_index(command) != 0:
        raise RuntimeError(f"clip-index build of {library.root} failed")
    return index_dir
