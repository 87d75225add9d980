"""The values the served generation holds for the filters that take names (folders, cameras, formats) and the span
of its capture times, found once per generation; and the check that a request's filters name something there.

Contracts:

* Facets come from the generation's :class:`PhotoColumns` (the columns filtered searches read anyway), once per
  generation: the latest generation's are kept, and concurrent first requests wait for one computation.
* A response lists every camera and format, and a page of folders (:class:`FolderQuery`): those whose path starts
  with a prefix, ignoring case, in path order, with how many match in all. The folders are kept sorted by their
  casefolded paths, so a prefix is a range of them, found by bisection, and a page costs that range, not the library.
* A folder, camera or format value is known when, alone, it matches at least one image of the generation. That is
  decided by the store's own rule (``PhotoColumns.mask``) over one representative image per distinct folder, camera
  and format, so what the API accepts and what a search matches cannot drift apart. A request naming an unknown
  value is refused (422) with the close known values and where to list them all (``GET /api/facets``); a
  combination of known values that matches no image is a valid filter, whose search has no results.
"""

from __future__ import annotations

import bisect
import dataclasses
import difflib
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from indexer.store.reader import PhotoColumns, SearchFilter

from .errors import BadRequestError
from .facet_schemas import CaptureTimes, Facets, FacetValue, FolderQuery
from .runtime import Served
from .schemas import SearchFilters, clock_text

SUGGESTIONS = 3  # close known values named in a refusal
SIMILARITY_CUTOFF = 0.6  # difflib ratio from which a known value is close to an unknown one
COMPARED_NAMES = 1000  # known values a refusal compares with the unknown one: its neighbours in sorted order
FACETS_HINT = "GET /api/facets lists them all"
NONE_KNOWN = {  # what an index with no value at all for a filter says
    "folder": "every indexed image lies directly in the image root",
    "camera": "no indexed image has a camera make or model in its EXIF",
    "format": "the index holds no image",
}


@dataclass(frozen=True, eq=False)
class GenerationFacets:
    """One generation's facets, every folder listed (what :func:`check_filters` compares with), its representative
    images, and its folders by casefolded path, for :meth:`listing`."""

    described: Facets
    representatives: PhotoColumns  # an image of each distinct folder, camera and format
    folded: list[str]  # the folders' paths casefolded, sorted: the folders starting with a prefix are a range
    folded_ranks: npt.NDArray[np.int64]  # [len(folded)] where each of ``folded`` is in ``described.folders``

    def listing(self, query: FolderQuery) -> Facets:
        """The response to ``query``: its page of folders (in path order), how many match its prefix, and every
        camera and format."""
        start, stop = _prefix_range(self.folded, query.prefix.lstrip("/").casefold())
        ranks = self.folded_ranks[start:stop]
        if query.after is not None:
            ranks = ranks[ranks >= bisect.bisect_right(self.described.folders, query.after, key=lambda f: f.value)]
        truncated = len(ranks) > query.limit
        if truncated:
            ranks = np.partition(ranks, query.limit - 1)[: query.limit]  # the first ``limit`` in path order
        folders = [self.described.folders[rank] for rank in np.sort(ranks).tolist()]
        update = {"folders": folders, "folders_matched": stop - start, "folders_truncated": truncated}
        return self.described.model_copy(update=update)


class FacetCache:
    """The facets of the latest generation asked about."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: GenerationFacets | None = None

    def of(self, state: Served) -> GenerationFacets:
        """The facets of ``state``'s generation, found on first use (under the lock: found once)."""
        with self._lock:
            if self._kept is None or self._kept.described.generation != state.generation:
                self._kept = _facets(state.generation, state.index.photo_columns())
            return self._kept


def _facets(generation: str, columns: PhotoColumns) -> GenerationFacets:
    folders = _folder_counts(columns.folders, columns.folder_codes)
    described = Facets(
        generation=generation,
        images=len(columns),
        folders=folders,
        folders_matched=len(folders),
        folders_truncated=False,
        cameras=_by_count(columns.cameras, columns.camera_codes),
        formats=_by_count(columns.formats, columns.format_codes),
        taken=_capture_times(columns),
    )
    folded = [folder.value.casefold() for folder in folders]
    ranks = sorted(range(len(folded)), key=folded.__getitem__)
    return GenerationFacets(
        described, _representatives(columns), [folded[rank] for rank in ranks], np.array(ranks, dtype=np.int64)
    )


def _prefix_range(ordered: list[str], prefix: str) -> tuple[int, int]:
    """The range of ``ordered`` (sorted) that starts with ``prefix``: bisected, as it is one run."""
    start = bisect.bisect_left(ordered, prefix)
    stop = bisect.bisect_left(ordered, True, lo=start, key=lambda name: not name.startswith(prefix))
    return start, stop


def _counts(names: Sequence[str], codes: npt.NDArray[np.int32]) -> list[int]:
    """Images per code (rows without a value, ``codes`` < 0, left out)."""
    return [int(n) for n in np.bincount(codes[codes >= 0], minlength=len(names))]


def _folder_counts(folders: Sequence[str], codes: npt.NDArray[np.int32]) -> list[FacetValue]:
    """Every folder that holds images, directly or below, with its images and its subfolders', in path order (the
    image root, which every image is under, left out)."""
    totals: dict[str, int] = {}
    for folder, count in zip(folders, _counts(folders, codes), strict=True):
        parts = folder.split("/") if folder else []
        for depth in range(1, len(parts) + 1):
            ancestor = "/".join(parts[:depth])
            totals[ancestor] = totals.get(ancestor, 0) + count
    return [FacetValue(value=name, images=totals[name]) for name in sorted(totals)]


def _by_count(names: Sequence[str], codes: npt.NDArray[np.int32]) -> list[FacetValue]:
    pairs = [(name, count) for name, count in zip(names, _counts(names, codes), strict=True) if count]
    return [FacetValue(value=name, images=count) for name, count in sorted(pairs, key=lambda p: (-p[1], p[0]))]


def _capture_times(columns: PhotoColumns) -> CaptureTimes | None:
    if not len(columns):
        return None
    return CaptureTimes(
        earliest=clock_text(int(columns.taken_at.min())),
        latest=clock_text(int(columns.taken_at.max())),
        from_exif=int(columns.taken_from_exif.sum()),
    )


def _representatives(columns: PhotoColumns) -> PhotoColumns:
    """A row of ``columns`` for each folder, camera and format code there is (every column kept)."""
    rows = np.unique(np.concatenate([_a_row_each(columns.folder_codes, len(columns.folders)),
                                     _a_row_each(columns.camera_codes, len(columns.cameras)),
                                     _a_row_each(columns.format_codes, len(columns.formats))]))  # fmt: skip
    arrays: dict[str, Any] = {  # the columns; the string tables stay whole
        column.name: value[rows]
        for column in dataclasses.fields(columns)
        if isinstance(value := getattr(columns, column.name), np.ndarray)
    }
    return dataclasses.replace(columns, **arrays)


def _a_row_each(codes: npt.NDArray[np.int32], values: int) -> npt.NDArray[np.int64]:
    """A row holding each code of ``codes`` (of ``values`` values; NO_CODE, -1, too): one scatter, no sort."""
    holder = np.full(values + 1, -1, dtype=np.int64)
    holder[codes + 1] = np.arange(len(codes), dtype=np.int64)  # of repeated codes, one row's index stays
    found: npt.NDArray[np.int64] = holder[holder >= 0]
    return found


def check_filters(cache: FacetCache, state: Served, filters: SearchFilters | None) -> None:
    """BadRequestError (422) when a folder, camera or format of ``filters`` matches no image of ``state``'s
    generation, naming each such value, the close known ones, and ``/api/facets``. Filters that name none of them
    are not looked at (the facets are not found for them)."""
    if filters is None or not (filters.folder or filters.camera or filters.format):
        return
    facets = cache.of(state)
    known = facets.described
    problems = [
        *_unknown("folder", filters.folder, lambda v: SearchFilter(folders=(v,)), facets, known.folders),
        *_unknown("camera", filters.camera, lambda v: SearchFilter(cameras=(v,)), facets, known.cameras),
        *_unknown("format", filters.format, lambda v: SearchFilter(formats=(v,)), facets, known.formats),
    ]
    if problems:
        raise BadRequestError("; ".join(problems))


def _unknown(
    what: str,
    values: Iterable[str],
    condition: Callable[[str], SearchFilter],
    facets: GenerationFacets,
    known: Sequence[FacetValue],
) -> list[str]:
    """A sentence per value of ``values`` that matches no image, alone."""
    names = [facet.value for facet in known]
    sentences = []
    for value in dict.fromkeys(values):  # each value once, in the order given
        if facets.representatives.mask(condition(value)).any():
            continue
        if not names:
            sentences.append(f"unknown {what} {value!r}: {NONE_KNOWN[what]}")
            continue
        close = close_names(value, names, by_last_part=what == "folder")
        hint = f"did you mean {' or '.join(repr(name) for name in close)}? " if close else ""
        sentences.append(f"unknown {what} {value!r}: no indexed image matches it ({hint}{FACETS_HINT})")
    return sentences


def close_names(value: str, names: Sequence[str], by_last_part: bool = False) -> list[str]:
    """Up to ``SUGGESTIONS`` of ``names`` close to ``value``, ignoring case: the one that differs only in case if
    there is one, else (for folders, ``by_last_part``) those whose last part is ``value``'s, then the most similar
    among the ``COMPARED_NAMES`` nearest in sorted order (so a refusal stays quick with 100,000 folders)."""
    wanted = value.strip("/").casefold()
    folded = {name.casefold(): name for name in reversed(names)}  # the first name of each folded form
    if wanted in folded:
        return [folded[wanted]]
    found = []
    if by_last_part:
        last = wanted.rpartition("/")[2]
        found += [name for name in names if name.casefold().rpartition("/")[2] == last]
    ordered = sorted(folded)
    at = max(0, bisect.bisect_left(ordered, wanted) - COMPARED_NAMES // 2)
    nearest = ordered[at : at + COMPARED_NAMES]
    found += [folded[m] for m in difflib.get_close_matches(wanted, nearest, SUGGESTIONS, SIMILARITY_CUTOFF)]
    return list(dict.fromkeys(found))[:SUGGESTIONS]
