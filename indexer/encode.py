"""``clip-index encode``: an image folder encoded into a shards directory (:mod:`indexer.shards`), partition by
partition, on an engine: this process (:class:`~indexer.partition_encoder.LocalEngine`) or a Ray cluster
(:mod:`indexer.ray_engine`). ``clip-index ingest`` brings the shards into an index; :func:`build_on_engine` does both.

A run, in this process (the driver):

1. The engine starts (the local engine loads the model; the Ray engine connects to the cluster and checks it can
   host the workers) and gives the model's provenance. The shards directory's :class:`~indexer.store.WriterLock`
   keeps a second run out of it until this one ends.
2. The folder is scanned (:func:`indexer.build.scan_folder`). With ``index_dir``, a file whose (size, mtime_ns) the
   index's catalog records for its path, or a passed-over entry it records with the same reason, is left out: it is
   in no partition. The rest, the work list, is cut into partitions (:mod:`indexer.partitions`: deterministic, named
   by their entries).
3. Shards already in the directory under a partition's name are finished: a rerun skips them. A shard that no
   partition of this listing names (written for another listing: the folder changed since, or an incremental run
   came after an ingest) is never mixed into the output: unless ``index_dir``'s catalog records it as ingested,
   the run stops before encoding anything and names it (``replace_stale`` removes such shards instead: for
   :func:`build_on_engine`'s own directory). Temp files a killed run left are removed.
4. The engine decodes and encodes the pending partitions' files with the local indexer's code
   (:mod:`indexer.partition_encoder`); as each partition comes back whole, this process writes it as a shard, once,
   atomically (:class:`~indexer.shards.ShardWriter`), with the scan's passed-over entries and the skipped files'
   reasons as rows, and the vectors of reused files read from the index. A partition that comes back twice (a
   worker's retry) is written the first time only, so every file is in exactly one shard however often it was
   encoded; a partition that comes back with other files than it holds stops the run.

A kill or Ctrl-C at any moment leaves whole shards and temp files only; the next run over the same listing writes
the missing partitions.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from clip_model import InferencePrecision
from clip_model.process_tuning import ThreadPlan

from .build import BuildOptions, fill_metadata, scan_folder
from .errors import IndexerError, ModelMismatchError, ShardError
from .ingest import IngestOptions, IngestStats, ingest
from .partition_encoder import EncodeJob, Work, WorkRows
from .partitions import Partition, split
from .pipeline import DEFAULT_BATCH_SIZE
from .scan import PassedOver
from .shards import (
    SHARD_PREFIX,
    SHARD_SUFFIX,
    TEMP_PREFIX,
    ShardRows,
    ShardWriter,
    import_pyarrow,
    list_shards,
    write_manifest,
)
from .store import CATALOG_FILE, Catalog, FileRecord, ModelInfo, WriterLock

logger = logging.getLogger(__name__)

DEFAULT_PARTITION_SIZE = 1000  # files per partition (and shard), on average
ENCODE_SHARDS_DIR = ".encode-shards"  # build_on_engine's shards directory, inside the index directory
SHOWN_STALE = 5  # stale shard names an error quotes
Progress = Callable[[int, int], None]  # (files done, files in the pending partitions)


class Engine(Protocol):
    """Where partitions are encoded: :meth:`start` once, then :meth:`run` once, then :meth:`close`."""

    name: str

    def start(self, job: EncodeJob) -> ModelInfo:
        """Get ready to encode ``job`` (load the model, connect to a cluster); returns the model's provenance."""
        ...

    def run(self, works: Sequence[Work], reusable: frozenset[str]) -> Iterator[WorkRows]:
        """Encode ``works``; yields each work's rows whole, each at least once, in any order."""
        ...

    def describe(self) -> str:
        """One line for the log: the engine and its workers."""
        ...

    def close(self) -> None:
        """Let go of what :meth:`start` took (a cluster connection it made); safe to call more than once."""
        ...


@dataclass(frozen=True)
class EncodeOptions:
    """What to encode, where to write it, and against which index (see ``indexer.cli`` for each option)."""

    root: Path
    out: Path  # the shards directory
    model: str
    arch: str | None = None
    extensions: frozenset[str] | None = None  # None: every format this Pillow can decode
    exclude: Sequence[str] = ()
    index_dir: Path | None = None  # encode only what this index does not hold as it is
    partition_size: int = DEFAULT_PARTITION_SIZE
    batch_size: int = DEFAULT_BATCH_SIZE
    draft: bool = True
    precision: InferencePrecision | None = None  # None: the device's own (fp32 on the CPU, fp16 on CUDA)
    device: str = "cpu"  # the device setting where the engine encodes (clip_model.device; Ray: indexer.ray_engine)
    replace_stale: bool = False  # remove shards no partition names instead of refusing to run
    store_gps: bool = False  # keep GPS positions in the shards' photo metadata


@dataclass
class EncodeStats:
    """Counts of one run; ``skipped_reasons`` maps a reason category to how many rows it covered."""

    scanned: int = 0  # files and passed-over entries found
    unchanged: int = 0  # held by the index as they are: in no partition
    partitions: int = 0
    partitions_before: int = 0  # finished by an earlier run
    shards: int = 0  # written by this run
    rows: int = 0  # rows of the shards this run wrote
    encoded: int = 0
    reused: int = 0  # vectors taken from the index (same content under this path, or a vanished one)
    skipped: int = 0
    skipped_reasons: dict[str, int] = field(default_factory=dict)
    stale_removed: int = 0
    seconds: float = 0.0
    images_per_second: float = 0.0  # encoded / seconds

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EncodeResult:
    """A run's counts and the index rows of the paths the scan no longer found (``index_dir`` only)."""

    stats: EncodeStats
    vanished: dict[str, FileRecord]


def encode_folder(options: EncodeOptions, engine: Engine, progress: Progress | None = None) -> EncodeResult:
    """Encode ``options.root`` into the shards directory ``options.out`` on ``engine`` (module docstring).

    Raises ShardError for a shards directory of another model or folder, or with stale shards; ModelMismatchError
    when ``index_dir`` holds another model's embeddings; IndexerError for bad options."""
    started = time.monotonic()
    if options.partition_size < 1 or options.batch_size < 1:
        raise IndexerError(
            f"partition size and batch size must be at least 1, got {options.partition_size} and {options.batch_size}"
        )
    if not options.root.is_dir():
        raise IndexerError(f"image folder {options.root} does not exist or is not a directory")
    if options.index_dir is not None and not (options.index_dir / CATALOG_FILE).is_file():
        raise IndexerError(f"{options.index_dir} holds no index (no {CATALOG_FILE}): leave out --index-dir")
    import_pyarrow()  # first: without it nothing is written, and the error says how to install it
    root = options.root.resolve()
    job = EncodeJob(
        root,
        options.model,
        options.arch,
        options.precision,
        options.draft,
        options.batch_size,
        gps=options.store_gps,
        device=options.device,
    )
    try:
        info = engine.start(job)
        logger.info("encoding on the %s", engine.describe())
        options.out.mkdir(parents=True, exist_ok=True)
        with WriterLock(options.out), _IndexView.open(options.index_dir, info) as index:
            stats = EncodeStats()
            scan = scan_folder(root, options.extensions, options.exclude, index.known, index.skip_reasons)
            vanished = scan.vanished(index.known)
            index.reusable = {r.content_hash: r for r in vanished.values() if r.status == "ok" and r.content_hash}
            stats.scanned, stats.unchanged = len(scan.seen), scan.unchanged
            partitions = split([*scan.changed, *scan.passed], options.partition_size)
            stats.partitions = len(partitions)
            write_manifest(options.out, info, root)
            pending = _pending(options, partitions, index.ingested, stats)
            logger.info(
                "%d files and entries: %d unchanged, %d to write in %d partitions (%d finished before)",
                stats.scanned,
                stats.unchanged,
                sum(map(len, partitions)),
                stats.partitions,
                stats.partitions_before,
            )
            _write_all(options.out, pending, engine, index, info, stats, progress)
    finally:
        engine.close()
    stats.seconds = time.monotonic() - started
    stats.images_per_second = stats.encoded / stats.seconds if stats.seconds else 0.0
    return EncodeResult(stats, vanished)


def shard_file(partition: str) -> str:
    """The file name of a partition's shard."""
    return f"{SHARD_PREFIX}{partition}{SHARD_SUFFIX}"


def _pending(
    options: EncodeOptions, partitions: Sequence[Partition], ingested: set[str], stats: EncodeStats
) -> list[Partition]:
    """The partitions without a shard in ``options.out``; stale shards refused (or removed) and temp files removed."""
    existing = {path.name: path for path in list_shards(options.out)}
    names = {shard_file(partition.name) for partition in partitions}
    stale = sorted(name for name in existing if name not in names and name not in ingested)
    if stale and not options.replace_stale:
        shown = ", ".join(stale[:SHOWN_STALE]) + (", ..." if len(stale) > SHOWN_STALE else "")
        raise ShardError(
            f"{options.out} holds {len(stale)} shards that no partition of this listing of {options.root} names "
            f"({shown}): they were written for another listing (the folder changed since, or the index they "
            "were compared with did). Ingest them first and pass that index as --index-dir, or remove them, or "
            "write to another directory"
        )
    for name in stale:
        existing[name].unlink()
        stats.stale_removed += 1
    if stale:
        logger.info("removed %d stale shards from %s", len(stale), options.out)
    for path in options.out.glob(f"{TEMP_PREFIX}{SHARD_PREFIX}*"):  # a killed run's; the lock keeps out live ones
        path.unlink(missing_ok=True)
    pending = [partition for partition in partitions if shard_file(partition.name) not in existing]
    stats.partitions_before = len(partitions) - len(pending)
    return pending


def _write_all(
    out: Path,
    pending: Sequence[Partition],
    engine: Engine,
    index: _IndexView,
    info: ModelInfo,
    stats: EncodeStats,
    progress: Progress | None,
) -> None:
    """Write a shard of every pending partition: those without files at once, the others as the engine hands them
    back (the first time each comes)."""
    total, done, reasons = sum(map(len, pending)), 0, Counter[str]()
    waiting = {partition.name: partition for partition in pending if partition.files}
    for partition in pending:
        if not partition.files:
            done += _write(out, partition, None, index, info, stats, reasons)
    if progress is not None:
        progress(done, total)
    works = [Work(p.name, p.files, tuple(index.known.get(f.path) for f in p.files)) for p in waiting.values()]
    if works:
        for rows in engine.run(works, frozenset(index.reusable)):
            if rows.partition not in waiting:
                logger.debug("partition %s came back again (a retried worker's): written already", rows.partition)
                continue
            done += _write(out, waiting.pop(rows.partition), rows, index, info, stats, reasons)
            if progress is not None:
                progress(done, total)
    stats.skipped_reasons = dict(reasons)
    if waiting:
        raise IndexerError(
            f"the {engine.name} engine ended without {len(waiting)} partitions (e.g. {next(iter(waiting))}); their "
            "shards are missing: run again to write them"
        )


def _write(
    out: Path,
    partition: Partition,
    rows: WorkRows | None,
    index: _IndexView,
    info: ModelInfo,
    stats: EncodeStats,
    reasons: Counter[str],
) -> int:
    """Write ``partition``'s shard from the engine's ``rows`` of its files and its passed-over entries; returns the
    rows written."""
    files = [scanned.path for scanned in partition.files]
    if (rows.paths if rows is not None else []) != files:
        raise IndexerError(
            f"the engine gave back other files than partition {partition.name} holds: a bug, please report it"
        )
    shard = _shard_rows(partition.passed, rows, index, info.embed_dim)
    with ShardWriter(out, partition.name, info) as writer:
        writer.add(shard)
    stats.shards += 1
    stats.rows += len(shard)
    if rows is not None:
        stats.encoded += rows.encoded
        stats.reused += sum(rows.reused)
    for error in shard.errors:
        if error is not None:
            stats.skipped += 1
            reasons[error.split(":")[0]] += 1
    return len(shard)


def _shard_rows(passed: Sequence[PassedOver], rows: WorkRows | None, index: _IndexView, dim: int) -> ShardRows:
    """The rows of a shard in stored path order: passed-over entries with their reason, and the engine's rows with
    the reused ones' vectors read from the index."""
    order: list[tuple[str, int]] = [(entry.path, -1 - i) for i, entry in enumerate(passed)]
    if rows is not None:
        order += [(path, i) for i, path in enumerate(rows.paths)]
    order.sort()
    columns: dict[str, list[Any]] = {name: [] for name in ("paths", "sha256", "size", "mtime_ns", "width", "height")}
    errors: list[str | None] = []
    photo: list[str | None] = []
    vectors: list[np.ndarray] = []
    for path, i in order:
        if i < 0:
            entry = passed[-1 - i]
            values: tuple[Any, ...] = (path, None, entry.size, entry.mtime_ns, None, None)
            errors.append(entry.reason)
            photo.append(None)
        else:
            assert rows is not None  # only rows' indexes are >= 0
            values = (path, rows.sha256[i], rows.size[i], rows.mtime_ns[i], rows.width[i], rows.height[i])
            errors.append(rows.errors[i])
            photo.append(rows.photo[i] if rows.errors[i] is None else None)
            if rows.errors[i] is None:
                vectors.append(index.vector(path, rows.sha256[i]) if rows.reused[i] else rows.embeddings[i])
        for name, value in zip(columns, values, strict=True):
            columns[name].append(value)
    embeddings = np.stack(vectors).astype(np.float32) if vectors else np.zeros((0, dim), dtype=np.float32)
    return ShardRows(
        paths=columns["paths"],
        sha256=columns["sha256"],
        size=np.asarray(columns["size"], dtype=np.int64),
        mtime_ns=np.asarray(columns["mtime_ns"], dtype=np.int64),
        width=columns["width"],
        height=columns["height"],
        errors=errors,
        embeddings=embeddings,
        photo=photo,
    )


class _IndexView:
    """What a run reads of ``index_dir`` (nothing without one): its rows by path, its skipped rows' reasons, the
    shards it ingested, and the vectors of reused files."""

    def __init__(self, catalog: Catalog | None) -> None:
        self._catalog = catalog
        self.known: dict[str, FileRecord] = catalog.files() if catalog else {}
        self.skip_reasons: dict[str, str] = dict(catalog.skipped()) if catalog else {}
        self.ingested: set[str] = set(catalog.ingested_shards()) if catalog else set()
        self.reusable: dict[str, FileRecord] = {}  # content hash -> an ok row of a vanished path

    @classmethod
    def open(cls, index_dir: Path | None, info: ModelInfo) -> _IndexView:
        if index_dir is None:
            return cls(None)
        catalog = Catalog.open(index_dir, readonly=True)
        try:
            held = catalog.model()
            if held is not None and not held.same_embeddings(info):
                raise ModelMismatchError(
                    f"the index in {index_dir} holds embeddings of model {held.name!r} (weights sha256 "
                    f"{held.weights_sha256[:12]}...), not of {info.name!r} (weights sha256 "
                    f"{info.weights_sha256[:12]}...): encode with --model {held.name}, or leave out --index-dir"
                )
            return cls(catalog)
        except BaseException:
            catalog.close()
            raise

    def vector(self, path: str, sha256: str | None) -> np.ndarray:
        """The index's vector of the content ``sha256`` found at ``path``: its own row's, or a vanished path's."""
        record = self.known.get(path)
        if record is None or record.status != "ok" or record.content_hash != sha256:
            record = self.reusable.get(sha256) if sha256 else None
        vector = self._catalog.embedding(record.id) if record is not None and self._catalog is not None else None
        if vector is None:
            raise IndexerError(f"the index no longer holds the vector of {path!r}: it changed during the run; rerun")
        return vector

    def __enter__(self) -> _IndexView:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._catalog is not None:
            self._catalog.close()


@dataclass
class EngineBuildStats:
    """Counts of :func:`build_on_engine`: the encode run's, the rows of vanished paths deleted, the ingest's, and the
    files whose photo metadata was read for rows indexed before without it."""

    encode: EncodeStats
    deleted: int
    ingest: IngestStats
    metadata_read: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "encode": self.encode.as_dict(),
            "deleted": self.deleted,
            "ingest": self.ingest.as_dict(),
            "metadata_read": self.metadata_read,
        }


def build_on_engine(
    options: BuildOptions,
    engine: Engine,
    partition_size: int = DEFAULT_PARTITION_SIZE,
    progress: Progress | None = None,
) -> EngineBuildStats:
    """``clip-index build --engine ray``: encode what changed in ``options.root`` on ``engine`` into the index's
    ``ENCODE_SHARDS_DIR``, delete the rows of files gone from the folder, ingest the shards (one publish), then
    remove them. A killed run resumes from the shards it wrote."""
    if options.rebuild or options.retrain:
        raise IndexerError(
            "--rebuild and --retrain are not available with an engine: build into a new index directory to re-embed "
            "everything, and run the local build with --retrain (it encodes nothing new) to train the index again"
        )
    shards = options.index_dir / ENCODE_SHARDS_DIR
    has_index = (options.index_dir / CATALOG_FILE).is_file()
    encoded = encode_folder(
        EncodeOptions(
            root=options.root,
            out=shards,
            model=options.model,
            arch=options.arch,
            extensions=options.extensions,
            exclude=options.exclude,
            index_dir=options.index_dir if has_index else None,
            partition_size=partition_size,
            batch_size=options.batch_size,
            draft=options.draft,
            precision=options.precision,
            device=options.device,
            replace_stale=True,
            store_gps=options.store_gps,
        ),
        engine,
        progress,
    )
    deleted = metadata_read = 0
    if has_index:  # rows already indexed: delete the vanished ones; read the photo metadata the unchanged ones lack
        with WriterLock(options.index_dir), Catalog.open(options.index_dir) as catalog:
            if encoded.vanished:
                with catalog.transaction():
                    deleted = catalog.delete(record.id for record in encoded.vanished.values())
            metadata_read = fill_metadata(catalog, options.root, options.store_gps)  # the shards carry the new ones'
    plan = ThreadPlan.for_indexing(workers=0)  # ingest decodes and encodes nothing
    ingested = ingest(
        IngestOptions(
            shards,
            options.index_dir,
            factory=options.factory,
            memory_budget=options.memory_budget,
            plan=plan,
            publish_anyway=metadata_read > 0,
        )
    )
    shutil.rmtree(shards)
    return EngineBuildStats(encoded.stats, deleted, ingested, metadata_read)
