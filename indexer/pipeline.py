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
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
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
) -> Iterator[Encoded | DecodeFailure]:
    """Decode and encode ``files``; yields one ``Encoded`` or ``DecodeFailure`` per file.

    ``workers=0`` decodes in this process (no pool: simplest to debug). ``needs_encoding`` lets the caller skip the
    encoder for images it can reuse (e.g. a renamed file whose content hash is known).
    """
    batcher = _Batcher(spec, encoder, batch_size)
    for result in _decoded(root, files, spec, workers, max_in_flight=IN_FLIGHT_PER_BATCH * batch_size):
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
    root: Path, files: Iterable[ScannedFile], spec: DecodeSpec, workers: int, max_in_flight: int
) -> Iterator[Decoded | DecodeFailure]:
    if workers <= 0:
        for scanned in files:
            yield decode_file(root, scanned, spec)
        return
    context = multiprocessing.get_context("spawn")  # fork after torch started its thread pools can deadlock
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        in_flight: deque[Future[Decoded | DecodeFailure]] = deque()
        for scanned in files:
            in_flight.append(pool.submit(decode_file, root, scanned, spec))
            while len(in_flight) >= max_in_flight or (in_flight and in_flight[0].done()):
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()
