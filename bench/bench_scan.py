"""Folder scan speed: ``indexer.scan.iter_images`` over 100,000 tiny files, median of 3 runs after one warm-up.

Run from the repository root: ``.venv/bin/python -m bench.bench_scan [FOLDER]``. Without a folder, 100,000 one-byte
files (1,000 per directory, every tenth not an image) are written into a temporary directory first. The runs are
warm-cache: this measures the scan's own cost (the no-op rerun of the indexer), not a cold disk.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from indexer.scan import iter_images

NUM_FILES = 100_000
FILES_PER_DIR = 1_000
NON_IMAGE_EVERY = 10  # every tenth file is a .txt the scan must skip
RUNS = 3


def make_tree(root: Path, num_files: int) -> None:
    """``num_files`` one-byte files in subdirectories of ``FILES_PER_DIR`` each, two levels deep."""
    for index in range(num_files):
        directory = root / f"year_{index // (FILES_PER_DIR * 10):02d}" / f"dir_{index // FILES_PER_DIR:04d}"
        if index % FILES_PER_DIR == 0:
            directory.mkdir(parents=True, exist_ok=True)
        extension = "txt" if index % NON_IMAGE_EVERY == 0 else ("JPG" if index % 3 == 0 else "jpg")
        (directory / f"IMG_{index:06d}.{extension}").write_bytes(b"x")


def time_scan(root: Path) -> tuple[float, int]:
    start = time.perf_counter()
    count = sum(1 for _ in iter_images(root))
    return time.perf_counter() - start, count


def run(root: Path) -> None:
    time_scan(root)  # warm-up: fills the dentry and inode caches
    timings = []
    for _ in range(RUNS):
        elapsed, count = time_scan(root)
        timings.append(elapsed)
    median = statistics.median(timings)
    print(f"iter_images: {count} images in {median:.3f} s (median of {RUNS}), {count / median:,.0f} files/s")
    print("runs: " + ", ".join(f"{t:.3f} s" for t in timings))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", type=Path, help="scan this folder instead of a generated one")
    parser.add_argument("--files", type=int, default=NUM_FILES, help="files to generate")
    args = parser.parse_args()
    if args.folder is not None:
        run(args.folder)
        return
    with tempfile.TemporaryDirectory(prefix="bench_scan_") as tmp:
        start = time.perf_counter()
        make_tree(Path(tmp), args.files)
        print(f"wrote {args.files} files in {time.perf_counter() - start:.1f} s")
        run(Path(tmp))


if __name__ == "__main__":
    main()
