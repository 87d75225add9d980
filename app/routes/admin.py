"""Admin: rebuild the index by running the indexer as a separate process (needs CLIPSEARCH_ADMIN_API_KEY)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from ..deps import AdminAccess, ReindexerDep, ServiceDep, SettingsDep
from ..errors import ConflictError
from ..reindex import indexer_command
from ..schemas import ReindexStatus
from ..strict_json import StrictJSONRoute
from ._common import errors

router = APIRouter(route_class=StrictJSONRoute, prefix="/api/admin", tags=["admin"], dependencies=[AdminAccess])


@router.post(
    "/reindex", response_model=ReindexStatus, status_code=202, responses=errors(401, 403, 409, 422), summary="Reindex"
)
def start_reindex(
    service: ServiceDep,
    settings: SettingsDep,
    reindexer: ReindexerDep,
    rebuild: Annotated[bool, Query(description="re-embed every image (`clip-index build --rebuild`)")] = False,
) -> ReindexStatus:
    """Start `clip-index build` over the image folder into the served index directory; the new generation is
    served as soon as it is published. Poll `GET /api/admin/reindex` for progress."""
    state = service.runtime.state
    image_root = settings.image_root or (state.image_root if state else None)
    if image_root is None:
        raise ConflictError("the image folder is unknown: set CLIPSEARCH_IMAGE_ROOT")
    model = settings.model or (state.encoder.info.name if state else None)
    command = indexer_command(str(image_root), str(settings.index_dir), model, settings.arch, rebuild)
    return reindexer.start(command)


@router.get("/reindex", response_model=ReindexStatus, responses=errors(401, 403), summary="Reindex status")
def reindex_status(reindexer: ReindexerDep) -> ReindexStatus:
    """State, exit code and the last log lines of the latest reindex."""
    return reindexer.status()
