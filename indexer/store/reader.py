"""What the server needs to read a published index; with ``indexer.errors``, all the server imports of the indexer.

Readers (:class:`PublishedIndex`) never write and never block. Besides reading, this module re-exports the records
the server uses and holds what the server and the indexer share beyond the format: ``ENV_PREFIX``, the prefix of the
environment variables both read.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np

from .. import _faiss_io
from .._faiss_io import FaissIndex, describe_backend
from ..errors import EmbeddingError, IndexFormatError, IndexNotFoundError
from ..paths import file_path
from .catalog import Catalog
from .format import (
    CURRENT_FILE,
    GENERATION_RE,
    GENERATIONS_DIR,
    IMAGES_FILE,
    INDEX_FILES,
    MANIFEST_FILE,
    TEXTS_FILE,
    ImageRecord,
    Manifest,
    ModelInfo,
    Vectors,
    _digest,
    generation_number,
)

__all__ = [  # the server's whole view of the index
    "ENV_PREFIX",
    "Hit",
    "ImageRecord",
    "ModelInfo",
    "PublishedIndex",
    "current_generation",
    "describe_backend",  # for the server's start-up log
    "file_path",  # the file a catalog path names under the image root
    "read_manifest",
]

ENV_PREFIX = "CLIPSEARCH_"  # of the variables the indexer's CLI and the server's settings both read (e.g. INDEX_DIR)
OPEN_ATTEMPTS = 3  # PublishedIndex.open retries when a publish swaps CURRENT while it reads


@dataclass(frozen=True, slots=True)
class Hit:
    """One search result: catalog id and cosine similarity."""

    id: int
    score: float


def current_generation(index_dir: Path) -> str | None:
    """The published generation's name ("g-000003"), or None if nothing is published."""
    path = Path(index_dir) / CURRENT_FILE
    try:
        name = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    if not GENERATION_RE.fullmatch(name):
        raise IndexFormatError(f"{path} holds {name[:40]!r}, not a generation name like 'g-000001'")
    return name


def read_manifest(index_dir: Path, generation: str) -> Manifest:
    """The manifest of ``generation``; IndexFormatError if it is corrupt or of another format version."""
    return _read_manifest(Path(index_dir) / GENERATIONS_DIR / generation)


def _read_manifest(generation_dir: Path) -> Manifest:
    path = generation_dir / MANIFEST_FILE
    manifest = Manifest.from_json(path.read_text(encoding="utf-8"), path)
    if manifest.generation != generation_dir.name:
        raise IndexFormatError(f"{path} describes generation {manifest.generation}, not {generation_dir.name}")
    return manifest


def _check_files(generation_dir: Path, manifest: Manifest, checksums: bool) -> dict[str, str]:
    """file name -> problem with its presence, size or (if ``checksums``) sha256, for the files that have one."""
    problems = {}
    for file_name in INDEX_FILES:
        path = generation_dir / file_name
        expected = manifest.files.get(file_name)
        if expected is None:
            problems[file_name] = f"{generation_dir / MANIFEST_FILE} records no checksum for {file_name}"
        elif not path.is_file():
            problems[file_name] = f"{path} is missing"
        elif (size := path.stat().st_size) != expected.bytes:
            problems[file_name] = f"{path} has {size} bytes, the manifest records {expected.bytes} (truncated?)"
        elif checksums and (actual := _digest(path).sha256) != expected.sha256:
            problems[file_name] = f"{path} has sha256 {actual[:16]}..., the manifest records {expected.sha256[:16]}..."
    return problems


def _check_loaded(manifest: Manifest, file_name: str, index: FaissIndex) -> list[str]:
    kind = file_name.removesuffix(".faiss")
    problems = []
    if index.d != manifest.embed_dim:
        problems.append(f"{file_name} has dimension {index.d}, the manifest records {manifest.embed_dim}")
    if index.ntotal != manifest.counts.get(kind):
        problems.append(f"{file_name} holds {index.ntotal} vectors, the manifest records {manifest.counts.get(kind)}")
    return problems


def _load_generation(generation_dir: Path, verify_checksums: bool) -> tuple[Manifest, dict[str, FaissIndex]]:
    manifest = _read_manifest(generation_dir)
    problems = list(_check_files(generation_dir, manifest, verify_checksums).values())
    indexes = {} if problems else {name: _faiss_io.read_index(generation_dir / name) for name in INDEX_FILES}
    for file_name, index in indexes.items():
        problems += _check_loaded(manifest, file_name, index)
    if IMAGES_FILE in indexes and not problems:
        try:  # also saved in the file; the manifest is what the server is told to use
            _faiss_io.set_search_params(indexes[IMAGES_FILE], manifest.search_params)
        except IndexFormatError as exc:
            problems.append(f"{IMAGES_FILE}: {exc}")
    if problems:
        raise IndexFormatError(
            f"generation {generation_dir.name} is unusable: {'; '.join(problems)}. "
            "Run the indexer again to publish a fresh generation"
        )
    return manifest, indexes


class PublishedIndex:
    """The published generation, loaded into memory, plus a read-only view of the catalog. Opening never writes.

    Thread-safe: searches run concurrently (FAISS searches are read-only); catalog lookups share one read-only
    SQLite connection behind a lock. Later publishes do not affect an open instance (reopen to see them).
    """

    def __init__(self, index_dir: Path, manifest: Manifest, indexes: dict[str, FaissIndex], catalog: Catalog) -> None:
        self.index_dir = index_dir
        self.manifest = manifest
        self._images = indexes[IMAGES_FILE]
        self._texts = indexes[TEXTS_FILE]
        self._catalog = catalog
        self._generation = generation_number(manifest.generation)
        self._lock = threading.Lock()

    @classmethod
    def open(cls, index_dir: Path, *, verify_checksums: bool = True) -> PublishedIndex:
        """Load CURRENT's generation. IndexNotFoundError if nothing is published, IndexFormatError if it is unusable."""
        index_dir = Path(index_dir)
        for _ in range(OPEN_ATTEMPTS):
            name = current_generation(index_dir)
            if name is None:
                where = "does not exist" if not index_dir.is_dir() else f"has no {CURRENT_FILE}: nothing is published"
                raise IndexNotFoundError(f"no published index: {index_dir} {where}. Run the indexer to build one")
            try:
                manifest, indexes = _load_generation(index_dir / GENERATIONS_DIR / name, verify_checksums)
            except (FileNotFoundError, IndexFormatError) as exc:
                if current_generation(index_dir) != name:
                    continue  # a publish replaced the generation while we read it
                if isinstance(exc, FileNotFoundError):
                    raise IndexFormatError(f"{CURRENT_FILE} of {index_dir} names {name}, but {exc}") from exc
                raise
            return cls(index_dir, manifest, indexes, Catalog.open(index_dir, readonly=True))
        raise IndexFormatError(f"{index_dir} was republished {OPEN_ATTEMPTS} times while opening it; try again")

    def close(self) -> None:
        with self._lock:
            self._catalog.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def search(self, queries: Vectors, k: int) -> list[list[Hit]]:
        """Images nearest to ``queries`` [Q, D] float32 unit rows: Q lists of at most ``k`` hits, best first."""
        return self._search(self._images, queries, k)

    def search_texts(self, queries: Vectors, k: int) -> list[list[Hit]]:
        """Indexed texts nearest to ``queries`` [Q, D] float32 unit rows, as :meth:`search`."""
        return self._search(self._texts, queries, k)

    def _search(self, index: FaissIndex, queries: Vectors, k: int) -> list[list[Hit]]:
        matrix = np.asarray(queries)
        if matrix.dtype != np.float32 or matrix.ndim != 2 or matrix.shape[1] != self.manifest.embed_dim:
            raise EmbeddingError(
                f"queries must be float32 [Q, {self.manifest.embed_dim}], got {matrix.dtype} {list(matrix.shape)}"
            )
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        scores, ids = _faiss_io.search(index, np.ascontiguousarray(matrix), k)
        return [
            [Hit(int(i), float(s)) for s, i in zip(row_scores, row_ids, strict=True) if i != -1]
            for row_scores, row_ids in zip(scores, ids, strict=True)
        ]

    def images(self, ids: Sequence[int]) -> dict[int, ImageRecord]:
        """Records of ``ids`` as this generation shows them, whatever the catalog holds now; ids the generation does
        not show are absent. GenerationRetiredError once later publishes dropped what this generation showed."""
        with self._lock:
            return self._catalog.images_at(ids, self._generation)

    def texts(self, ids: Sequence[int]) -> dict[int, str]:
        """Texts of ``ids`` this generation holds, as :meth:`images`."""
        with self._lock:
            return self._catalog.texts_at(ids, self._generation)

    def last_run(self) -> dict[str, Any] | None:
        """The catalog's latest indexer run, as ``Catalog.last_run``."""
        with self._lock:
            return self._catalog.last_run()

    def image_root(self) -> Path | None:
        """The image folder the latest indexer run indexed, or None before any run."""
        with self._lock:
            return self._catalog.image_root()

    def embedding(self, image_id: int) -> Vectors | None:
        """The [D] float32 unit vector of an image this generation holds (None if it holds none): from FAISS if
        stored exactly there, else from the catalog's version of the image for this generation."""
        if not _faiss_io.is_lossy(self.manifest.factory):
            return _faiss_io.reconstruct(self._images, image_id)
        with self._lock:
            return self._catalog.embedding_at(image_id, self._generation)
