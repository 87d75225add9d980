"""Text -> images, uploaded image -> images, and combined (weighted) queries."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Query, UploadFile

from ..deps import ReadAccess, ServiceDep
from ..schemas import (
    CURSOR_DESCRIPTION,
    K_FIELD,
    MAX_K,
    MIN_RELEVANCE_FIELD,
    MIN_SCORE_FIELD,
    NOT_BLANK,
    SORT_DESCRIPTION,
    TEXT_FIELD_MAX,
    CombinedQuery,
    DecimalInteger,
    QueryFilters,
    SearchResponse,
)
from ..service import ResultOptions
from ..strict_json import StrictJSONRoute
from ._common import ID_BODY_ERRORS, QUERY_ERRORS, UPLOAD_ERRORS

router = APIRouter(route_class=StrictJSONRoute, prefix="/api/search", tags=["search"], dependencies=[ReadAccess])

K = Annotated[int, Query(ge=1, le=MAX_K, description=K_FIELD.description), DecimalInteger]
MinScore = Annotated[float | None, Query(ge=-1.0, le=1.0, allow_inf_nan=False, description=MIN_SCORE_FIELD.description)]
MinRelevance = Annotated[
    float | None, Query(ge=0.0, le=1.0, allow_inf_nan=False, description=MIN_RELEVANCE_FIELD.description)
]
QueryText = Annotated[
    str,
    Query(
        min_length=1,
        max_length=TEXT_FIELD_MAX,
        pattern=NOT_BLANK,
        description="what to look for",
        examples=["a dog on a beach"],
    ),
]
Filters = Annotated[QueryFilters, Query()]
SortParam = Annotated[Literal["relevance", "newest", "oldest"], Query(description=SORT_DESCRIPTION)]
CursorParam = Annotated[str | None, Query(max_length=512, description=CURSOR_DESCRIPTION)]
# minLength: an empty file is no image (refused with a 422), and the schema says so
Upload = Annotated[
    UploadFile, File(description="JPEG, PNG, WebP, GIF, BMP, TIFF or AVIF image", json_schema_extra={"minLength": 1})
]


@router.get("", response_model=SearchResponse, responses=QUERY_ERRORS, summary="Text -> images")
def search_text(
    q: QueryText,
    service: ServiceDep,
    filters: Filters,
    k: K = 20,
    min_score: MinScore = None,
    min_relevance: MinRelevance = None,
    sort: SortParam = "relevance",
    cursor: CursorParam = None,
) -> SearchResponse:
    """A page of `k` indexed images closest to the text `q`, among those the filters match, best first (or by date:
    `sort`); `next_cursor` gets the next page.

    Example: `GET /api/search?q=a%20dog%20on%20a%20beach&k=10&folder=2023&taken_after=2023-06-01`
    """
    return service.search_text(q, ResultOptions(k, min_score, filters, sort, cursor, min_relevance))


@router.post("/image", response_model=SearchResponse, responses=UPLOAD_ERRORS, summary="Uploaded image -> images")
def search_image(
    file: Upload,
    service: ServiceDep,
    filters: Filters,
    k: K = 20,
    min_score: MinScore = None,
    sort: SortParam = "relevance",
    cursor: CursorParam = None,
) -> SearchResponse:
    """The `k` indexed images most similar to an uploaded image (multipart field `file`), among those the filters
    (query parameters) match.

    Example: `curl -F file=@cat.jpg 'http://localhost:8000/api/search/image?k=10&orientation=portrait'`
    """
    return service.search_upload(file.file.read(), ResultOptions(k, min_score, filters, sort, cursor))


@router.post("/combined", response_model=SearchResponse, responses=ID_BODY_ERRORS, summary="Weighted query arithmetic")
def search_combined(query: CombinedQuery, service: ServiceDep) -> SearchResponse:
    """Images closest to a weighted sum of unit embeddings of texts and indexed images, e.g. "beach" + "sunset"
    - 0.5 "people". Parts with negative weights push results away from them."""
    return service.search_combined(query)
