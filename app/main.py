"""``create_app(settings)``: the FastAPI application, its lifespan and its middleware.

The lifespan loads the model and the published index once (``Runtime.start``) and starts the watcher that swaps
in new generations; heavy objects live on ``app.state``. Model-bound endpoints are sync functions, so FastAPI runs
them in its threadpool and the event loop never waits for torch or FAISS.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from clip_model.errors import ClipModelError
from clip_model.process_tuning import ThreadPlan

from .duplicates_service import DuplicateFinder
from .errors import install_error_handlers
from .facets import FacetCache
from .metrics import Metrics
from .middleware import BodySizeLimitMiddleware, RequestContextMiddleware
from .reindex import Reindexer
from .routes import admin, classify, duplicates, embed, facets, images, ops, search, texts, web
from .runtime import Runtime
from .service import SearchService
from .settings import Settings, get_settings

logger = logging.getLogger(__name__)

DESCRIPTION = """\
Semantic image search over a folder indexed by `clip-index`, on a CLIP model implemented in this project.

* **search**: text -> images, uploaded image -> images, weighted query arithmetic
* **images**: metadata, file, thumbnail, "more like this" and stored embedding of an indexed image, by id
* **duplicates**: groups of byte-identical and near-duplicate images, a page at a time
* **facets**: the folders, cameras, formats and capture times the index holds, to choose filters from
* **image to text**: the texts that best describe an image (indexed corpus or candidates you send)
* **zero-shot**: probabilities over your labels, with prompt ensembling
* **embeddings**: vectors for texts and images
* **operations**: /livez, /readyz, /api/stats, /metrics; **admin**: reindex

Scores are cosine similarities of L2-normalized embeddings. Errors are JSON `{"detail": "..."}`.
With `CLIPSEARCH_API_KEY` set, send the key in the `X-API-Key` header.
"""


def create_app(settings: Settings | None = None, *, watch: bool = True, plan: ThreadPlan | None = None) -> FastAPI:
    """The application for ``settings`` (default: from the environment). ``watch=False`` turns off the thread that
    picks up new generations (tests then call ``app.state.runtime.refresh()``). ``plan``: the process's thread
    counts (default: ``ThreadPlan.for_serving(settings.torch_threads)``)."""
    settings = settings or get_settings()
    plan = plan or ThreadPlan.for_serving(settings.torch_threads)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = Runtime(settings, metrics, plan)
        try:
            runtime.start(watch=watch)
        except ClipModelError as exc:  # the runtime has closed itself
            logger.error("cannot start: %s", exc)
            raise
        app.state.runtime = runtime
        facet_cache = FacetCache()  # one per app: the search and duplicates services check filters against it
        app.state.service = SearchService(runtime, settings, facet_cache)
        app.state.duplicates = DuplicateFinder(runtime, facet_cache)
        try:
            yield
        finally:
            app.state.reindexer.close()
            runtime.close()

    app = FastAPI(
        title="clip-search",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.reindexer = Reindexer()
    install_error_handlers(app)
    for module in (search, facets, images, duplicates, texts, classify, embed, ops, admin, web):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=web.STATIC_DIR), name="static")
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["X-API-Key", "Content-Type", "X-Request-ID"],
        )
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_upload_bytes)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)  # outermost: sees every response, 413s included
    return app
