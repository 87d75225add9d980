"""Exceptions the server raises on purpose, and the one place that maps them (and the libraries' ones) to HTTP.

Every error body is JSON ``{"detail": "<what went wrong and what to change>"}``; FastAPI's own validation errors
keep their ``{"detail": [...]}`` list form (status 422). A 500 is a bug.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from clip_model.errors import ClipModelError, ImageDecodeError, TokenizerError

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # what a 503 for a full inference queue tells the client to wait


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


def _error_response(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    """Registered for SearchServiceError: its ``status``, message and ``headers``."""
    status, headers = getattr(exc, "status", 500), getattr(exc, "headers", None)
    if status >= 500 and not isinstance(exc, NotReadyError | ServiceBusyError):
        logger.error("%s %s failed: %s", request.method, request.url.path, exc)
    return _error_response(status, str(exc), headers)


async def _model_input_error(request: Request, exc: Exception) -> JSONResponse:
    """Text or pixels the encoder cannot take (mode it cannot convert, text it cannot tokenize)."""
    return _error_response(422, str(exc))


async def _unexpected_model_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("%s %s: model error", request.method, request.url.path, exc_info=exc)
    return _error_response(500, f"model error: {exc}")


def install_error_handlers(app: FastAPI) -> None:
    """Register the mappings above on ``app``."""
    app.add_exception_handler(SearchServiceError, _service_error)
    app.add_exception_handler(ImageDecodeError, _model_input_error)
    app.add_exception_handler(TokenizerError, _model_input_error)
    app.add_exception_handler(ClipModelError, _unexpected_model_error)
