"""OpenAPI declarations shared by the routers: the error responses each kind of endpoint can give."""

from __future__ import annotations

from typing import Any

from ..schemas import ErrorResponse

_ERRORS: dict[int, str] = {
    400: "the body cannot be parsed as multipart form data (no boundary, broken framing, too many or too large parts)",
    401: "missing or wrong API key",
    403: "switched off by the server's settings",
    404: "unknown image id, or its file is gone",
    409: "conflicts with the server's state: a reindex already runs (admin), or the indexed file no longer reads as "
    "an image (changed since it was indexed: run the indexer)",
    413: "body over the upload limit, or an image with too many pixels",
    415: "not an image, or a format the server does not accept",
    422: "invalid parameters or undecodable image",
    503: "not ready (see /readyz) or busy (retry after the Retry-After header)",
}


_PAGED_ERRORS: dict[int, str] = {
    409: "the cursor is of an index generation no longer served: ask again without it",
    422: "invalid parameters, a folder, camera or format no indexed image has (GET /api/facets lists them), or a "
    "cursor this server did not give for this list",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: the given statuses with the error body and their meaning."""
    return {status: {"model": ErrorResponse, "description": _ERRORS[status]} for status in statuses}


def paged(responses: dict[int | str, dict[str, Any]]) -> dict[int | str, dict[str, Any]]:
    """``responses`` of a route that pages with a cursor and takes filters: its 409 and 422 say so."""
    said: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorResponse, "description": text} for status, text in _PAGED_ERRORS.items()
    }
    return {**responses, **said}


QUERY_ERRORS = errors(401, 422, 503)
ID_ERRORS = errors(401, 404, 422, 503)
# routes that read a JSON body: the body limit applies (413)
TEXTS_BODY_ERRORS = errors(401, 413, 422, 503)
ID_BODY_ERRORS = errors(401, 404, 413, 422, 503)
UPLOAD_ERRORS = errors(400, 401, 413, 415, 422, 503)
SEARCH_ERRORS = paged(QUERY_ERRORS)
SIMILAR_ERRORS = paged(ID_ERRORS)
UPLOAD_SEARCH_ERRORS = paged(UPLOAD_ERRORS)
COMBINED_ERRORS = paged(ID_BODY_ERRORS)
