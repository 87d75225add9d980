"""Which FAISS index a collection gets, and the search-time knob that makes it meet the recall target.

``choose_index(n, dim, memory_budget)`` is the rule, a pure function re-applied at every publish (a collection
that grows past a threshold switches type). Its thresholds follow the bench's "index_types" member (CLIP-like
512-d vectors, one FAISS thread; see bench/README.md, "index_types"):

* ``Flat`` (exact) up to ``FLAT_MAX_VECTORS``: a query scans 4*dim bytes per vector, so its time grows with the
  collection. Below the threshold it is fast enough, exact, and needs no training.
* Above it, ``IVF{nlist},SQ8``: ``nlist`` is the power of two nearest ``IVF_LISTS_PER_SQRT_N * sqrt(n)`` (2048 at
  1M), with at least ``IVF_MIN_POINTS_PER_LIST`` vectors per list; the coarse quantizer trains on a seeded sample
  of ``_faiss_io.TRAIN_POINTS_PER_LIST`` vectors per list. More lists would build longer for a modestly faster
  query. SQ8 codes take about a quarter of Flat's memory and reach the recall target at a small nprobe. HNSW32
  answers faster at the same recall but takes several times as long to build (at every publish) and more memory
  than Flat; SQfp16 codes double the memory for a higher recall ceiling that the target does not need.
* Under a memory budget that SQ8 does not fit, smaller codes (SQ6, SQ4, 4-bit fast-scan PQ), which may not reach
  the target (PQ256x4fs stays well below it at any nprobe): the calibration then records what they reach.
  Collections too small for IVF lists use the same codes without lists. When none fits, IVF with SQ8 codes, whose
  inverted lists the server memory-maps from disk past the budget (:mod:`indexer.store.segments`), so that its
  own memory holds the coarse centroids and ids, not the codes.
* Vectors without cluster structure (uniform random, the ANN worst case) need nearly every IVF list; when the
  calibrated nprobe exceeds ``MAX_PROBE_SHARE`` of the lists, :func:`build_calibrated` publishes Flat instead.

The knob (``nprobe`` for IVF, ``efSearch`` for HNSW) is not guessed: :func:`calibrate` raises it along
``KNOB_LADDER`` until recall@10 against exact search, measured on ``RECALL_QUERIES`` queries made from the
collection's own vectors, reaches ``TARGET_RECALL + RECALL_MARGIN`` (the margin absorbs the sampling error of a
few hundred queries). The chosen value is saved in the index file and in the manifest, so the server uses it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from . import _faiss_io
from ._faiss_io import FaissIndex, VectorRows

logger = logging.getLogger(__name__)

AUTO = "auto"  # the factory "string" that asks for choose_index
FLAT_MAX_VECTORS = 20_000  # exact search up to here (its query time: bench/README.md, "index_types")
IVF_LISTS_PER_SQRT_N = 2  # 1M vectors: 2048 lists (more lists: a longer build for a modestly faster query)
IVF_MIN_LISTS = 16  # fewer lists than this is no index: exhaustive codes instead
IVF_MAX_LISTS = 16_384  # training cost grows with nlist^2; past ~10M vectors use a bigger machine or IVF-PQ
IVF_MIN_POINTS_PER_LIST = 39  # FAISS warns below this many training points per centroid
PQ_MIN_VECTORS = 16 * IVF_MIN_POINTS_PER_LIST  # 4-bit PQ trains 16 centroids per sub-vector
TARGET_RECALL = 0.95  # recall@10 against exact search that a published index must reach
RECALL_MARGIN = 0.01  # calibrate to TARGET_RECALL + this, for the sampling error of the measurement
RECALL_K = 10
RECALL_QUERIES = 200  # queries of the recall measurement (their exact answers are recomputed at every publish)
QUERY_NOISE = 0.5  # query = normalize(v + QUERY_NOISE * g / sqrt(dim)), g ~ N(0, I): cos(query, v) ~ 0.9
RECALL_SEED = 0
GROUND_TRUTH_CHUNK = 65_536  # catalog rows per exact-score matrix product (200 x 65536 float32 = 52 MB)
# nprobe / efSearch values tried, in order (about x1.4 per step); values past the index's own limit are skipped
KNOB_LADDER = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 4096)
# bytes of one vector besides its code: IDMap2 id (8) and reverse hash map entry (~48), IVF list id (8) and
# direct map entry (8)
OVERHEAD_BYTES_PER_VECTOR = 72
# an auto-chosen IVF that needs more than this share of its lists to reach the target scans most of the collection
# anyway (vectors without cluster structure, e.g. uniform random): exact Flat is then about as fast, and is used
# instead, budget permitting
MAX_PROBE_SHARE = 0.5


@dataclass(frozen=True)
class IndexChoice:
    """A FAISS factory string (normalized, "IDMap2,...") with its search-time parameters and why it was chosen."""

    factory: str
    search_params: Mapping[str, int]
    reason: str


@dataclass(frozen=True)
class _Codec:
    body: str  # factory component after the IVF part: "SQ8", "PQ{m}x4fs"
    bits_per_dim: float  # code size; PQ fast-scan: 4 bits per sub-vector of 2 dims = 2 bits per dim


# the order of preference past the flat threshold: best recall ceiling first; the budget picks the first that fits
_CODECS = (_Codec("SQ8", 8), _Codec("SQ6", 6), _Codec("SQ4", 4), _Codec("PQ{m}x4fs", 2), _Codec("PQ{m4}x4fs", 1))


def choose_index(
    n: int, dim: int, memory_budget_bytes: int | None = None, *, flat_max_vectors: int = FLAT_MAX_VECTORS
) -> IndexChoice:
    """The index for ``n`` vectors of ``dim`` float32 components, fitting ``memory_budget_bytes`` if given.

    Never an index that cannot be built from ``n`` vectors: IVF only with >= ``IVF_MIN_LISTS`` lists of
    >= ``IVF_MIN_POINTS_PER_LIST`` vectors each; ``n`` = 0 is always Flat. When no candidate fits the budget the
    smallest is returned (the reason says so) rather than failing the build. ``search_params`` holds the knob's
    starting value; :func:`calibrate` sets the final one on the built index.
    """
    if n < 0 or dim < 1:
        raise ValueError(f"need n >= 0 and dim >= 1, got n={n}, dim={dim}")
    flat_bytes = estimated_bytes("Flat", n, dim)
    budget = f"the memory budget of {memory_budget_bytes:,} bytes" if memory_budget_bytes is not None else ""
    fits_flat = memory_budget_bytes is None or flat_bytes <= memory_budget_bytes
    if n == 0 or (n <= flat_max_vectors and fits_flat):
        return IndexChoice(_faiss_io.normalize_factory("Flat"), {}, f"{n} vectors <= {flat_max_vectors}: exact")
    nlist = ivf_lists(n)
    prefix = f"IVF{nlist}," if nlist else ""
    params = {"nprobe": max(1, nlist // 64)} if nlist else {}
    trainable = [c for c in _CODECS if _codec_body(c, dim) and (c.bits_per_dim >= 4 or n >= PQ_MIN_VECTORS)]
    candidates = [prefix + _codec_body(codec, dim) for codec in trainable]
    if n <= flat_max_vectors:  # small but over budget as Flat: exhaustive codes, smallest first that fits
        candidates = [c.removeprefix(prefix) for c in candidates]
        params = {}
    for body in candidates:
        size = estimated_bytes(body, n, dim)
        if memory_budget_bytes is None or size <= memory_budget_bytes:
            why = f"{n} vectors > {flat_max_vectors}" if n > flat_max_vectors else f"Flat exceeds {budget}"
            return IndexChoice(_faiss_io.normalize_factory(body), params, f"{why}: {body}, ~{size:,} bytes")
    if nlist:  # served from disk: the lists memory-mapped, the codes the target needs
        body = candidates[0]
        return IndexChoice(
            _faiss_io.normalize_factory(body),
            params,
            f"no index type fits {budget} in memory; {body} (~{estimated_bytes(body, n, dim):,} bytes) with its "
            "inverted lists memory-mapped from disk",
        )
    body = candidates[-1]
    return IndexChoice(
        _faiss_io.normalize_factory(body),
        params,
        f"no index type fits {budget}; using the smallest, {body} (~{estimated_bytes(body, n, dim):,} bytes)",
    )


def ivf_lists(n: int) -> int:
    """IVF lists for ``n`` vectors: power of two nearest 4*sqrt(n), within the limits; 0 when n is too small."""
    if n < IVF_MIN_LISTS * IVF_MIN_POINTS_PER_LIST:
        return 0
    nlist = 2 ** round(math.log2(IVF_LISTS_PER_SQRT_N * math.sqrt(n)))
    most = 2 ** int(math.log2(n // IVF_MIN_POINTS_PER_LIST))
    return int(max(IVF_MIN_LISTS, min(nlist, most, IVF_MAX_LISTS)))


def _codec_body(codec: _Codec, dim: int) -> str:
    if "{m}" in codec.body:
        return codec.body.format(m=dim // 2) if dim % 2 == 0 else ""
    if "{m4}" in codec.body:
        return codec.body.format(m4=dim // 4) if dim % 4 == 0 else ""
    return codec.body


def estimated_bytes(factory: str, n: int, dim: int) -> int:
    """Approximate memory of an index ``factory`` over ``n`` vectors of ``dim`` (codes, ids, maps, centroids)."""
    body = _faiss_io.normalize_factory(factory).removeprefix(_faiss_io.IDMAP_PREFIX)
    per_vector, fixed = float(OVERHEAD_BYTES_PER_VECTOR), 0
    for part in body.split(","):
        if part.startswith("IVF"):
            fixed += int(part[3:].split("_")[0]) * dim * 4
        elif part.startswith("HNSW"):
            per_vector += int(part[4:] or 32) * 2 * 4 * 1.05  # level-0 links, plus the upper levels
        elif part == "Flat":
            per_vector += dim * 4
        elif part.startswith("SQ"):
            bits = {"SQfp16": 16, "SQbf16": 16, "SQ8": 8, "SQ6": 6, "SQ4": 4}.get(part, 8)
            per_vector += math.ceil(dim * bits / 8)
            fixed += 2 * dim * 4
        elif part.startswith("PQ"):
            m, _, rest = part[2:].partition("x")
            nbits = int(rest.removesuffix("fs") or 8)
            per_vector += math.ceil(int(m) * nbits / 8)
            fixed += dim * (2**nbits) * 4
    return int(per_vector * n + fixed)


# --- calibration ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """The search parameters set on an index and the recall@k they measured (None: nothing to measure)."""

    search_params: dict[str, int]
    recall: float | None
    queries: int


def recall_queries(
    vectors: VectorRows, count: int = RECALL_QUERIES, seed: int = RECALL_SEED
) -> npt.NDArray[np.float32]:
    """[min(count, N), D] float32 unit queries near stored vectors: a random sample, each perturbed by Gaussian
    noise of norm ~``QUERY_NOISE`` (cos ~0.9 to its source), so a query is near the collection but not in it."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(vectors), size=min(count, len(vectors)), replace=False))
    dim = vectors.shape[1]
    noise = rng.standard_normal((len(rows), dim)).astype(np.float32) * np.float32(QUERY_NOISE / math.sqrt(dim))
    queries = vectors[rows] + noise
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return np.ascontiguousarray(queries, dtype=np.float32)


def exact_kth_scores(vectors: VectorRows, queries: npt.NDArray[np.float32], k: int) -> npt.NDArray[np.float32]:
    """[Q] float32: the k-th largest inner product of each query over ``vectors`` [N, D] (numpy, chunked; k <= N)."""
    best = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    for start in range(0, len(vectors), GROUND_TRUTH_CHUNK):
        scores = queries @ vectors[start : start + GROUND_TRUTH_CHUNK].T  # [Q, chunk]
        merged = np.concatenate([best, scores], axis=1)
        keep = min(k, merged.shape[1])
        best = -np.partition(-merged, keep - 1, axis=1)[:, :keep]
    kth: npt.NDArray[np.float32] = best.min(axis=1)
    return kth


def measure_recall(
    index: FaissIndex,
    ids: npt.NDArray[np.int64],
    vectors: VectorRows,
    queries: npt.NDArray[np.float32],
    kth: npt.NDArray[np.float32],
    k: int,
) -> float:
    """Recall@k of ``index`` against exact search: the fraction of its top-k hits that score at least the exact
    k-th score (``kth`` [Q]), so that equal vectors (duplicate images) count as found whichever id comes back.
    ``ids`` [N] sorted int64 and ``vectors`` [N, D] are the indexed rows."""
    _, found = _faiss_io.search(index, queries, k)  # [Q, k] ids, -1 where missing
    rows = np.clip(np.searchsorted(ids, found), 0, len(ids) - 1)
    valid = (found >= 0) & (ids[rows] == found)
    true_scores = np.einsum("qd,qkd->qk", queries, vectors[rows])  # exact score of each hit
    hits = valid & (true_scores >= kth[:, None] - 1e-5)
    return float(hits.sum() / (len(queries) * k))


def calibrate(
    index: FaissIndex,
    ids: npt.NDArray[np.int64],
    vectors: VectorRows,
    factory: str,
    *,
    target: float = TARGET_RECALL + RECALL_MARGIN,
    queries: int = RECALL_QUERIES,
) -> Calibration:
    """Set the knob (nprobe, efSearch) of ``index`` to the smallest value on ``KNOB_LADDER`` in its useful range
    whose recall@10 reaches ``target``, and return the search parameters with that recall. ``ids`` [N] int64
    sorted and ``vectors`` [N, D] float32 are what the index holds. Exact ``Flat`` reports 1.0 without measuring,
    an empty index None; an index without a knob is only measured. If no value reaches the target, the largest
    stays set and a warning says what it reaches."""
    if len(ids) == 0:
        return Calibration(_faiss_io.get_search_params(index), None, 0)
    if _faiss_io.is_exact(factory):
        return Calibration(_faiss_io.get_search_params(index), 1.0, 0)
    k = min(RECALL_K, len(ids))
    query_vectors = recall_queries(vectors, queries)
    kth = exact_kth_scores(vectors, query_vectors, k)
    knob = _faiss_io.search_knob(index)
    recall = measure_recall(index, ids, vectors, query_vectors, kth, k) if knob is None else 0.0
    if knob is not None:
        name, lowest, highest = knob
        values = [v for v in KNOB_LADDER if lowest <= v < highest] + [min(highest, KNOB_LADDER[-1])]
        for value in values:
            _faiss_io.set_search_params(index, {name: value})
            recall = measure_recall(index, ids, vectors, query_vectors, kth, k)
            if recall >= target:
                break
    if recall < target:
        logger.warning(
            "%s reaches recall@%d %.3f at most (%s), below the target %.3f: consider another index type",
            factory,
            k,
            recall,
            _faiss_io.get_search_params(index) or "no search parameters",
            target,
        )
    return Calibration(_faiss_io.get_search_params(index), recall, len(query_vectors))


@dataclass(frozen=True)
class BuiltIndex:
    """An index built and calibrated from ``factory``; ``note`` says why an auto choice was replaced ("" if not)."""

    index: FaissIndex
    factory: str
    calibration: Calibration
    note: str


def build_calibrated(
    ids: npt.NDArray[np.int64],
    vectors: VectorRows,
    dim: int,
    factory: str,
    *,
    auto: bool = False,
    memory_budget_bytes: int | None = None,
) -> BuiltIndex:
    """Build ``factory`` over ``ids`` [N] int64 sorted / ``vectors`` [N, dim] float32 and :func:`calibrate` it.

    For an ``auto`` choice (from :func:`choose_index`), an IVF whose calibrated nprobe exceeds ``MAX_PROBE_SHARE``
    of its lists is replaced by exact Flat when that fits ``memory_budget_bytes``: it would be no faster."""
    index = _faiss_io.build_index(ids, vectors, dim, factory)
    tuned = calibrate(index, ids, vectors, factory)
    knob = _faiss_io.search_knob(index)
    if not (auto and knob is not None and knob[0] == "nprobe"):
        return BuiltIndex(index, factory, tuned, "")
    nprobe, nlist = tuned.search_params["nprobe"], knob[2]
    flat_fits = memory_budget_bytes is None or estimated_bytes("Flat", len(ids), dim) <= memory_budget_bytes
    if nprobe <= MAX_PROBE_SHARE * nlist or not flat_fits:
        return BuiltIndex(index, factory, tuned, "")
    note = (
        f"; but {factory.removeprefix(_faiss_io.IDMAP_PREFIX)} needed nprobe={nprobe} of {nlist} lists for "
        f"recall@{RECALL_K} {TARGET_RECALL} (vectors without cluster structure), so exact Flat, as fast"
    )
    del index
    flat = _faiss_io.normalize_factory("Flat")
    index = _faiss_io.build_index(ids, vectors, dim, flat)
    return BuiltIndex(index, flat, calibrate(index, ids, vectors, flat), note)
