"""Embeddings computed elsewhere in and out of an index directory: ``clip-index ingest`` and ``clip-index export``.

Both speak the embedding shard format of :mod:`indexer.shards` (its module docstring is the specification); ingest
also reads clip-retrieval's inference output (:mod:`indexer.shards_clip_retrieval`) for a model the caller names.

Ingest, under the index's :class:`WriterLock`:

* Provenance as in a build: the shards' model becomes a new index's model, an index of other weights refuses them
  (ModelMismatchError, nothing written), and every shard is read against the index's model.
* A shard is validated whole before any of it is written: a bad row refuses it, naming the shard and the row. Its
  rows and its ``ingested_shards`` record (name, sha256 of its bytes, rows) are committed in one catalog
  transaction, so a kill leaves each shard wholly in or wholly out and a rerun skips the recorded ones. A recorded
  name whose bytes changed is refused: a shard is written once.
* A row whose path the catalog holds with the same size, mtime_ns, sha256 and status is left alone; any other row
  replaces the catalog's row of its path (keeping its id) or adds one. Rows of paths no shard names are kept.
* One publish at the end, unless the published generation already shows every image row as it is and was built
  as asked: image rows a killed run committed are published by the rerun.

Export writes the catalog's image rows (ok ones with their vectors, skipped ones with their reason) in id order,
``rows_per_shard`` to a shard, under a manifest naming the catalog's model and the last run's image root; ingesting
them into a new index directory gives the same rows, vectors and search results.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from clip_model.process_tuning import ThreadPlan, own_threads

from .build import check_provenance
from .errors import IndexerError, ShardError
from .photo_metadata import PhotoMetadata
from .shards import ShardRows, ShardWriter, import_pyarrow, list_shards, read_shard, write_manifest
from .shards import read_manifest as read_shards_manifest
from .shards_clip_retrieval import list_parts, read_part
from .store import (
    Catalog,
    FileRecord,
    ImageRecord,
    ModelInfo,
    NewImage,
    WriterLock,
    current_generation,
    publish,
    up_to_date,
)
from .store.format import HASH_CHUNK_BYTES, Vectors

logger = logging.getLogger(__name__)

Source = Literal["shards", "clip-retrieval"]
SOURCES: tuple[Source, ...] = ("shards", "clip-retrieval")
DEFAULT_ROWS_PER_SHARD = 100_000  # rows per exported shard: 200 MB of vectors at 512 dimensions
Progress = Callable[[int, int], None]  # (shards done, shards in the directory)


@dataclass(frozen=True)
class IngestOptions:
    """What to ingest, from where, into which index (see ``indexer.cli`` for each option's meaning)."""

    shards_dir: Path  # a shards directory, or clip-retrieval's output folder
    index_dir: Path
    source: Source = "shards"
    model: ModelInfo | None = None  # the embeddings' model: required for clip-retrieval, a check for shards
    image_root: Path | None = None  # the folder the paths are relative to; None: the manifest's (shards only)
    factory: str | None = None  # as BuildOptions.factory
    memory_budget: int | None = None  # as BuildOptions.memory_budget
    plan: ThreadPlan | None = None  # FAISS threads of the publish; None: ThreadPlan.for_indexing()
    publish_anyway: bool = False  # publish even if the image rows did not change (photo metadata did: readers load it)


@dataclass
class IngestStats:
    """Counts of one ingest; rows are counted in the shards this run ingested."""

    shards: int = 0  # ingested by this run
    shards_before: int = 0  # passed over: an earlier run ingested them
    rows: int = 0
    unchanged: int = 0
    added: int = 0
    modified: int = 0
    skipped: int = 0
    seconds: float = 0.0
    generation: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ExportStats:
    shards: int = 0
    rows: int = 0
    skipped: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Shard:
    """One unit of ingest: its name in the catalog, the files its sha256 covers, and how to read its rows against
    the index's model."""

    name: str
    files: tuple[Path, ...]
    read: Callable[[ModelInfo], ShardRows]


def ingest(options: IngestOptions, progress: Progress | None = None) -> IngestStats:
    """Bring the shards of ``options.shards_dir`` into ``options.index_dir`` and publish (see the module docstring).

    Raises ShardError for a bad shard (earlier shards stay committed), ModelMismatchError for another model's."""
    started = time.monotonic()
    import_pyarrow()  # first: without it nothing is written, and the error says how to install it
    model, root, shards = _source(options)
    if not root.is_dir():
        logger.warning("image folder %s is not a directory here: the server will not find the images", root)
    with WriterLock(options.index_dir), Catalog.open(options.index_dir, create=True) as catalog:
        check_provenance(catalog, model, options.index_dir)
        if catalog.model() is None:
            catalog.set_model(model)
        run_id = catalog.start_run(str(root.resolve()))
        index_model = catalog.model() or model  # the index's name for the same embeddings
        stats = _ingest_shards(catalog, shards, index_model, progress)
        stats.generation = _publish(options, catalog)
        stats.seconds = time.monotonic() - started
        catalog.finish_run(run_id, stats.as_dict())
    return stats


def _source(options: IngestOptions) -> tuple[ModelInfo, Path, list[_Shard]]:
    """(the embeddings' model, the image root, the shards in order) of ``options.shards_dir``."""
    if options.source not in SOURCES:
        raise IndexerError(f"unknown source {options.source!r}: one of {', '.join(SOURCES)}")
    if options.source == "shards":
        manifest = read_shards_manifest(options.shards_dir, expected=options.model)
        files = list_shards(options.shards_dir)
        shards = [_Shard(path.name, (path,), functools.partial(read_shard, path)) for path in files]
        return manifest.model, options.image_root or Path(manifest.image_root), shards
    if options.model is None or options.image_root is None:
        raise IndexerError(
            "clip-retrieval's output records neither the model nor the image folder: name them with --model "
            "(the model it was computed with) and --image-root (the folder its image_path values are under)"
        )
    root = options.image_root
    shards = [
        _Shard(part.metadata.name, (part.embeddings, part.metadata), functools.partial(read_part, part, root))
        for part in list_parts(options.shards_dir)
    ]
    return options.model, root, shards


def _ingest_shards(
    catalog: Catalog, shards: Sequence[_Shard], model: ModelInfo, progress: Progress | None
) -> IngestStats:
    stats, done = IngestStats(), catalog.ingested_shards()
    before = sum(shard.name in done for shard in shards)
    logger.info("ingesting %d of %d shards (%d ingested before)", len(shards) - before, len(shards), before)
    for number, shard in enumerate(shards, 1):
        digest = _sha256(shard.files)
        if shard.name in done:
            recorded, rows = done[shard.name]
            if digest != recorded:
                raise ShardError(
                    f"{shard.files[-1]} was ingested before with other content (sha256 {recorded[:12]}..., "
                    f"{rows} rows; now {digest[:12]}...): a shard is written once, so write the changed rows "
                    "under a new partition name"
                )
            stats.shards_before += 1
        else:
            rows_of_shard = shard.read(model)
            with catalog.transaction():
                _write_rows(catalog, rows_of_shard, catalog.files_at(rows_of_shard.paths), stats)
                catalog.record_ingested_shard(shard.name, digest, len(rows_of_shard))
            stats.shards += 1
            logger.debug("ingested %s: %d rows", shard.name, len(rows_of_shard))
        if progress is not None:
            progress(number, len(shards))
    return stats


def _write_rows(catalog: Catalog, rows: ShardRows, known: dict[str, FileRecord], stats: IngestStats) -> None:
    """Write the rows that differ from the catalog's ``known`` rows of the shard's paths (call in a transaction;
    a shard's paths are unique, so each is looked at once). The embedded ones go in as one batch."""
    images: list[NewImage] = []
    embedded: list[int] = []  # positions in rows.embeddings of the images written
    for i, path in enumerate(rows.paths):
        error, sha256 = rows.errors[i], rows.sha256[i]
        size, mtime_ns = int(rows.size[i]), int(rows.mtime_ns[i])
        status = "ok" if error is None else "skipped"
        previous = known.get(path)
        facts = (size, mtime_ns, sha256, status)
        if previous is not None and (previous.size, previous.mtime_ns, previous.content_hash, previous.status) == facts:
            stats.unchanged += 1
        elif error is not None:
            catalog.add_skipped(path, size, mtime_ns, sha256, error)
            stats.skipped += 1
        else:
            width, height = rows.width[i], rows.height[i]
            assert sha256 is not None and width is not None and height is not None  # check_rows
            images.append(NewImage(path, size, mtime_ns, sha256, width, height))
            embedded.append(i)
            if previous is None:
                stats.added += 1
            else:
                stats.modified += 1
    if images:
        positions = np.searchsorted(rows.embedded_rows, np.asarray(embedded, dtype=np.int64))
        catalog.add_images(images, np.ascontiguousarray(rows.embeddings[positions]))
        photos = [(image.content_hash, rows.photos[i]) for image, i in zip(images, embedded, strict=True)]
        catalog.photos.record([(digest, PhotoMetadata.from_json(text)) for digest, text in photos if text is not None])
    stats.rows += len(rows)


def _publish(options: IngestOptions, catalog: Catalog) -> str:
    """Publish a new generation unless the published one shows every image row as it is and was built as asked;
    returns the name of the generation served."""
    if not options.publish_anyway and up_to_date(options.index_dir, catalog, options.factory, options.memory_budget):
        published = current_generation(options.index_dir)
        assert published is not None  # up to date: something is published
        return published
    plan = options.plan or ThreadPlan.for_indexing()
    with own_threads(plan.faiss_threads):
        return publish(options.index_dir, catalog, options.factory, memory_budget=options.memory_budget).generation


def _sha256(files: Sequence[Path]) -> str:
    """sha256 of the files' bytes, one after the other."""
    sha = hashlib.sha256()
    for path in files:
        try:
            with path.open("rb") as file:
                while chunk := file.read(HASH_CHUNK_BYTES):
                    sha.update(chunk)
        except OSError as exc:
            raise ShardError(f"cannot read {path}: {exc}") from exc
    return sha.hexdigest()


def export(index_dir: Path, out_dir: Path, *, rows_per_shard: int = DEFAULT_ROWS_PER_SHARD) -> ExportStats:
    """Write the image rows of ``index_dir``'s catalog as a shards directory ``out_dir`` (new, or without shards).

    Shard ``shard-<n>.parquet`` (n from 000000) holds ``rows_per_shard`` rows in id order; a consistent snapshot of
    the catalog is exported while a writer goes on."""
    started = time.monotonic()
    import_pyarrow()
    if rows_per_shard < 1:
        raise IndexerError(f"rows per shard must be at least 1, got {rows_per_shard}")
    stats = ExportStats()
    with Catalog.open(index_dir, readonly=True) as catalog, catalog.snapshot():
        model, root = catalog.model(), catalog.image_root()
        if model is None or root is None:
            raise IndexerError(f"{index_dir} has no indexed images yet: there is nothing to export")
        if Path(out_dir).is_dir() and list_shards(out_dir):
            raise ShardError(f"{out_dir} already holds shards: export into a new directory")
        write_manifest(out_dir, model, root)
        after = 0
        while True:
            records, vectors = catalog.image_page(after, rows_per_shard)
            if not records:
                break
            photos = catalog.photos.of([r.content_hash for r in records if r.status == "ok" and r.content_hash])
            with ShardWriter(out_dir, f"{stats.shards:06d}", model) as writer:
                writer.add(_shard_rows(records, vectors, photos))
            stats.shards += 1
            stats.rows += len(records)
            stats.skipped += sum(record.status == "skipped" for record in records)
            after = records[-1].id
    stats.seconds = time.monotonic() - started
    return stats


def _shard_rows(records: Sequence[ImageRecord], vectors: Vectors, photos: dict[str, PhotoMetadata]) -> ShardRows:
    """Catalog rows as shard rows; ``vectors`` [M, D] are those of the ok ones, in order; ``photos`` their
    metadata by content hash."""
    return ShardRows(
        paths=[record.path for record in records],
        sha256=[record.content_hash for record in records],
        size=np.asarray([record.size for record in records], dtype=np.int64),
        mtime_ns=np.asarray([record.mtime_ns for record in records], dtype=np.int64),
        width=[record.width for record in records],
        height=[record.height for record in records],
        errors=[record.error if record.status == "skipped" else None for record in records],
        embeddings=vectors,
        photo=[
            photos[r.content_hash].to_json() if r.status == "ok" and r.content_hash in photos else None for r in records
        ],
    )
