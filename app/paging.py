"""Pages of result lists: the order of a search's results, and the one cursor format every paged list uses.

Contracts:

* A search ranks at most ``MAX_DEPTH`` results (those above the request's cut-off, among the images its filters
  match). ``sort=relevance`` orders them by score, best first; ``newest`` / ``oldest`` by capture time (then by
  score), so a date order covers the best ``MAX_DEPTH`` results, not the whole collection.
* Ties are broken by id, so the same query over the same generation gives the same list; a page is a slice of it.
* A cursor (search results, duplicate groups) is opaque to clients: the generation its list is of, the offset of the
  next page, a fingerprint of what identifies the list (query, filters, cut-off, sort; threshold and folder), the
  parameters it carries for requests that leave them out (duplicates), and a checksum of all that, so that an
  edited cursor is refused. The checksum is not a signature: every field is checked anyway, so a cursor made by
  hand can only ask for a page that the same request could reach by paging.
* Refusals: a token that is not a cursor this server made, or one used with another list, is a 422; a cursor of
  another generation is a 409 that says to ask again without it (the list may have changed).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from indexer.store.reader import Hit

from .errors import BadRequestError, ConflictError

Sort = Literal["relevance", "newest", "oldest"]
SORTS: tuple[Sort, ...] = ("relevance", "newest", "oldest")
MAX_DEPTH = 10_000  # results a search ranks: pages reach this far, and a date order covers this many
CURSOR_VERSION = 2
CHECKSUM_CHARS = 16  # hex digits of the cursor's checksum
NOT_A_CURSOR = "cursor is not one this server gave out: leave it out to start from the first page"
Carried = dict[str, str | float | None]


@dataclass(frozen=True)
class Cursor:
    """Where the next page starts: ``offset`` into the list of ``generation`` that ``query`` (a :func:`fingerprint`)
    identifies; ``carried``: parameters of the list that a request sending the cursor may leave out."""

    generation: str
    offset: int
    query: str
    carried: Carried = field(default_factory=dict)

    def encode(self) -> str:
        fields: dict[str, Any] = {"v": CURSOR_VERSION, "g": self.generation, "o": self.offset, "q": self.query}
        if self.carried:
            fields["p"] = self.carried
        fields["c"] = _checksum(fields)
        text = json.dumps(fields, separators=(",", ":"), ensure_ascii=False)
        return base64.urlsafe_b64encode(text.encode("utf-8", "surrogatepass")).decode("ascii").rstrip("=")

    @classmethod
    def decode(cls, token: str) -> Cursor:
        """The cursor ``token`` encodes; BadRequestError (422) when it is not one :meth:`encode` made, or was edited."""
        try:
            data = base64.urlsafe_b64decode((token + "=" * (-len(token) % 4)).encode("ascii"))
            fields = json.loads(data.decode("utf-8", "surrogatepass"))
            checksum = fields.pop("c")
            cursor = cls(fields["g"], fields["o"], fields["q"], fields.get("p", {}))
            valid = (
                fields.get("v") == CURSOR_VERSION
                and checksum == _checksum(fields)
                and isinstance(cursor.generation, str)
                and isinstance(cursor.query, str)
                and type(cursor.offset) is int
                and cursor.offset > 0
                and isinstance(cursor.carried, dict)
            )
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeError, binascii.Error, RecursionError):
            valid = False
        if not valid:
            raise BadRequestError(NOT_A_CURSOR)
        return cursor

    def offset_in(self, generation: str, query: str) -> int:
        """The offset, once the cursor is checked against the served ``generation`` (409) and the ``query``
        fingerprint of the request (422)."""
        if self.query != query:
            raise BadRequestError(
                "cursor belongs to another query (text, image, filters, cut-off, sort, threshold or folder changed): "
                "send the same parameters as for the first page, or leave the cursor out"
            )
        if self.generation != generation:
            raise ConflictError(
                f"the index changed since this cursor was made (it was {self.generation}, it is {generation} now): "
                "search again without the cursor, as the results may have changed"
            )
        return self.offset


def _checksum(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[
        :CHECKSUM_CHARS
    ]


def fingerprint(*parts: Any) -> str:
    """A short digest of what identifies a list (JSON-serializable parts, in a fixed order)."""
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:24]


def open_cursor(token: str | None, generation: str, query: str) -> int:
    """The offset a search request starts at: 0 without a cursor, else the cursor's, once it is checked against the
    served ``generation`` and the request's ``query`` fingerprint (and lies within ``MAX_DEPTH``)."""
    if token is None:
        return 0
    offset = Cursor.decode(token).offset_in(generation, query)
    if offset >= MAX_DEPTH:
        raise BadRequestError(NOT_A_CURSOR)
    return offset


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
