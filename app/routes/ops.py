"""Operations: liveness, readiness, what is served, Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from ..deps import ReadAccess, ServiceDep
from ..metrics import CONTENT_TYPE, Metrics
from ..schemas import ReadyResponse, Stats
from ..strict_json import StrictJSONRoute
from ._common import errors

router = APIRouter(route_class=StrictJSONRoute, tags=["operations"])


@router.get("/livez", summary="Liveness")
def livez() -> dict[str, str]:
    """200 while the process answers at all."""
    return {"status": "alive"}


@router.get(
    "/readyz",
    response_model=ReadyResponse,
    responses={503: {"model": ReadyResponse, "description": "not ready; `reason` says why and what to do"}},
    summary="Readiness",
)
def readyz(service: ServiceDep) -> Response:
    """200 once a verified index generation and a model that produced its embeddings are loaded; 503 with the
    reason before that (no index yet, corrupt index, index built with other weights than the pinned model)."""
    ready = service.ready()
    return JSONResponse(ready.model_dump(), status_code=200 if ready.ready else 503)


@router.get("/api/stats", response_model=Stats, dependencies=[ReadAccess], responses=errors(401), summary="Index stats")
def stats(service: ServiceDep) -> Stats:
    """Model, weights checksum, the device and arithmetic the encoders run in, generation, when it was built, and
    how many images and texts it holds."""
    return service.stats()


@router.get("/metrics", response_class=Response, summary="Prometheus metrics")
def metrics(request: Request) -> Response:
    """Request latency, encode and search time, cache hits, rejections, index size (Prometheus text format)."""
    registry: Metrics = request.app.state.metrics
    return Response(registry.exposition(), media_type=CONTENT_TYPE)
