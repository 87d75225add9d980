"""Metadata filters on image searches: what a filter says, the columns it is evaluated on, and how a filtered
search runs.

A :class:`SearchFilter` is a conjunction of conditions on the images a generation shows (an empty one matches every
image): folder prefixes, a capture-time range, cameras, formats, a minimum width and height, an orientation.

Capture time: EXIF's (:mod:`indexer.photo_metadata`: the camera's wall clock as seconds since 1970-01-01T00:00 of
that clock) when the file has one, else the file's mtime (UTC, flagged ``taken_from_exif`` False). Ranges compare
wall clocks: ``taken_from`` inclusive, ``taken_until`` exclusive.

:class:`PhotoColumns` holds one generation's values of every filterable attribute as numpy columns in id order
(strings as codes into small tables), read once from the catalog (:meth:`indexer.store.Catalog.photo_columns_at`);
a filter is then a vectorized mask, a few milliseconds at a million images.

How a filtered search runs (:class:`FilterPlanner`): with ``m`` of the generation's ``n`` images matching,

* ``m`` = 0: nothing to search.
* ``m`` <= ``EXACT_SCAN_MAX``: the matching vectors, read once from the vector files, are scored exactly (FAISS's
  scan over at most ``EXACT_SCAN_MAX`` rows kept in memory: cheaper than a probe of the index, and exact).
* otherwise each segment with ``m_s`` of its ``n_s`` live vectors matching (a segment with none is skipped) is
  searched with its knob raised: IVF nprobe times ``(n_s / m_s) ** NPROBE_EXPONENT``, HNSW efSearch times
  ``n_s / m_s``, within the knob's useful range; exact (Flat) segments need no knob. An IVF segment's matching
  codes are copied into a small IVF of their own sharing its quantizer (:func:`indexer._faiss_io.subset`) while
  all such copies of the plan fit ``SUBSET_MAX_BYTES``; it then scans only matching codes, and returns what the
  segment returns at the same nprobe. Other segments are searched with a FAISS ``IDSelector`` over their own
  positions (the matching ones less their deletions), which steps over the others in every probed list.

A probed list holds about ``m_s / n_s`` of its usual share of matching candidates, but the filtered top-k need
not lie ``n_s / m_s`` times as many lists away: the exponent is the one at which recall@10 from 1% to 50%
selectivity stays at or above the unfiltered search's (bench/README.md, "filters"); HNSW's is kept linear, not
having been measured.

Users page through and refine the results of one filter, so a generation's plans (the mask's outcome: the vectors
to scan, the copies, the selectors) are kept per filter, the most recently used first, within
``PLAN_CACHE_ENTRIES`` plans and ``PLAN_CACHE_BYTES``; a new generation is a new :class:`FilterPlanner`.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from .. import _faiss_io
from .._faiss_io import FaissIndex
from .format import Ids, Vectors

if TYPE_CHECKING:
    from .segments import LoadedSegment

Orientation = Literal["landscape", "portrait", "square"]
ORIENTATIONS: tuple[Orientation, ...] = ("landscape", "portrait", "square")
EXACT_SCAN_MAX = 8192  # matching images up to which a filtered search scores their vectors exactly (16 MiB at 512-d)
NPROBE_EXPONENT = 0.7  # a filtered IVF search probes (n / m) ** this times the lists (module docstring)
SUBSET_MAX_BYTES = 32 << 20  # codes and ids one plan may copy out of the IVF segments (module docstring)
PLAN_CACHE_ENTRIES = 32  # filters whose plans a generation keeps
PLAN_CACHE_BYTES = 128 << 20  # bytes of selectors, copies and scanned vectors those plans may hold
MAX_CODE_RUNS = 8  # runs of wanted codes up to which a string condition compares codes rather than looks them up
NO_CODE = -1
ROOT_FOLDER = "."  # the code table's name of the image root, which a stored path never is


@dataclass(frozen=True)
class SearchFilter:
    """Conditions an image must meet, all of them (module docstring). Folders are stored-form path prefixes of
    :mod:`indexer.paths` ("2023/Holidays" matches "2023/Holidays/a.jpg" and "2023/Holidays/Rome/b.jpg"; "" is the
    root); cameras match case-insensitively as substrings of "make model"; formats as lowercase format names."""

    folders: tuple[str, ...] = ()
    taken_from: int | None = None
    taken_until: int | None = None
    cameras: tuple[str, ...] = ()
    formats: tuple[str, ...] = ()
    min_width: int | None = None
    min_height: int | None = None
    orientation: Orientation | None = None

    def __post_init__(self) -> None:
        if self.orientation is not None and self.orientation not in ORIENTATIONS:
            raise ValueError(f"orientation must be one of {list(ORIENTATIONS)}, got {self.orientation!r}")
        for name in ("min_width", "min_height"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} cannot be negative, got {value}")

    @property
    def empty(self) -> bool:
        return self == SearchFilter()


@dataclass(frozen=True, eq=False)
class PhotoColumns:
    """One generation's filterable attributes, row ``r`` being the image ``ids[r]`` (ids sorted). Codes index the
    string tables (``NO_CODE``: unknown)."""

    ids: Ids
    folder_codes: npt.NDArray[np.int32]
    folders: list[str]  # sorted: the folders inside one are a range of codes
    taken_at: npt.NDArray[np.int64]  # wall-clock seconds: EXIF, else mtime
    taken_from_exif: npt.NDArray[np.bool_]
    camera_codes: npt.NDArray[np.int32]
    cameras: list[str]  # "make model"
    format_codes: npt.NDArray[np.int32]
    formats: list[str]
    width: npt.NDArray[np.int32]
    height: npt.NDArray[np.int32]
    vec_files: Ids  # where each image's vector is (indexer.store.vector_log)
    vec_rows: Ids

    def __len__(self) -> int:
        return len(self.ids)

    def mask(self, where: SearchFilter) -> npt.NDArray[np.bool_]:
        """[N] bool: the rows ``where`` matches. Each condition on a string is decided once per distinct value, then
        applied to the codes (folders are coded in sorted order, so a prefix is a range of codes)."""
        keep = np.ones(len(self.ids), dtype=bool)
        if where.folders:
            wanted = np.zeros(len(self.folders), dtype=bool)
            for prefix in where.folders:
                wanted[_folder_codes(self.folders, prefix)] = True
            keep &= _coded(self.folder_codes, wanted)
        if where.taken_from is not None:
            keep &= self.taken_at >= where.taken_from
        if where.taken_until is not None:
            keep &= self.taken_at < where.taken_until
        if where.cameras:
            cameras = [c.casefold() for c in where.cameras]
            wanted = np.array([any(c in camera.casefold() for c in cameras) for camera in self.cameras], dtype=bool)
            keep &= _coded(self.camera_codes, wanted)
        if where.formats:
            formats = {f.casefold() for f in where.formats}
            keep &= _coded(self.format_codes, np.array([f in formats for f in self.formats], dtype=bool))
        if where.min_width is not None:
            keep &= self.width >= where.min_width
        if where.min_height is not None:
            keep &= self.height >= where.min_height
        if where.orientation == "landscape":
            keep &= self.width > self.height
        elif where.orientation == "portrait":
            keep &= self.width < self.height
        elif where.orientation == "square":
            keep &= self.width == self.height
        return keep


def _coded(codes: npt.NDArray[np.int32], wanted: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """[N] bool: whether each row's value (``codes``, NO_CODE: none) is one that ``wanted`` (by code) says yes to.
    Codes are compared with each run of wanted codes while there are at most ``MAX_CODE_RUNS`` runs (a folder prefix
    is one or two; comparisons are several times faster than a lookup per row), else looked up."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], wanted.astype(np.int8), [0]))))
    starts, stops = edges[0::2].tolist(), edges[1::2].tolist()
    if len(starts) > MAX_CODE_RUNS:
        matched: npt.NDArray[np.bool_] = np.take(np.concatenate(([False], wanted)), codes + 1)  # slot 0: NO_CODE
        return matched
    keep = np.zeros(len(codes), dtype=bool)
    for start, stop in zip(starts, stops, strict=True):
        keep |= (codes == start) if stop - start == 1 else (codes >= start) & (codes < stop)
    return keep


def _folder_codes(folders: list[str], prefix: str) -> list[int] | slice:
    """The codes of ``folders`` (sorted) that are ``prefix`` or inside it ("a" holds "a/b", not "a-b")."""
    prefix = prefix.strip("/")
    if not prefix:
        return slice(0, len(folders))
    inside = range(bisect.bisect_left(folders, prefix + "/"), bisect.bisect_left(folders, prefix + "0"))  # "0" > "/"
    exact = bisect.bisect_left(folders, prefix)
    return ([exact] if exact < len(folders) and folders[exact] == prefix else []) + list(inside)


@dataclass(frozen=True)
class SegmentRows:
    """Where the positions of one segment's index lie among a generation's :class:`PhotoColumns` rows: position
    ``p`` is row ``start + p`` when ``rows`` is None (the segment's ids are a run of the columns' ids, as a build's
    are), else row ``rows[p]``, where ``len(columns)`` marks an id the generation does not show (a deleted image)."""

    start: int
    size: int
    rows: Ids | None = None

    @classmethod
    def of(cls, column_ids: Ids, id_map: Ids) -> SegmentRows:
        """The rows of a segment whose positions hold ``id_map`` [n], among columns of ``column_ids`` (sorted)."""
        start = int(np.searchsorted(column_ids, id_map[0])) if len(id_map) else 0
        if np.array_equal(column_ids[start : start + len(id_map)], id_map):
            return cls(start, len(id_map))
        rows = np.searchsorted(column_ids, id_map)
        shown = rows < len(column_ids)
        shown[shown] = column_ids[rows[shown]] == id_map[shown]
        rows[~shown] = len(column_ids)
        return cls(0, len(id_map), rows)

    def members(self, keep: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
        """[size] bool: the positions whose rows ``keep`` [len(columns)] marks."""
        if self.rows is None:
            return keep[self.start : self.start + self.size]
        members: npt.NDArray[np.bool_] = np.append(keep, False)[self.rows]
        return members


@dataclass(frozen=True, eq=False)
class SegmentPlan:
    """How one segment is searched for a filter (module docstring): its matching positions copied into
    ``subset`` when there is one, else among its ``allowed`` positions; with the search parameters ``params``."""

    params: dict[str, int]
    allowed: _faiss_io.Allowed | None = None
    subset: _faiss_io.Subset | None = None

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in (self.allowed, self.subset) if part is not None)


@dataclass(frozen=True, eq=False)
class FilteredPlan:
    """How one filtered search runs (module docstring): nothing (``matching`` 0), a ``scan`` of ``vectors`` (row
    ``i`` the vector of image ``ids[i]``), or each segment searched by its plan in ``segments`` (None: skipped)."""

    matching: int
    ids: Ids | None = None
    vectors: Vectors | None = None  # [matching, D] float32, C-contiguous
    segments: tuple[SegmentPlan | None, ...] = ()

    @property
    def scan(self) -> bool:
        return self.vectors is not None

    @property
    def nbytes(self) -> int:
        """Memory the plan holds (its arrays and copies)."""
        arrays = sum(a.nbytes for a in (self.ids, self.vectors) if a is not None)
        return arrays + sum(p.nbytes for p in self.segments if p is not None)


def boosted_params(index: FaissIndex, params: dict[str, int], boost: float) -> dict[str, int]:
    """``params`` with the index's knob raised for a search among 1 / ``boost`` of its vectors (module docstring:
    IVF nprobe times ``boost ** NPROBE_EXPONENT``, HNSW efSearch times ``boost``), within its useful range."""
    knob = _faiss_io.search_knob(index)
    if knob is None or boost <= 1.0:
        return params
    name, _, highest = knob
    factor = boost**NPROBE_EXPONENT if name == "nprobe" else boost
    current = params.get(name) or _faiss_io.get_search_params(index).get(name, 1)
    return {**params, name: min(highest, max(current, math.ceil(current * factor)))}


VectorReader = Callable[[Ids, Ids], Vectors]  # (vec_files, vec_rows) -> [N, D] float32 vectors, in that order


class FilterPlanner:
    """The plans of one generation's filtered searches (module docstring), each made once per filter and kept: the
    most recently used, at most ``max_entries`` plans holding at most ``max_bytes`` (a plan larger than that is
    not kept). Thread-safe; a plan is made outside the lock, so two threads asking for one new filter at once may
    both make it (one is kept)."""

    def __init__(
        self,
        columns: PhotoColumns,
        segments: Sequence[LoadedSegment],
        read_vectors: VectorReader,
        *,
        max_entries: int = PLAN_CACHE_ENTRIES,
        max_bytes: int = PLAN_CACHE_BYTES,
    ) -> None:
        """``segments``: the generation's, whose images ``columns`` describes; ``read_vectors``: reads the vectors
        at the columns' pointers (``vec_files``, ``vec_rows``). Made with the columns: it maps each segment's
        positions to rows and views its IVF lists (:func:`indexer._faiss_io.ivf_lists`), a few tens of ms and up
        to 16 bytes per vector."""
        self.columns = columns
        self._segments = list(segments)
        self._rows = [SegmentRows.of(columns.ids, _faiss_io.index_ids(s.index)) for s in self._segments]
        self._lists = [_faiss_io.ivf_lists(s.index) for s in self._segments]  # None: no subsets of it
        self._read_vectors = read_vectors
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._plans: OrderedDict[SearchFilter, FilteredPlan] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._plans)

    def __contains__(self, where: SearchFilter) -> bool:
        with self._lock:
            return where in self._plans

    @property
    def nbytes(self) -> int:
        """Bytes the kept plans hold."""
        with self._lock:
            return self._bytes

    def plan(self, where: SearchFilter) -> FilteredPlan:
        """The plan of a search for ``where``: the kept one, else made (:meth:`make`) and kept."""
        with self._lock:
            kept = self._plans.get(where)
            if kept is not None:
                self._plans.move_to_end(where)
                return kept
        made = self.make(where)
        with self._lock:
            replaced = self._plans.pop(where, None)
            self._bytes -= replaced.nbytes if replaced is not None else 0
            if made.nbytes <= self.max_bytes:
                self._plans[where] = made
                self._bytes += made.nbytes
            while len(self._plans) > self.max_entries or self._bytes > self.max_bytes:
                _, evicted = self._plans.popitem(last=False)
                self._bytes -= evicted.nbytes
        return made

    def make(self, where: SearchFilter) -> FilteredPlan:
        """The plan of a search for ``where``, made anew (module docstring)."""
        keep = self.columns.mask(where)
        matching = int(np.count_nonzero(keep))
        if matching == 0:
            return FilteredPlan(0)
        if matching <= EXACT_SCAN_MAX:
            rows = np.flatnonzero(keep)
            vectors = self._read_vectors(self.columns.vec_files[rows], self.columns.vec_rows[rows])
            return FilteredPlan(matching, self.columns.ids[rows], np.ascontiguousarray(vectors, dtype=np.float32))
        plans: list[SegmentPlan | None] = []
        room = SUBSET_MAX_BYTES
        for segment, rows_of, lists in zip(self._segments, self._rows, self._lists, strict=True):
            allowed = _faiss_io.Allowed.of(rows_of.members(keep), segment.deleted) if segment.record.live else None
            if allowed is None or allowed.count == 0:
                plans.append(None)
                continue
            params = boosted_params(segment.index, {}, segment.record.live / allowed.count)
            if lists is not None and (copied := allowed.count * lists.entry_bytes) <= room:
                room -= copied
                plans.append(SegmentPlan(params, subset=_faiss_io.subset(lists, allowed)))
            else:
                plans.append(SegmentPlan(params, allowed=allowed))
        return FilteredPlan(matching, segments=tuple(plans))


# one generation's ok images with their metadata: (id, path, width, height, mtime_ns, vec_file, vec_row, taken_at,
# camera_make, camera_model, format), ordered by id
_SHOWN_AT = (
    "SELECT v.id, v.path, v.width, v.height, v.mtime_ns, v.vec_file, v.vec_row, {metadata} FROM ("
    "SELECT id, path, width, height, mtime_ns, vec_file, vec_row, content_hash FROM images "
    "WHERE gen <= :g AND status = 'ok' UNION ALL "
    "SELECT id, path, width, height, mtime_ns, vec_file, vec_row, content_hash FROM image_versions "
    "WHERE gen <= :g AND (until_gen IS NULL OR until_gen > :g) AND status = 'ok') v {join} ORDER BY v.id"
)
_WITH_METADATA = (
    "m.taken_at, m.camera_make, m.camera_model, m.format",
    "LEFT JOIN photo_metadata m USING (content_hash)",
)
_WITHOUT_METADATA = ("NULL, NULL, NULL, NULL", "")
FETCH_ROWS = 65_536
EXTENSION_FORMATS = {"jpg": "jpeg", "jpe": "jpeg", "jfif": "jpeg", "tif": "tiff", "heic": "heif", "hif": "heif"}


def photo_columns_query(has_metadata: bool) -> str:
    """The SELECT :func:`photo_columns` reads (parameter ``:g``: the generation number)."""
    metadata, join = _WITH_METADATA if has_metadata else _WITHOUT_METADATA
    return _SHOWN_AT.format(metadata=metadata, join=join)


def photo_columns(rows: Iterable[Sequence[Any]]) -> PhotoColumns:
    """:class:`PhotoColumns` from the rows of :func:`photo_columns_query`, in chunks."""
    tables: dict[str, dict[str, int]] = {"folders": {}, "cameras": {}, "formats": {}}

    def code(table: str, value: str | None) -> int:
        if not value:
            return NO_CODE
        codes = tables[table]
        return codes.setdefault(value, len(codes))

    parts: list[dict[str, np.ndarray]] = []
    for chunk in _chunks(rows):
        ids, paths, width, height, mtime_ns, vec_file, vec_row, taken_at, make, model, image_format = zip(
            *chunk, strict=True
        )
        exif = np.array([t is not None for t in taken_at], dtype=bool)
        mtime_s = np.asarray(mtime_ns, dtype=np.int64) // 1_000_000_000
        taken = np.where(exif, np.array([t or 0 for t in taken_at], dtype=np.int64), mtime_s)
        parts.append({
            "ids": np.asarray(ids, dtype=np.int64),
            "folder_codes": np.array([code("folders", _folder(p)) for p in paths], dtype=np.int32),
            "taken_at": taken,
            "taken_from_exif": exif,
            "camera_codes": np.array([code("cameras", _camera(a, b)) for a, b in zip(make, model, strict=True)],
                                     dtype=np.int32),
            "format_codes": np.array(
                [code("formats", f or _format_of(p)) for f, p in zip(image_format, paths, strict=True)], dtype=np.int32
            ),
            "width": np.asarray(width, dtype=np.int32),
            "height": np.asarray(height, dtype=np.int32),
            "vec_files": np.asarray(vec_file, dtype=np.int64),
            "vec_rows": np.asarray(vec_row, dtype=np.int64),
        })  # fmt: skip
    names = ("ids", "folder_codes", "taken_at", "taken_from_exif", "camera_codes", "format_codes", "width", "height",
             "vec_files", "vec_rows")  # fmt: skip
    dtypes = (np.int64, np.int32, np.int64, np.bool_, np.int32, np.int32, np.int32, np.int32, np.int64, np.int64)
    merged = {
        name: np.concatenate([part[name] for part in parts]) if parts else np.empty(0, dtype=dtype)
        for name, dtype in zip(names, dtypes, strict=True)
    }
    found = ["" if f == ROOT_FOLDER else f for f in tables["folders"]]
    order = sorted(range(len(found)), key=found.__getitem__)
    recode = np.empty(len(found), dtype=np.int32)
    recode[order] = np.arange(len(found), dtype=np.int32)
    merged["folder_codes"] = recode[merged["folder_codes"]] if len(found) else merged["folder_codes"]
    folders = [found[i] for i in order]
    return PhotoColumns(folders=folders, cameras=list(tables["cameras"]), formats=list(tables["formats"]), **merged)


def _chunks(rows: Iterable[Sequence[Any]]) -> Iterator[list[Sequence[Any]]]:
    chunk: list[Sequence[Any]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == FETCH_ROWS:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _folder(path: str) -> str:
    """The folder of a stored path ("" at the root, kept as ROOT_FOLDER in the code table)."""
    return path.rpartition("/")[0] or ROOT_FOLDER


def _camera(make: str | None, model: str | None) -> str | None:
    """ "make model", without the make twice when the model repeats it (as "Canon" "Canon EOS R5" does)."""
    make, model = (make or "").strip(), (model or "").strip()
    if make and model.casefold().startswith(make.casefold()):
        return model
    return f"{make} {model}".strip() or None


def _format_of(path: str) -> str | None:
    """The format an image's extension names, for images indexed before their metadata was read."""
    extension = path.rpartition(".")[2].casefold() if "." in path.rpartition("/")[2] else ""
    return EXTENSION_FORMATS.get(extension, extension) or None
