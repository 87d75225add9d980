"""Duplicate groups for the API: found once per (generation, threshold, folder) over the served generation, kept,
and handed out a page at a time.

Contracts:

* Finding the groups compares every image with every other (``indexer.duplicates``), far too slow to redo per
  request: the result is kept for the ``CACHED_RESULTS`` latest (threshold, folder) pairs of the served generation;
  requests for one pair that arrive while it is being found wait for that search instead of starting another.
* A cursor names the generation, threshold, folder and the first group of the next page. The groups of one
  generation and arguments always come in the same order, so pages neither repeat nor skip a group within a
  generation. A cursor from another generation is refused (409: ask again without it), as is one this server did
  not make (422).
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
import time
from dataclasses import dataclass, field

from clip_model.process_tuning import own_threads
from indexer.store.reader import duplicates

from .duplicate_schemas import DuplicateGroup, DuplicateMember, DuplicatesPage
from .errors import BadRequestError, ConflictError
from .runtime import Runtime, Served

CACHED_RESULTS = 8  # (threshold, folder) results kept for the served generation
CURSOR_VERSION = 1

Key = tuple[str, float, str | None]  # generation, threshold, folder


@dataclass(frozen=True)
class Cursor:
    """Where the next page starts: group ``offset`` of the groups of ``generation`` at ``threshold`` (``folder``)."""

    generation: str
    threshold: float
    folder: str | None
    offset: int

    def encode(self) -> str:
        fields = {"v": CURSOR_VERSION, "g": self.generation, "t": self.threshold, "f": self.folder, "o": self.offset}
        return base64.urlsafe_b64encode(json.dumps(fields, separators=(",", ":")).encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        """The cursor ``text`` encodes; BadRequestError when it is not one :meth:`encode` made."""
        try:
            fields = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
            cursor = cls(
                str(fields["g"]), duplicates.check_threshold(float(fields["t"])), fields["f"], int(fields["o"])
            )
            valid = fields["v"] == CURSOR_VERSION and cursor.offset > 0 and isinstance(cursor.folder, str | None)
        except (binascii.Error, UnicodeDecodeError, ValueError, TypeError, KeyError, OverflowError):
            valid = False
        if not valid:
            raise BadRequestError("cursor is not one this server gave out: leave it out to start from the first page")
        return cursor


@dataclass
class _Entry:
    """A result being found (``done`` unset) or found."""

    done: threading.Event = field(default_factory=threading.Event)
    result: duplicates.Duplicates | None = None
    error: BaseException | None = None


class DuplicateFinder:
    """Pages of duplicate groups of the runtime's served generation."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._lock = threading.Lock()
        self._entries: dict[Key, _Entry] = {}  # oldest first

    def page(self, threshold: float | None, folder: str | None, page_size: int, cursor: str | None) -> DuplicatesPage:
        """The page at ``cursor`` (None: the first) of ``page_size`` groups. ``threshold`` and ``folder`` default to
        the cursor's, else to the default threshold and every image."""
        started, state = time.perf_counter(), self.runtime.require()
        folder = None if folder is None or not folder.strip("/") else folder.strip("/")
        position = self._position(state, threshold, folder, cursor)
        if position is not None:
            threshold, folder = position.threshold, position.folder
        elif threshold is None:
            threshold = duplicates.DEFAULT_THRESHOLD
        found = self._found(state, threshold, folder)
        if folder is not None and found.images == 0:
            raise BadRequestError(
                f"no indexed image lies under the folder {folder!r}: give one relative to the image root"
            )
        offset = position.offset if position is not None else 0
        if offset >= len(found.groups):
            raise BadRequestError("cursor is past the last group: leave it out to start from the first page")
        end = offset + page_size
        following = Cursor(state.generation, threshold, folder, end).encode() if end < len(found.groups) else None
        return DuplicatesPage(
            groups=[_group(group) for group in found.groups[offset:end]],
            total_groups=len(found.groups),
            images=found.images,
            threshold=threshold,
            folder=folder,
            generation=found.generation,
            next_cursor=following,
            took_ms=round((time.perf_counter() - started) * 1000, 2),
        )

    def _position(self, state: Served, threshold: float | None, folder: str | None, text: str | None) -> Cursor | None:
        if text is None:
            return None
        cursor = Cursor.decode(text)
        if cursor.generation != state.generation:
            raise ConflictError(
                f"the index changed since this cursor was made (it was {cursor.generation}, it is {state.generation} "
                "now): the groups may have changed, so ask for them again without the cursor"
            )
        if (threshold is not None and threshold != cursor.threshold) or (
            folder is not None and folder != cursor.folder
        ):
            raise BadRequestError(
                f"the cursor continues the groups at threshold {cursor.threshold} and folder {cursor.folder!r}: give "
                "the same or leave threshold and folder out"
            )
        return cursor

    def _found(self, state: Served, threshold: float, folder: str | None) -> duplicates.Duplicates:
        """The groups of (state's generation, threshold, folder): kept, being found by another request, or found
        now on this thread with the server's FAISS thread count."""
        key = (state.generation, threshold, folder)
        with self._lock:
            entry = self._entries.get(key)
            finds = entry is None
            if entry is None:
                entry = self._entries[key] = _Entry()
                self._forget_all_but(key)
        if finds:
            try:
                with own_threads(self.runtime.plan.faiss_threads):
                    entry.result = duplicates.find_duplicates(state.index, threshold, folder)
            except BaseException as exc:
                entry.error = exc
                with self._lock:
                    self._entries.pop(key, None)
                raise
            finally:
                entry.done.set()
        entry.done.wait()
        if entry.result is None:  # the request that was finding them failed: this one fails the same way
            assert entry.error is not None
            raise entry.error
        return entry.result

    def _forget_all_but(self, key: Key) -> None:
        """Drop the results of other generations and the oldest beyond CACHED_RESULTS (called holding the lock)."""
        for old in [k for k in self._entries if k[0] != key[0]]:
            del self._entries[old]
        while len(self._entries) > CACHED_RESULTS:
            del self._entries[next(iter(self._entries))]


def _group(group: duplicates.DuplicateGroup) -> DuplicateGroup:
    members = [DuplicateMember(id=m.id, path=m.path, similarity=m.similarity, kind=m.kind) for m in group.members]
    return DuplicateGroup(kind=group.kind, members=members)
