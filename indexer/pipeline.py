"""The encoding pipeline: decode + preprocess in worker processes, batched inference in this process.

Files go out to a pool of spawned workers (``indexer.decode.decode_file``) that end with this process, however it
ends (``indexer.lifetime``); at most ``max_in_flight`` are outstanding at any time, so memory stays bounded whatever
the folder size; a caller that encodes many small sets of files keeps them between calls (:class:`DecodeWorkers`).
Decoded images come back as uint8 crops, are normalized and stacked into batches here, and encoded
by ``encoder`` while the workers keep decoding the next ones. Results are yielded in completion order, one per
input file.

``streams`` > 1 encodes that many batches at once, each on a thread of its own with ``stream_threads`` torch
threads, instead of one batch at a time on the calling thread with all of its threads. Independent single-threaded
streams scale where one batch over several threads does not: every parallel op ends in a barrier, and an op over a
chunk of a small model is too short to pay for it (the "indexer" bench member times one batch over every thread
against the default streams; see bench/README.md, "indexer").
A stream holds its batch's activations, so memory grows with the count.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool, ProcessPoolExecutor
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from clip_model.preprocess import normalize_pixels
from clip_model.process_tuning import set_own_thread_count

from . import paths
from .decode import Decoded, DecodeFailure, DecodeSpec, decode_file
from .lifetime import worker_pool
from .scan import ScannedFile

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 32  # images per encoder call
IN_FLIGHT_PER_BATCH = 3  # outstanding decode tasks, in batches: enough to keep workers busy during an encode

Encoder = Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]]  # [B, 3, R, R] -> [B, D] unit vectors
NeedsEncoding = Callable[[Decoded], bool]
Decode = Callable[[Path, ScannedFile, DecodeSpec], "Decoded | DecodeFailure"]  # picklable: runs in workers


@dataclass(frozen=True)
class Encoded:
    """A decoded image and its embedding: float32 [D], unit norm; None when ``needs_encoding`` said no."""

    decoded: Decoded
    embedding: npt.NDArray[np.float32] | None


def encode_files(
    root: Path,
    files: Iterable[ScannedFile],
    spec: DecodeSpec,
    encoder: Encoder,
    *,
    workers: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    needs_encoding: NeedsEncoding | None = None,
    decode: Decode = decode_file,
    streams: int = 1,
    stream_threads: int = 1,
    kept: DecodeWorkers | None = None,
) -> Iterator[Encoded | DecodeFailure]:
    """Decode and encode ``files``; yields one ``Encoded`` or ``DecodeFailure`` per file.

    ``workers=0`` decodes in this process (no pool: simplest to debug). ``needs_encoding`` lets the caller skip the
    encoder for images it can reuse (e.g. a renamed file whose content hash is known). A file that crashes its
    decoder process is skipped with a reason; the others are decoded again in new processes. ``streams`` batches
    are encoded at once, on threads of ``stream_threads`` torch threads each; with 1 the encoder runs here, on
    the calling thread's count (see the module docstring). ``kept`` decodes on its processes instead of starting
    ``workers`` for this call. An error of the encoder is raised here.
    """
    if streams < 1 or stream_threads < 1:
        raise ValueError(f"streams and stream_threads must be at least 1, got {streams} and {stream_threads}")
    max_in_flight = (IN_FLIGHT_PER_BATCH + streams - 1) * batch_size
    with _Batcher(spec, encoder, batch_size, streams, stream_threads) as batcher:
        for result in _decoded(root, files, spec, workers, max_in_flight, decode, kept):
            if isinstance(result, DecodeFailure):
                yield result
            elif needs_encoding is not None and not needs_encoding(result):
                yield Encoded(result, None)
            else:
                yield from batcher.add(result)
        yield from batcher.flush()


class _Batcher:
    """Collects decoded crops and encodes them ``batch_size`` at a time, up to ``streams`` batches at once.

    ``add`` and ``flush`` return the batches that are done, oldest first; ``add`` waits for the oldest one only
    when ``streams`` are busy. Used as a context manager: leaving it stops the stream threads (a batch being
    encoded is finished first, queued ones are dropped)."""

    def __init__(self, spec: DecodeSpec, encoder: Encoder, batch_size: int, streams: int, stream_threads: int) -> None:
        self._spec, self._encoder, self._batch_size, self._streams = spec, encoder, batch_size, streams
        self._pending: list[Decoded] = []
        self._busy: deque[tuple[list[Decoded], Future[npt.NDArray[np.float32]]]] = deque()
        self._pool = (
            ThreadPoolExecutor(streams, "encode", initializer=set_own_thread_count, initargs=(stream_threads,))
            if streams > 1
            else None
        )

    def __enter__(self) -> _Batcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)  # the threads (and their OpenMP teams) end here

    def add(self, decoded: Decoded) -> list[Encoded]:
        self._pending.append(decoded)
        if len(self._pending) < self._batch_size:
            return []
        self._submit()
        return self._collect(keep_busy=self._streams - 1)

    def flush(self) -> list[Encoded]:
        self._submit()
        return self._collect(keep_busy=0)

    def _submit(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        pixels = normalize_pixels(np.stack([d.pixels for d in batch]), self._spec.mean, self._spec.std)  # [B,3,R,R]
        future: Future[npt.NDArray[np.float32]] = Future()
        if self._pool is None:
            future.set_result(self._encoder(pixels))  # here, on the calling thread
        else:
            future = self._pool.submit(self._encoder, pixels)
        self._busy.append((batch, future))

    def _collect(self, keep_busy: int) -> list[Encoded]:
        """The finished batches at the head of the queue, waiting until at most ``keep_busy`` are left."""
        done: list[Encoded] = []
        while self._busy and (len(self._busy) > keep_busy or self._busy[0][1].done()):
            batch, future = self._busy.popleft()
            vectors = future.result()  # [B, D]
            done.extend(Encoded(d, vectors[i]) for i, d in enumerate(batch))
        return done


class DecodeWorkers:
    """Decode worker processes kept from one :func:`encode_files` call to the next, for a caller that encodes many
    small sets of files (a Ray actor, a partition per call) and should start its workers once: started on first
    use (:func:`indexer.lifetime.worker_pool`: they end with this process), replaced after one of them dies, ended
    by :meth:`close`."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"kept decode workers must be at least 1, got {workers}")
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None
        self._stack = ExitStack()

    def pool(self) -> ProcessPoolExecutor:
        """The running pool, started if there is none."""
        if self._pool is None:
            self._pool = self._stack.enter_context(worker_pool(self.workers))
        return self._pool

    def close(self) -> None:
        """End the workers (a later :meth:`pool` starts new ones)."""
        self._pool = None
        self._stack.close()


def _decoded(
    root: Path,
    files: Iterable[ScannedFile],
    spec: DecodeSpec,
    workers: int,
    max_in_flight: int,
    decode: Decode,
    kept: DecodeWorkers | None = None,
) -> Iterator[Decoded | DecodeFailure]:
    if workers <= 0 and kept is None:
        for scanned in files:
            yield decode(root, scanned, spec)
        return
    pending = iter(files)
    while True:
        failed = yield from _decode_in_pool(root, pending, spec, workers, max_in_flight, decode, kept)
        if not failed:
            return
        # A worker died (a decoder crash: segfault, out of memory). Its pool is gone and with it every task in
        # flight; decode those files one per process so the one that kills its decoder is found and skipped.
        logger.warning("a decode worker died; retrying %d files one by one to find the culprit", len(failed))
        for scanned in failed:
            yield _decode_isolated(root, scanned, spec, decode)


def _decode_in_pool(
    root: Path,
    files: Iterator[ScannedFile],
    spec: DecodeSpec,
    workers: int,
    max_in_flight: int,
    decode: Decode,
    kept: DecodeWorkers | None,
) -> Generator[Decoded | DecodeFailure, None, list[ScannedFile]]:
    """Decode ``files`` in a pool (``kept``'s, else one of ``workers`` for this call) until they run out (returns
    []) or a worker dies (returns the files in flight; a kept pool is closed, to be replaced on its next use)."""
    # spawned (a fork after torch started its threads can deadlock)
    with worker_pool(workers) if kept is None else nullcontext(kept.pool()) as pool:
        in_flight: deque[tuple[ScannedFile, Future[Decoded | DecodeFailure] | None]] = deque()
        exhausted = False
        while in_flight or not exhausted:
            while not exhausted and len(in_flight) < max_in_flight:
                scanned = next(files, None)
                if scanned is None:
                    exhausted = True
                    break
                try:
                    in_flight.append((scanned, pool.submit(decode, root, scanned, spec)))
                except BrokenProcessPool:  # a kept pool whose worker died since the last call
                    in_flight.append((scanned, None))
                    break
            if not in_flight:
                break
            future = in_flight[0][1]
            try:
                if future is None:
                    raise BrokenProcessPool("a decode worker died")
                result = future.result()
            except BrokenProcessPool:
                if kept is not None:
                    kept.close()
                return [scanned for scanned, _ in in_flight]
            in_flight.popleft()
            yield result
    return []


def _decode_isolated(root: Path, scanned: ScannedFile, spec: DecodeSpec, decode: Decode) -> Decoded | DecodeFailure:
    """Decode one file in a process of its own; a crash there is this file's fault."""
    with worker_pool(1) as pool:
        try:
            return pool.submit(decode, root, scanned, spec).result()
        except BrokenProcessPool:
            logger.warning("skipping %s: it crashed the image decoder", paths.display(scanned.path))
            return DecodeFailure(scanned.path, scanned.size, scanned.mtime_ns, None, "corrupt: crashed the decoder")
