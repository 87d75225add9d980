"""Zero-shot classification: an image and a label set -> probabilities, with prompt ensembling."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form

from ..deps import ReadAccess, ServiceDep
from ..schemas import (
    LABELS_DESCRIPTION,
    MAX_LABELS,
    MAX_TEMPLATES,
    NOT_BLANK,
    TEMPLATES_DESCRIPTION,
    TEXT_FIELD_MAX,
    ClassifyRequest,
    ClassifyResponse,
    Template,
)
from ..strict_json import StrictJSONRoute
from ._common import ID_BODY_ERRORS, UPLOAD_ERRORS
from .search import Upload
from .texts import LongTextForm

router = APIRouter(route_class=StrictJSONRoute, prefix="/api/classify", tags=["zero-shot"], dependencies=[ReadAccess])

FormText = Annotated[str, Form(min_length=1, max_length=TEXT_FIELD_MAX, pattern=NOT_BLANK)]
Labels = Annotated[
    list[FormText],
    Form(
        min_length=1,
        max_length=MAX_LABELS,
        json_schema_extra={"uniqueItems": True},
        description=f"{LABELS_DESCRIPTION}; repeat the field once per label",
    ),
]
# Not nullable: a multipart form has no null (a client sending one would send the text "null"); none means default.
Templates = Annotated[
    list[Template],
    Form(
        default_factory=list,
        max_length=MAX_TEMPLATES,
        description=f"{TEMPLATES_DESCRIPTION}; repeat the field once per template",
    ),
]


@router.post("", response_model=ClassifyResponse, responses=ID_BODY_ERRORS, summary="Classify an indexed image")
def classify(request: ClassifyRequest, service: ServiceDep) -> ClassifyResponse:
    """Probabilities over `labels` for an indexed image. Each label is embedded through every template (default:
    the CLIP paper's 80 ImageNet prompts) and the prompt embeddings are averaged."""
    return service.classify_indexed(request.image_id, request.labels, request.templates, request.long_text)


@router.post("/upload", response_model=ClassifyResponse, responses=UPLOAD_ERRORS, summary="Classify an upload")
def classify_upload(
    file: Upload, labels: Labels, service: ServiceDep, templates: Templates, long_text: LongTextForm = None
) -> ClassifyResponse:
    """Probabilities over `labels` for an uploaded image. Example:
    `curl -F file=@pet.jpg -F labels=cat -F labels=dog http://localhost:8000/api/classify/upload`"""
    return service.classify_upload(file.file.read(), labels, templates or None, long_text)
