"""Embeddings for people who build on top: text or image -> the served model's unit vector."""

from __future__ import annotations

from fastapi import APIRouter

from ..deps import ReadAccess, ServiceDep
from ..schemas import EmbeddingResponse, EmbedTextRequest
from ..strict_json import StrictJSONRoute
from ._common import TEXTS_BODY_ERRORS, UPLOAD_ERRORS
from .search import Upload

router = APIRouter(route_class=StrictJSONRoute, prefix="/api/embed", tags=["embeddings"], dependencies=[ReadAccess])


@router.post("/text", response_model=EmbeddingResponse, responses=TEXTS_BODY_ERRORS, summary="Texts -> embeddings")
def embed_text(request: EmbedTextRequest, service: ServiceDep) -> EmbeddingResponse:
    """One unit-norm row per text, in the order given. Texts over the model's context are cut (`truncated`) or, with
    `long_text: "chunk"`, encoded as overlapping windows whose embeddings are averaged (`chunks`)."""
    return service.embed_texts(request.texts, request.long_text)


@router.post("/image", response_model=EmbeddingResponse, responses=UPLOAD_ERRORS, summary="Image -> embedding")
def embed_image(file: Upload, service: ServiceDep) -> EmbeddingResponse:
    """The unit-norm embedding of an uploaded image. Example: `curl -F file=@cat.jpg .../api/embed/image`"""
    return service.embed_upload(file.file.read())
