"""clip-retrieval's inference output, read as embedding shards (:class:`indexer.shards.ShardRows`).

``clip-retrieval inference`` over a folder of images writes, per output partition (its number zero-padded to the
width of the partition count)::

    FOLDER/img_emb/img_emb_<i>.npy          float16 [N, D]: L2-normalized in float32, then cast
    FOLDER/metadata/metadata_<i>.parquet    N rows in the same order; ``image_path`` is ``str()`` of the path
                                            clip-retrieval globbed under its input folder (other columns: ignored)
    FOLDER/text_emb/                        caption embeddings: not read

The output names no model and records nothing about the files, so the caller names the model it was computed with
(no file can confirm it), and size, mtime_ns, sha256 and the upright width and height come from the files
themselves: they must be on this machine, under the image root, and unchanged since. An absolute ``image_path``
must lie under the image root (compared as written, no symlink resolved); a relative one is taken relative to the
image root. The webdataset input's ``image_path`` is a key, not a path, so those files are not found.

A part is accepted or refused whole by the rules of :func:`indexer.shards.check_rows`; a row is named by its
number in the metadata file. Vectors keep their float16 values, converted to float32 (the norm rule allows the
cast's rounding).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image

from clip_model.preprocess import EXIF_ORIENTATION_TAG
from indexer import paths
from indexer.decode import TRANSPOSED_ORIENTATIONS
from indexer.errors import ShardError
from indexer.shards import ShardRows, check_embeddings, check_rows, import_pyarrow, refuse_row
from indexer.store import ModelInfo

EMBEDDINGS_DIR, METADATA_DIR = "img_emb", "metadata"
EMBEDDINGS_RE = re.compile(r"img_emb_(\d+)\.npy")
METADATA_RE = re.compile(r"metadata_(\d+)\.parquet")
PATH_COLUMN = "image_path"
STORED_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))
FILES_FIX = "its images must be on this machine, under the image root given, and unchanged since"


@dataclass(frozen=True)
class ClipRetrievalPart:
    """One output partition: its number as written in the file names, and its two files."""

    partition: str
    embeddings: Path
    metadata: Path


def read_clip_retrieval(
    folder: Path, image_root: Path, model: ModelInfo
) -> Iterator[tuple[ClipRetrievalPart, ShardRows]]:
    """Each part of ``folder`` with its validated rows, in partition order (see :func:`read_part`)."""
    for part in list_parts(folder):
        yield part, read_part(part, image_root, model)


def list_parts(folder: Path) -> list[ClipRetrievalPart]:
    """Pair ``img_emb_<i>.npy`` with ``metadata_<i>.parquet``, in partition order; ShardError for a file alone."""
    found: dict[str, dict[str, Path]] = {}
    for directory, pattern in ((EMBEDDINGS_DIR, EMBEDDINGS_RE), (METADATA_DIR, METADATA_RE)):
        try:
            names = os.listdir(Path(folder) / directory)
        except OSError as exc:
            raise ShardError(
                f"cannot list {Path(folder) / directory} ({exc}): is {folder} clip-retrieval's output?"
            ) from exc
        found[directory] = {m[1]: Path(folder) / directory / m[0] for m in map(pattern.fullmatch, names) if m}
    embeddings, metadata = found[EMBEDDINGS_DIR], found[METADATA_DIR]
    unpaired = sorted(embeddings.keys() ^ metadata.keys())
    if unpaired:
        alone = embeddings.get(unpaired[0]) or metadata[unpaired[0]]
        raise ShardError(f"{alone} has no partner file of partition {unpaired[0]}: the output is incomplete")
    return [ClipRetrievalPart(n, embeddings[n], metadata[n]) for n in sorted(embeddings, key=lambda n: (int(n), n))]


def read_part(part: ClipRetrievalPart, image_root: Path, model: ModelInfo) -> ShardRows:
    """The rows of one part: paths in the stored form relative to ``image_root``, float32 embeddings, file facts read
    from the files. Raises ShardError naming the metadata file and row before returning anything."""
    source, root = str(part.metadata), Path(image_root).absolute()
    image_paths = _image_paths(part.metadata)
    embeddings = _embeddings(part.embeddings, len(image_paths))
    stored = [_stored_path(image_path, root, source, row) for row, image_path in enumerate(image_paths)]
    check_embeddings(
        embeddings, np.arange(len(embeddings), dtype=np.int64), model.embed_dim, source
    )  # before the slow part
    sha256: list[str | None] = []
    size, mtime_ns = [], []
    width: list[int | None] = []
    height: list[int | None] = []
    for row, path in enumerate(stored):
        digest, file_size, file_mtime_ns, file_width, file_height = _file_facts(root, path, source, row)
        sha256.append(digest)
        size.append(file_size)
        mtime_ns.append(file_mtime_ns)
        width.append(file_width)
        height.append(file_height)
    errors: list[str | None] = [None] * len(stored)
    rows = ShardRows(stored, sha256, np.asarray(size), np.asarray(mtime_ns), width, height, errors, embeddings)
    check_rows(rows, model.embed_dim, source)
    return rows


def _image_paths(metadata: Path) -> list[str | None]:
    pa, pq = import_pyarrow()
    try:
        column = pq.read_table(metadata, columns=[PATH_COLUMN]).column(PATH_COLUMN)
    except (OSError, pa.ArrowException) as exc:
        raise ShardError(f"{metadata} has no readable {PATH_COLUMN!r} column ({exc}): is it clip-retrieval's?") from exc
    if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
        raise ShardError(f"{metadata}: column {PATH_COLUMN!r} has type {column.type}, not string")
    return list(column.to_pylist())


def _embeddings(path: Path, rows: int) -> npt.NDArray[np.float32]:
    """The ``[N, D]`` matrix of ``path`` as C-contiguous float32; ShardError unless it is float16/32 with ``rows``."""
    try:
        stored = np.load(path, mmap_mode="r", allow_pickle=False)  # mapped: converted to float32 in one copy
    except (OSError, ValueError) as exc:
        raise ShardError(f"{path} is not a readable .npy file ({exc})") from exc
    if stored.dtype not in STORED_DTYPES or stored.ndim != 2:
        raise ShardError(f"{path} holds {stored.dtype} {list(stored.shape)}, not float16 or float32 [N, D]")
    if len(stored) != rows:
        raise ShardError(f"{path} has {len(stored)} embeddings for {rows} rows of its metadata: the output is corrupt")
    return np.ascontiguousarray(stored, dtype=np.float32)


def _stored_path(image_path: str | None, root: Path, source: str, row: int) -> str:
    """The stored form of ``image_path`` relative to ``root``; refuses the row for a path that leaves it."""
    try:
        path = Path(image_path or "")
        relative = path.relative_to(root) if path.is_absolute() else path
        return paths.check_stored(paths.to_stored(relative.as_posix()))
    except ValueError as exc:
        raise refuse_row(
            source, row, f"{PATH_COLUMN} {image_path!r} is not a file under {root} ({exc})", FILES_FIX
        ) from None


def _file_facts(root: Path, stored: str, source: str, row: int) -> tuple[str, int, int, int, int]:
    """(sha256, size, mtime_ns, width, height) of the file, read as the local indexer reads it: the sha256 of the
    bytes read, the size of what was read, the upright pixel size from the header and the EXIF orientation."""
    shown = paths.display(stored)
    try:
        with open(paths.file_path(root, stored), "rb") as file:
            mtime_ns = os.fstat(file.fileno()).st_mtime_ns
            data = file.read()
    except OSError as exc:
        problem = "does not exist" if isinstance(exc, FileNotFoundError) else f"cannot be read ({exc.strerror or exc})"
        raise refuse_row(source, row, f"{shown} {problem} under {root}", FILES_FIX) from exc
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if image.getexif().get(EXIF_ORIENTATION_TAG, 1) in TRANSPOSED_ORIENTATIONS:
                width, height = height, width
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise refuse_row(source, row, f"{shown} is not an image Pillow can read ({exc})", FILES_FIX) from exc
    return hashlib.sha256(data).hexdigest(), len(data), mtime_ns, width, height
