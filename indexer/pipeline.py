"""The encoding pipeline: decode + preprocess in worker processes, batched inference in this process.

Files go out to a pool of spawned workers (``indexer.decode.decode_file``); at most ``max_in_flight`` are
outstanding at any time, so memory stays bounded whatever the folder size. Decoded images come back as uint8
crops, are normalized and stacked into batches here, and encoded by ``encoder`` while the workers keep decoding
the next ones. Results are yielded in completion order, one per input file.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from .decode import Decoded, DecodeFailure, DecodeSpec, decode_file, normalize_batch
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
) -> Iterator[Encoded | DecodeFailure]:
    """Decode and encode ``files``; yields one ``Encoded`` or ``DecodeFailure`` per file.

    ``workers=0`` decodes in this process (no pool: simplest to debug). ``needs_encoding`` lets the caller skip the
    encoder for images it can reuse (e.g. a renamed file whose content hash is known). A file that crashes its
    decoder process is skipped with a reason; the others are decoded again in new processes.
    """
    batcher = _Batcher(spec, encoder, batch_size)
    for result in _decoded(root, files, spec, workers, IN_FLIGHT_PER_BATCH * batch_size, decode):
        if isinstance(result, DecodeFailure):
            yield result
        elif needs_encoding is not None and not needs_encoding(result):
            yield Encoded(result, None)
        else:
            yield from batcher.add(result)
    yield from batcher.flush()


class _Batcher:
    """Collects decoded crops and encodes them ``batch_size`` at a time."""

    def __init__(self, spec: DecodeSpec, encoder: Encoder, batch_size: int) -> None:
        self._spec, self._encoder, self._batch_size = spec, encoder, batch_size
        self._pending: list[Decoded] = []

    def add(self, decoded: Decoded) -> list[Encoded]:
        self._pending.append(decoded)
        return self.flush() if len(self._pending) >= self._batch_size else []

    def flush(self) -> list[Encoded]:
        if not self._pending:
            return []
        batch, self._pending = self._pending, []
        pixels = np.stack([d.pixels for d in batch])  # [B, R, R, 3] uint8
        vectors = self._encoder(normalize_batch(pixels, self._spec.mean, self._spec.std))  # [B, D]
        return [Encoded(d, vectors[i]) for i, d in enumerate(batch)]


def _decoded(
    root: Path, files: Iterable[ScannedFile], spec: DecodeSpec, workers: int, max_in_flight: int, decode: Decode
) -> Iterator[Decoded | DecodeFailure]:
    if workers <= 0:
        for scanned in files:
            yield decode(root, scanned, spec)
        return
    pending = iter(files)
    while True:
        failed = yield from _decode_in_pool(root, pending, spec, workers, max_in_flight, decode)
        if not failed:
            return
        # A worker died (a decoder crash: segfault, out of memory). Its pool is gone and with it every task in
        # flight; decode those files one per process so the one that kills its decoder is found and skipped.
        logger.warning("a decode worker died; retrying %d files one by one to find the culprit", len(failed))
        for scanned in failed:
            yield _decode_isolated(root, scanned, spec, decode)


def _decode_in_pool(
    root: Path, files: Iterator[ScannedFile], spec: DecodeSpec, workers: int, max_in_flight: int, decode: Decode
) -> Generator[Decoded | DecodeFailure, None, list[ScannedFile]]:
    """Decode ``files`` in a pool until they run out (returns []) or a worker dies (returns the files in flight)."""
    context = multiprocessing.get_context("spawn")  # fork after torch started its thread pools can deadlock
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        in_flight: deque[tuple[ScannedFile, Future[Decoded | DecodeFailure]]] = deque()
        exhausted = False
        while in_flight or not exhausted:
            while not exhausted and len(in_flight) < max_in_flight:
                scanned = next(files, None)
                if scanned is None:
                    exhausted = True
                    break
                in_flight.append((scanned, pool.submit(decode, root, scanned, spec)))
            if not in_flight:
                break
            try:
                result = in_flight[0][1].result()
            except BrokenProcessPool:
                return [scanned for scanned, _ in in_flight]
            in_flight.popleft()
            yield result
    return []


def _decode_isolated(root: Path, scanned: ScannedFile, spec: DecodeSpec, decode: Decode) -> Decoded | DecodeFailure:
    """Decode one file in a process of its own; a crash there is this file's fault."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        try:
            return pool.submit(decode, root, scanned, spec).result()
        except BrokenProcessPool:
            logger.warning("skipping %s: it crashed the image decoder", scanned.path)
            return DecodeFailure(scanned.path, scanned.size, scanned.mtime_ns, None, "corrupt: crashed the decoder")
