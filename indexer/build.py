"""Build or update an index directory from an image folder: scan -> diff -> encode -> commit -> publish.

Incremental by construction: a file whose (size, mtime) match its catalog row is not read again; a changed file
whose content hash did not change is only touched; a new path whose content hash belongs to a file that vanished
is a rename and keeps its embedding; rows of vanished files are deleted. Paths are in the stored form of
:mod:`indexer.paths`. Entries the scan passes over (``indexer.scan.PassedOver``: links leaving the folder, dangling
or looping, FIFOs, directories named like images, ...) are skipped rows with their reason, written again only when
their size, mtime or reason changes, and deleted when they go. One file never stops a build: decoding and recording
are per-file skip boundaries (an error there skips that file with a reason); the catalog's own errors stop the run.
Rows are committed every ``COMMIT_EVERY_N_FILES`` files, so a killed run loses at most that much work, and the FAISS
index is published only at the end as a new generation: readers keep the last published one until then.
"""

from __future__ import annotations

import itertools
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Container, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

import clip_model
from clip_model import InferencePrecision, Placement
from clip_model.process_tuning import ThreadPlan, own_threads, run_in_fresh_thread, set_own_thread_count

from . import paths
from .decode import Decoded, DecodeFailure, DecodeSpec
from .errors import IndexerError, ModelMismatchError
from .photo_metadata import read_file_metadata
from .pipeline import DEFAULT_BATCH_SIZE, Encoded, encode_files
from .scan import PassedOver, ScannedFile, iter_images
from .store import (
    Catalog,
    FileRecord,
    ModelInfo,
    WriterLock,
    current_generation,
    publish,
    up_to_date,
)

logger = logging.getLogger(__name__)

COMMIT_EVERY_N_FILES = 256  # catalog rows per transaction: the most work a kill -9 can cost
METADATA_COMMIT_EVERY = 1000  # photo metadata rows per transaction when read apart from encoding
Progress = Callable[[int, int], None]  # (files done, files to process)
Result = PassedOver | Encoded | DecodeFailure  # one file's outcome, recorded by _record


@dataclass(frozen=True)
class BuildOptions:
    """What to index, where, and with which model (see ``indexer.cli`` for each option's meaning)."""

    root: Path
    index_dir: Path
    model: str
    arch: str | None = None
    extensions: frozenset[str] | None = None  # None: every format this Pillow can decode
    exclude: Sequence[str] = ()
    factory: str | None = None  # "auto" or a FAISS factory string; None: what the index was last built with
    memory_budget: int | None = None  # bytes for the auto-chosen image index; None: as last time, 0: no budget
    batch_size: int = DEFAULT_BATCH_SIZE
    draft: bool = True
    rebuild: bool = False
    retrain: bool = False  # build the image index anew over every image, whatever the segment policy says
    precision: InferencePrecision | None = None  # None: the device's own (fp32 on the CPU, fp16 on CUDA)
    device: str = "cpu"  # the device setting (clip_model.device): auto, cpu, cuda or cuda:N
    plan: ThreadPlan | None = None  # decode workers, encode streams and threads; None: ThreadPlan.for_indexing
    store_gps: bool = False  # keep photos' GPS positions in the catalog (off: none kept, and those kept are dropped)


@dataclass
class BuildStats:
    """Counts of one run; ``skipped_reasons`` maps a reason category to how many files it covered."""

    scanned: int = 0
    unchanged: int = 0
    added: int = 0
    modified: int = 0
    touched: int = 0
    renamed: int = 0
    deleted: int = 0
    skipped: int = 0
    skipped_reasons: dict[str, int] = field(default_factory=dict)
    encoded: int = 0
    seconds: float = 0.0
    images_per_second: float = 0.0
    generation: str | None = None
    device: str = ""  # where the encoder ran ("cpu", "cuda:0") and in which arithmetic
    precision: str = ""
    metadata_read: int = 0  # files whose photo metadata was read apart from encoding (older indexes, GPS turned on)

    @property
    def changes_vectors(self) -> bool:
        """Whether the set of (id, vector) pairs differs from before the run (touches and re-skips do not count)."""
        return bool(self.added or self.modified or self.renamed or self.deleted or self.skipped)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadedModel:
    """The CLIP used for a run, with the provenance an index records and where it runs (its encoders take and give
    CPU arrays whatever the device: :mod:`clip_model.inference`)."""

    model: clip_model.ImageTextModel
    info: ModelInfo
    placement: Placement

    def encode(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """[B, 3, R, R] normalized pixels -> [B, D] float32 unit vectors."""
        with torch.inference_mode():
            features = self.model.encode_image(torch.from_numpy(batch), normalize=True)
        return np.ascontiguousarray(features.float().numpy())

    def decode_spec(self, draft: bool, gps: bool = False) -> DecodeSpec:
        pre = self.info.preprocess
        return DecodeSpec(
            image_size=pre["image_size"],
            mean=tuple(pre["mean"]),
            std=tuple(pre["std"]),
            resize_mode=pre["resize_mode"],
            draft=draft,
            gps=gps,
        )


def resolve_placement(device: str = "cpu", precision: str | None = None) -> Placement:
    """Where and in which arithmetic the encoder runs for the device and precision settings
    (:func:`clip_model.resolve_placement`); IndexerError, naming the settings, for a combination it refuses."""
    try:
        return clip_model.resolve_placement(device, precision)
    except ValueError as exc:
        raise IndexerError(str(exc)) from exc


def load_model(name: str, arch: str | None = None, precision: str | None = None, device: str = "cpu") -> LoadedModel:
    """Load ``name`` (registry name or checkpoint path) for inference on ``device`` in ``precision`` (the settings,
    :func:`resolve_placement`; :func:`clip_model.load_for_inference`): the index records the fingerprint of the
    float32 weights, so runs (and servers) of every precision and device share one index."""
    placement = resolve_placement(device, precision)
    loaded = clip_model.load_for_inference(name, arch=arch, precision=placement.precision, device=str(placement.device))
    info = ModelInfo.of(**loaded.provenance(), **clip_model.input_provenance(loaded.model, loaded.preprocess))
    return LoadedModel(loaded.model, info, placement)


def check_provenance(catalog: Catalog, info: ModelInfo, index_dir: Path) -> None:
    """Refuse to mix embeddings of different weights in one index."""
    built_with = catalog.model()
    if built_with is not None and built_with.weights_sha256 != info.weights_sha256:
        raise ModelMismatchError(
            f"the index in {index_dir} was built with model {built_with.name!r} (weights sha256 "
            f"{built_with.weights_sha256[:12]}...), but this run uses {info.name!r} (weights sha256 "
            f"{info.weights_sha256[:12]}...). Update it with --model {built_with.name}, or re-embed everything "
            f"with this model by adding --rebuild (the old index stays served until the new one is published)."
        )


def build_index(options: BuildOptions, progress: Progress | None = None) -> BuildStats:
    """Bring ``options.index_dir`` up to date with ``options.root`` and publish a new generation."""
    if not options.root.is_dir():
        raise IndexerError(f"image folder {options.root} does not exist or is not a directory")
    placement = resolve_placement(options.device, options.precision)  # refused settings touch no index
    plan = options.plan or ThreadPlan.for_indexing(placement.precision)
    logger.info("threads: %s", plan.describe())
    with own_threads(plan.stream_threads):  # a single stream encodes on this thread (decode workers are processes)
        return _build(options, progress, plan)


def _build(options: BuildOptions, progress: Progress | None, plan: ThreadPlan) -> BuildStats:
    started = time.monotonic()

    def load() -> LoadedModel:
        set_own_thread_count(plan.torch_threads)
        return load_model(options.model, options.arch, options.precision, options.device)

    # first: a failed load leaves no directory. On a thread that ends with it, so that its OpenMP team does not
    # stay beside the encoding ones (clip_model.process_tuning.threads).
    loaded = run_in_fresh_thread(load, name="load-model")
    options.index_dir.mkdir(parents=True, exist_ok=True)
    with WriterLock(options.index_dir), Catalog.open(options.index_dir, create=True) as catalog:
        if options.rebuild:
            catalog.reset(loaded.info)
        check_provenance(catalog, loaded.info, options.index_dir)
        if catalog.model() is None:
            catalog.set_model(loaded.info)
        run_id = catalog.start_run(str(options.root.resolve()))
        stats = _update(catalog, loaded, options, progress, plan)
        stats.device, stats.precision = str(loaded.placement.device), loaded.placement.precision
        stats.metadata_read = fill_metadata(catalog, options.root, options.store_gps)
        asked = options.rebuild or options.retrain or stats.metadata_read > 0  # readers load metadata per generation
        if not asked and up_to_date(options.index_dir, catalog, options.factory, options.memory_budget):
            stats.generation = current_generation(options.index_dir)  # nothing a reader would see changed
        else:
            with own_threads(plan.faiss_threads):
                manifest = publish(
                    options.index_dir,
                    catalog,
                    options.factory,
                    memory_budget=options.memory_budget,
                    retrain=options.retrain,
                )
            stats.generation = manifest.generation
        stats.seconds = time.monotonic() - started
        stats.images_per_second = stats.encoded / stats.seconds if stats.seconds else 0.0
        catalog.finish_run(run_id, stats.as_dict())
    return stats


def fill_metadata(catalog: Catalog, root: Path, store_gps: bool) -> int:
    """Photo metadata for the ok images whose content has none from this extractor (an index built before it was
    read, or every image once GPS positions are asked for), read from each file's header and EXIF only, and no GPS
    position kept unless ``store_gps``. Returns how many contents were read."""
    photos = catalog.photos
    with catalog.transaction():
        if not store_gps:
            dropped = photos.drop_gps()
            if dropped:
                logger.info("dropped the GPS positions of %d photos (--store-gps is off)", dropped)
        everything = store_gps and not photos.gps_recorded()
        missing = photos.missing(everything=everything)
    if missing:
        logger.info("reading the photo metadata of %d files (header and EXIF only)", len(missing))
    items = list(missing.items())
    for start in range(0, len(items), METADATA_COMMIT_EVERY):
        chunk = items[start : start + METADATA_COMMIT_EVERY]
        read = [(digest, read_file_metadata(paths.file_path(root, path), gps=store_gps)) for digest, path in chunk]
        with catalog.transaction():
            photos.record(read)
    with catalog.transaction():
        photos.set_gps_recorded(store_gps)
    return len(items)


@dataclass
class FolderScan:
    """A folder's scan against an index's rows: what needs work, what was seen, and where the scan could not look."""

    changed: list[ScannedFile] = field(default_factory=list)  # new or changed files: decoded
    passed: list[PassedOver] = field(default_factory=list)  # new or changed passed-over entries: recorded
    seen: set[str] = field(default_factory=set)  # every stored path found, files and passed-over entries
    unreadable: list[str] = field(default_factory=list)  # "dir/" prefixes of folders that could not be listed
    unchanged: int = 0
    passed_over: int = 0

    def vanished(self, known: Mapping[str, FileRecord]) -> dict[str, FileRecord]:
        """The rows of ``known`` whose paths the scan did not see, sparing those under folders it could not list."""
        spared = tuple(self.unreadable)
        return {path: rec for path, rec in known.items() if path not in self.seen and not path.startswith(spared)}


def scan_folder(
    root: Path,
    extensions: frozenset[str] | None,
    exclude: Sequence[str],
    known: Mapping[str, FileRecord],
    skip_reasons: Mapping[str, str],
) -> FolderScan:
    """Scan ``root`` and sort what it finds by whether ``known`` (an index's rows by stored path; ``skip_reasons``
    its skipped rows' reasons) already holds it as it is: a file by its (size, mtime_ns), a passed-over entry by
    those and its reason."""
    scan = FolderScan()

    def note_unreadable(path: str, error: OSError) -> None:
        scan.unreadable.append(path.rstrip("/") + "/")  # its files are not gone, just out of reach

    def note_passed(entry: PassedOver) -> None:
        scan.seen.add(entry.path)
        scan.passed_over += 1
        record = known.get(entry.path)
        if (
            record is not None
            and record.status == "skipped"
            and (record.size, record.mtime_ns) == (entry.size, entry.mtime_ns)
            and skip_reasons.get(entry.path) == entry.reason
        ):
            scan.unchanged += 1
        else:
            scan.passed.append(entry)

    for scanned in iter_images(root, extensions, exclude, on_error=note_unreadable, on_skip=note_passed):
        scan.seen.add(scanned.path)
        record = known.get(scanned.path)
        if record is not None and (record.size, record.mtime_ns) == (scanned.size, scanned.mtime_ns):
            scan.unchanged += 1  # skipped files too: retried only when they change
        else:
            scan.changed.append(scanned)
    return scan


def reuses_vector(decoded: Decoded, previous: FileRecord | None, reusable: Container[str]) -> bool:
    """Whether ``decoded`` needs no encoding because the index holds its content's vector: under its own path
    (``previous``, an ok row with the same content hash: a touch) or under a vanished path (its hash in
    ``reusable``: a rename or move)."""
    same_content = previous is not None and previous.status == "ok" and previous.content_hash == decoded.content_hash
    return same_content or decoded.content_hash in reusable


@dataclass
class _Changes:
    """What recording one run's results reads and updates, beside the catalog."""

    known: dict[str, FileRecord]  # the catalog's rows before the run, by stored path
    vanished: dict[str, FileRecord]  # rows of paths the scan did not see: deleted at the end
    reusable: dict[str, FileRecord]  # ok rows among ``vanished``, by content hash: a new path with one is a rename
    stats: BuildStats
    reasons: Counter[str] = field(default_factory=Counter)


def _update(
    catalog: Catalog,
    loaded: LoadedModel,
    options: BuildOptions,
    progress: Progress | None,
    plan: ThreadPlan,
) -> BuildStats:
    known = catalog.files()
    scan = scan_folder(options.root, options.extensions, options.exclude, known, dict(catalog.skipped()))
    vanished = scan.vanished(known)
    reusable = {rec.content_hash: rec for rec in vanished.values() if rec.status == "ok" and rec.content_hash}
    changes = _Changes(known, vanished, reusable, BuildStats(scanned=len(scan.seen), unchanged=scan.unchanged))
    logger.info(
        "%d files: %d unchanged, %d new or changed, %d gone; %d passed over (%d new or changed)",
        len(scan.seen),
        scan.unchanged,
        len(scan.changed),
        len(vanished),
        scan.passed_over,
        len(scan.passed),
    )

    def needs_encoding(decoded: Decoded) -> bool:
        return not reuses_vector(decoded, known.get(decoded.path), reusable)

    encoded = encode_files(
        options.root,
        scan.changed,
        loaded.decode_spec(options.draft, options.store_gps),
        loaded.encode,
        workers=plan.decode_workers,
        batch_size=options.batch_size,
        needs_encoding=needs_encoding,
        streams=plan.encode_streams,
        stream_threads=plan.stream_threads,
    )
    results: Iterator[Result] = itertools.chain(scan.passed, encoded)
    total, done = len(scan.passed) + len(scan.changed), 0
    while True:
        with catalog.transaction():
            for result in results:
                _record_file(catalog, result, changes)
                done += 1
                if progress is not None:
                    progress(done, total)
                if done % COMMIT_EVERY_N_FILES == 0:
                    break
            else:
                changes.stats.deleted = catalog.delete(rec.id for rec in vanished.values())
                break
    changes.stats.skipped_reasons = dict(changes.reasons)
    return changes.stats


def _record_file(catalog: Catalog, result: Result, changes: _Changes) -> None:
    """``_record``, where an error about this file's data records it as skipped: the per-file skip boundary."""
    try:
        _record(catalog, result, changes)
    except sqlite3.Error:
        raise  # the catalog failed, not this file: the run stops (committed work is kept)
    except Exception as exc:  # one file never stops a build
        path, size, mtime_ns, content_hash = _identity(result)
        logger.warning("skipping %s: recording it failed", paths.display(path), exc_info=True)
        _skip(catalog, changes, path, size, mtime_ns, content_hash, f"unrecordable: {type(exc).__name__}: {exc}")


def _identity(result: Result) -> tuple[str, int, int, str | None]:
    """(stored path, size, mtime_ns, content hash or None) of one result."""
    if isinstance(result, Encoded):
        decoded = result.decoded
        return decoded.path, decoded.size, decoded.mtime_ns, decoded.content_hash
    return result.path, result.size, result.mtime_ns, result.content_hash if isinstance(result, DecodeFailure) else None


def _skip(
    catalog: Catalog, changes: _Changes, path: str, size: int, mtime_ns: int, content_hash: str | None, reason: str
) -> None:
    """Record ``path`` as skipped with ``reason`` (made valid UTF-8: exception messages may hold surrogates)."""
    reason = reason.encode("utf-8", "backslashreplace").decode("utf-8")
    catalog.add_skipped(path, size, mtime_ns, content_hash, reason)
    changes.stats.skipped += 1
    changes.reasons[reason.split(":")[0]] += 1


def _record(catalog: Catalog, result: Result, changes: _Changes) -> None:
    """Write one file's outcome to the catalog and count it."""
    if isinstance(result, PassedOver):
        _skip(catalog, changes, result.path, result.size, result.mtime_ns, None, result.reason)
        return
    if isinstance(result, DecodeFailure):
        _skip(catalog, changes, result.path, result.size, result.mtime_ns, result.content_hash, result.reason)
        return
    stats = changes.stats
    decoded, previous = result.decoded, changes.known.get(result.decoded.path)
    if result.embedding is not None:
        catalog.add_image(
            decoded.path,
            decoded.size,
            decoded.mtime_ns,
            decoded.content_hash,
            decoded.width,
            decoded.height,
            result.embedding,
        )
        catalog.photos.record([(decoded.content_hash, decoded.metadata)])
        stats.encoded += 1
        if previous is None:
            stats.added += 1
        else:
            stats.modified += 1
    elif previous is not None and previous.content_hash == decoded.content_hash:
        catalog.touch(previous.id, decoded.size, decoded.mtime_ns)
        stats.touched += 1
    else:  # needs_encoding said this content belongs to a vanished file: a rename or move
        source = changes.reusable[decoded.content_hash]
        if previous is not None:  # the new path held other content before: that row is replaced
            catalog.delete([previous.id])
        catalog.move(source.id, decoded.path, decoded.size, decoded.mtime_ns)
        del changes.reusable[decoded.content_hash]  # once moved, and not before: a failed move leaves it be
        changes.vanished.pop(source.path, None)
        stats.renamed += 1
