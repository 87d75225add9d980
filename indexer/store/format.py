"""The layout of an index directory and the records it holds: the contract between the indexer (writer) and the
server (reader).

Layout::

    <index_dir>/
      catalog.sqlite3        SQLite, WAL mode, PRAGMA user_version = CATALOG_VERSION: the record of truth
                             (tables: :mod:`indexer.store.schema`)
      .lock                  writer lock (fcntl.flock), holds the writer's pid
      vectors/images-000001.vec  the embeddings, append-only: fixed-width (id, float32 x dim) rows that the catalog
                             points at (:mod:`indexer.store.vectors`); texts-<n>.vec likewise for the texts
      CURRENT                text: name of the published generation, e.g. "g-000003"; replaced atomically
      segments/              the image index as immutable files that generations share (indexer.store.segments):
          s-000000-000002.g000002.faiss   an IndexIDMap2 (factory in the manifest) over the images stamped with
                                          generations 0..2, ids = images.id; written by generation 2
          s-....del-g000003.npy           the ids deleted from a segment as of generation 3 (sorted int64)
          trained.g000002.faiss           the trained, empty index every new segment starts from (IVF, PQ...)
      generations/g-000003/  immutable once published
          texts.faiss        faiss.write_index of the indexed texts (ids = texts.id, always "IDMap2,Flat"); may hold
                             0 vectors
          manifest.json      format_version, generation, created_at, model provenance, metric, factory, counts,
                             files {name: {sha256, bytes}} of every file the generation uses; segments (file,
                             first_gen, last_gen, count, deleted_file, deleted), trained, trained_count,
                             auto_choice; and how the image index was chosen and tuned: requested_factory ("auto"
                             or the user's), memory_budget, index_reason, search_params (e.g. {"nprobe": 12},
                             applied on load), recall_at_10 (against exact search, measured when the index was last
                             trained, on recall_queries queries; 1.0 for Flat)

A format 1 generation (one ``images.faiss`` in the generation directory, no segments) is still read; the next
publish replaces it by segments.

Invariant: embeddings are float32 little-endian rows of ``embed_dim`` values, L2-normalized (checked on write);
FAISS indexes use METRIC_INNER_PRODUCT, so scores are cosine similarities. Ids are int64.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import IndexFormatError

FORMAT_VERSION = 2  # of manifest.json; 2: the image index as segments
READABLE_FORMATS = (1, 2)  # 1: one images.faiss per generation, still read until the next publish replaces it
CATALOG_FILE = "catalog.sqlite3"
LOCK_FILE = ".lock"
CURRENT_FILE = "CURRENT"
CURRENT_TMP_FILE = "CURRENT.tmp"
GENERATIONS_DIR = "generations"
TEMP_PREFIX = ".tmp-"  # generations/.tmp-g-000004: being written, or left by a crashed publish
IMAGES_FILE = "images.faiss"
TEXTS_FILE = "texts.faiss"
MANIFEST_FILE = "manifest.json"
INDEX_FILES = (IMAGES_FILE, TEXTS_FILE)
TEXT_FACTORY = "IDMap2,Flat"  # text corpora are small; exact search needs no training
METRIC = "inner_product"
NORM_TOLERANCE = 1e-3  # |‖v‖ - 1| allowed for a stored embedding
HASH_CHUNK_BYTES = 1 << 20  # 1 MiB reads when hashing a file (not clip_model.download's: that import loads torch)
GENERATION_RE = re.compile(r"g-(\d{6,})")

Vectors = npt.NDArray[np.float32]
Ids = npt.NDArray[np.int64]


# How inputs reach the model besides the pixels' size and normalization (clip_model.input_provenance). A record
# written before these keys describes what the indexer and the server could only do then: CLIP's BPE tokenizer and
# the shortest-side resize with a centre crop, so such an index still matches a CLIP loaded today.
LEGACY_INPUTS = {"family": "clip", "tokenizer": "clip-bpe", "resize_mode": "shortest"}


@dataclass(frozen=True)
class ModelInfo:
    """Provenance of the embeddings: which encoder, which weights, which preprocessing (JSON-able). ``preprocess``
    holds the image side (``image_size``, ``mean``, ``std``, ``resize_mode``) and the model's ``family`` and
    ``tokenizer``; keys a record lacks read as :data:`LEGACY_INPUTS`."""

    name: str
    weights_sha256: str
    embed_dim: int
    preprocess: dict[str, Any]

    def __post_init__(self) -> None:  # canonical JSON form, so tuples and lists compare equal after a round trip
        object.__setattr__(self, "preprocess", json.loads(json.dumps({**LEGACY_INPUTS, **self.preprocess})))

    @classmethod
    def of(
        cls,
        name: str,
        weights_sha256: str,
        embed_dim: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        **inputs: str,
    ) -> ModelInfo:
        """The provenance record of a loaded model, in the one form indexer and app both write and compare.
        ``inputs``: ``family``, ``tokenizer``, ``resize_mode`` (:data:`LEGACY_INPUTS` where not given)."""
        unknown = set(inputs) - set(LEGACY_INPUTS)
        if unknown:
            raise TypeError(f"unknown provenance fields {sorted(unknown)}; known: {sorted(LEGACY_INPUTS)}")
        preprocess = {"image_size": int(image_size), "mean": [float(m) for m in mean], "std": [float(s) for s in std]}
        preprocess |= {key: str(value) for key, value in inputs.items()}
        return cls(name=name, weights_sha256=weights_sha256, embed_dim=int(embed_dim), preprocess=preprocess)

    def same_embeddings(self, other: ModelInfo) -> bool:
        """Whether both produce the same vectors: same weights, dim and preprocessing (the name is only a label)."""
        return (self.weights_sha256, self.embed_dim, self.preprocess) == (
            other.weights_sha256,
            other.embed_dim,
            other.preprocess,
        )


@dataclass(frozen=True, slots=True)
class FileRecord:
    """What change detection needs about one catalog row."""

    id: int
    path: str
    size: int
    mtime_ns: int
    content_hash: str | None
    status: str


@dataclass(frozen=True, slots=True)
class NewImage:
    """An image file to record with its embedding (:meth:`indexer.store.Catalog.add_images`)."""

    path: str
    size: int
    mtime_ns: int
    content_hash: str
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """What the app shows about one image; ``path`` is relative to the image root, in POSIX form."""

    id: int
    path: str
    size: int
    mtime_ns: int
    content_hash: str | None
    width: int | None
    height: int | None
    status: str
    error: str | None


@dataclass(frozen=True)
class FileDigest:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    """manifest.json of one generation. ``created_at`` is Unix seconds; ``counts`` = {"images": n, "texts": n}."""

    format_version: int
    generation: str
    created_at: float
    model_name: str
    weights_sha256: str
    embed_dim: int
    preprocess: dict[str, Any]
    metric: str
    factory: str
    text_factory: str
    counts: dict[str, int]
    files: dict[str, FileDigest]
    requested_factory: str = ""  # "auto" or the factory string the user asked for ("": before this field)
    memory_budget: int | None = None  # bytes the image index had to fit in (auto only), None: no budget
    index_reason: str = ""  # why ``factory`` (one line)
    search_params: dict[str, int] = dataclasses.field(default_factory=dict)  # set on the image index on load
    recall_at_10: float | None = None  # image index vs exact search; None: empty or not measured
    recall_queries: int = 0  # queries behind recall_at_10 (0 for Flat: exact by construction)
    segments: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # segments.SegmentRecord fields
    trained: str | None = None  # the trained, empty index new segments copy (in segments/); None: needs none
    trained_count: int = 0  # images when it was trained
    auto_choice: str = ""  # what choose_index gave at that training ("" unless the type is "auto")
    calibration: str | None = None  # ground truth of the knob's calibration (in segments/); None: no knob
    text_long_text: str = "truncate"  # texts longer than the context: "truncate", "chunk" or "mixed" (the catalog's)

    @property
    def model(self) -> ModelInfo:
        return ModelInfo(self.model_name, self.weights_sha256, self.embed_dim, self.preprocess)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: Path) -> Manifest:
        """Parse and validate; IndexFormatError names ``source`` and what is wrong (bad JSON, unknown version...)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise IndexFormatError(f"{source} is not valid JSON ({exc}): the generation is corrupt") from exc
        version = data.get("format_version") if isinstance(data, dict) else None
        if not isinstance(version, int):
            raise IndexFormatError(f"{source} has no integer format_version: the generation is corrupt")
        if version not in READABLE_FORMATS:
            hint = ": upgrade clip-search to read it" if version > FORMAT_VERSION else ""
            raise IndexFormatError(
                f"{source} has format version {version}; this code reads format version {FORMAT_VERSION}{hint}"
            )
        try:
            fields = {f.name: data[f.name] for f in dataclasses.fields(cls) if _required(f) or f.name in data}
            fields["files"] = {name: FileDigest(str(d["sha256"]), int(d["bytes"])) for name, d in data["files"].items()}
            fields["counts"] = {name: int(n) for name, n in data["counts"].items()}
            fields["created_at"], fields["embed_dim"] = float(data["created_at"]), int(data["embed_dim"])
            fields["search_params"] = {name: int(v) for name, v in data.get("search_params", {}).items()}
            fields["segments"] = [dict(segment) for segment in data.get("segments", [])]
            manifest = cls(**fields)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise IndexFormatError(f"{source} is missing a field or has a malformed one ({exc!r})") from exc
        if manifest.metric != METRIC:
            raise IndexFormatError(f"{source} has metric {manifest.metric!r}; this code reads {METRIC!r}")
        return manifest


def _required(field: dataclasses.Field[Any]) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def generation_number(name: str) -> int:
    """The number of a generation name: "g-000007" -> 7."""
    match = GENERATION_RE.fullmatch(name)
    if match is None:
        raise IndexFormatError(f"{name[:40]!r} is not a generation name like 'g-000001'")
    return int(match.group(1))


def _write_durably(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())


def _fsync(path: Path) -> None:
    """fsync a file or a directory (the latter makes renames and new entries in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(path: Path) -> FileDigest:
    sha = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(HASH_CHUNK_BYTES):
            sha.update(chunk)
    return FileDigest(sha.hexdigest(), path.stat().st_size)
