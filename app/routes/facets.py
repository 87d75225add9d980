"""What the served generation holds for the filters that take names: folders, cameras, formats, capture times."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from ..deps import ReadAccess, ServiceDep
from ..facet_schemas import DEFAULT_FOLDER_LIMIT, MAX_FOLDER_LIMIT, Facets, FolderQuery
from ..schemas import TEXT_FIELD_MAX, DecimalInteger
from ..strict_json import StrictJSONRoute
from ._common import errors

router = APIRouter(route_class=StrictJSONRoute, prefix="/api/facets", tags=["search"], dependencies=[ReadAccess])

FolderPrefix = Annotated[
    str,
    Query(
        max_length=TEXT_FIELD_MAX,
        description='list the folders whose path starts with this, ignoring case and a leading "/" ("2023/ho": '
        "2023/Holidays, 2023/home); default: every folder",
    ),
]
FolderAfter = Annotated[
    str | None,
    Query(
        max_length=TEXT_FIELD_MAX,
        description="list the folders after this path, in path order: the last folder of the previous response, "
        "when it says `folders_truncated`",
    ),
]
Limit = Annotated[
    int,
    Query(ge=1, le=MAX_FOLDER_LIMIT, description=f"folders listed at most, 1..{MAX_FOLDER_LIMIT}"),
    DecimalInteger,
]


@router.get("", response_model=Facets, responses=errors(401, 422, 503), summary="Filter values")
def facets(
    service: ServiceDep,
    folder_prefix: FolderPrefix = "",
    folder_after: FolderAfter = None,
    limit: Limit = DEFAULT_FOLDER_LIMIT,
) -> Facets:
    """The folders, cameras and formats the served index generation's images have, with how many images match each,
    and the span of their capture times: the values the search and duplicates filters accept (another folder, camera
    or format is a 422). Every camera and format; the folders a page at a time, in path order: `limit` of those
    starting with `folder_prefix`, with how many do in all (`folders_matched`), the next page after the last one
    listed (`folder_after`). Found once per generation.

    Example: `GET /api/facets?folder_prefix=2023/ho`, then `GET /api/search?q=beach&folder=2023/Holidays&camera=iphone`
    """
    return service.facets(FolderQuery(prefix=folder_prefix, after=folder_after, limit=limit))
