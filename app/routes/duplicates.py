"""Duplicate images: groups of byte-identical files and near-duplicates in the served index, a page at a time."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from indexer.store.reader import duplicates

from ..deps import DuplicatesDep, ReadAccess
from ..duplicate_schemas import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, DuplicatesPage
from ..schemas import MAX_CURSOR_CHARS, TEXT_FIELD_MAX, DecimalInteger
from ..strict_json import StrictJSONRoute
from ._common import errors, paged

router = APIRouter(
    route_class=StrictJSONRoute, prefix="/api/duplicates", tags=["duplicates"], dependencies=[ReadAccess]
)

_RESPONSES = paged(errors(401, 422, 503))
Threshold = Annotated[
    float | None,
    Query(
        ge=duplicates.MIN_THRESHOLD,
        le=1.0,
        allow_inf_nan=False,
        description="cosine similarity from which two images are near-duplicates (default "
        f"{duplicates.DEFAULT_THRESHOLD}: copies of one photo; lower finds similar photos, bursts included)",
    ),
]
Folder = Annotated[
    str | None,
    Query(
        max_length=TEXT_FIELD_MAX,
        description='compare only the images under this folder ("2023/Holidays"); one that holds no indexed image is a '
        "422 (GET /api/facets lists the folders)",
    ),
]
PageSize = Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE, description="groups per page"), DecimalInteger]
Cursor = Annotated[
    str | None, Query(min_length=1, max_length=MAX_CURSOR_CHARS, description="next_cursor of the previous page")
]


@router.get("", response_model=DuplicatesPage, responses=_RESPONSES, summary="Duplicate images")
def duplicate_groups(
    finder: DuplicatesDep,
    threshold: Threshold = None,
    folder: Folder = None,
    page_size: PageSize = DEFAULT_PAGE_SIZE,
    cursor: Cursor = None,
) -> DuplicatesPage:
    """Groups of images that are copies of each other: files with the same bytes, and images whose embeddings reach
    the similarity `threshold` (joined transitively), larger groups first. The first request for a threshold and
    folder compares every image with every other, which takes a while on a large collection; later pages and
    repeats are served from memory until the index is republished.

    Example: `GET /api/duplicates?folder=2023&page_size=20`, then `GET /api/duplicates?cursor=<next_cursor>`
    """
    return finder.page(threshold, folder, page_size, cursor)
