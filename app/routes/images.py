"""Indexed images by id: metadata, the file, its thumbnail, "more like this", its stored embedding.

Files are looked up by catalog id only, never by a client-supplied path (see ``app.imaging``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from starlette.types import Message, Receive, Scope, Send

from ..deps import ReadAccess, ResultOptionsDep, ServiceDep, SettingsDep
from ..schemas import MAX_ID, DecimalInteger, ErrorResponse, ImageEmbedding, ImageInfo, SearchResponse
from ..strict_json import StrictJSONRoute
from ._common import ID_ERRORS, SIMILAR_ERRORS, errors

router = APIRouter(route_class=StrictJSONRoute, prefix="/api/images", tags=["images"], dependencies=[ReadAccess])

ImageId = Annotated[int, PathParam(ge=0, le=MAX_ID, description="image id from a search result"), DecimalInteger]
FILE_MAX_AGE_S = 3600
THUMBNAIL_MAX_AGE_S = 86400
_IMAGE_RESPONSES = {
    **ID_ERRORS,
    **errors(409),
    200: {"content": {"image/*": {}}, "description": "the image"},
    206: {
        "content": {"image/*": {}, "multipart/byteranges": {}},
        "description": "the byte ranges a Range header asked",
    },
    304: {"description": "not modified (If-None-Match matched the ETag)"},
    400: {"model": ErrorResponse, "description": "malformed Range header"},
    416: {"model": ErrorResponse, "description": "Range beyond the end of the file (Content-Range gives its size)"},
}
RANGE_REFUSALS = {400, 416}


class ImageFileResponse(FileResponse):
    """A FileResponse whose refusals of a Range header (400 malformed, 416 unsatisfiable), which Starlette sends as
    plain text, have a JSON ``{"detail": ...}`` body like every other error (their other headers are kept)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal: Message | None = None

        async def json_refusals(message: Message) -> None:
            nonlocal refusal
            if message["type"] == "http.response.start" and message["status"] in RANGE_REFUSALS:
                refusal = message  # held back until its body says why
                return
            if refusal is None or message["type"] != "http.response.body":
                await send(message)
                return
            reason = message.get("body", b"").decode("utf-8", "replace") or "the Range asks for bytes past the end"
            body = json.dumps({"detail": f"Range header refused: {reason}"}).encode("utf-8")
            kept = [(k, v) for k, v in refusal["headers"] if k.lower() not in (b"content-type", b"content-length")]
            headers = [*kept, (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({**refusal, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await super().__call__(scope, receive, json_refusals)


def _cache_control(settings: SettingsDep, max_age: int) -> str:
    return f"{'private' if settings.api_key else 'public'}, max-age={max_age}"


def _conditional(
    request: Request, path: Path, etag: str, cache_control: str, media_type: str | None, stat: os.stat_result | None
) -> Response:
    headers = {"ETag": etag, "Cache-Control": cache_control}
    if etag in {tag.strip() for tag in request.headers.get("if-none-match", "").split(",")}:
        return Response(status_code=304, headers=headers)
    return ImageFileResponse(path, headers=headers, media_type=media_type, stat_result=stat)


@router.get("/{image_id}", response_model=ImageInfo, responses=ID_ERRORS, summary="Image metadata")
def image_info(image_id: ImageId, service: ServiceDep) -> ImageInfo:
    """Path, size and checksum of an indexed image. Example: `GET /api/images/7`"""
    return service.image_info(image_id)


@router.get("/{image_id}/file", response_class=FileResponse, responses=_IMAGE_RESPONSES, summary="The image file")
def image_file(image_id: ImageId, request: Request, service: ServiceDep, settings: SettingsDep) -> Response:
    """The original file, with an ETag (size + mtime) for conditional requests. Example: `GET /api/images/7/file`"""
    path, stat = service.image_file(image_id)
    etag = f'"{stat.st_size:x}-{stat.st_mtime_ns:x}"'
    return _conditional(request, path, etag, _cache_control(settings, FILE_MAX_AGE_S), None, stat)


@router.get("/{image_id}/thumbnail", response_class=FileResponse, responses=_IMAGE_RESPONSES, summary="Thumbnail")
def thumbnail(
    image_id: ImageId,
    request: Request,
    service: ServiceDep,
    settings: SettingsDep,
    size: Annotated[
        int | None,
        Query(ge=16, le=1024, description="side in pixels, rounded up to 64, 128, 256, 512 or 1024"),
        DecimalInteger,
    ] = None,
) -> Response:
    """A JPEG fitted in `size` x `size`, generated once and cached. Example: `GET /api/images/7/thumbnail?size=256`"""
    path, key = service.thumbnail(image_id, size)
    return _conditional(request, path, f'"{key}"', _cache_control(settings, THUMBNAIL_MAX_AGE_S), "image/jpeg", None)


@router.get("/{image_id}/similar", response_model=SearchResponse, responses=SIMILAR_ERRORS, summary="More like this")
def similar(image_id: ImageId, service: ServiceDep, options: ResultOptionsDep) -> SearchResponse:
    """Images most similar to an indexed one, from its stored embedding (nothing is re-encoded), among those the
    filters match; the image itself is left out. Pages and order as for text search (`min_relevance` is for text
    queries only: 422). Example: `GET /api/images/7/similar?k=20&folder=2023`"""
    return service.similar(image_id, options)


@router.get("/{image_id}/embedding", response_model=ImageEmbedding, responses=ID_ERRORS, summary="Stored embedding")
def image_embedding(image_id: ImageId, service: ServiceDep) -> ImageEmbedding:
    """The unit-norm embedding the index holds for an image. Example: `GET /api/images/7/embedding`"""
    return service.image_embedding(image_id)
