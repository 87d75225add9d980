"""The loaded CLIP behind one inference thread: bounded queue, micro-batched texts, an LRU cache of text embeddings.

Contracts:

* Every vector leaving this module is float32, C-contiguous and L2-normalized ([N, D] for N inputs).
* All model calls run on one dedicated thread, so concurrent requests never oversubscribe the cores torch uses.
  Requests (FastAPI runs sync endpoints in its threadpool) submit jobs and wait for them; at most
  ``queue_size`` jobs wait at once, beyond that :class:`ServiceBusyError` (503 + Retry-After) is raised at once.
* Text jobs that are waiting together are encoded in one call (up to ``text_batch_size`` texts), at the length of
  the batch's longest prompt instead of the full context: the causal mask makes each row's end-of-text feature
  independent of the padding after it, so the output is the same.
* Image jobs that are waiting together are likewise stacked into one call.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch

import clip_model
from indexer.store import ModelInfo

from .errors import ServiceBusyError
from .metrics import Metrics

logger = logging.getLogger(__name__)

Vectors = npt.NDArray[np.float32]
STOP = object()  # sentinel that ends the inference thread
IMAGE_BATCH_SIZE = 32  # most images stacked into one encoder call


@dataclass
class _Job:
    kind: str  # "text" | "image"
    inputs: torch.Tensor  # tokens [N, context] int64, or pixels [N, 3, R, R] float32
    future: Future[Vectors] = field(default_factory=Future)


@dataclass(frozen=True)
class TextEmbedding:
    """One text's unit vector [D] float32, and whether the text was cut to fit the model's context."""

    vector: Vectors
    truncated: bool


class Encoder:
    """A CLIP model ready to serve: ``encode_texts`` and ``encode_images`` are safe to call from many threads."""

    def __init__(
        self,
        model: clip_model.CLIP,
        preprocess: clip_model.Preprocess,
        info: ModelInfo,
        metrics: Metrics,
        *,
        queue_size: int = 64,
        text_batch_size: int = 64,
        text_cache_size: int = 4096,
    ) -> None:
        self.model = model.eval()
        self.preprocess = preprocess
        self.info = info
        self._metrics = metrics
        self._queue: queue.Queue[_Job | object] = queue.Queue(maxsize=queue_size)
        self._text_batch_size = text_batch_size
        self._cache: OrderedDict[str, TextEmbedding] = OrderedDict()
        self._cache_size = text_cache_size
        self._cache_lock = threading.Lock()
        self._held: _Job | None = None  # a job taken while draining a batch of the other kind
        self._thread = threading.Thread(target=self._run, name="clip-inference", daemon=True)
        self._thread.start()

    @property
    def image_size(self) -> int:
        return self.preprocess.image_size

    def close(self) -> None:
        """Stop the inference thread after the jobs already queued."""
        self._queue.put(STOP)
        self._thread.join(timeout=30)

    # --- texts -------------------------------------------------------------------------------------------------

    def encode_texts(self, texts: Sequence[str]) -> list[TextEmbedding]:
        """Unit embeddings of ``texts``, from the cache where possible; texts over the context are truncated."""
        found: dict[str, TextEmbedding] = {}
        with self._cache_lock:
            for text in texts:
                hit = self._cache.get(text)
                if hit is not None:
                    self._cache.move_to_end(text)
                    found[text] = hit
        missing = list(dict.fromkeys(t for t in texts if t not in found))
        self._metrics.text_cache.labels("hit").inc(len(texts) - len(missing))
        self._metrics.text_cache.labels("miss").inc(len(missing))
        if missing:
            tokens = clip_model.tokenize(missing, context_length=self.model.context_length, truncate=True)
            truncated = (tokens[:, -1] != 0).tolist()
            vectors = self._submit("text", tokens)
            fresh = {t: TextEmbedding(vectors[i], bool(truncated[i])) for i, t in enumerate(missing)}
            found.update(fresh)
            self._remember(fresh)
        return [found[text] for text in texts]

    def encode_text_matrix(self, texts: Sequence[str]) -> Vectors:
        """[N, D] float32 unit rows for ``texts`` (see :meth:`encode_texts`)."""
        return np.stack([e.vector for e in self.encode_texts(texts)]).astype(np.float32, copy=False)

    def _remember(self, fresh: dict[str, TextEmbedding]) -> None:
        if self._cache_size == 0:
            return
        with self._cache_lock:
            self._cache.update(fresh)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    # --- images ------------------------------------------------------------------------------------------------

    def encode_images(self, pixels: torch.Tensor) -> Vectors:
        """[N, 3, R, R] float32 preprocessed images -> [N, D] unit rows."""
        return self._submit("image", pixels)

    # --- the inference thread ----------------------------------------------------------------------------------

    def _submit(self, kind: str, inputs: torch.Tensor) -> Vectors:
        job = _Job(kind, inputs)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self._metrics.rejected.labels("queue_full").inc()
            raise ServiceBusyError(
                f"the server is busy ({self._queue.maxsize} encoder jobs waiting); retry in a moment"
            ) from None
        return job.future.result()

    def _run(self) -> None:
        while True:
            job = self._held if self._held is not None else self._queue.get()
            self._held = None
            if job is STOP:
                return
            assert isinstance(job, _Job)  # noqa: S101  # only _Job and STOP are ever queued
            batch = self._drain(job)
            try:
                self._encode_batch(job.kind, batch)
            except BaseException as exc:  # noqa: BLE001  # handed to the waiting requests, which re-raise it
                for item in batch:
                    item.future.set_exception(exc)

    def _drain(self, first: _Job) -> list[_Job]:
        """``first`` plus the jobs of the same kind waiting right now (texts: up to ``text_batch_size`` rows)."""
        batch, rows = [first], len(first.inputs)
        limit = self._text_batch_size if first.kind == "text" else IMAGE_BATCH_SIZE
        while rows < limit:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if not isinstance(job, _Job) or job.kind != first.kind:
                self._held = job if isinstance(job, _Job) else None
                if job is STOP:
                    self._queue.put(STOP)
                break
            batch.append(job)
            rows += len(job.inputs)
        return batch

    def _encode_batch(self, kind: str, batch: list[_Job]) -> None:
        inputs = torch.cat([job.inputs for job in batch])
        started = time.perf_counter()
        with torch.inference_mode():
            if kind == "text":
                length = int(inputs.argmax(dim=-1).max()) + 1  # the longest prompt's end-of-text position + 1
                features = self.model.encode_text(inputs[:, :length], normalize=True)
            else:
                features = self.model.encode_image(inputs, normalize=True)
        vectors = np.ascontiguousarray(features.float().numpy())
        self._metrics.encode_seconds.labels(kind).observe(time.perf_counter() - started)
        self._metrics.encode_batch_size.labels(kind).observe(len(inputs))
        start = 0
        for job in batch:
            job.future.set_result(vectors[start : start + len(job.inputs)])
            start += len(job.inputs)
