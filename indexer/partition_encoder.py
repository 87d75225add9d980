"""Encoding the files of partitions: what every engine of ``clip-index encode`` runs where it encodes.

:class:`PartitionEncoder` holds a loaded model and runs the local indexer's pipeline over the files of one or more
partitions (:func:`indexer.pipeline.encode_files`: :func:`indexer.decode.decode_file` in decode worker processes,
crops normalized and encoded in batches, exactly as ``clip-index build`` does), and hands each partition's rows
back whole, as soon as its last file is done. The local engine (:class:`LocalEngine`) runs one in this process over
every pending partition; the Ray engine (:mod:`indexer.ray_engine`) one per actor, a partition per call. So every
engine decodes and encodes with the build's own code, and gives the build's numbers.

A file whose content the index already holds (:func:`indexer.build.reuses_vector`: its path's row with the same
sha256, or a vanished path's row) is read and hashed but not encoded: its row is marked ``reused``, and the process
that writes the shard takes the vector from the index.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from clip_model import InferencePrecision
from clip_model.process_tuning import ThreadPlan, own_threads, run_in_fresh_thread, set_own_thread_count

from .build import LoadedModel, load_model, resolve_placement, reuses_vector
from .decode import Decoded, DecodeFailure
from .pipeline import DEFAULT_BATCH_SIZE, DecodeWorkers, Encoded, encode_files
from .scan import ScannedFile
from .store import FileRecord, ModelInfo

Vectors = npt.NDArray[np.float32]


@dataclass(frozen=True)
class EncodeJob:
    """What every worker of a run needs, the same for all of them (picklable: each Ray actor gets a copy).

    ``root`` is the image folder as the workers see it; ``model`` a registry name or a checkpoint path they can
    read; ``reusable`` the content hashes whose vectors the index holds under paths gone from the folder;
    ``device`` and ``precision`` the settings each worker resolves where it runs (:mod:`clip_model.device`)."""

    root: Path
    model: str
    arch: str | None = None
    precision: InferencePrecision | None = None  # None: the device's own
    draft: bool = True
    batch_size: int = DEFAULT_BATCH_SIZE
    reusable: frozenset[str] = frozenset()
    gps: bool = False  # keep GPS positions in the photo metadata (the build's --store-gps)
    device: str = "cpu"


@dataclass(frozen=True)
class Work:
    """One partition's files to decode, and the index's row of each file's path (None: a path new to the index)."""

    partition: str
    files: tuple[ScannedFile, ...]
    known: tuple[FileRecord | None, ...]

    def __post_init__(self) -> None:
        if len(self.known) != len(self.files):
            raise ValueError(f"{len(self.known)} index rows for {len(self.files)} files of partition {self.partition}")


@dataclass(frozen=True, eq=False)  # eq=False: comparing numpy fields with == is ambiguous
class WorkRows:
    """The outcome of each file of a partition, in the partition's file order.

    A row is encoded (``embeddings[i]`` is its unit vector), reused (no error, ``reused[i]``: the index holds its
    vector) or skipped (``errors[i]`` says why). ``embeddings`` is float32 ``[N, D]``, zeros where not encoded.
    """

    partition: str
    paths: list[str]
    sha256: list[str | None]
    size: list[int]
    mtime_ns: list[int]
    width: list[int | None]
    height: list[int | None]
    errors: list[str | None]
    reused: list[bool]
    embeddings: Vectors
    photo: list[str | None]  # the photo metadata JSON of each decoded file (None: skipped)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def encoded(self) -> int:
        return sum(error is None and not reused for error, reused in zip(self.errors, self.reused, strict=True))


class PartitionEncoder:
    """A loaded model, the plan of the threads and processes that decode and encode with it, and the decode workers
    it keeps from one :meth:`encode` call to the next (ended by :meth:`close`, or with this process)."""

    def __init__(self, loaded: LoadedModel, job: EncodeJob, plan: ThreadPlan) -> None:
        self.loaded, self.job, self.plan = loaded, job, plan
        self._spec = loaded.decode_spec(job.draft, job.gps)
        self._workers = DecodeWorkers(plan.decode_workers) if plan.decode_workers else None

    @classmethod
    def load(cls, job: EncodeJob, plan: ThreadPlan) -> PartitionEncoder:
        """Load ``job.model`` on a thread that ends with the load, so that its OpenMP team does not stay beside the
        encoding ones (:mod:`clip_model.process_tuning.threads`)."""

        def load() -> LoadedModel:
            set_own_thread_count(plan.torch_threads)
            return load_model(job.model, job.arch, job.precision, job.device)

        return cls(run_in_fresh_thread(load, name="load-model"), job, plan)

    @property
    def info(self) -> ModelInfo:
        return self.loaded.info

    def encode(self, works: Sequence[Work]) -> Iterator[WorkRows]:
        """Decode and encode the files of ``works`` (paths unique across them) in one pipeline; yields each work's
        rows when its last file is done, so partitions come back roughly in the order given."""
        owner: dict[str, int] = {}
        done: list[dict[str, Encoded | DecodeFailure]] = []
        for number, work in enumerate(works):
            owner.update((scanned.path, number) for scanned in work.files)
            done.append({})
            if not work.files:
                yield self._rows(work, {})
        known = {scanned.path: record for work in works for scanned, record in zip(work.files, work.known, strict=True)}

        def needs_encoding(decoded: Decoded) -> bool:
            return not reuses_vector(decoded, known.get(decoded.path), self.job.reusable)

        with own_threads(self.plan.stream_threads):  # one stream encodes on this thread
            results = encode_files(
                self.job.root,
                [scanned for work in works for scanned in work.files],
                self._spec,
                self.loaded.encode,
                workers=self.plan.decode_workers,
                batch_size=self.job.batch_size,
                needs_encoding=needs_encoding,
                streams=self.plan.encode_streams,
                stream_threads=self.plan.stream_threads,
                kept=self._workers,
            )
            for result in results:
                path = result.decoded.path if isinstance(result, Encoded) else result.path
                number = owner[path]
                done[number][path] = result
                if len(done[number]) == len(works[number].files):
                    finished, done[number] = done[number], {}
                    yield self._rows(works[number], finished)

    def with_reusable(self, reusable: frozenset[str]) -> PartitionEncoder:
        """This encoder (its model and decode workers) for a job whose ``reusable`` hashes are ``reusable``."""
        encoder = copy.copy(self)
        encoder.job = dataclasses.replace(self.job, reusable=reusable)
        return encoder

    def close(self) -> None:
        """End the kept decode workers."""
        if self._workers is not None:
            self._workers.close()

    def _rows(self, work: Work, results: dict[str, Encoded | DecodeFailure]) -> WorkRows:
        count = len(work.files)
        rows = WorkRows(
            work.partition,
            [scanned.path for scanned in work.files],
            [None] * count,
            [0] * count,
            [0] * count,
            [None] * count,
            [None] * count,
            [None] * count,
            [False] * count,
            np.zeros((count, self.info.embed_dim), dtype=np.float32),
            [None] * count,
        )
        for i, scanned in enumerate(work.files):
            result = results[scanned.path]
            if isinstance(result, DecodeFailure):
                rows.sha256[i], rows.size[i], rows.mtime_ns[i] = result.content_hash, result.size, result.mtime_ns
                rows.errors[i] = result.reason.encode("utf-8", "backslashreplace").decode("utf-8")  # valid UTF-8
                continue
            decoded = result.decoded
            rows.sha256[i], rows.size[i], rows.mtime_ns[i] = decoded.content_hash, decoded.size, decoded.mtime_ns
            rows.width[i], rows.height[i] = decoded.width, decoded.height
            rows.photo[i] = decoded.metadata.to_json()
            if result.embedding is None:
                rows.reused[i] = True
            else:
                rows.embeddings[i] = result.embedding
        return rows


class LocalEngine:
    """The local engine: one :class:`PartitionEncoder` in this process (with its decode worker processes) encodes
    every pending partition, in one pipeline."""

    name = "local"

    def __init__(self, plan: ThreadPlan | None = None) -> None:
        self._plan = plan
        self._encoder: PartitionEncoder | None = None

    def start(self, job: EncodeJob) -> ModelInfo:
        """Load the model; returns its provenance. IndexerError for device settings this machine refuses."""
        plan = self._plan or ThreadPlan.for_indexing(resolve_placement(job.device, job.precision).precision)
        self._encoder = PartitionEncoder.load(job, plan)
        return self._encoder.info

    def run(self, works: Sequence[Work], reusable: frozenset[str]) -> Iterator[WorkRows]:
        """Each work's rows, when its last file is done (call :meth:`start` first)."""
        if self._encoder is None:
            raise RuntimeError("LocalEngine.run before start")
        yield from self._encoder.with_reusable(reusable).encode(works)

    @property
    def plan(self) -> ThreadPlan:
        if self._encoder is None:
            raise RuntimeError("LocalEngine.plan before start")
        return self._encoder.plan

    def describe(self) -> str:
        if self._encoder is None:
            return "local engine"
        return f"local engine on {self._encoder.loaded.placement}, {self.plan.describe()}"

    def close(self) -> None:
        if self._encoder is not None:
            self._encoder.close()
            self._encoder = None
