"""JSON request bodies, read strictly: UTF-8 text (RFC 8259), finite numbers, valid Unicode strings.

Python's ``json`` module accepts ``NaN``, ``Infinity`` and ``-Infinity``, turns ``1e400`` into ``inf``, reads
``"\\ud800"`` as a lone surrogate and guesses UTF-16/32 from the bytes. A body with any of these anywhere (values or
object keys) is refused with a 422 whose ``detail`` has the shape of a validation error, ``loc`` naming the place
(``["body", "parts", 0, "weight"]``), so no handler downstream ever holds a value it cannot encode. Syntax errors
stay FastAPI's own 422 (``json_invalid``). Every APIRouter of the app is made with ``route_class=StrictJSONRoute``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.routing import APIRoute

Location = tuple[str | int, ...]


def _refusal(kind: str, loc: Location, msg: str) -> HTTPException:
    return HTTPException(status_code=422, detail=[{"type": kind, "loc": ["body", *loc], "msg": msg}])


def _valid_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return True


def _find_invalid(document: Any) -> tuple[str, Location, str] | None:
    """The first non-finite number or invalid string in a parsed document: (type, loc, message), or None.
    Walks with an explicit stack, so a deeply nested document cannot exhaust the interpreter's recursion."""
    stack: list[tuple[Any, Location]] = [(document, ())]
    while stack:
        value, loc = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return "finite_number", loc, f"{value} is not a JSON number: numbers must be finite"
        if isinstance(value, str) and not _valid_text(value):
            return "string_unicode", loc, "string holds a lone surrogate (e.g. \\ud800): not valid Unicode text"
        if isinstance(value, dict):
            for key, item in value.items():
                if not _valid_text(key):
                    return "string_unicode", loc, "an object key holds a lone surrogate: not valid Unicode text"
                stack.append((item, (*loc, key)))
        elif isinstance(value, list):
            stack.extend((item, (*loc, index)) for index, item in enumerate(value))
    return None


def parse_strict_json(body: bytes) -> Any:
    """The document in ``body``. Raises json.JSONDecodeError for bad syntax, HTTPException 422 (validation-error
    shape) for text that is not UTF-8, nesting too deep to parse, a number Python refuses (an integer of thousands
    of digits), a non-finite number or a lone surrogate."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _refusal(
            "json_invalid", (exc.start,), f"the body is not UTF-8 text: {exc.reason} at byte {exc.start}"
        ) from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError:  # a ValueError too: left to FastAPI, which answers its own 422 (json_invalid)
        raise
    except RecursionError:
        raise _refusal("json_invalid", (), "the JSON document is nested too deeply") from None
    except ValueError as exc:  # e.g. an integer literal over Python's int conversion limit
        raise _refusal("json_invalid", (), f"the JSON document cannot be read: {exc}") from None
    invalid = _find_invalid(document)
    if invalid is not None:
        raise _refusal(*invalid)
    return document


class StrictJSONRequest(Request):
    """A request whose ``json()`` is :func:`parse_strict_json` of the body (parsed once)."""

    _strict_json: Any

    async def json(self) -> Any:
        if not hasattr(self, "_strict_json"):
            self._strict_json = parse_strict_json(await self.body())
        return self._strict_json


class StrictJSONRoute(APIRoute):
    """An API route that reads JSON bodies with :class:`StrictJSONRequest` (FastAPI re-raises the HTTPException
    that ``json()`` raises, so the refusal reaches the app's handler unchanged)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_handler
