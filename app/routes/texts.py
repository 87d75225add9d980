"""Image -> text: the texts that best describe an image, from the indexed corpus or from given candidates."""

from __future__ import annotations

from typing import Annotated, get_args

from fastapi import APIRouter, Form, Query
from pydantic import WithJsonSchema

from clip_model import LongText

from ..deps import ReadAccess, ServiceDep
from ..schemas import (
    LONG_TEXT_DESCRIPTION,
    MAX_K,
    MAX_LABELS,
    NOT_BLANK,
    TEXT_FIELD_MAX,
    DecimalInteger,
    DescribeRequest,
    TextsResponse,
)
from ..strict_json import StrictJSONRoute
from ._common import ID_BODY_ERRORS, UPLOAD_ERRORS
from .search import Upload

router = APIRouter(
    route_class=StrictJSONRoute, prefix="/api/describe", tags=["image to text"], dependencies=[ReadAccess]
)

# The long-text mode as a multipart form field, for the upload routes (the JSON bodies carry it as a field). Left
# out, the server's setting applies; the schema offers the modes only, since a form has no way to send a null.
LongTextForm = Annotated[
    LongText | None,
    Form(description=LONG_TEXT_DESCRIPTION),
    WithJsonSchema({"type": "string", "enum": list(get_args(LongText)), "description": LONG_TEXT_DESCRIPTION}),
]
Candidates = Annotated[
    list[Annotated[str, Form(min_length=1, max_length=TEXT_FIELD_MAX, pattern=NOT_BLANK)]] | None,
    Form(max_length=MAX_LABELS, description="repeat the field once per candidate text; default: the indexed corpus"),
]


@router.post("", response_model=TextsResponse, responses=ID_BODY_ERRORS, summary="Indexed image -> texts")
def describe(request: DescribeRequest, service: ServiceDep) -> TextsResponse:
    """Top-k texts for an indexed image, by its stored embedding."""
    return service.describe_indexed(request.image_id, request.candidates, request.k, request.long_text)


@router.post("/upload", response_model=TextsResponse, responses=UPLOAD_ERRORS, summary="Uploaded image -> texts")
def describe_upload(
    file: Upload,
    service: ServiceDep,
    candidates: Candidates = None,
    k: Annotated[int, Query(ge=1, le=MAX_K), DecimalInteger] = 10,
    long_text: LongTextForm = None,
) -> TextsResponse:
    """Top-k texts for an uploaded image. Example:
    `curl -F file=@cat.jpg -F candidates='a cat' -F candidates='a dog' 'http://localhost:8000/api/describe/upload'`
    """
    return service.describe_upload(file.file.read(), candidates, k, long_text)
