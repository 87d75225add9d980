"""Pages of search results: the order of a result list and the cursor that continues it.

Contracts:

* A search ranks at most ``MAX_DEPTH`` results (those above the request's cut-off, among the images its filters
  match). ``sort=relevance`` orders them by score, best first; ``newest`` / ``oldest`` by capture time (then by
  score), so a date order covers the best ``MAX_DEPTH`` results, not the whole collection.
* Ties are broken by id, so the same query over the same generation gives the same list; a page is a slice of it.
* A cursor is opaque to clients: the generation it was made for, the offset of the next page, and a fingerprint
  of the query (text, image, filters, cut-off, sort). Using it with another query is a 422; with another generation
  a 409 that says to search again (the list may have changed).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from indexer.store.reader import Hit

from .errors import BadRequestError, ConflictError

Sort = Literal["relevance", "newest", "oldest"]
SORTS: tuple[Sort, ...] = ("relevance", "newest", "oldest")
MAX_DEPTH = 10_000  # results a search ranks: pages reach this far, and a date order covers this many
CURSOR_VERSION = 1


@dataclass(frozen=True)
class Cursor:
    """Where the next page starts: ``offset`` into the list of ``generation`` for the query ``fingerprint``."""

    generation: str
    offset: int
    fingerprint: str

    def encode(self) -> str:
        data = {"v": CURSOR_VERSION, "g": self.generation, "o": self.offset, "q": self.fingerprint}
        return base64.urlsafe_b64encode(json.dumps(data, separators=(",", ":")).encode()).decode().rstrip("=")


def fingerprint(*parts: Any) -> str:
    """A short digest of what identifies a query (JSON-serializable parts, in a fixed order)."""
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:24]


def open_cursor(token: str | None, generation: str, query: str) -> int:
    """The offset a request starts at: 0 without a cursor, else the cursor's, once it is checked against the served
    ``generation`` and the request's ``query`` fingerprint."""
    if token is None:
        return 0
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
        cursor = Cursor(str(data["g"]), int(data["o"]), str(data["q"]))
        if data.get("v") != CURSOR_VERSION or not 0 < cursor.offset < MAX_DEPTH:
            raise ValueError("unknown version or offset")
    except (ValueError, KeyError, TypeError, UnicodeError, binascii.Error):
        raise BadRequestError(
            "cursor is not one this server gave out: leave it out to start from the first page"
        ) from None
    if cursor.fingerprint != query:
        raise BadRequestError("cursor belongs to another query (text, image, filters, cut-off or sort changed)")
    if cursor.generation != generation:
        raise ConflictError(
            f"the index changed since this cursor was made (it was {cursor.generation}, it is {generation} now): "
            "search again without the cursor"
        )
    return cursor.offset


def depth(offset: int, k: int, sort: Sort) -> int:
    """How many results to rank for the page at ``offset`` of size ``k``: all of them for a date order."""
    return MAX_DEPTH if sort != "relevance" else min(MAX_DEPTH, offset + k)


def ordered(hits: list[Hit], sort: Sort, taken_at: npt.NDArray[np.int64] | None) -> list[Hit]:
    """``hits`` in the page order of ``sort`` (``taken_at`` [len(hits)]: their capture times, for a date order)."""
    if sort == "relevance" or taken_at is None:
        return sorted(hits, key=lambda hit: (-hit.score, hit.id))
    sign = -1 if sort == "newest" else 1
    order = sorted(range(len(hits)), key=lambda i: (sign * int(taken_at[i]), -hits[i].score, hits[i].id))
    return [hits[i] for i in order]


def next_cursor(generation: str, offset: int, k: int, ranked: int, complete: bool, query: str) -> str | None:
    """The cursor of the page after ``offset..offset+k`` of a list of ``ranked`` results (``complete``: the list
    holds every result there is, else more may follow it), or None when that page would be past the end."""
    following = offset + k
    more = following < ranked or (following == ranked and not complete)
    return Cursor(generation, following, query).encode() if more and following < MAX_DEPTH else None
