"""The FAISS idioms the index store relies on, in one place (style A6).

Contracts: every index is built with ``faiss.index_factory(dim, factory, METRIC_INNER_PRODUCT)`` behind an
``IndexIDMap2`` (our own stable int64 ids, reconstruct-by-id); vectors go in as C-contiguous float32 rows that the
caller has L2-normalized, so scores are cosine similarities. FAISS's ``D, I`` become ``scores, ids`` here and labels
of -1 ("not enough results") never leave this module.

Process-wide FAISS state set here: the BLAS threshold (on import). FAISS's OpenMP thread counts are set with every
other thread count, by ``clip_model.process_tuning``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

# FAISS's loader logs at INFO each CPU-specific build it tries, with a ModuleNotFoundError for those this wheel does
# not ship (it dispatches by CPU at run time instead): nothing is wrong, so only its warnings are shown.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)
import faiss  # noqa: E402  (after the logger level above, which must be set before the loader runs)

from .errors import IndexBuildError, IndexFormatError  # noqa: E402  (in the import block, after faiss)

logger = logging.getLogger(__name__)

FaissIndex = Any  # faiss ships no type stubs
IDMAP_PREFIX = "IDMap2,"
HNSW_EF_SEARCH = 128  # HNSW candidate list length at query time (faiss default 16 loses recall at k=100)
HNSW_MAX_EF_SEARCH = 4096  # the most calibration may raise efSearch to
# Exact (flat) search scans the database once per query when queries x dim < this many floats, and uses one
# matrix product per block of queries (BLAS) otherwise. With FAISS's default (128,000 floats since 1.15: 250
# queries of 512-d) a batch of 8-64 queries costs 8-64 full scans. One query is faster as a scan, three or more as
# a product (two break even), so only 1-2 queries of 512-d (1 of 768-d or 1024-d) scan (see bench/README.md,
# "index_types", which times the three thresholds). With 2 threads and 1 query FAISS splits
# the database between threads whatever this value is. Process-wide; set on import, so that the indexer and the
# server (which imports this module through indexer.store) both get it.
BLAS_THRESHOLD_FLOATS = 1536
TRAIN_POINTS_PER_LIST = 64  # IVF trains on this many vectors per list (FAISS would take 256: 4x the k-means time)
TRAIN_MAX_POINTS = 131_072  # training sample of codecs without lists (SQ, PQ)
TRAIN_SEED = 0
ADD_CHUNK_ROWS = 65_536  # rows read and added per call when filling an index (128 MB of 512-d float32)

faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD_FLOATS
_IDMAP_PREFIX_RE = re.compile(r"^\s*IDMap2?\s*,\s*")
_LOSSY_CODEC_RE = re.compile(r"PQ|SQ|RQ|LSH|RaBitQ|LSQ")  # codecs whose reconstruct() only approximates the input


class VectorRows(Protocol):
    """[N, D] float32 unit rows that the index builders read part by part: a numpy matrix, or rows kept on disk
    (``indexer.store.vector_log.StoredRows``). Indexing by a slice or an integer array returns a new array."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __len__(self) -> int: ...

    def __getitem__(self, key: Any, /) -> Any: ...


def describe_backend() -> str:
    """FAISS's version and the SIMD instructions its kernels use on this CPU, e.g. "FAISS 1.15.1 (AVX512)"."""
    config = faiss.SIMDConfig
    level = config.get_level_name() if hasattr(config, "get_level_name") else faiss.get_compile_options().strip()
    return f"FAISS {faiss.__version__} ({level})"


def normalize_factory(factory: str) -> str:
    """``"HNSW32,Flat"`` -> ``"IDMap2,HNSW32,Flat"``: every index is wrapped in an IDMap2 exactly once."""
    body = _IDMAP_PREFIX_RE.sub("", factory).strip()
    if not body:
        raise IndexBuildError(f"empty FAISS factory string {factory!r}: use e.g. 'IDMap2,Flat'")
    return IDMAP_PREFIX + body


def is_lossy(factory: str) -> bool:
    """Whether vectors reconstructed from an index built with ``factory`` only approximate the ones added."""
    return bool(_LOSSY_CODEC_RE.search(factory))


def is_exact(factory: str) -> bool:
    """Whether ``factory`` searches exhaustively over exact vectors (``Flat``), so its recall is 1 by construction."""
    return normalize_factory(factory) == IDMAP_PREFIX + "Flat"


def build_index(ids: npt.NDArray[np.int64], vectors: VectorRows, dim: int, factory: str) -> FaissIndex:
    """Build an inner-product index over ``vectors`` [N, dim] float32 unit rows with ``ids`` [N] int64.

    Trains, when the factory needs it (IVF, PQ, SQ...), on a seeded sample of the vectors themselves
    (``TRAIN_POINTS_PER_LIST`` per IVF list, else up to ``TRAIN_MAX_POINTS``), so that a rebuild from the same
    catalog gives the same index; then adds the rows ``ADD_CHUNK_ROWS`` at a time, so rows on disk are read part by
    part. Raises IndexBuildError when FAISS cannot build it (unknown factory string, too few vectors to train).
    """
    index = trained_index(vectors, dim, factory)
    add_rows(index, ids, vectors)
    prepare_for_queries(index)
    return index


def trained_index(vectors: VectorRows, dim: int, factory: str) -> FaissIndex:
    """An empty index of ``factory``, trained as :func:`build_index` trains it on ``vectors`` [N, dim] when the type
    needs training (IndexBuildError as there)."""
    try:
        index = faiss.index_factory(dim, normalize_factory(factory), faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise IndexBuildError(f"FAISS does not understand the factory string {factory!r}: {exc}") from exc
    if not index.is_trained:
        if len(vectors) == 0:
            raise IndexBuildError(f"factory {factory!r} must be trained, but there are no vectors to train it on")
        try:
            index.train(_training_sample(index, vectors))
        except RuntimeError as exc:
            raise IndexBuildError(
                f"FAISS could not train {factory!r} on {len(vectors)} vectors: {exc}. "
                "Use fewer IVF lists / PQ centroids, or 'IDMap2,Flat' for small collections."
            ) from exc
    return index


def add_rows(index: FaissIndex, ids: npt.NDArray[np.int64], vectors: VectorRows) -> None:
    """Add ``vectors`` [N, D] with ``ids`` [N] to ``index``, ``ADD_CHUNK_ROWS`` rows per call."""
    for start in range(0, len(ids), ADD_CHUNK_ROWS):
        chunk = np.ascontiguousarray(vectors[start : start + ADD_CHUNK_ROWS], dtype=np.float32)
        index.add_with_ids(chunk, ids[start : start + ADD_CHUNK_ROWS])


def prepare_for_queries(index: FaissIndex) -> None:
    """Give IVF a direct map (so reconstruct-by-id works) and HNSW a wider search; both are saved with the index."""
    inner = faiss.downcast_index(index.index)
    if isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efSearch = max(inner.hnsw.efSearch, HNSW_EF_SEARCH)
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None:
        ivf.make_direct_map()


def _training_sample(index: FaissIndex, vectors: VectorRows) -> npt.NDArray[np.float32]:
    """The rows ``index`` trains on: a seeded random subset, in catalog order, of at most the size it needs."""
    ivf = faiss.try_extract_index_ivf(index)
    size = int(ivf.nlist) * TRAIN_POINTS_PER_LIST if ivf is not None else TRAIN_MAX_POINTS
    if len(vectors) <= size:
        return np.ascontiguousarray(vectors[:], dtype=np.float32)
    rows = np.sort(np.random.default_rng(TRAIN_SEED).choice(len(vectors), size=size, replace=False))
    return np.ascontiguousarray(vectors[rows], dtype=np.float32)


def _layers(index: FaissIndex) -> list[FaissIndex]:
    """``index`` and the indexes it wraps (IDMap, Refine, PreTransform), outermost first, each downcast."""
    layers = [faiss.downcast_index(index)]
    while True:
        current = layers[-1]
        if isinstance(current, (faiss.IndexIDMap, faiss.IndexPreTransform)):
            layers.append(faiss.downcast_index(current.index))
        elif isinstance(current, faiss.IndexRefine):
            layers.append(faiss.downcast_index(current.base_index))
        else:
            return layers


def search_knob(index: FaissIndex) -> tuple[str, int, int] | None:
    """The search-time parameter that trades speed for recall, with its useful range: ("nprobe", 1, nlist) for
    IVF, ("efSearch", HNSW_EF_SEARCH, HNSW_MAX_EF_SEARCH) for HNSW; None for indexes without one (Flat, codes)."""
    for layer in _layers(index):
        if isinstance(layer, faiss.IndexIVF):
            return "nprobe", 1, int(layer.nlist)
        if isinstance(layer, faiss.IndexHNSW):
            return "efSearch", HNSW_EF_SEARCH, HNSW_MAX_EF_SEARCH
    return None


def get_search_params(index: FaissIndex) -> dict[str, int]:
    """{"nprobe": n} / {"efSearch": n} (plus "k_factor" of a refine stage), as :func:`set_search_params` takes."""
    params = {}
    for layer in _layers(index):
        if isinstance(layer, faiss.IndexIVF):
            params["nprobe"] = int(layer.nprobe)
        elif isinstance(layer, faiss.IndexHNSW):
            params["efSearch"] = int(layer.hnsw.efSearch)
        elif isinstance(layer, faiss.IndexRefine):
            params["k_factor"] = int(layer.k_factor)
    return params


def set_search_params(index: FaissIndex, params: dict[str, int]) -> None:
    """Set search-time parameters (names as :func:`get_search_params` gives them). They are saved with the index
    file too. IndexFormatError for a parameter the index does not have."""
    layers = _layers(index)
    holders: dict[str, list[Any]] = {
        "nprobe": [layer for layer in layers if isinstance(layer, faiss.IndexIVF)],
        "efSearch": [layer.hnsw for layer in layers if isinstance(layer, faiss.IndexHNSW)],
        "k_factor": [layer for layer in layers if isinstance(layer, faiss.IndexRefine)],
    }
    for name, value in params.items():
        targets = holders.get(name)
        if not targets:
            raise IndexFormatError(f"search parameter {name}={value} does not apply to this index")
        for target in targets:
            setattr(target, name, int(value))


def write_index(index: FaissIndex, path: Path) -> None:
    """``faiss.write_index`` to ``path`` (not fsynced: the caller does that)."""
    faiss.write_index(index, str(path))


def read_index(path: Path, *, mapped: bool = False) -> FaissIndex:
    """Read an index file; IndexFormatError if it is truncated or not a FAISS index.

    Everything is read into memory, except with ``mapped`` the inverted lists of an IVF index whose lists are
    FAISS's plain arrays (IVF with Flat, SQ or PQ codes; not the fast-scan PQ codes): those are memory-mapped
    read-only from the file as ``write_index`` wrote it (``IO_FLAG_MMAP``: an ``OnDiskInvertedLists`` over the
    file), so their pages belong to the kernel's file cache, not to this process's memory. The file must then
    never change while the index is open (segment files never do). Other index types ignore ``mapped``; see
    :func:`is_memory_mapped`.
    """
    if not path.is_file():
        raise FileNotFoundError(f"FAISS index file {path} does not exist")
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mapped else 0
    try:
        index = faiss.read_index(str(path), flags)
    except RuntimeError as exc:
        raise IndexFormatError(f"cannot read FAISS index {path} (truncated or corrupt?): {exc}") from exc
    lists = _mapped_lists(index)
    if lists is not None:
        # no prefetch threads: FAISS would start that many threads per search to touch the lists' pages first,
        # which costs more than a search over cached pages (bench/README.md, "ondisk")
        lists.prefetch_nthread = 0
    return index


def is_memory_mapped(index: FaissIndex) -> bool:
    """Whether ``index``'s inverted lists are memory-mapped from its file (read with ``mapped``)."""
    return _mapped_lists(index) is not None


def _mapped_lists(index: FaissIndex) -> Any:
    """The ``OnDiskInvertedLists`` of an IVF ``index`` read memory-mapped, else None."""
    ivf = faiss.try_extract_index_ivf(index)
    lists = faiss.downcast_InvertedLists(ivf.invlists) if ivf is not None and ivf.invlists is not None else None
    return lists if isinstance(lists, faiss.OnDiskInvertedLists) else None


def index_ids(index: FaissIndex) -> npt.NDArray[np.int64]:
    """All ids held by an IDMap/IDMap2 index, int64 [ntotal], in insertion order."""
    ids: npt.NDArray[np.int64] = faiss.vector_to_array(index.id_map).astype(np.int64, copy=False)
    return ids


def _id_view(index: FaissIndex) -> npt.NDArray[np.int64]:
    """The IDMap's position -> id map as a numpy view of FAISS's own vector (no copy; valid while ``index`` is)."""
    size = int(index.id_map.size())
    if size == 0:
        return np.empty(0, dtype=np.int64)
    view: npt.NDArray[np.int64] = faiss.rev_swig_ptr(index.id_map.data(), size).view(np.int64)
    return view


def needs_training(factory: str, dim: int) -> bool:
    """Whether an index of ``factory`` must be trained before vectors go in (IVF, PQ, SQ; not Flat or HNSW,Flat)."""
    return not faiss.index_factory(dim, normalize_factory(factory), faiss.METRIC_INNER_PRODUCT).is_trained


@dataclass(frozen=True)
class Exclusion:
    """Ids an IDMap index must not return, made once per index: a selector over the wrapped index's own positions
    (which every index type and layer accepts, unlike ids that only the IDMap layer translates)."""

    selector: Any  # faiss.IDSelectorNot over an IDSelectorBitmap of the excluded positions
    id_map: npt.NDArray[np.int64]  # position -> id
    bitmap: npt.NDArray[np.uint8]  # bit p (little-endian within each byte) set: position p excluded
    count: int  # positions excluded
    _members: Any  # the IDSelectorBitmap the selector points to, kept alive with it

    def ids(self) -> npt.NDArray[np.int64]:
        """The excluded ids, in position order."""
        excluded = np.unpackbits(self.bitmap, bitorder="little")[: len(self.id_map)].astype(bool)
        ids: npt.NDArray[np.int64] = self.id_map[excluded]
        return ids


def exclusion(index: FaissIndex, ids: npt.NDArray[np.int64]) -> Exclusion:
    """The :class:`Exclusion` of ``ids`` [N] int64 from an IDMap ``index`` (ids it does not hold are ignored)."""
    id_map = index_ids(index).copy()
    excluded = np.isin(id_map, ids)
    bitmap = np.packbits(excluded, bitorder="little")
    members = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))  # n: the bitmap's bytes, not bits
    return Exclusion(faiss.IDSelectorNot(members), id_map, bitmap, int(excluded.sum()), members)


@dataclass(frozen=True)
class Allowed:
    """The positions of one IDMap index that a search may return, as a bitmap over the wrapped index's positions
    (the ids FAISS's inner index sees, so no id translation per candidate): bit ``p`` (little-endian within each
    byte) set when position ``p`` may be returned. Made once per filter and index (``indexer.store.filters``)."""

    bitmap: npt.NDArray[np.uint8]
    count: int  # positions allowed
    selector: Any  # faiss.IDSelectorBitmap over the bitmap

    @classmethod
    def of(cls, members: npt.NDArray[np.bool_], exclude: Exclusion | None = None) -> Allowed:
        """The positions where ``members`` [ntotal] bool is True, less those ``exclude`` (the same index's) leaves
        out, so that a search with it needs no exclusion."""
        bitmap = np.packbits(members, bitorder="little")
        if exclude is not None:
            if len(exclude.bitmap) != len(bitmap):
                raise ValueError(f"{len(members)} members for an exclusion over {len(exclude.id_map)} positions")
            bitmap &= ~exclude.bitmap
        selector = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))  # n: the bitmap's bytes, not bits
        return cls(bitmap, int(np.bitwise_count(bitmap).sum()), selector)

    @property
    def nbytes(self) -> int:
        return int(self.bitmap.nbytes)


@dataclass(frozen=True, eq=False)
class IvfLists:
    """The inverted lists of one IDMap-wrapped IVF index (Flat or scalar-quantizer codes, lists in memory or
    memory-mapped) as numpy views, made once per index for :func:`subset`: valid while the index is alive and
    unchanged (a served segment never changes)."""

    source: FaissIndex  # the IDMap index, kept alive with the views
    ivf: FaissIndex  # its IndexIVF, downcast
    positions: npt.NDArray[np.int64]  # every list's positions (the ids the IVF holds), list after list
    offsets: npt.NDArray[np.int64]  # [nlist + 1]: list l is positions[offsets[l]:offsets[l + 1]]
    codes: list[npt.NDArray[np.uint8]]  # list l's codes [size, code_size], a view of the index's own memory
    id_map: npt.NDArray[np.int64]  # position -> id

    @property
    def entry_bytes(self) -> int:
        """What one position copied into a :class:`Subset` takes: its code and its id."""
        return int(self.ivf.code_size) + 8


SUBSET_TYPES = ("IndexIVFFlat", "IndexIVFScalarQuantizer")  # IVF types a subset can copy codes of
SUBSET_LISTS = ("ArrayInvertedLists", "OnDiskInvertedLists")  # lists whose codes are plain arrays


def ivf_lists(index: FaissIndex) -> IvfLists | None:
    """The :class:`IvfLists` of an IDMap ``index``; None when it is not an IVF of ``SUBSET_TYPES`` with lists of
    ``SUBSET_LISTS``."""
    ivf: FaissIndex = faiss.downcast_index(index.index)
    if type(ivf).__name__ not in SUBSET_TYPES:
        return None
    lists: Any = faiss.downcast_InvertedLists(ivf.invlists)
    if type(lists).__name__ not in SUBSET_LISTS:
        return None
    sizes = np.array([lists.list_size(i) for i in range(ivf.nlist)], dtype=np.int64)
    offsets = np.concatenate(([0], np.cumsum(sizes)))
    positions = np.empty(int(offsets[-1]), dtype=np.int64)
    codes = []
    for i, size in enumerate(sizes.tolist()):
        if size:
            positions[offsets[i] : offsets[i + 1]] = faiss.rev_swig_ptr(lists.get_ids(i), size).view(np.int64)
            codes.append(faiss.rev_swig_ptr(lists.get_codes(i), size * ivf.code_size).reshape(size, ivf.code_size))
        else:
            codes.append(np.empty((0, ivf.code_size), dtype=np.uint8))
    return IvfLists(index, ivf, positions, offsets, codes, _id_view(index))


@dataclass(frozen=True, eq=False)
class Subset:
    """Some positions of one IDMap IVF index copied into an IVF of their own: the source's coarse quantizer
    (shared, not copied), codec and nprobe, each chosen position's code in its list, in the source's order,
    labelled with its id. Searched with the same nprobe it returns what the source searched with an
    :class:`Allowed` of those positions returns, without stepping over the positions that are not allowed."""

    index: FaissIndex  # the IndexIVF of the chosen codes, labelled with ids
    count: int  # positions copied
    source: FaissIndex  # the IDMap index whose quantizer ``index`` uses, kept alive with it

    @property
    def nbytes(self) -> int:
        return self.count * (int(self.index.code_size) + 8)  # as IvfLists.entry_bytes


def subset(lists: IvfLists, allowed: Allowed) -> Subset:
    """The :class:`Subset` of ``lists``' index at the positions ``allowed`` (of the same index)."""
    ivf = lists.ivf
    members = np.unpackbits(allowed.bitmap, count=len(lists.id_map), bitorder="little").view(bool)
    chosen = np.flatnonzero(members[lists.positions])  # entries, list after list
    ids = lists.id_map[lists.positions[chosen]]
    bounds = np.searchsorted(chosen, lists.offsets)  # list l's chosen entries: chosen[bounds[l]:bounds[l + 1]]
    copy: FaissIndex
    if isinstance(ivf, faiss.IndexIVFScalarQuantizer):
        copy = faiss.IndexIVFScalarQuantizer(
            ivf.quantizer, ivf.d, ivf.nlist, ivf.sq.qtype, ivf.metric_type, ivf.by_residual
        )
        copy.sq = ivf.sq  # the trained codec
    else:
        copy = faiss.IndexIVFFlat(ivf.quantizer, ivf.d, ivf.nlist, ivf.metric_type)
    copy.is_trained = True
    copy.nprobe = ivf.nprobe  # the source's search parameter, which a search without params uses
    for i in np.flatnonzero(np.diff(bounds)).tolist():
        start, stop = int(bounds[i]), int(bounds[i + 1])
        codes = np.ascontiguousarray(lists.codes[i][chosen[start:stop] - lists.offsets[i]])
        list_ids = np.ascontiguousarray(ids[start:stop])  # both named: FAISS reads them during the call
        copy.invlists.add_entries(i, stop - start, faiss.swig_ptr(list_ids), faiss.swig_ptr(codes))
    copy.ntotal = len(chosen)
    return Subset(copy, len(chosen), lists.source)


def search_subset(
    subset: Subset, queries: npt.NDArray[np.float32], k: int, params: dict[str, int] | None = None
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """:func:`search` of a :class:`Subset` (its positions are all allowed, ``params`` as there)."""
    k = min(k, subset.count)
    if k <= 0:
        empty = np.empty((len(queries), 0))
        return empty.astype(np.float32), empty.astype(np.int64)
    keep: list[Any] = []
    scores, ids = subset.index.search(queries, k, params=_selecting_params(subset.index, None, keep, params or {}))
    return scores, ids


def search(
    index: FaissIndex,
    queries: npt.NDArray[np.float32],
    k: int,
    exclude: Exclusion | None = None,
    *,
    allowed: Allowed | None = None,
    params: dict[str, int] | None = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Top-k inner products for ``queries`` [Q, D] float32 C-contiguous, among the positions of ``allowed`` (None:
    all; an :class:`Allowed` made with the index's exclusion needs no ``exclude``), leaving out ``exclude``, with the
    search-time ``params`` (names as :func:`get_search_params` gives them) for this search only instead of the
    index's own. Returns (scores, ids), each [Q, k'] with k' = min(k, vectors not excluded, positions allowed); rows
    best first; ids of -1 (fewer than k' results: possible with HNSW/IVF) still present."""
    k = min(k, int(index.ntotal) - (exclude.count if exclude is not None else 0))
    if allowed is not None:
        k = min(k, allowed.count)
    if k <= 0:
        empty = np.empty((len(queries), 0))
        return empty.astype(np.float32), empty.astype(np.int64)
    if exclude is None and allowed is None and not params:
        scores, ids = index.search(queries, k)
        return scores, ids
    inner = faiss.downcast_index(index.index)
    keep: list[Any] = []  # the nested parameter and selector objects, alive until the search returns
    selectors = [] if exclude is None else [exclude.selector]
    if allowed is not None:
        selectors.append(allowed.selector)
    selector = selectors[0] if len(selectors) == 1 else None
    if len(selectors) == 2:
        selector = faiss.IDSelectorAnd(selectors[0], selectors[1])
    keep += selectors
    scores, positions = inner.search(queries, k, params=_selecting_params(inner, selector, keep, params or {}))
    id_map = exclude.id_map if exclude is not None else _id_view(index)
    ids = np.where(positions >= 0, id_map[np.maximum(positions, 0)], -1)
    return scores, ids


def _selecting_params(layer: FaissIndex, selector: Any, keep: list[Any], overrides: dict[str, int]) -> Any:
    """Search parameters for ``layer`` that carry ``selector`` (None: none) down to the index that scans, and the
    layer's search-time settings (nprobe, efSearch, k_factor), ``overrides`` replacing them, which typed parameters
    would otherwise reset."""
    layer = faiss.downcast_index(layer)
    params: Any
    if isinstance(layer, faiss.IndexPreTransform):
        params = faiss.SearchParametersPreTransform()
        params.index_params = _selecting_params(layer.index, selector, keep, overrides)
    elif isinstance(layer, faiss.IndexRefine):
        params = faiss.IndexRefineSearchParameters()
        params.k_factor = overrides.get("k_factor", layer.k_factor)
        params.base_index_params = _selecting_params(layer.base_index, selector, keep, overrides)
    else:
        if isinstance(layer, faiss.IndexIVF):
            params = faiss.SearchParametersIVF()
            params.nprobe = overrides.get("nprobe", layer.nprobe)
        elif isinstance(layer, faiss.IndexHNSW):
            params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]  # missing from the stubs
            params.efSearch = overrides.get("efSearch", layer.hnsw.efSearch)
        else:
            params = faiss.SearchParameters()
        if selector is not None:
            params.sel = selector
    keep.append(params)
    return params


def reconstruct(index: FaissIndex, item_id: int) -> npt.NDArray[np.float32] | None:
    """The stored vector for ``item_id`` [D] float32, or None if the index does not hold that id."""
    try:
        vector: npt.NDArray[np.float32] = index.reconstruct(int(item_id))
    except RuntimeError:  # IndexIDMap2 raises for an unknown id
        return None
    return vector


def exact_search(
    vectors: npt.NDArray[np.float32], queries: npt.NDArray[np.float32], k: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Exact top-k inner products of ``queries`` [Q, D] over the rows of ``vectors`` [N, D] (both float32,
    C-contiguous): (scores, rows), each [Q, min(k, N)], best first. FAISS's scan, on the calling thread's FAISS
    threads (numpy's matrix product would start BLAS threads of its own)."""
    k = min(k, len(vectors))
    if k <= 0:
        empty = np.empty((len(queries), 0))
        return empty.astype(np.float32), empty.astype(np.int64)
    scores, rows = faiss.knn(queries, vectors, k, faiss.METRIC_INNER_PRODUCT)
    return scores, rows


def exact_index(vectors: npt.NDArray[np.float32]) -> FaissIndex:
    """A flat inner-product index over ``vectors`` [N, D] float32 unit rows, addressed by row (no id map)."""
    index = faiss.IndexFlatIP(int(vectors.shape[1]))
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def range_search(
    index: FaissIndex, queries: npt.NDArray[np.float32], min_score: float
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Every (query, indexed row) pair of ``queries`` [Q, D] float32 and an :func:`exact_index` whose inner product
    is at least ``min_score``: (query rows [P], indexed rows [P], scores [P]), grouped by query row."""
    radius = float(np.nextafter(np.float32(min_score), np.float32(-np.inf)))  # FAISS keeps the scores above it
    lims, scores, rows = index.range_search(np.ascontiguousarray(queries, dtype=np.float32), radius)
    query_rows = np.repeat(np.arange(len(queries), dtype=np.int64), np.diff(lims).astype(np.int64))
    keep = scores >= min_score
    return query_rows[keep], rows[keep].astype(np.int64, copy=False), scores[keep]
