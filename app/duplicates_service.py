"""Duplicate groups for the API: found once per (generation, threshold, folder) over the served generation, kept,
and handed out a page at a time.

Contracts:

* Finding the groups compares every image with every other (``indexer.duplicates``), far too slow to redo per
  request: the result is kept for the ``CACHED_RESULTS`` latest (threshold, folder) pairs of the served generation;
  requests for one pair that arrive while it is being found wait for that search instead of starting another.
* Pages are continued by the cursor of :mod:`app.paging` (the one format of every paged list), which carries the
  threshold and folder, so a request with a cursor may leave them out. The groups of one generation and arguments
  always come in the same order, so pages neither repeat nor skip a group within a generation. A cursor from another
  generation is refused (409: ask again without it), as is one this server did not make or one past the last group
  (422).
* A folder that holds no indexed image is refused (422) as a search's folder filter is (:mod:`app.facets`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from clip_model.process_tuning import own_threads
from indexer.store.reader import duplicates

from .duplicate_schemas import DuplicateGroup, DuplicateMember, DuplicatesPage
from .errors import BadRequestError
from .facets import FacetCache, check_filters
from .paging import NOT_A_CURSOR, Cursor, fingerprint
from .runtime import Runtime, Served
from .schemas import SearchFilters

CACHED_RESULTS = 8  # (threshold, folder) results kept for the served generation

Key = tuple[str, float, str | None]  # generation, threshold, folder


@dataclass(frozen=True)
class _Position:
    """Where a request's page starts: the groups at ``threshold`` (``folder``), from group ``offset``."""

    threshold: float
    folder: str | None
    offset: int


def _list_of(threshold: float, folder: str | None) -> str:
    """The fingerprint of the groups at ``threshold`` and ``folder`` (:func:`app.paging.fingerprint`)."""
    return fingerprint("duplicates", threshold, folder)


@dataclass
class _Entry:
    """A result being found (``done`` unset) or found."""

    done: threading.Event = field(default_factory=threading.Event)
    result: duplicates.Duplicates | None = None
    error: BaseException | None = None


class DuplicateFinder:
    """Pages of duplicate groups of the runtime's served generation."""

    def __init__(self, runtime: Runtime, facets: FacetCache) -> None:
        self.runtime = runtime
        self.facets = facets
        self._lock = threading.Lock()
        self._entries: dict[Key, _Entry] = {}  # oldest first

    def page(self, threshold: float | None, folder: str | None, page_size: int, cursor: str | None) -> DuplicatesPage:
        """The page at ``cursor`` (None: the first) of ``page_size`` groups. ``threshold`` and ``folder`` default to
        the cursor's, else to the default threshold and every image."""
        started, state = time.perf_counter(), self.runtime.require()
        folder = None if folder is None or not folder.strip("/") else folder.strip("/")
        if folder is not None:
            check_filters(self.facets, state, SearchFilters(folder=[folder]))
        position = self._position(state, threshold, folder, cursor)
        found = self._found(state, position.threshold, position.folder)
        if position.offset and position.offset >= len(found.groups):
            raise BadRequestError("cursor is past the last group: leave it out to start from the first page")
        end = position.offset + page_size
        following = None
        if end < len(found.groups):
            carried = {"threshold": position.threshold, "folder": position.folder}
            following = Cursor(state.generation, end, _list_of(position.threshold, position.folder), carried).encode()
        return DuplicatesPage(
            groups=[_group(group) for group in found.groups[position.offset : end]],
            total_groups=len(found.groups),
            images=found.images,
            threshold=position.threshold,
            folder=position.folder,
            generation=found.generation,
            next_cursor=following,
            took_ms=round((time.perf_counter() - started) * 1000, 2),
        )

    def _position(self, state: Served, threshold: float | None, folder: str | None, text: str | None) -> _Position:
        """The first page's position for the arguments, or the cursor's, checked against them and the generation."""
        if text is None:
            return _Position(duplicates.DEFAULT_THRESHOLD if threshold is None else threshold, folder, 0)
        cursor = Cursor.decode(text)
        kept_threshold, kept_folder = cursor.carried.get("threshold"), cursor.carried.get("folder", 0.0)
        # a search's cursor carries neither; one made by hand may carry anything
        if not isinstance(kept_threshold, float) or not isinstance(kept_folder, str | None):
            raise BadRequestError(NOT_A_CURSOR)
        try:
            duplicates.check_threshold(kept_threshold)
        except ValueError:
            raise BadRequestError(NOT_A_CURSOR) from None
        if (threshold is not None and threshold != kept_threshold) or (folder is not None and folder != kept_folder):
            raise BadRequestError(
                f"the cursor continues the groups at threshold {kept_threshold} and folder {kept_folder!r}: give "
                "the same or leave threshold and folder out"
            )
        offset = cursor.offset_in(state.generation, _list_of(kept_threshold, kept_folder))
        return _Position(kept_threshold, kept_folder, offset)

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
