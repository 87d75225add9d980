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

How a filtered search runs (:func:`plan`): with ``m`` of the generation's ``n`` images matching,

* ``m`` = 0: nothing to search.
* ``m`` <= ``EXACT_SCAN_MAX``: the matching vectors are read from the vector files and scored exactly (a matrix
  product over at most ``EXACT_SCAN_MAX`` rows, cheaper than any index probe and exact).
* otherwise each segment is searched with the matching ids as a FAISS ``IDSelector``, its knob (IVF nprobe, HNSW
  efSearch) raised by ``n / m`` (capped at the index's useful range): a probed list or graph neighbourhood holds
  about ``m / n`` of its usual share of candidates, so the search looks at about as many candidates as an
  unfiltered one does. Exact (Flat) segments need no knob.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from .. import _faiss_io
from .._faiss_io import FaissIndex
from .format import Ids

Orientation = Literal["landscape", "portrait", "square"]
ORIENTATIONS: tuple[Orientation, ...] = ("landscape", "portrait", "square")
EXACT_SCAN_MAX = 4096  # matching images up to which a filtered search scores their vectors exactly
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
        gathered by code (folders are coded in sorted order, so a prefix is a range of codes)."""
        keep = np.ones(len(self.ids), dtype=bool)
        if where.folders:
            wanted = np.zeros(len(self.folders), dtype=bool)
            for prefix in where.folders:
                wanted[_folder_codes(self.folders, prefix)] = True
            keep &= wanted[self.folder_codes]
        if where.taken_from is not None:
            keep &= self.taken_at >= where.taken_from
        if where.taken_until is not None:
            keep &= self.taken_at < where.taken_until
        if where.cameras:
            cameras = [c.casefold() for c in where.cameras]
            keep &= _coded(self.camera_codes, [any(c in camera.casefold() for c in cameras) for camera in self.cameras])
        if where.formats:
            formats = {f.casefold() for f in where.formats}
            keep &= _coded(self.format_codes, [f in formats for f in self.formats])
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


def _coded(codes: npt.NDArray[np.int32], matches: list[bool]) -> npt.NDArray[np.bool_]:
    """[N] bool: whether each row's value (``codes``, NO_CODE: none) is one that ``matches`` (by code) says yes to."""
    table = np.array([False, *matches], dtype=bool)  # slot 0: NO_CODE
    matched: npt.NDArray[np.bool_] = table[codes + 1]
    return matched


def _folder_codes(folders: list[str], prefix: str) -> list[int] | slice:
    """The codes of ``folders`` (sorted) that are ``prefix`` or inside it ("a" holds "a/b", not "a-b")."""
    prefix = prefix.strip("/")
    if not prefix:
        return slice(0, len(folders))
    inside = range(bisect.bisect_left(folders, prefix + "/"), bisect.bisect_left(folders, prefix + "0"))  # "0" > "/"
    exact = bisect.bisect_left(folders, prefix)
    return ([exact] if exact < len(folders) and folders[exact] == prefix else []) + list(inside)


@dataclass(frozen=True)
class FilteredPlan:
    """How one filtered search runs (module docstring): ``scan`` the rows of ``rows`` exactly, or search the
    segments with ``allowed`` and the knob factor ``boost``."""

    matching: int
    rows: npt.NDArray[np.int64]  # rows of the PhotoColumns that match, when scanned
    allowed: _faiss_io.Allowed | None
    boost: float

    @property
    def scan(self) -> bool:
        return self.allowed is None


def plan(columns: PhotoColumns, where: SearchFilter, live: int) -> FilteredPlan:
    """The plan of a search for ``where`` over a generation of ``live`` images whose columns are ``columns``."""
    keep = columns.mask(where)
    rows = np.flatnonzero(keep)
    if len(rows) <= EXACT_SCAN_MAX:
        return FilteredPlan(len(rows), rows, None, 1.0)
    return FilteredPlan(len(rows), rows, _faiss_io.Allowed.of(columns.ids[rows]), max(1.0, live / len(rows)))


def boosted_params(index: FaissIndex, params: dict[str, int], boost: float) -> dict[str, int]:
    """``params`` with the index's knob multiplied by ``boost`` within its useful range (module docstring)."""
    knob = _faiss_io.search_knob(index)
    if knob is None or boost <= 1.0:
        return params
    name, _, highest = knob
    current = params.get(name) or _faiss_io.get_search_params(index).get(name, 1)
    return {**params, name: min(highest, max(current, math.ceil(current * boost)))}


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
