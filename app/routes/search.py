"""Text -> images, uploaded image -> images, and combined (weighted) queries."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Query, UploadFile

from clip_model import LongText

from ..deps import ReadAccess, ResultOptionsDep, ServiceDep
from ..schemas import LONG_TEXT_DESCRIPTION, NOT_BLANK, TEXT_FIELD_MAX, CombinedQuery, SearchResponse
from ..strict_json import StrictJSONRoute
from ._common import COMBINED_ERRORS, SEARCH_ERRORS, UPLOAD_SEARCH_ERRORS

router = APIRouter(route_class=StrictJSONRoute, prefix="/api/search", tags=["search"], dependencies=[ReadAccess])

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
LongTextParam = Annotated[LongText | None, Query(description=LONG_TEXT_DESCRIPTION)]
# minLength: an empty file is no image (refused with a 422), and the schema says so
Upload = Annotated[
    UploadFile, File(description="JPEG, PNG, WebP, GIF, BMP, TIFF or AVIF image", json_schema_extra={"minLength": 1})
]


@router.get("", response_model=SearchResponse, responses=SEARCH_ERRORS, summary="Text -> images")
def search_text(
    q: QueryText, service: ServiceDep, options: ResultOptionsDep, long_text: LongTextParam = None
) -> SearchResponse:
    """A page of `k` indexed images closest to the text `q`, among those the filters match, best first (or by date:
    `sort`); `next_cursor` gets the next page. A folder, camera or format no indexed image has is a 422 (`GET
    /api/facets` lists those there are).

    Example: `GET /api/search?q=a%20dog%20on%20a%20beach&k=10&folder=2023&taken_after=2023-06-01`
    """
    return service.search_text(q, options, long_text)


@router.post(
    "/image", response_model=SearchResponse, responses=UPLOAD_SEARCH_ERRORS, summary="Uploaded image -> images"
)
def search_image(file: Upload, service: ServiceDep, options: ResultOptionsDep) -> SearchResponse:
    """The `k` indexed images most similar to an uploaded image (multipart field `file`), among those the filters
    (query parameters) match; pages and order as for text search (`min_relevance` is for text queries only: 422).

    Example: `curl -F file=@cat.jpg 'http://localhost:8000/api/search/image?k=10&orientation=portrait'`
    """
    return service.search_upload(file.file.read(), options)


@router.post("/combined", response_model=SearchResponse, responses=COMBINED_ERRORS, summary="Weighted query arithmetic")
def search_combined(query: CombinedQuery, service: ServiceDep) -> SearchResponse:
    """Images closest to a weighted sum of unit embeddings of texts and indexed images, e.g. "beach" + "sunset"
    - 0.5 "people". Parts with negative weights push results away from them."""
    return service.search_combined(query)
