"""FastAPI dependencies as ``Annotated`` aliases: the services, the settings, the API key checks, and the options
every image search takes for its results (:func:`result_options`)."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Header, Query, Request
from pydantic import SecretStr

from .duplicates_service import DuplicateFinder
from .errors import ForbiddenError, UnauthorizedError
from .paging import Sort
from .reindex import Reindexer
from .schemas import (
    CURSOR_DESCRIPTION,
    K_FIELD,
    MAX_CURSOR_CHARS,
    MAX_K,
    MIN_RELEVANCE_FIELD,
    MIN_SCORE_FIELD,
    SORT_DESCRIPTION,
    DecimalInteger,
    QueryFilters,
)
from .service import ResultOptions, SearchService
from .settings import Settings

API_KEY_HEADER = "X-API-Key"


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_service(request: Request) -> SearchService:
    service: SearchService = request.app.state.service
    return service


def get_reindexer(request: Request) -> Reindexer:
    reindexer: Reindexer = request.app.state.reindexer
    return reindexer


def get_duplicates(request: Request) -> DuplicateFinder:
    finder: DuplicateFinder = request.app.state.duplicates
    return finder


SettingsDep = Annotated[Settings, Depends(get_settings)]
ServiceDep = Annotated[SearchService, Depends(get_service)]
ReindexerDep = Annotated[Reindexer, Depends(get_reindexer)]
DuplicatesDep = Annotated[DuplicateFinder, Depends(get_duplicates)]
K = Annotated[int, Query(ge=1, le=MAX_K, description=K_FIELD.description), DecimalInteger]
MinScore = Annotated[float | None, Query(ge=-1.0, le=1.0, allow_inf_nan=False, description=MIN_SCORE_FIELD.description)]
MinRelevance = Annotated[
    float | None, Query(ge=0.0, le=1.0, allow_inf_nan=False, description=MIN_RELEVANCE_FIELD.description)
]
Filters = Annotated[QueryFilters, Query()]
SortParam = Annotated[Sort, Query(description=SORT_DESCRIPTION)]
CursorParam = Annotated[str | None, Query(min_length=1, max_length=MAX_CURSOR_CHARS, description=CURSOR_DESCRIPTION)]


def result_options(
    filters: Filters,
    k: K = 20,
    min_score: MinScore = None,
    min_relevance: MinRelevance = None,
    sort: SortParam = "relevance",
    cursor: CursorParam = None,
) -> ResultOptions:
    """The query parameters every image search takes for its results: page size, cut-offs, filters, order, cursor
    (a JSON body carries the same fields: :class:`app.schemas.CombinedQuery`)."""
    return ResultOptions(k, min_score, filters, sort, cursor, min_relevance)


ResultOptionsDep = Annotated[ResultOptions, Depends(result_options)]
KeyHeader = Annotated[str | None, Header(alias=API_KEY_HEADER, description="API key, when the server has one")]
KeyQuery = Annotated[
    str | None, Query(alias="api_key", description="API key for clients that cannot set headers (<img src>)")
]


def _utf8(text: str) -> bytes:
    """UTF-8 bytes of any str: surrogate escapes (from os.environ) back to their bytes, other surrogates as is."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def header_bytes(value: str) -> bytes:
    """The bytes a header value arrived as: ASGI servers give them latin-1 decoded, one character per byte."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:  # not from an ASGI header (a direct call): its UTF-8 form
        return _utf8(value)


def _matches(given: bytes | None, *keys: SecretStr | None) -> bool:
    """Whether ``given`` is the UTF-8 form of one of ``keys``, compared in constant time. Bytes, not str:
    ``compare_digest`` refuses str with non-ASCII characters, and a header may hold any bytes."""
    if given is None:
        return False
    return any(key is not None and secrets.compare_digest(given, _utf8(key.get_secret_value())) for key in keys)


def _sent_key(header: str | None, query: str | None) -> bytes | None:
    if header is not None:
        return header_bytes(header)
    return _utf8(query) if query is not None else None


def require_read_key(settings: SettingsDep, header: KeyHeader = None, query: KeyQuery = None) -> None:
    """With ``CLIPSEARCH_API_KEY`` set, the request must carry it (or the admin key), in the header or the query."""
    if settings.api_key is None:
        return
    if not _matches(_sent_key(header or None, query), settings.api_key, settings.admin_api_key):
        raise UnauthorizedError(f"this server needs an API key: send it in the {API_KEY_HEADER} header")


def require_admin_key(settings: SettingsDep, header: KeyHeader = None) -> None:
    """Admin endpoints are off unless ``CLIPSEARCH_ADMIN_API_KEY`` is set, and then need that key (header only)."""
    if settings.admin_api_key is None:
        raise ForbiddenError("admin endpoints are disabled: set CLIPSEARCH_ADMIN_API_KEY to enable them")
    if not _matches(_sent_key(header, None), settings.admin_api_key):
        raise UnauthorizedError(f"this endpoint needs the admin API key in the {API_KEY_HEADER} header")


ReadAccess = Depends(require_read_key)
AdminAccess = Depends(require_admin_key)
