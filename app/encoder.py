"""The loaded CLIP behind one inference thread: bounded queue, micro-batched texts, an LRU cache of text embeddings.

Contracts:

* Every vector leaving this module is float32, C-contiguous and L2-normalized ([N, D] for N inputs).
* All model calls run on one dedicated thread, so concurrent requests never oversubscribe the cores torch uses.
  Requests (FastAPI runs sync endpoints in its threadpool) submit jobs and wait for them; at most
  ``queue_size`` jobs wait at once, beyond that :class:`ServiceBusyError` (503 + Retry-After) is raised at once.
* Texts become token rows through the model's :class:`clip_model.TextInput` (its own tokenizer, whichever the
  family): a text longer than the context is truncated or, with ``long_text="chunk"``, split into windows whose unit
  embeddings are averaged and renormalized (:mod:`clip_model.text_input`); a text that fits embeds the same either
  way. Each :class:`TextEmbedding` says whether its text was cut and how many rows it took. Cached embeddings are
  keyed by (mode, text).
* Text jobs that are waiting together are encoded in one call (up to ``text_batch_size`` rows), cut by
  :func:`clip_model.trim_for` to the columns the family reads (CLIP: the batch's longest prompt, since the causal
  mask makes each row's end-of-text feature independent of the padding after it; SigLIP: never cut); each job's
  rows are pooled into its texts' vectors before any search.
* Image jobs that are waiting together are likewise stacked into one call.
* A job may carry a search (:class:`SearchRequest`: an index and k): after the batch is encoded, the queries of
  all its jobs that search the same index go to FAISS in one call with the largest k, and each job gets its own
  rows cut to its own k. A flat scan is memory-bound, so Q queries cost about what one does; an HNSW or IVF search
  runs its queries in parallel. Jobs that only search (cached texts, stored or uploaded embeddings) join any batch.
* Encoding and searching share the one thread, so torch and FAISS never compete for the cores. That thread sets
  its own torch and FAISS thread counts (from the plan) when it starts: OpenMP thread counts belong to the thread
  that sets them, and the thread's OpenMP team stays fast only if no other long-lived thread runs parallel torch
  work (see :mod:`clip_model.process_tuning.threads`: the runtime loads models on short-lived threads and makes one
  torch thread the default everywhere else).
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
from typing import Protocol

import numpy as np
import numpy.typing as npt
import torch

import clip_model
from clip_model import LongText
from clip_model.process_tuning import ThreadPlan, set_own_thread_count
from indexer.store.reader import Hit, ModelInfo, SearchFilter

from .compiled import CompiledText
from .errors import ServiceBusyError
from .metrics import Metrics

logger = logging.getLogger(__name__)

Vectors = npt.NDArray[np.float32]
STOP = object()  # sentinel that ends the inference thread
IMAGE_BATCH_SIZE = 32  # most images stacked into one encoder call


class SearchableIndex(Protocol):
    """What a search job needs of an index (``indexer.store.reader.PublishedIndex`` is one)."""

    def search(self, queries: Vectors, k: int, where: SearchFilter | None = None) -> list[list[Hit]]: ...


@dataclass(frozen=True)
class SearchRequest:
    """Search ``index`` for the ``k`` nearest images of each of a job's vectors once they are encoded, among the
    images ``where`` matches (None: all)."""

    index: SearchableIndex
    k: int
    where: SearchFilter | None = None


@dataclass
class _Result:
    vectors: Vectors  # [N, D] float32 unit rows
    hits: list[list[Hit]] | None  # N lists of at most k hits, when the job asked for a search


@dataclass
class _Job:
    kind: str  # "text" | "image" | "vectors" (already embedded: only searched)
    inputs: torch.Tensor | Vectors  # token rows [R, context] int64, pixels [N, 3, R, R] float32, or vectors [N, D]
    search: SearchRequest | None = None
    future: Future[_Result] = field(default_factory=Future)
    rows: clip_model.TextRows | None = None  # a text job's rows: how they pool into its N texts' vectors


@dataclass(frozen=True)
class TextEmbedding:
    """One text's unit vector [D] float32, whether the text was cut to fit the model's context, and how many rows
    (context windows) it was encoded as: 1, or more when it was chunked."""

    vector: Vectors
    truncated: bool
    chunks: int = 1


def _pooled(job: _Job, features: torch.Tensor) -> torch.Tensor:
    """A job's rows of features -> one unit row per input (a text job's chunks averaged, :meth:`TextRows.pool`)."""
    return features if job.rows is None else job.rows.pool(features)


class Encoder:
    """A CLIP model ready to serve: ``encode_texts`` and ``encode_images`` are safe to call from many threads."""

    def __init__(
        self,
        model: clip_model.ImageTextModel,
        preprocess: clip_model.Preprocess,
        info: ModelInfo,
        metrics: Metrics,
        *,
        plan: ThreadPlan,
        queue_size: int = 64,
        text_batch_size: int = 64,
        text_cache_size: int = 4096,
        compile_text: bool = False,
    ) -> None:
        """``plan``: the inference thread runs torch and FAISS on ``plan.torch_threads`` threads.
        ``compile_text``: compile the text tower in the background and use it once ready (:mod:`app.compiled`)."""
        self.model = model.eval()
        self.preprocess = preprocess
        self.info = info
        self._metrics = metrics
        self._queue: queue.Queue[_Job | object] = queue.Queue(maxsize=queue_size)
        self._text_batch_size = text_batch_size
        self._cache: OrderedDict[tuple[LongText, str], TextEmbedding] = OrderedDict()
        self._cache_size = text_cache_size
        self._cache_lock = threading.Lock()
        self._held: _Job | None = None  # a job taken while draining a batch of the other kind
        self._plan = plan
        self.text_input = clip_model.TextInput.of(model)  # raises for a model without its tokenizer's vocabulary
        self.text_tower = CompiledText(model, plan.torch_threads, self.text_input)
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="clip-inference", daemon=True)
        self._thread.start()
        self._started.wait()  # its thread counts are set before the first job (and before any compile starts)
        if compile_text:
            self.text_tower.start()

    @property
    def image_size(self) -> int:
        return self.preprocess.image_size

    def close(self) -> None:
        """Stop the inference thread after the jobs already queued."""
        self._queue.put(STOP)
        self._thread.join(timeout=30)

    # --- texts -------------------------------------------------------------------------------------------------

    def encode_texts(self, texts: Sequence[str], long_text: LongText = "truncate") -> list[TextEmbedding]:
        """Unit embeddings of ``texts``, from the cache where possible; texts over the context are truncated or
        chunked as ``long_text`` says."""
        found = self._cached(texts, long_text)
        missing = list(dict.fromkeys(t for t in texts if t not in found))
        if missing:
            rows = self.text_input.rows(missing, long_text)
            vectors = self._submit(_Job("text", rows.tokens, rows=rows)).vectors
            found.update(self._remember(missing, vectors, rows, long_text))
        return [found[text] for text in texts]

    def search_text(
        self, text: str, search: SearchRequest, long_text: LongText = "truncate"
    ) -> tuple[TextEmbedding, list[Hit]]:
        """``text``'s embedding (as :meth:`encode_texts`) and the index's nearest images, encoded and searched in
        the same micro-batch as the other queries waiting now."""
        cached = self._cached([text], long_text).get(text)
        if cached is not None:
            return cached, self.search_vectors(cached.vector[None], search)[0]
        rows = self.text_input.rows([text], long_text)
        result = self._submit(_Job("text", rows.tokens, search, rows=rows))
        assert result.hits is not None  # a job with a search always gets hits
        return self._remember([text], result.vectors, rows, long_text)[text], result.hits[0]

    def search_vectors(self, vectors: Vectors, search: SearchRequest) -> list[list[Hit]]:
        """The index's nearest images of ``vectors`` [N, D] float32 unit rows, batched with the waiting queries."""
        result = self._submit(_Job("vectors", np.ascontiguousarray(vectors, dtype=np.float32), search))
        assert result.hits is not None  # a job with a search always gets hits
        return result.hits

    def _cached(self, texts: Sequence[str], long_text: LongText) -> dict[str, TextEmbedding]:
        found: dict[str, TextEmbedding] = {}
        with self._cache_lock:
            for text in texts:
                hit = self._cache.get((long_text, text))
                if hit is not None:
                    self._cache.move_to_end((long_text, text))
                    found[text] = hit
        self._metrics.text_cache.labels("hit").inc(len(found))
        self._metrics.text_cache.labels("miss").inc(len(set(texts)) - len(found))
        return found

    def encode_text_matrix(self, texts: Sequence[str], long_text: LongText = "truncate") -> Vectors:
        """[N, D] float32 unit rows for ``texts`` (see :meth:`encode_texts`)."""
        return np.stack([e.vector for e in self.encode_texts(texts, long_text)]).astype(np.float32, copy=False)

    def _remember(
        self, texts: Sequence[str], vectors: Vectors, rows: clip_model.TextRows, long_text: LongText
    ) -> dict[str, TextEmbedding]:
        fresh = {t: TextEmbedding(vectors[i], rows.truncated[i], rows.chunks[i]) for i, t in enumerate(texts)}
        if self._cache_size == 0:
            return fresh
        with self._cache_lock:
            self._cache.update({(long_text, text): embedding for text, embedding in fresh.items()})
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return fresh

    # --- images ------------------------------------------------------------------------------------------------

    def encode_images(self, pixels: torch.Tensor) -> Vectors:
        """[N, 3, R, R] float32 preprocessed images -> [N, D] unit rows."""
        return self._submit(_Job("image", pixels)).vectors

    # --- the inference thread ----------------------------------------------------------------------------------

    def _submit(self, job: _Job) -> _Result:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self._metrics.rejected.labels("queue_full").inc()
            raise ServiceBusyError(
                f"the server is busy ({self._queue.maxsize} encoder jobs waiting); retry in a moment"
            ) from None
        return job.future.result()

    def _run(self) -> None:
        set_own_thread_count(self._plan.torch_threads)  # torch and FAISS, this thread only: the defaults stay
        self._started.set()
        while True:
            job = self._held if self._held is not None else self._queue.get()
            self._held = None
            if job is STOP:
                return
            assert isinstance(job, _Job)  # only _Job and STOP are ever queued
            batch = self._drain(job)
            try:
                vectors = self._encode_batch(batch)
            except BaseException as exc:  # handed to the waiting requests, which re-raise it
                for item in batch:
                    item.future.set_exception(exc)
                continue
            self._search_batch(batch, vectors)

    def _drain(self, first: _Job) -> list[_Job]:
        """``first`` plus the jobs waiting right now that can share its encoder call: the same kind (texts: up to
        ``text_batch_size`` rows, images: ``IMAGE_BATCH_SIZE``), and search-only jobs with any kind."""
        batch, kind = [first], first.kind
        rows = {first.kind: len(first.inputs)}
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if not isinstance(job, _Job) or (job.kind not in ("vectors", kind) and kind != "vectors"):
                self._held = job if isinstance(job, _Job) else None
                if job is STOP:
                    self._queue.put(STOP)
                break
            batch.append(job)
            kind = job.kind if kind == "vectors" else kind
            rows[job.kind] = rows.get(job.kind, 0) + len(job.inputs)
            if rows.get("text", 0) >= self._text_batch_size or rows.get("image", 0) >= IMAGE_BATCH_SIZE:
                break
        return batch

    def _encode_batch(self, batch: list[_Job]) -> list[Vectors]:
        """Each job's [N, D] float32 unit rows: the batch's text rows or images encoded in one call, then each text
        job's rows pooled into its texts' vectors."""
        encoded = [job for job in batch if job.kind != "vectors"]
        if encoded:
            kind = encoded[0].kind
            inputs = torch.cat([torch.as_tensor(job.inputs) for job in encoded])
            started = time.perf_counter()
            with torch.inference_mode():
                if kind == "text":
                    features = self.text_tower.encode(clip_model.trim_for(self.model, inputs))
                else:
                    features = self.model.encode_image(inputs, normalize=True)
                per_job = torch.split(features.float(), [len(job.inputs) for job in encoded])
                pooled = iter([_pooled(job, rows) for job, rows in zip(encoded, per_job, strict=True)])
            self._metrics.encode_seconds.labels(kind).observe(time.perf_counter() - started)
            self._metrics.encode_batch_size.labels(kind).observe(len(inputs))
        out = []
        for job in batch:
            if job.kind == "vectors":
                out.append(np.asarray(job.inputs, dtype=np.float32))
            else:
                out.append(np.ascontiguousarray(next(pooled).numpy()))
        return out

    def _search_batch(self, batch: list[_Job], vectors: list[Vectors]) -> None:
        """Finish every job: one search per index and filter for the jobs that share them, then each job's result."""
        hits: list[list[list[Hit]] | None] = [None] * len(batch)
        groups: dict[tuple[int, SearchFilter | None], list[tuple[int, SearchRequest]]] = {}  # -> (job, its search)
        for i, job in enumerate(batch):
            if job.search is not None:
                groups.setdefault((id(job.search.index), job.search.where), []).append((i, job.search))
        for members in groups.values():
            index, k = members[0][1].index, max(search.k for _, search in members)
            queries = np.concatenate([vectors[i] for i, _ in members])
            started = time.perf_counter()
            try:
                found = index.search(queries, k, members[0][1].where)
            except BaseException as exc:  # handed to the waiting requests, which re-raise it
                for i, _ in members:
                    batch[i].future.set_exception(exc)
                continue
            self._metrics.search_seconds.labels("images").observe(time.perf_counter() - started)
            self._metrics.search_batch_size.observe(len(queries))
            start = 0
            for i, search in members:
                rows = len(vectors[i])
                hits[i] = [row[: search.k] for row in found[start : start + rows]]
                start += rows
        for job, job_vectors, job_hits in zip(batch, vectors, hits, strict=True):
            if not job.future.done():
                job.future.set_result(_Result(job_vectors, job_hits))
