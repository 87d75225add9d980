"""The FAISS idioms the index store relies on, in one place (style A6).

Contracts: every index is built with ``faiss.index_factory(dim, factory, METRIC_INNER_PRODUCT)`` behind an
``IndexIDMap2`` (our own stable int64 ids, reconstruct-by-id); vectors go in as C-contiguous float32 rows that the
caller has L2-normalized, so scores are cosine similarities. FAISS's ``D, I`` become ``scores, ids`` here and labels
of -1 ("not enough results") never leave this module.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from .errors import IndexBuildError, IndexFormatError

logger = logging.getLogger(__name__)

FaissIndex = Any  # faiss ships no type stubs
IDMAP_PREFIX = "IDMap2,"
HNSW_EF_SEARCH = 128  # HNSW candidate list length at query time (faiss default 16 loses recall at k=100)
_IDMAP_PREFIX_RE = re.compile(r"^\s*IDMap2?\s*,\s*")
_LOSSY_CODEC_RE = re.compile(r"PQ|SQ|RQ|LSH|RaBitQ|LSQ")  # codecs whose reconstruct() only approximates the input


def normalize_factory(factory: str) -> str:
    """``"HNSW32,Flat"`` -> ``"IDMap2,HNSW32,Flat"``: every index is wrapped in an IDMap2 exactly once."""
    body = _IDMAP_PREFIX_RE.sub("", factory).strip()
    if not body:
        raise IndexBuildError(f"empty FAISS factory string {factory!r}: use e.g. 'IDMap2,Flat'")
    return IDMAP_PREFIX + body


def is_lossy(factory: str) -> bool:
    """Whether vectors reconstructed from an index built with ``factory`` only approximate the ones added."""
    return bool(_LOSSY_CODEC_RE.search(factory))


def build_index(ids: npt.NDArray[np.int64], vectors: npt.NDArray[np.float32], dim: int, factory: str) -> FaissIndex:
    """Build an inner-product index over ``vectors`` [N, dim] float32 unit rows with ``ids`` [N] int64.

    Trains on the vectors themselves when the factory needs it (IVF, PQ, ...); raises IndexBuildError when FAISS
    cannot build it (unknown factory string, too few vectors to train).
    """
    try:
        index = faiss.index_factory(dim, normalize_factory(factory), faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise IndexBuildError(f"FAISS does not understand the factory string {factory!r}: {exc}") from exc
    if not index.is_trained:
        if len(vectors) == 0:
            raise IndexBuildError(f"factory {factory!r} must be trained, but there are no vectors to train it on")
        try:
            index.train(vectors)
        except RuntimeError as exc:
            raise IndexBuildError(
                f"FAISS could not train {factory!r} on {len(vectors)} vectors: {exc}. "
                "Use fewer IVF lists / PQ centroids, or 'IDMap2,Flat' for small collections."
            ) from exc
    if len(vectors):
        index.add_with_ids(vectors, ids)
    _prepare_for_queries(index)
    return index


def _prepare_for_queries(index: FaissIndex) -> None:
    """Give IVF a direct map (so reconstruct-by-id works) and HNSW a wider search; both are saved with the index."""
    inner = faiss.downcast_index(index.index)
    if isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efSearch = max(inner.hnsw.efSearch, HNSW_EF_SEARCH)
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None:
        ivf.make_direct_map()


def set_threads(threads: int) -> None:
    """OpenMP threads FAISS uses per search (a server sharing its cores with torch sets this explicitly)."""
    faiss.omp_set_num_threads(int(threads))


def write_index(index: FaissIndex, path: Path) -> None:
    """``faiss.write_index`` to ``path`` (not fsynced: the caller does that)."""
    faiss.write_index(index, str(path))


def read_index(path: Path) -> FaissIndex:
    """Read an index file fully into memory; IndexFormatError if it is truncated or not a FAISS index."""
    if not path.is_file():
        raise FileNotFoundError(f"FAISS index file {path} does not exist")
    try:
        return faiss.read_index(str(path))
    except RuntimeError as exc:
        raise IndexFormatError(f"cannot read FAISS index {path} (truncated or corrupt?): {exc}") from exc


def index_ids(index: FaissIndex) -> npt.NDArray[np.int64]:
    """All ids held by an IDMap/IDMap2 index, int64 [ntotal], in insertion order."""
    ids: npt.NDArray[np.int64] = faiss.vector_to_array(index.id_map).astype(np.int64, copy=False)
    return ids


def search(
    index: FaissIndex, queries: npt.NDArray[np.float32], k: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Top-k inner products for ``queries`` [Q, D] float32 C-contiguous. Returns (scores, ids), each [Q, k'] with
    k' = min(k, ntotal); rows best first; ids of -1 (fewer than k' results, possible with HNSW/IVF) still present."""
    k = min(k, int(index.ntotal))
    if k == 0:
        empty = np.empty((len(queries), 0))
        return empty.astype(np.float32), empty.astype(np.int64)
    scores, ids = index.search(queries, k)
    return scores, ids


def reconstruct(index: FaissIndex, item_id: int) -> npt.NDArray[np.float32] | None:
    """The stored vector for ``item_id`` [D] float32, or None if the index does not hold that id."""
    try:
        vector: npt.NDArray[np.float32] = index.reconstruct(int(item_id))
    except RuntimeError:  # IndexIDMap2 raises for an unknown id
        return None
    return vector
