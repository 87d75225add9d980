"""Exceptions the server raises on purpose, and the one place that maps them (and the libraries' ones) to HTTP.

Every error body is JSON ``{"detail": "<what went wrong and what to change>"}``; requests that do not fit the schema
get ``{"detail": [{"type", "loc", "msg", "ctx"?}, ...]}`` (status 422), one entry per problem. The offending input is
never echoed back: it may be large, or be what cannot be encoded (NaN, a lone surrogate). Every string in an error
body is made encodable (lone surrogates as ``\\udXXX`` escapes, non-finite numbers as text), so the handlers
themselves cannot fail. A 500 is a bug.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.routing import Match, Mount

from clip_model.errors import ClipModelError, ImageDecodeError, TokenizerError
from indexer.errors import GenerationRetiredError

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # what a 503 for a full inference queue tells the client to wait
PROBED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")  # what a 405's Allow header may list


class SearchServiceError(Exception):
    """Base class: ``status`` is the HTTP status it maps to, the message is the response's ``detail``."""

    status = 500
    headers: dict[str, str] | None = None


class BadRequestError(SearchServiceError):
    """A request that is well-formed but asks for something impossible (e.g. weights that cancel out)."""

    status = 422


class NotFoundError(SearchServiceError):
    """An unknown image id (or one whose file is gone)."""

    status = 404


class ConflictError(SearchServiceError):
    """The request clashes with the server's state (e.g. a reindex is already running)."""

    status = 409


class StaleFileError(SearchServiceError):
    """An indexed file that no longer reads as the image that was indexed (replaced, truncated, unreadable, or too
    many pixels to decode): the index is out of date, or the file needs fixing."""

    status = 409


class PayloadTooLargeError(SearchServiceError):
    """A body over ``max_upload_bytes`` or an image over ``max_image_pixels`` (decompression bomb)."""

    status = 413


class UnsupportedImageError(SearchServiceError):
    """An upload that is not an image, or an image in a format the server does not accept."""

    status = 415


class InvalidImageError(SearchServiceError):
    """An upload in an accepted format whose data cannot be decoded (truncated, corrupt)."""

    status = 422


class UnauthorizedError(SearchServiceError):
    """A missing or wrong API key."""

    status = 401
    headers = {"WWW-Authenticate": "X-API-Key"}


class ForbiddenError(SearchServiceError):
    """An endpoint that is switched off by the settings (admin endpoints without an admin key)."""

    status = 403


class NotReadyError(SearchServiceError):
    """No verified index and model are loaded yet; the message says why (also shown by /readyz)."""

    status = 503
    headers = {"Retry-After": "5"}


class ServiceBusyError(SearchServiceError):
    """The inference queue is full: the client should retry shortly instead of queueing without bound."""

    status = 503
    headers = {"Retry-After": str(RETRY_AFTER_S)}


def json_safe(value: object) -> Any:
    """``value`` as something ``json.dumps(allow_nan=False)`` and UTF-8 encode: lone surrogates escaped, non-finite
    floats as text, containers converted item by item, anything else as its ``str``."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {str(json_safe(key)): json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return json_safe(str(value))


def validation_errors(errors: Iterable[Any]) -> list[dict[str, Any]]:
    """The ``detail`` list of a 422: type, loc, msg and ctx of each problem, without the input."""
    keep = ("type", "loc", "msg", "ctx")
    return [{key: json_safe(error[key]) for key in keep if key in error} for error in errors]


def _error_response(status: int, detail: object, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": json_safe(detail)}, status_code=status, headers=headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """Registered for RequestValidationError: 422 with :func:`validation_errors`."""
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": validation_errors(exc.errors())}, status_code=422)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Registered for Starlette's HTTPException (unknown path, wrong method, unparseable body, ...): its status and
    detail as JSON; a 405 lists in ``Allow`` every method that some route of the path accepts (Starlette's own
    lists only the first route's)."""
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 405 and (allowed := allowed_methods(request)):
        headers["Allow"] = ", ".join(allowed)
    if exc.status_code in (204, 304) or exc.status_code < 200:  # statuses that carry no body
        return Response(status_code=exc.status_code, headers=headers)
    return _error_response(exc.status_code, exc.detail, headers)


def allowed_methods(request: Request) -> list[str]:
    """The methods some route of the app accepts for the request's path (probed through each route's public
    ``matches``; mounts such as the static files are left out, as they take any method)."""
    routes = [route for route in request.app.routes if not isinstance(route, Mount)]
    return [
        method
        for method in PROBED_METHODS
        if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes)
    ]


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    """Registered for SearchServiceError: its ``status``, message and ``headers``."""
    status, headers = getattr(exc, "status", 500), getattr(exc, "headers", None)
    if status >= 500 and not isinstance(exc, NotReadyError | ServiceBusyError):
        logger.error("%s %s failed: %s", request.method, request.url.path, exc)
    return _error_response(status, str(exc), headers)


async def _generation_retired(request: Request, exc: Exception) -> JSONResponse:
    """The served generation was retired by later publishes before the server loaded the published one (it does
    within the reload interval): 503, so the client retries and gets an answer from one generation."""
    return _error_response(503, f"the index was republished: retry ({exc})", {"Retry-After": "1"})


async def _model_input_error(request: Request, exc: Exception) -> JSONResponse:
    """Text or pixels the encoder cannot take (mode it cannot convert, text it cannot tokenize)."""
    return _error_response(422, str(exc))


async def _unexpected_model_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("%s %s: model error", request.method, request.url.path, exc_info=exc)
    return _error_response(500, f"model error: {exc}")


async def _bug(request: Request, exc: Exception) -> JSONResponse:
    """Registered for Exception, which Starlette calls from its outermost middleware and then re-raises (so the
    server still logs the traceback): the 500 gets a JSON body instead of plain text."""
    return _error_response(500, "internal server error: a bug in the server, its log has the details")


def install_error_handlers(app: FastAPI) -> None:
    """Register the mappings above on ``app``."""
    app.add_exception_handler(Exception, _bug)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(SearchServiceError, _service_error)
    app.add_exception_handler(GenerationRetiredError, _generation_retired)
    app.add_exception_handler(ImageDecodeError, _model_input_error)
    app.add_exception_handler(TokenizerError, _model_input_error)
    app.add_exception_handler(ClipModelError, _unexpected_model_error)
