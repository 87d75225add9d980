"""What the server serves: the loaded model and the published index generation, swapped as one reference.

Contracts:

* ``Runtime.state`` is an immutable :class:`Served` (encoder + index + image root) or None. A request reads it once
  and uses that object throughout, so a swap never mixes two generations in one answer, and never blocks or fails
  a request in flight (the old generation is closed only after ``RETIRE_AFTER_S``).
* A watcher thread checks ``CURRENT`` every ``reload_interval_s``. A new generation is opened with its checksums
  verified and checked against the model: with ``CLIPSEARCH_MODEL`` unset the server follows the index (loading
  the model it was built with, also when a ``--rebuild`` switched models); with a model pinned, a generation of other
  weights is refused.
* A generation that cannot be served never replaces the one being served: the reason is kept (``problem``), shown
  by /readyz and /api/stats, and that generation is not retried until CURRENT names another one.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import clip_model
from clip_model.errors import ClipModelError
from clip_model.process_tuning import (
    ThreadPlan,
    default_thread_count,
    run_in_fresh_thread,
    set_own_thread_count,
    set_thread_count,
    single_threaded_elsewhere,
)
from indexer.errors import IndexerError
from indexer.store.reader import ModelInfo, PublishedIndex, current_generation, describe_backend

from .encoder import Encoder
from .errors import NotReadyError
from .metrics import Metrics
from .relevance import GenerationRelevance, RelevanceScale, SigmoidRelevance, sample_rows, unrelated_prompts
from .settings import Settings

logger = logging.getLogger(__name__)

RETIRE_AFTER_S = 30.0  # a replaced generation stays open this long for the requests still using it


@dataclass(frozen=True)
class Served:
    """One consistent view: the encoder, the index generation it can search, where the image files are, and the
    generation's relevance scale for text queries (:mod:`app.relevance`: the model's own probability for a
    sigmoid-trained model, else one calibrated on the generation, None while it holds no image)."""

    encoder: Encoder
    index: PublishedIndex
    image_root: Path | None
    relevance: GenerationRelevance | None = None

    @property
    def generation(self) -> str:
        return self.index.manifest.generation


class Runtime:
    """Loads, watches and swaps what is served. ``start`` once, ``close`` at shutdown.

    ``plan``: each encoder's inference thread runs torch and FAISS on ``plan.torch_threads`` threads; every other
    thread runs torch on one (see :mod:`clip_model.process_tuning.threads`: a second OpenMP
    team would slow the first)."""

    def __init__(self, settings: Settings, metrics: Metrics, plan: ThreadPlan) -> None:
        self.settings = settings
        self.plan = plan
        self.placement = settings.placement()  # where every encoder it loads runs (clip_model.device)
        self.metrics = metrics
        self.state: Served | None = None
        self.problem: str | None = None
        self._pinned: Encoder | None = None  # the encoder of CLIPSEARCH_MODEL, loaded at start
        self._failed_generation: str | None = None
        self._refresh_lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._timers: list[threading.Timer] = []
        self._default_threads = 0  # torch's default before start, restored by close (0: not started)

    # --- lifecycle -----------------------------------------------------------------------------------------------

    def start(self, watch: bool = True) -> None:
        """Load a pinned model (its failure is fatal: ClipModelError), load the published index if there is one,
        and start watching for new generations. A start that raises has closed what it had started (torch's
        default thread count is back)."""
        self._default_threads = default_thread_count()  # not this thread's own count, which may differ
        logger.info("threads: %s; search by %s", self.plan.describe(), describe_backend())
        single_threaded_elsewhere()  # loaders and inference threads set their own counts, for themselves only
        try:
            if self.settings.model is not None:
                self._pinned = self._load_encoder(self.settings.model)
            self.refresh()
            if watch:
                self._watcher = threading.Thread(target=self._watch, name="index-watcher", daemon=True)
                self._watcher.start()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._stop.set()
        if self._default_threads:
            set_thread_count(self._default_threads)  # the process default again, as it was before start
        if self._watcher is not None:
            self._watcher.join(timeout=10)
        for timer in self._timers:
            timer.cancel()
        state, self.state = self.state, None
        if state is not None:
            state.index.close()
            if state.encoder is not self._pinned:
                state.encoder.close()
        if self._pinned is not None:
            self._pinned.close()

    def require(self) -> Served:
        """The served state, or NotReadyError (503) saying why there is none."""
        state = self.state
        if state is None:
            raise NotReadyError(self.problem or "the server is starting")
        return state

    # --- watching ------------------------------------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop.wait(self.settings.reload_interval_s):
            try:
                self.refresh()
            except Exception:  # the watcher must survive anything; the reason is logged
                logger.exception("checking %s for a new generation failed", self.settings.index_dir)

    def refresh(self) -> bool:
        """Pick up a newly published generation. Returns whether the served state changed."""
        with self._refresh_lock:
            index_dir = self.settings.index_dir
            try:
                name = current_generation(index_dir)
            except IndexerError as exc:
                return self._fail(None, str(exc))
            if name is None:
                if self.state is None:
                    self.problem = (
                        f"no published index in {index_dir}: build one with "
                        f"`clip-index build <image folder> --index-dir {index_dir}`"
                    )
                return False
            if (self.state is not None and self.state.generation == name) or name == self._failed_generation:
                return False
            return self._swap_to(name)

    def _swap_to(self, name: str) -> bool:
        try:
            index = PublishedIndex.open(self.settings.index_dir)
        except IndexerError as exc:
            return self._fail(name, str(exc))
        try:
            encoder = self._encoder_for(index.manifest.model)
            image_root = self.settings.image_root or index.image_root()
            index.photo_columns()  # read now, before it serves: filters, dates and their order need them
            relevance = relevance_scale(encoder, index)
        except (ClipModelError, _MismatchError, OSError) as exc:
            index.close()
            return self._fail(index.manifest.generation, f"cannot serve generation {index.manifest.generation}: {exc}")
        old, self.state = self.state, Served(encoder, index, image_root, relevance)
        self.problem, self._failed_generation = None, None
        self._observe(index)
        summary = {
            "generation": index.manifest.generation,
            "index_dir": self.settings.index_dir,
            "images": index.manifest.counts.get("images", 0),
            "texts": index.manifest.counts.get("texts", 0),
            "model": encoder.info.name,
        }
        logger.info(
            "serving %(generation)s of %(index_dir)s: %(images)d images, %(texts)d texts, model %(model)s", summary
        )
        if old is not None:
            self._retire(old, close_encoder=old.encoder is not encoder and old.encoder is not self._pinned)
        return True

    def _fail(self, generation: str | None, message: str) -> bool:
        self._failed_generation = generation
        if self.state is not None:
            message = f"serving {self.state.generation}; a newer generation could not be loaded: {message}"
        self.problem = message
        logger.error("%s", message)
        return False

    def _observe(self, index: PublishedIndex) -> None:
        self.metrics.index_swaps.inc()
        for kind in ("images", "texts"):
            self.metrics.index_vectors.labels(kind).set(index.manifest.counts.get(kind, 0))
        self.metrics.index_generation.set(int(index.manifest.generation.removeprefix("g-")))

    def _retire(self, old: Served, close_encoder: bool) -> None:
        def close() -> None:
            old.index.close()
            if close_encoder:
                old.encoder.close()

        timer = threading.Timer(RETIRE_AFTER_S, close)
        timer.daemon = True
        timer.start()
        self._timers = [t for t in self._timers if t.is_alive()] + [timer]

    # --- models --------------------------------------------------------------------------------------------------

    def _encoder_for(self, built_with: ModelInfo) -> Encoder:
        """An encoder whose embeddings match ``built_with``: the pinned one, the one in use, or a freshly loaded one."""
        if self._pinned is not None:
            if not self._pinned.info.same_embeddings(built_with):
                raise _MismatchError(
                    f"it was built with model {built_with.name!r} (weights sha256 {built_with.weights_sha256[:12]}), "
                    f"but the server loaded CLIPSEARCH_MODEL={self._pinned.info.name!r} (weights sha256 "
                    f"{self._pinned.info.weights_sha256[:12]}). Set CLIPSEARCH_MODEL={built_with.name} or unset it "
                    f"to follow the index, or rebuild the index with `clip-index build --rebuild --model "
                    f"{self._pinned.info.name}`"
                )
            return self._pinned
        if self.state is not None and self.state.encoder.info.same_embeddings(built_with):
            return self.state.encoder
        encoder = self._load_encoder(built_with.name)
        if not encoder.info.same_embeddings(built_with):
            encoder.close()
            raise _MismatchError(
                f"its manifest names model {built_with.name!r} with weights sha256 {built_with.weights_sha256[:12]}, "
                f"but that model now has weights sha256 {encoder.info.weights_sha256[:12]} (the file changed?). "
                f"Set CLIPSEARCH_MODEL to the model the index was built with, or rebuild the index"
            )
        return encoder

    def _load_encoder(self, name: str) -> Encoder:
        """Load ``name`` on a short-lived thread (its OpenMP team ends with it) and start its inference thread."""

        def load() -> tuple[clip_model.ImageTextModel, clip_model.Preprocess, ModelInfo]:
            set_own_thread_count(self.plan.torch_threads)  # a thread that ends when loaded may use every core
            return self._load_model(name)

        model, preprocess, info = run_in_fresh_thread(load, name="model-loader")
        return Encoder(
            model,
            preprocess,
            info,
            self.metrics,
            queue_size=self.settings.inference_queue,
            text_batch_size=self.settings.text_batch_size,
            text_cache_size=self.settings.text_cache_size,
            plan=self.plan,
            compile_text=self.settings.compile_text,
        )

    def _load_model(self, name: str) -> tuple[clip_model.ImageTextModel, clip_model.Preprocess, ModelInfo]:
        logger.info("loading model %s on %s", name, self.placement)
        loaded = clip_model.load_for_inference(
            name, arch=self.settings.arch, precision=self.placement.precision, device=str(self.placement.device)
        )
        info = ModelInfo.of(**loaded.provenance(), **clip_model.input_provenance(loaded.model, loaded.preprocess))
        return loaded.model, loaded.preprocess, info


class _MismatchError(Exception):
    """The index's embeddings come from other weights than the model the server can use."""


def relevance_scale(encoder: Encoder, index: PublishedIndex) -> GenerationRelevance | None:
    """The generation's relevance scale (:mod:`app.relevance`): a sigmoid-trained model's own pair probability, else
    the calibrated one, from the generation's mean image embedding and the unrelated prompts' best scores over it
    (None for a generation without images)."""
    sigmoid = SigmoidRelevance.of_model(encoder.model)
    if sigmoid is not None:
        logger.info(
            "relevance of %s: the model's pair probability, sigmoid(%.4f * score %+.4f) (sigmoid-trained)",
            index.manifest.generation,
            sigmoid.scale,
            sigmoid.bias,
        )
        return sigmoid
    if not index.manifest.counts.get("images", 0):
        return None
    columns = index.photo_columns()
    rows = sample_rows(len(columns))
    mean = index.stored_vectors(columns.vec_files[rows], columns.vec_rows[rows]).mean(axis=0, dtype=np.float64)
    prompts = encoder.encode_text_matrix(unrelated_prompts())
    found = [(i, hits[0].score) for i, hits in enumerate(index.search(prompts, 1)) if hits]
    best = np.array([score for _, score in found], dtype=np.float32)
    scale = RelevanceScale.of_prompts(prompts[[i for i, _ in found]], best, mean)
    logger.info(
        "relevance of %s: calibrated on unrelated prompts, their best lifts' median %.4f, spread %.4f",
        index.manifest.generation,
        scale.median,
        scale.spread,
    )
    return scale
