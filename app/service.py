"""The operations the API offers, over one consistent served state (model + index generation).

Routers only translate HTTP to these calls; every torch and FAISS call happens here or below. Each public method
reads ``runtime.require()`` once, so one answer never mixes two index generations.

Vectors: every query vector is float32 [D], L2-normalized; scores are inner products of unit vectors (cosine).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

import clip_model
from clip_model import LongText
from indexer.store.reader import Hit, ImageRecord, SearchFilter

from .encoder import SearchRequest
from .errors import BadRequestError, NotFoundError
from .facet_schemas import Facets, FolderQuery
from .facets import FacetCache, check_filters
from .imaging import ThumbnailCache, decode_upload, resolve_image_path, stat_readable
from .paging import Sort, depth, fingerprint, next_cursor, open_cursor, ordered
from .relevance import GenerationRelevance, ScoreRelevance
from .runtime import Runtime, Served
from .schemas import (
    ClassifyResponse,
    CombinedQuery,
    EmbeddingResponse,
    ImageEmbedding,
    ImageHit,
    ImageInfo,
    LabelScore,
    ReadyResponse,
    SearchFilters,
    SearchResponse,
    Stats,
    TextHit,
    TextPart,
    TextsResponse,
    clock_seconds,
    clock_text,
)
from .settings import Settings

Vector = npt.NDArray[np.float32]
CANCELLED_NORM = 1e-6  # a combined query whose weighted sum is shorter than this has no direction
THUMBNAIL_SIZES = (64, 128, 256, 512, 1024)  # the sizes made: a request is rounded up, so the cache stays bounded


class SearchService:
    """Search, image -> text, zero-shot, embeddings and image files, for one runtime."""

    def __init__(self, runtime: Runtime, settings: Settings, facets: FacetCache) -> None:
        self.runtime = runtime
        self.settings = settings
        self.facet_cache = facets
        self.thumbnails = ThumbnailCache(settings.cache_dir / "thumbnails", settings.max_image_pixels)

    # --- text / image -> images ----------------------------------------------------------------------------------

    def search_text(self, text: str, options: ResultOptions, long_text: LongText | None = None) -> SearchResponse:
        started, state = time.perf_counter(), self.runtime.require()
        text, mode = self._check_text(text), self._long_text(long_text)
        page = self._page(state, options, ("text", text, mode), text_query=True)
        request = SearchRequest(state.index, page.depth, page.where)
        embedding, hits = state.encoder.search_text(text, request, mode)
        return self._respond(
            state, hits, page.for_query(embedding.vector), started, embedding.truncated, embedding.chunks
        )

    def search_upload(self, data: bytes, options: ResultOptions) -> SearchResponse:
        started, state = time.perf_counter(), self.runtime.require()
        page = self._page(state, options, ("image", hashlib.sha256(data).hexdigest()))
        return self._search(state, self._embed_upload(state, data), page, started)

    def similar(self, image_id: int, options: ResultOptions) -> SearchResponse:
        """Images like an indexed one, from its stored embedding (no re-encoding); the image itself is left out."""
        started, state = time.perf_counter(), self.runtime.require()
        vector = self._stored_embedding(state, image_id)
        page = self._page(state, options, ("similar", image_id), exclude=image_id)
        return self._search(state, vector, page, started)

    def search_combined(self, query: CombinedQuery) -> SearchResponse:
        """Normalized weighted sum of the parts' unit embeddings."""
        started, state = time.perf_counter(), self.runtime.require()
        texts = [self._check_text(p.text) for p in query.parts if isinstance(p, TextPart)]
        options = ResultOptions(query.k, query.min_score, query.filters, query.sort, query.cursor, query.min_relevance)
        only_texts = all(isinstance(p, TextPart) for p in query.parts)
        mode = self._long_text(query.long_text)
        key = ("combined", [p.model_dump() for p in query.parts], mode)
        page = self._page(state, options, key, text_query=only_texts)
        embedded = dict(zip(texts, state.encoder.encode_texts(texts, mode), strict=True)) if texts else {}
        total = np.zeros(state.index.manifest.embed_dim, dtype=np.float64)
        for part in query.parts:
            if isinstance(part, TextPart):
                vector = embedded[part.text].vector
            else:
                vector = self._stored_embedding(state, part.image_id)
            total += part.weight * vector.astype(np.float64)
        norm = float(np.linalg.norm(total))
        if norm < CANCELLED_NORM:
            raise BadRequestError("the weighted parts cancel out (their sum has no direction): change the weights")
        truncated = any(e.truncated for e in embedded.values())
        chunks = sum(e.chunks for e in embedded.values()) if embedded else None
        unit = (total / norm).astype(np.float32)
        return self._search(state, unit, page, started, truncated=truncated, chunks=chunks)

    def _search(
        self,
        state: Served,
        query: Vector,
        page: _Page,
        started: float,
        truncated: bool = False,
        chunks: int | None = None,
    ) -> SearchResponse:
        request = SearchRequest(state.index, page.depth, page.where)
        hits = state.encoder.search_vectors(query[None], request)[0]
        return self._respond(state, hits, page.for_query(query), started, truncated, chunks)

    def _page(
        self, state: Served, options: ResultOptions, query: object, exclude: int | None = None, text_query: bool = False
    ) -> _Page:
        """The request's page, once its filters are checked against what the generation holds (422 for a folder,
        camera or format no image has: :mod:`app.facets`)."""
        check_filters(self.facet_cache, state, options.filters)
        return _Page.of(state, options, query, exclude, text_query)

    def _respond(
        self,
        state: Served,
        hits: list[Hit],
        page: _Page,
        started: float,
        truncated: bool = False,
        chunks: int | None = None,
    ) -> SearchResponse:
        """The page of ``hits`` (ranked to ``page.depth``) the request asked for, with the cursor of the next."""
        options = page.options
        found = len(hits)
        hits = [h for h in hits if h.id != page.exclude]
        cut_off = page.cut_off()
        kept = [h for h in hits if cut_off is None or h.score >= cut_off]
        complete = len(kept) < len(hits) or found < page.depth  # nothing past the cut-off, or nothing more found
        taken = _taken_at(state, kept)
        ranked = ordered(kept, options.sort, taken[0] if taken is not None else None)
        window = ranked[page.offset : page.offset + options.k]
        records = state.index.images([h.id for h in window])
        dates = _taken_at(state, window)
        results = [
            _image_hit(hit, records[hit.id], dates, i, page.query_scale)
            for i, hit in enumerate(window)
            if _servable(records.get(hit.id))
        ]
        took_ms = (time.perf_counter() - started) * 1000
        cursor = next_cursor(state.generation, page.offset, options.k, len(ranked), complete, page.query)
        return SearchResponse(
            results=results,
            generation=state.generation,
            took_ms=round(took_ms, 2),
            truncated=truncated,
            chunks=chunks,
            relevance_kind=None if page.scale is None else page.scale.kind,
            next_cursor=cursor,
        )

    # --- image -> text and zero-shot -----------------------------------------------------------------------------

    def describe_indexed(
        self, image_id: int, candidates: Sequence[str] | None, k: int, long_text: LongText | None = None
    ) -> TextsResponse:
        state = self.runtime.require()
        return self._describe(state, self._stored_embedding(state, image_id), candidates, k, long_text)

    def describe_upload(
        self, data: bytes, candidates: Sequence[str] | None, k: int, long_text: LongText | None = None
    ) -> TextsResponse:
        state = self.runtime.require()
        return self._describe(state, self._embed_upload(state, data), candidates, k, long_text)

    def _describe(
        self, state: Served, image: Vector, candidates: Sequence[str] | None, k: int, long_text: LongText | None
    ) -> TextsResponse:
        if candidates:
            texts = self._check_texts(candidates, "candidates")
            embedded = state.encoder.encode_texts(texts, self._long_text(long_text))
            scores = np.stack([e.vector for e in embedded]) @ image  # [N]
            order = np.argsort(-scores, kind="stable")[:k]
            results = [TextHit(text=texts[i], score=float(scores[i]), chunks=embedded[i].chunks) for i in order]
            return TextsResponse(results=results, source="candidates")
        if state.index.manifest.counts.get("texts", 0) == 0:
            raise BadRequestError(
                "no texts are indexed: pass 'candidates', or index a corpus with "
                "`clip-index texts captions.txt --index-dir ...`"
            )
        search_started = time.perf_counter()
        hits = state.index.search_texts(image[None], k)[0]
        self.runtime.metrics.search_seconds.labels("texts").observe(time.perf_counter() - search_started)
        texts_by_id = state.index.texts([h.id for h in hits])
        results = [TextHit(text=texts_by_id[h.id], score=h.score, id=h.id) for h in hits if h.id in texts_by_id]
        return TextsResponse(results=results, source="index")

    def classify_indexed(
        self,
        image_id: int,
        labels: Sequence[str],
        templates: Sequence[str] | None,
        long_text: LongText | None = None,
    ) -> ClassifyResponse:
        state = self.runtime.require()
        return self._classify(state, self._stored_embedding(state, image_id), labels, templates, long_text)

    def classify_upload(
        self, data: bytes, labels: Sequence[str], templates: Sequence[str] | None, long_text: LongText | None = None
    ) -> ClassifyResponse:
        state = self.runtime.require()
        return self._classify(state, self._embed_upload(state, data), labels, templates, long_text)

    def _classify(
        self,
        state: Served,
        image: Vector,
        labels: Sequence[str],
        templates: Sequence[str] | None,
        long_text: LongText | None,
    ) -> ClassifyResponse:
        labels = self._check_texts(labels, "labels")
        if len(set(labels)) != len(labels):
            raise BadRequestError("labels must be distinct")
        if templates is not None:
            if len(templates) > self.settings.max_templates:
                raise BadRequestError(f"at most {self.settings.max_templates} templates per request")
            templates = [self._check_text(t) for t in templates]
        try:  # clip_model owns the template rule (the schema checks it too): a refused template is the client's error
            prompts = clip_model.zero_shot_prompts(labels, templates)
        except ValueError as exc:
            raise BadRequestError(str(exc)) from None
        # each prompt is at most a label plus a template, both within max_text_chars
        embedded = state.encoder.encode_texts(prompts, self._long_text(long_text))
        embeddings = torch.from_numpy(np.stack([e.vector for e in embedded]))
        per_label = len(prompts) // len(labels)  # prompts are label-major: each label's block of templates
        chunks = {
            label: max(e.chunks for e in embedded[i * per_label : (i + 1) * per_label])
            for i, label in enumerate(labels)
        }
        classifier = clip_model.ensemble_prompts(embeddings, len(labels))  # [D, C]
        model = state.encoder.model
        logit_bias = clip_model.pair_logit_bias(model)  # a sigmoid-trained model's probabilities are independent
        probs = clip_model.zero_shot_probabilities(
            torch.from_numpy(image)[None], classifier, model.logit_scale.detach(), logit_bias
        )[0]
        ranked = sorted(zip(labels, probs.tolist(), strict=True), key=lambda pair: -pair[1])
        return ClassifyResponse(
            labels=[
                LabelScore(label=label, probability=min(max(p, 0.0), 1.0), chunks=chunks[label]) for label, p in ranked
            ],
            templates=len(prompts) // len(labels),
            independent=logit_bias is not None,
        )

    # --- embeddings ----------------------------------------------------------------------------------------------

    def embed_texts(self, texts: Sequence[str], long_text: LongText | None = None) -> EmbeddingResponse:
        state = self.runtime.require()
        embedded = state.encoder.encode_texts([self._check_text(t) for t in texts], self._long_text(long_text))
        return EmbeddingResponse(
            model=state.encoder.info.name,
            dim=state.encoder.info.embed_dim,
            embeddings=[e.vector.tolist() for e in embedded],
            truncated=[e.truncated for e in embedded],
            chunks=[e.chunks for e in embedded],
        )

    def embed_upload(self, data: bytes) -> EmbeddingResponse:
        state = self.runtime.require()
        vector = self._embed_upload(state, data)
        return EmbeddingResponse(model=state.encoder.info.name, dim=len(vector), embeddings=[vector.tolist()])

    def image_embedding(self, image_id: int) -> ImageEmbedding:
        state = self.runtime.require()
        vector = self._stored_embedding(state, image_id)
        return ImageEmbedding(id=image_id, model=state.encoder.info.name, dim=len(vector), embedding=vector.tolist())

    # --- images by id --------------------------------------------------------------------------------------------

    def image_info(self, image_id: int) -> ImageInfo:
        record = self._record(self.runtime.require(), image_id)
        return ImageInfo(
            id=record.id,
            path=record.path,
            width=record.width,
            height=record.height,
            bytes=record.size,
            sha256=record.content_hash,
            url=_file_url(record.id),
            thumbnail_url=_thumbnail_url(record.id),
        )

    def image_file(self, image_id: int) -> tuple[Path, os.stat_result]:
        """The file of an indexed image, inside the image root, and its stat: NotFoundError if it is gone or lies
        outside, StaleFileError if it cannot be read."""
        path = self._image_path(image_id)
        return path, stat_readable(path)

    def thumbnail(self, image_id: int, size: int | None) -> tuple[Path, str]:
        """(cached JPEG path, cache key usable as an ETag) of an indexed image's thumbnail. NotFoundError as for
        :meth:`image_file`; StaleFileError if the file no longer decodes (changed since it was indexed)."""
        wanted = size or self.settings.thumbnail_size
        side = next((s for s in THUMBNAIL_SIZES if s >= wanted), THUMBNAIL_SIZES[-1])
        return self.thumbnails.get(self._image_path(image_id), side)

    def _image_path(self, image_id: int) -> Path:
        state = self.runtime.require()
        record = self._record(state, image_id)
        if state.image_root is None:
            raise NotFoundError(
                "the server does not know the image folder (no indexer run recorded): set CLIPSEARCH_IMAGE_ROOT"
            )
        return resolve_image_path(state.image_root, record.path)

    def facets(self, folders: FolderQuery) -> Facets:
        """The values the served generation holds for the folder, camera and format filters (the folders that
        ``folders`` asks for, a page of them), and its capture times."""
        return self.facet_cache.of(self.runtime.require()).listing(folders)

    # --- operations ----------------------------------------------------------------------------------------------

    def ready(self) -> ReadyResponse:
        state = self.runtime.state
        return ReadyResponse(
            ready=state is not None, reason=self.runtime.problem, generation=state.generation if state else None
        )

    def stats(self) -> Stats:
        state, problem = self.runtime.state, self.runtime.problem
        if state is None:
            return self._not_ready_stats(problem)
        manifest = state.index.manifest
        return Stats(
            ready=True,
            reason=problem,
            model=state.encoder.info.name,
            weights_sha256=manifest.weights_sha256,
            embed_dim=manifest.embed_dim,
            generation=manifest.generation,
            built_at=manifest.created_at,
            images=manifest.counts.get("images", 0),
            texts=manifest.counts.get("texts", 0),
            factory=manifest.factory,
            image_root=str(state.image_root) if state.image_root else None,
            precision=self.runtime.placement.precision,
            device=str(self.runtime.placement.device),
            index_reason=manifest.index_reason or None,
            search_params=manifest.search_params,
            recall_at_10=manifest.recall_at_10,
            text_encoder=state.encoder.text_tower.status,
            relevance_kind=None if state.relevance is None else state.relevance.kind,
            default_min_relevance=None if state.relevance is None else state.relevance.default_min_relevance,
        )

    # --- helpers -------------------------------------------------------------------------------------------------

    def _not_ready_stats(self, reason: str | None) -> Stats:
        """Stats while nothing is served: no model or index fields, no images or texts."""
        return Stats(
            ready=False,
            reason=reason,
            model=None,
            weights_sha256=None,
            embed_dim=None,
            generation=None,
            built_at=None,
            images=0,
            texts=0,
            factory=None,
            image_root=None,
            precision=self.runtime.placement.precision,
            device=str(self.runtime.placement.device),
        )

    def _long_text(self, requested: LongText | None) -> LongText:
        """The request's long-text mode, else the server's (``CLIPSEARCH_LONG_TEXT``)."""
        return requested or self.settings.long_text

    def _check_text(self, text: str) -> str:
        """The settings' length limit (the schema already refuses empty and all-blank texts)."""
        if len(text) > self.settings.max_text_chars:
            raise BadRequestError(f"text is {len(text)} characters, the limit is {self.settings.max_text_chars}")
        return text

    def _check_texts(self, texts: Sequence[str], what: str) -> list[str]:
        if len(texts) > self.settings.max_labels:
            raise BadRequestError(f"at most {self.settings.max_labels} {what} per request, got {len(texts)}")
        return [self._check_text(t) for t in texts]

    def _embed_upload(self, state: Served, data: bytes) -> Vector:
        image = decode_upload(data, state.encoder.image_size, self.settings.max_image_pixels)
        pixels = state.encoder.preprocess(image)[None]  # [1, 3, R, R]
        vector: Vector = state.encoder.encode_images(pixels)[0]
        return vector

    def _record(self, state: Served, image_id: int) -> ImageRecord:
        record = state.index.images([image_id]).get(image_id)
        if record is None or not _servable(record):
            raise NotFoundError(f"no indexed image has id {image_id}")
        return record

    def _stored_embedding(self, state: Served, image_id: int) -> Vector:
        vector = state.index.embedding(image_id)
        if vector is None:
            raise NotFoundError(f"no indexed image has id {image_id}")
        return vector


def _servable(record: ImageRecord | None) -> bool:
    return record is not None and record.status == "ok"


def _file_url(image_id: int) -> str:
    return f"/api/images/{image_id}/file"


def _thumbnail_url(image_id: int) -> str:
    return f"/api/images/{image_id}/thumbnail"


def _image_hit(
    hit: Hit,
    record: ImageRecord,
    dates: tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]] | None,
    row: int,
    scale: ScoreRelevance | None,
) -> ImageHit:
    taken, from_exif = (None, None) if dates is None else (int(dates[0][row]), bool(dates[1][row]))
    return ImageHit(
        relevance=None if scale is None else round(scale.relevance(hit.score), 4),
        id=hit.id,
        path=record.path,
        score=round(hit.score, 6),
        width=record.width,
        height=record.height,
        url=_file_url(hit.id),
        thumbnail_url=_thumbnail_url(hit.id),
        taken_at=None if taken is None else clock_text(taken),
        taken_from_exif=from_exif,
    )


def _taken_at(state: Served, hits: list[Hit]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]] | None:
    """Capture times (clock seconds) of ``hits`` and whether EXIF gave them, from the generation's columns."""
    if not hits:
        return None
    columns = state.index.photo_columns()
    ids = np.fromiter((h.id for h in hits), dtype=np.int64, count=len(hits))
    rows = np.clip(np.searchsorted(columns.ids, ids), 0, max(0, len(columns.ids) - 1))
    if not len(columns.ids) or not np.array_equal(columns.ids[rows], ids):
        return None  # a hit the columns do not hold: cannot happen within one generation
    return columns.taken_at[rows], columns.taken_from_exif[rows]


@dataclass(frozen=True)
class ResultOptions:
    """What a search request asks of its results besides the query: page size ``k``, cut-off, filters, order and
    the cursor of the page (None: the first)."""

    k: int
    min_score: float | None = None
    filters: SearchFilters | None = None
    sort: Sort = "relevance"
    cursor: str | None = None
    min_relevance: float | None = None


@dataclass(frozen=True)
class _Page:
    """A request's page: its options, the index's filter for them, the offset its cursor gives, how deep to rank,
    the query's fingerprint, and the relevance scale when the query is a text one (:mod:`app.relevance`)."""

    options: ResultOptions
    where: SearchFilter | None
    offset: int
    depth: int
    query: str
    exclude: int | None = None
    scale: GenerationRelevance | None = None
    query_scale: ScoreRelevance | None = None  # the scale of the query's own scores, once it is encoded

    @classmethod
    def of(
        cls, state: Served, options: ResultOptions, query: object, exclude: int | None = None, text_query: bool = False
    ) -> _Page:
        if options.min_relevance is not None and not text_query:
            raise BadRequestError("min_relevance applies to text queries: image queries have no relevance scale")
        filters = options.filters.model_dump(mode="json") if options.filters is not None else None
        key = fingerprint(query, filters, options.min_score, options.min_relevance, options.sort)
        offset = open_cursor(options.cursor, state.generation, key)
        ranked = depth(offset, options.k, options.sort) + (exclude is not None)
        scale = state.relevance if text_query else None
        return cls(options, store_filter(options.filters), offset, ranked, key, exclude, scale)

    def for_query(self, query: Vector) -> _Page:
        """This page with the relevance scale of ``query``'s scores (unchanged for a query without a scale)."""
        return self if self.scale is None else replace(self, query_scale=self.scale.for_query(query))

    def cut_off(self) -> float | None:
        """The lowest score a result may have: ``min_score``, raised to ``min_relevance``'s score if given."""
        limits = [] if self.options.min_score is None else [self.options.min_score]
        if self.options.min_relevance is not None and self.scale is not None:
            if self.query_scale is None:
                raise RuntimeError("a text query's results are cut before its scale is known (see for_query)")
            limits.append(self.query_scale.min_score(self.options.min_relevance))
        return max(limits) if limits else None


def store_filter(filters: SearchFilters | None) -> SearchFilter | None:
    """The index's filter for the API's (None when no condition is given). Datetimes become clock seconds
    (:func:`app.schemas.clock_seconds`)."""
    if filters is None:
        return None
    where = SearchFilter(
        folders=tuple(filters.folder),
        taken_from=None if filters.taken_after is None else clock_seconds(filters.taken_after),
        taken_until=None if filters.taken_before is None else clock_seconds(filters.taken_before),
        cameras=tuple(filters.camera),
        formats=tuple(filters.format),
        min_width=filters.min_width,
        min_height=filters.min_height,
        orientation=filters.orientation,
    )
    return None if where.empty else where
