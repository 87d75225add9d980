"""What the server needs to read a published index; with ``indexer.errors``, all the server imports of the indexer.

Readers (:class:`PublishedIndex`) never write and never block. Besides reading, this module re-exports the records
the server uses and holds what the server and the indexer share beyond the format: ``ENV_PREFIX``, the prefix of the
environment variables both read.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np
import numpy.typing as npt

from .. import _faiss_io, duplicates
from .._faiss_io import FaissIndex, describe_backend
from ..errors import EmbeddingError, IndexFormatError, IndexNotFoundError
from ..paths import file_path
from .catalog import Catalog
from .filters import ORIENTATIONS, FilteredPlan, FilterPlanner, PhotoColumns, SearchFilter
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
from .segments import SEGMENTS_DIR, LoadedSegment, SegmentRecord, search_segments, served_mapped

__all__ = [  # the server's whole view of the index
    "ENV_PREFIX",
    "ORIENTATIONS",
    "Hit",
    "ImageRecord",
    "ModelInfo",
    "PhotoColumns",  # a generation's filterable attributes (PublishedIndex.photo_columns)
    "PublishedIndex",
    "SearchFilter",
    "current_generation",
    "describe_backend",  # for the server's start-up log
    "duplicates",  # groups of duplicate images of a generation (indexer.duplicates)
    "file_path",  # the file a catalog path names under the image root
    "read_manifest",
]

logger = logging.getLogger(__name__)

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


def manifest_paths(index_dir: Path, manifest: Manifest) -> dict[str, Path]:
    """Where each file a manifest names lies: the texts index (and a format 1 images index) in the generation's
    directory, segment, deletion and trained files in the shared segments directory."""
    generation_dir = index_dir / GENERATIONS_DIR / manifest.generation
    required = set(INDEX_FILES) if manifest.format_version < 2 else {TEXTS_FILE, *_segment_files(manifest)}
    names = sorted(required | set(manifest.files))
    return {name: generation_dir / name if name in INDEX_FILES else index_dir / SEGMENTS_DIR / name for name in names}


def _segment_files(manifest: Manifest) -> list[str]:
    records = [SegmentRecord(**record) for record in manifest.segments]
    return [r.file for r in records] + [r.deleted_file for r in records if r.deleted_file is not None]


_VERIFIED: set[tuple[str, int, int, str]] = set()  # (path, size, mtime_ns, sha256) of shared files checked already
_VERIFIED_LOCK = threading.Lock()


def _check_files(index_dir: Path, manifest: Manifest, checksums: bool) -> dict[str, str]:
    """file name -> problem with its presence, size or (if ``checksums``) sha256, for the files that have one.
    Segment files never change once written, so this process hashes each one once."""
    problems = {}
    for file_name, path in manifest_paths(index_dir, manifest).items():
        expected = manifest.files.get(file_name)
        if expected is None:
            problems[file_name] = f"the manifest of {manifest.generation} records no checksum for {file_name}"
        elif not path.is_file():
            problems[file_name] = f"{path} is missing"
        elif (size := path.stat().st_size) != expected.bytes:
            problems[file_name] = f"{path} has {size} bytes, the manifest records {expected.bytes} (truncated?)"
        elif checksums and not _has_digest(path, expected.sha256, shared=file_name not in INDEX_FILES):
            actual = _digest(path).sha256
            problems[file_name] = f"{path} has sha256 {actual[:16]}..., the manifest records {expected.sha256[:16]}..."
    return problems


def _has_digest(path: Path, sha256: str, *, shared: bool) -> bool:
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns, sha256)
    with _VERIFIED_LOCK:
        if shared and key in _VERIFIED:
            return True
    if _digest(path).sha256 != sha256:
        return False
    if shared:
        with _VERIFIED_LOCK:
            _VERIFIED.add(key)
    return True


@dataclass(frozen=True)
class LoadedGeneration:
    """A generation's manifest and indexes, loaded: the image segments and the texts index."""

    manifest: Manifest
    segments: list[LoadedSegment]
    texts: FaissIndex
    saved_params: list[dict[str, int]]  # each segment's search parameters as its file had them (the manifest's win)
    memory_mapped: bool = False  # the segments' inverted lists are memory-mapped from their files


def load_generation(
    index_dir: Path, generation: str, verify_checksums: bool, memory_budget: int | None = None
) -> LoadedGeneration:
    """Read and check ``generation``: IndexFormatError naming every problem when it is unusable. The image segments
    are memory-mapped when their files exceed ``memory_budget`` bytes (default: the manifest's), by the rule of
    :func:`indexer.store.segments.served_mapped`."""
    generation_dir = index_dir / GENERATIONS_DIR / generation
    manifest = _read_manifest(generation_dir)
    problems = list(_check_files(index_dir, manifest, verify_checksums).values())
    if problems:
        raise _unusable(generation, problems)
    paths = manifest_paths(index_dir, manifest)
    texts = _faiss_io.read_index(paths[TEXTS_FILE])
    problems += _check_count(manifest, TEXTS_FILE, texts, manifest.counts.get("texts"))
    if manifest.format_version < 2:
        records = [SegmentRecord(IMAGES_FILE, 0, generation_number(generation), manifest.counts.get("images", 0))]
    else:
        records = [SegmentRecord(**record) for record in manifest.segments]
    budget = manifest.memory_budget if memory_budget is None else memory_budget
    mapped = served_mapped(sum(_file_bytes(manifest, r.file) for r in records), budget)
    segments, saved_params = [], []
    for record in records:
        index = _faiss_io.read_index(paths[record.file], mapped=mapped)
        problems += _check_count(manifest, record.file, index, record.count)
        saved_params.append(_faiss_io.get_search_params(index))
        try:  # also saved in the file; the manifest is what the server is told to use
            _faiss_io.set_search_params(index, manifest.search_params)
        except IndexFormatError as exc:
            problems.append(f"{record.file}: {exc}")
        deleted = (
            np.load(paths[record.deleted_file], allow_pickle=False).astype(np.int64, copy=False)
            if record.deleted_file is not None
            else np.empty(0, dtype=np.int64)
        )
        segments.append(LoadedSegment.of(record, index, deleted))
    live = sum(s.record.live for s in segments)
    if live != manifest.counts.get("images"):
        problems.append(f"the segments hold {live} images, the manifest records {manifest.counts.get('images')}")
    if problems:
        raise _unusable(generation, problems)
    mapped = any(_faiss_io.is_memory_mapped(s.index) for s in segments)
    if mapped:
        logger.info("%s: the inverted lists of its %d segment(s) are memory-mapped", generation, len(segments))
    return LoadedGeneration(manifest, segments, texts, saved_params, mapped)


def _file_bytes(manifest: Manifest, file_name: str) -> int:
    digest = manifest.files.get(file_name)
    return digest.bytes if digest is not None else 0


def _check_count(manifest: Manifest, file_name: str, index: FaissIndex, expected: int | None) -> list[str]:
    problems = []
    if index.d != manifest.embed_dim:
        problems.append(f"{file_name} has dimension {index.d}, the manifest records {manifest.embed_dim}")
    if index.ntotal != expected:
        problems.append(f"{file_name} holds {index.ntotal} vectors, the manifest records {expected}")
    return problems


def _unusable(generation: str, problems: list[str]) -> IndexFormatError:
    return IndexFormatError(
        f"generation {generation} is unusable: {'; '.join(problems)}. Run the indexer again to publish a fresh "
        "generation"
    )


class PublishedIndex:
    """The published generation, loaded into memory (a large image index memory-mapped: :func:`load_generation`),
    plus a read-only view of the catalog. Opening never writes.

    Thread-safe: searches run concurrently (FAISS searches are read-only); catalog lookups share one read-only
    SQLite connection behind a lock. Later publishes do not affect an open instance (reopen to see them).
    """

    def __init__(self, index_dir: Path, loaded: LoadedGeneration, catalog: Catalog) -> None:
        self.index_dir = index_dir
        self.manifest = loaded.manifest
        self._segments = loaded.segments
        self.memory_mapped = loaded.memory_mapped  # the image index's inverted lists are pages of its files
        self._texts = loaded.texts
        self._catalog = catalog
        self._generation = generation_number(loaded.manifest.generation)
        self._lock = threading.Lock()
        self._planner: FilterPlanner | None = None  # with the generation's PhotoColumns, made on first use

    @classmethod
    def open(
        cls, index_dir: Path, *, verify_checksums: bool = True, memory_budget: int | None = None
    ) -> PublishedIndex:
        """Load CURRENT's generation, its image index memory-mapped past ``memory_budget`` bytes (default: the
        generation's, see :func:`load_generation`). IndexNotFoundError if nothing is published, IndexFormatError if
        it is unusable."""
        index_dir = Path(index_dir)
        for _ in range(OPEN_ATTEMPTS):
            name = current_generation(index_dir)
            if name is None:
                where = "does not exist" if not index_dir.is_dir() else f"has no {CURRENT_FILE}: nothing is published"
                raise IndexNotFoundError(f"no published index: {index_dir} {where}. Run the indexer to build one")
            try:
                loaded = load_generation(index_dir, name, verify_checksums, memory_budget)
            except (FileNotFoundError, IndexFormatError) as exc:
                if current_generation(index_dir) != name:
                    continue  # a publish replaced the generation while we read it
                if isinstance(exc, FileNotFoundError):
                    raise IndexFormatError(f"{CURRENT_FILE} of {index_dir} names {name}, but {exc}") from exc
                raise
            return cls(index_dir, loaded, Catalog.open(index_dir, readonly=True))
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

    def search(self, queries: Vectors, k: int, where: SearchFilter | None = None) -> list[list[Hit]]:
        """Images nearest to ``queries`` [Q, D] float32 unit rows: Q lists of at most ``k`` hits, best first, among
        the images ``where`` matches (None: all), by the plan of :mod:`indexer.store.filters`."""
        matrix = self._checked(queries, k)
        if where is None or where.empty:
            return _hits(*search_segments(self._segments, matrix, k))
        planned = self.filter_plan(where)
        if planned.matching == 0:
            return [[] for _ in range(len(matrix))]
        if planned.vectors is not None and planned.ids is not None:
            scores, rows = _faiss_io.exact_search(planned.vectors, matrix, k)
            return _hits(scores, planned.ids[rows])
        return _hits(*search_segments(self._segments, matrix, k, planned.segments))

    def filter_plan(self, where: SearchFilter) -> FilteredPlan:
        """How a search for ``where`` runs on this generation (:class:`indexer.store.filters.FilterPlanner`: made
        on the filter's first search and kept for the next ones)."""
        return self._filters().plan(where)

    def photo_columns(self) -> PhotoColumns:
        """This generation's filterable attributes, read from the catalog on first use and kept."""
        return self._filters().columns

    def _filters(self) -> FilterPlanner:
        """The generation's filter planner, made with its columns (the server makes it before serving: it reads
        the columns through :meth:`photo_columns`)."""
        with self._lock:
            if self._planner is None:
                columns = self._catalog.photo_columns_at(self._generation)
                self._planner = FilterPlanner(columns, self._segments, self.stored_vectors)
            return self._planner

    def search_texts(self, queries: Vectors, k: int) -> list[list[Hit]]:
        """Indexed texts nearest to ``queries`` [Q, D] float32 unit rows, as :meth:`search`."""
        matrix = self._checked(queries, k)
        return _hits(*_faiss_io.search(self._texts, matrix, k))

    def _checked(self, queries: Vectors, k: int) -> Vectors:
        matrix = np.asarray(queries)
        if matrix.dtype != np.float32 or matrix.ndim != 2 or matrix.shape[1] != self.manifest.embed_dim:
            raise EmbeddingError(
                f"queries must be float32 [Q, {self.manifest.embed_dim}], got {matrix.dtype} {list(matrix.shape)}"
            )
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        return np.ascontiguousarray(matrix)

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
        """The [D] float32 unit vector of an image this generation holds (None if it holds none): the catalog's
        version of the image for this generation."""
        with self._lock:
            return self._catalog.embedding_at(image_id, self._generation)

    def stored_vectors(self, files: npt.NDArray[np.int64], rows: npt.NDArray[np.int64]) -> Vectors:
        """The [N, D] float32 unit vectors at the pointers :meth:`photo_columns` gives (``vec_files[i]``,
        ``vec_rows[i]``), in that order."""
        with self._lock:
            return self._catalog.stored_vectors(files, rows)

    def same_content(self) -> list[list[int]]:
        """The ids of this generation's images that share their bytes (content hash), in groups of two or more,
        each by id, the groups by their first id."""
        with self._lock:
            return self._catalog.same_content_at(self._generation)


def _hits(scores: Vectors, ids: npt.NDArray[np.int64]) -> list[list[Hit]]:
    return [
        [Hit(int(i), float(s)) for s, i in zip(row_scores, row_ids, strict=True) if i != -1]
        for row_scores, row_ids in zip(scores, ids, strict=True)
    ]
