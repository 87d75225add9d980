"""Index types at scale: Flat vs HNSW vs IVF (SQ8, fp16, 4-bit PQ) and the indexer's auto choice, at 100k and 1M.

Run from the repository root: ``.venv/bin/python -m bench.bench_index_types --workdir /some/cache [--sizes 100000]``
(``--smoke``: tiny sizes, < 60 s, for CI). Three parts:

- ``blas``: exact (IDMap2,Flat) search over 100,000 x 512 CLIP-like vectors for batches of 1, 8, 32 and 64
  queries, with FAISS's default ``distance_compute_blas_threshold`` (128,000 floats in 1.15), the one
  ``indexer._faiss_io`` sets on import, and 1 (always BLAS); 1 and 2 threads. Time per batch.
- ``flat_scaling``: single-query p50 of exact search for 5k...100k vectors: where exact search stops being fast,
  i.e. the auto choice's flat threshold (``indexer.index_choice.FLAT_MAX_VECTORS``).
- ``indexes``: for each data set and size, each index type built as the indexer builds it
  (``indexer._faiss_io.build_index``: IDMap2 wrapper, seeded training sample), in a fresh child process so that
  memory is measured alone: build time (2 threads), index bytes (the written file) and the process's RSS after the
  build minus before it (and the peak), then for each value of the search knob (IVF nprobe, HNSW efSearch):
  recall@10 against exact search (numpy) over ``--queries`` held-out queries, single-query p50/p99 with 1 and 2
  FAISS threads, and throughput in batches of 64 (2 threads). ``auto`` is what publish does:
  ``index_choice.choose_index``, then ``index_choice.build_calibrated`` (build, calibrate the knob on queries
  perturbed from the indexed vectors, fall back to Flat if the IVF would scan most lists); its build time includes
  the calibration, and its row shows the knob it picked, the recall it recorded, and the recall and speed on the
  held-out queries.

Data: CLIP-like vectors (:func:`bench.inputs.make_clip_like`: clustered, in a narrow cone, with a fast-decaying
spectrum, as real CLIP embeddings are) and, as the worst case for every ANN index, unit vectors uniform on the
sphere (:func:`bench.inputs.make_uniform`). Queries are fresh draws from the same distribution, never in the index.
Vectors, queries and exact neighbours are cached in ``--workdir`` (2 GB per 1M x 512 data set).

Timings are medians over ``--repeat`` repetitions with min-max. Builds are repeated ``--repeat`` times up to
200,000 vectors and once above (an HNSW graph over 1M x 512 takes tens of minutes on 2 cores). Results: a markdown
table on stdout (``markdown(results)``, also the suite's report) and JSON in
``bench/results/index-types-<date>[-tag].json`` (or ``--out``; ``--results-dir`` for another folder).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    REPO,
    RESULTS_DIR,
    median_min_max,
    new_results,
    proc_status_kb,
    results_file,
    summary,
    workdir_or_temporary,
    write_json,
)
from bench.inputs import (
    CENTRE_WEIGHT,
    CLUSTERS,
    GENERATOR_VERSION,
    MEAN_WEIGHT,
    NOISE_WEIGHT,
    SPECTRUM_POWER,
    make_clip_like,
    make_uniform,
)

GT_CHUNK = 100_000  # catalog rows per exact-score product
K = 10
TARGET_RECALL = 0.95
BATCH = 64
BLAS_BATCHES = (1, 8, 32, 64)
BLAS_SIZE = 100_000
FLAT_SIZES = (5_000, 10_000, 20_000, 50_000, 100_000)
TIMING_SECONDS = 5.0  # single-query timing budget per knob value and thread count, all repetitions together
MIN_TIMED, MAX_TIMED = 30, 300  # single queries timed per repetition
CHEAP_BUILD_MAX = 200_000  # builds are repeated up to this size
KINDS = ("flat", "hnsw", "ivf-sq8", "ivf-fp16", "ivf-pq", "auto")
SWEEPS = {  # knob values measured per kind (IVF values above nlist are dropped)
    "hnsw": ("efSearch", (16, 32, 64, 128, 256, 512)),
    "ivf-sq8": ("nprobe", (2, 4, 8, 16, 32, 64, 128, 256)),
    "ivf-fp16": ("nprobe", (2, 4, 8, 16, 32, 64)),
    "ivf-pq": ("nprobe", (4, 16, 64)),
}
UNIFORM_EXTRA_NPROBE = (512, 1024)  # uniform vectors need a large share of the lists


def factory_for(kind: str, n: int, dim: int) -> str:
    """The factory string of ``kind`` for ``n`` vectors of ``dim`` (IVF lists as the auto choice would pick)."""
    from indexer.index_choice import ivf_lists

    nlist = max(ivf_lists(n), 16)
    return {
        "flat": "Flat",
        "hnsw": "HNSW32,Flat",
        "ivf-sq8": f"IVF{nlist},SQ8",
        "ivf-fp16": f"IVF{nlist},SQfp16",
        "ivf-pq": f"IVF{nlist},PQ{dim // 2}x4fs",
    }[kind]


# ------------------------------------------------------------------------------------------------------------ data


def dataset_files(workdir: Path, dataset: str, n: int, dim: int, n_queries: int) -> dict[str, Path]:
    """Cached ``vectors`` (n_max rows), ``queries`` and the exact top-``K`` ``neighbours`` for ``n``."""
    stem = f"{dataset}-d{dim}-v{GENERATOR_VERSION}"
    return {
        "vectors": workdir / f"{stem}-vectors.npy",
        "queries": workdir / f"{stem}-q{n_queries}-queries.npy",
        "neighbours": workdir / f"{stem}-q{n_queries}-n{n}-neighbours.npy",
    }


def prepare_dataset(workdir: Path, dataset: str, sizes: Sequence[int], dim: int, n_queries: int) -> None:
    """Generate (or reuse) the vectors for max(sizes) and the exact neighbours of the queries for each size."""
    files = dataset_files(workdir, dataset, max(sizes), dim, n_queries)
    cached = files["vectors"].exists() and np.load(files["vectors"], mmap_mode="r").shape[0] >= max(sizes)
    if not cached or not files["queries"].exists():
        started = time.perf_counter()
        make = make_clip_like if dataset == "clip" else make_uniform
        vectors, queries = make(max(sizes), dim, seed=0, n_queries=n_queries)
        np.save(files["vectors"], vectors)
        np.save(files["queries"], queries)
        print(f"  generated {dataset} {vectors.shape} in {time.perf_counter() - started:.0f} s", flush=True)
    vectors = np.load(files["vectors"], mmap_mode="r")
    queries = np.load(files["queries"])
    for n in sizes:
        path = dataset_files(workdir, dataset, n, dim, n_queries)["neighbours"]
        if not path.exists():
            np.save(path, exact_neighbours(np.asarray(vectors[:n]), queries, K))


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """[Q, k] int64 row numbers of the k largest inner products, best first (numpy, chunked)."""
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_rows = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(vectors), GT_CHUNK):
        scores = queries @ vectors[start : start + GT_CHUNK].T
        keep = min(k, scores.shape[1])
        top = np.argpartition(-scores, keep - 1, axis=1)[:, :keep]
        best_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, axis=1)], axis=1)
        best_rows = np.concatenate([best_rows, top + start], axis=1)
        order = np.argsort(-best_scores, axis=1)[:, :k]
        best_scores = np.take_along_axis(best_scores, order, axis=1)
        best_rows = np.take_along_axis(best_rows, order, axis=1)
    return best_rows


# ---------------------------------------------------------------------------------------------------- measurements


def reset_peak_rss() -> None:
    """Make VmHWM restart from the current RSS (Linux >= 4.0); without it the peak includes data loading."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as refs:
            refs.write("5")
    except OSError:
        pass


def recall_at_k(found: np.ndarray, neighbours: np.ndarray) -> float:
    """Mean |found ∩ exact| / K over queries; ``found`` [Q, K] ids (= row numbers here, -1 for missing)."""
    hits = [len(set(f[f >= 0].tolist()) & set(e.tolist())) for f, e in zip(found, neighbours, strict=True)]
    return float(np.mean(hits)) / neighbours.shape[1]


def single_query_times(index: Any, queries: np.ndarray, repeat: int) -> dict[str, Any]:
    """Per repetition, the p50 and p99 (ms) of one-query searches over up to MAX_TIMED queries."""
    probe = []
    for query in queries[:5]:
        started = time.perf_counter()
        index.search(query[None], K)
        probe.append(time.perf_counter() - started)
    count = int(np.clip(TIMING_SECONDS / (statistics.median(probe) * repeat), MIN_TIMED, MAX_TIMED))
    p50, p99 = [], []
    for _ in range(repeat):
        times = []
        for query in queries[:count]:
            started = time.perf_counter()
            index.search(query[None], K)
            times.append(time.perf_counter() - started)
        p50.append(1e3 * float(np.percentile(times, 50)))
        p99.append(1e3 * float(np.percentile(times, 99)))
    return {"p50_ms": summary(p50), "p99_ms": summary(p99), "queries_timed": count}


def batch_throughput(index: Any, queries: np.ndarray, repeat: int) -> dict[str, Any]:
    """Queries per second searching all queries in batches of BATCH."""
    rates = []
    for _ in range(repeat):
        started = time.perf_counter()
        for start in range(0, len(queries), BATCH):
            index.search(queries[start : start + BATCH], K)
        rates.append(len(queries) / (time.perf_counter() - started))
    return summary(rates)


def measure_point(
    index: Any, queries: np.ndarray, neighbours: np.ndarray, threads: Sequence[int], repeat: int
) -> dict[str, Any]:
    from clip_model.process_tuning import set_own_thread_count

    point: dict[str, Any] = {}
    set_own_thread_count(max(threads))
    _, found = index.search(queries, K)
    point["recall"] = recall_at_k(found, neighbours)
    for count in threads:
        set_own_thread_count(count)
        point[f"single_{count}t"] = single_query_times(index, queries, repeat)
    set_own_thread_count(max(threads))
    point[f"batch{BATCH}_qps_{max(threads)}t"] = batch_throughput(index, queries, repeat)
    return point


# ------------------------------------------------------------------------------------------------------ the child


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Build one index kind over one data set in this (fresh) process and measure it; JSON-ready result."""

    from clip_model.process_tuning import set_own_thread_count
    from indexer import _faiss_io, index_choice

    files = {name: Path(path) for name, path in spec["files"].items()}
    n, dim, kind, repeat = spec["n"], spec["dim"], spec["kind"], spec["repeat"]
    mapped = np.load(files["vectors"], mmap_mode="r")
    vectors = np.array(mapped[:n], dtype=np.float32, copy=True)  # anonymous memory, all touched before the build
    del mapped  # unmapped: the file's pages leave the RSS
    queries = np.load(files["queries"])
    neighbours = np.load(files["neighbours"])
    ids = np.arange(n, dtype=np.int64)
    set_own_thread_count(spec["build_threads"])
    if kind == "auto":
        choice = index_choice.choose_index(n, dim, flat_max_vectors=spec["flat_max"])
        factory = choice.factory
    else:
        factory = _faiss_io.normalize_factory(factory_for(kind, n, dim))
    result: dict[str, Any] = {"kind": kind, "factory": factory, "n": n, "dim": dim}
    build_times, index = [], None
    reset_peak_rss()
    rss_before, peak_before = proc_status_kb("self", "VmRSS"), proc_status_kb("self", "VmHWM")
    builds = repeat if n <= CHEAP_BUILD_MAX else 1
    built = None
    for build in range(builds):
        index = built = None
        started = time.perf_counter()
        if kind == "auto":  # as publish does it: build, calibrate, maybe fall back to Flat
            built = index_choice.build_calibrated(ids, vectors, dim, factory, auto=True)
            index = built.index
        else:
            index = _faiss_io.build_index(ids, vectors, dim, factory)
        build_times.append(time.perf_counter() - started)
        if build == 0:
            result["rss_delta_mb"] = (proc_status_kb("self", "VmRSS") - rss_before) / 1024
            result["rss_peak_delta_mb"] = (proc_status_kb("self", "VmHWM") - max(rss_before, peak_before)) / 1024
    result["build_s"] = summary(build_times)
    with tempfile.TemporaryDirectory(dir=spec["workdir"]) as tmp:
        path = Path(tmp) / "index.faiss"
        _faiss_io.write_index(index, path)
        result["index_mb"] = path.stat().st_size / 2**20
    threads = spec["threads"]
    if built is not None:
        tuned = built.calibration
        result["factory"], result["reason"] = built.factory, choice.reason + built.note
        result["calibrated"] = {"search_params": tuned.search_params, "recall": tuned.recall, "queries": tuned.queries}
        result["points"] = [
            {"params": tuned.search_params, **measure_point(index, queries, neighbours, threads, repeat)}
        ]
        return result
    knob = _faiss_io.search_knob(index)
    values: list[int | None] = [None]
    if kind in SWEEPS and knob is not None:
        name, values_all = SWEEPS[kind]
        extra = UNIFORM_EXTRA_NPROBE if spec["dataset"] == "uniform" and name == "nprobe" else ()
        values = [v for v in (*values_all, *extra) if v <= knob[2]]
    points = []
    for value in values:
        params = {} if value is None or knob is None else {knob[0]: value}
        _faiss_io.set_search_params(index, params)
        points.append({"params": params, **measure_point(index, queries, neighbours, threads, repeat)})
        print(f"    {kind} {params}: recall {points[-1]['recall']:.3f}", file=sys.stderr, flush=True)
    result["points"] = points
    return result


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`child` in a fresh interpreter (its RSS is the index's alone); its last stdout line is JSON."""
    command = [sys.executable, "-m", "bench.bench_index_types", "--child", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO)
    if done.returncode != 0:
        return {"kind": spec["kind"], "n": spec["n"], "error": done.stderr.strip().splitlines()[-5:]}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


# ---------------------------------------------------------------------------------------------------- in-process


def bench_blas(vectors: np.ndarray, queries: np.ndarray, threads: Sequence[int], repeat: int) -> dict[str, Any]:
    """Exact search time per batch for each BLAS threshold, batch size and thread count."""
    import faiss

    from clip_model.process_tuning import set_own_thread_count
    from indexer import _faiss_io

    index = _faiss_io.build_index(np.arange(len(vectors), dtype=np.int64), vectors, vectors.shape[1], "Flat")
    thresholds = {"faiss_default": 128_000, "indexer": _faiss_io.BLAS_THRESHOLD_FLOATS, "always_blas": 1}
    results: dict[str, Any] = {"n": len(vectors), "dim": vectors.shape[1], "thresholds": thresholds, "ms": {}}
    batches = [b for b in BLAS_BATCHES if b <= len(queries)]
    runs: dict[tuple[int, str, int], list[float]] = {}
    try:
        for _ in range(repeat):  # interleaved, so that load changes hit every setting alike
            for count in threads:
                set_own_thread_count(count)
                for name, threshold in thresholds.items():
                    faiss.cvar.distance_compute_blas_threshold = threshold
                    for batch in batches:
                        index.search(queries[:batch], K)  # warm
                        started = time.perf_counter()
                        index.search(queries[:batch], K)
                        runs.setdefault((count, name, batch), []).append(1e3 * (time.perf_counter() - started))
    finally:
        faiss.cvar.distance_compute_blas_threshold = _faiss_io.BLAS_THRESHOLD_FLOATS
    for (count, name, batch), values in runs.items():
        results["ms"].setdefault(f"{count}t", {}).setdefault(name, {})[str(batch)] = summary(values)
    return results


def bench_flat_scaling(
    vectors: np.ndarray, queries: np.ndarray, sizes: Sequence[int], threads: Sequence[int], repeat: int
) -> dict[str, Any]:
    """Single-query p50/p99 of exact search at each size."""

    from clip_model.process_tuning import set_own_thread_count
    from indexer import _faiss_io

    results: dict[str, Any] = {}
    for n in sizes:
        index = _faiss_io.build_index(
            np.arange(n, dtype=np.int64), np.ascontiguousarray(vectors[:n]), vectors.shape[1], "Flat"
        )
        for count in threads:
            set_own_thread_count(count)
            results.setdefault(str(n), {})[f"{count}t"] = single_query_times(index, queries, repeat)
    return results


# ---------------------------------------------------------------------------------------------------------- report


def faiss_machine_info() -> dict[str, Any]:
    """What matters for FAISS beside :func:`bench.common.machine_info`: the load average and FAISS's compile options."""
    import faiss

    return {"loadavg": os.getloadavg(), "faiss_compile_options": faiss.get_compile_options()}


def operating_point(result: dict[str, Any]) -> dict[str, Any]:
    """The fastest measured point reaching TARGET_RECALL (points are in increasing knob order), else the best."""
    points = result.get("points") or []
    for point in points:
        if point["recall"] >= TARGET_RECALL:
            return dict(point)
    return dict(max(points, key=lambda p: p["recall"])) if points else {}


def markdown(results: dict[str, Any]) -> str:
    """The markdown tables of ``results`` (printed at the end of a run, and the suite's report section)."""

    lines: list[str] = []
    threads = results["settings"]["threads"]
    blas = results.get("blas")
    if blas:
        lines += [f"Exact search, {blas['n']:,} x {blas['dim']}, ms per batch (median, min-max):", ""]
        batches = sorted({int(b) for t in blas["ms"].values() for s in t.values() for b in s})
        lines.append("| threads | blas threshold | " + " | ".join(f"batch {b}" for b in batches) + " |")
        lines.append("|---|---|" + "---|" * len(batches))
        for count, settings in blas["ms"].items():
            for name, per_batch in settings.items():
                cells = " | ".join(median_min_max(per_batch[str(b)], ".1f") for b in batches)
                lines.append(f"| {count} | {name} ({blas['thresholds'][name]}) | {cells} |")
        lines.append("")
    scaling = results.get("flat_scaling")
    if scaling:
        lines += ["Exact search, single-query p50 ms (median, min-max over repetitions):", ""]
        lines.append("| vectors | " + " | ".join(f"{t} thread(s)" for t in threads) + " |")
        lines.append("|---|" + "---|" * len(threads))
        for n, per in scaling.items():
            lines.append(
                f"| {int(n):,} | " + " | ".join(median_min_max(per[f"{t}t"]["p50_ms"]) for t in threads) + " |"
            )
        lines.append("")
    if not results.get("indexes"):
        return "\n".join(lines)
    lines += [f"Index types at their operating point (the smallest knob value with recall@10 >= {TARGET_RECALL}):", ""]
    t1, tn = min(threads), max(threads)
    lines.append(
        f"| data | N | index | factory | build s | index MB | RSS delta MB (peak) | params | recall@10 | "
        f"p50 ms {t1}t | p99 ms {t1}t | p50 ms {tn}t | p99 ms {tn}t | batch{BATCH} q/s {tn}t |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in results["indexes"]:
        if "error" in row:
            lines.append(f"| {row.get('dataset')} | {row['n']:,} | {row['kind']} | error: {row['error'][-1]} |")
            continue
        point = operating_point(row)
        params = ", ".join(f"{k}={v}" for k, v in point.get("params", {}).items()) or "-"
        if row["kind"] == "auto" and row["calibrated"]["queries"]:
            params += f" (calibrated recall {row['calibrated']['recall']:.3f})"
        single1, single_n = point[f"single_{t1}t"], point[f"single_{tn}t"]
        cells = [
            row["dataset"], f"{row['n']:,}", row["kind"], row["factory"].removeprefix("IDMap2,"),
            median_min_max(row["build_s"], ".1f"), f"{row['index_mb']:.1f}",
            f"{row['rss_delta_mb']:.0f} ({row['rss_peak_delta_mb']:.0f})", params, f"{point['recall']:.3f}",
            median_min_max(single1["p50_ms"]), f"{single1['p99_ms']['median']:.2f}", median_min_max(single_n["p50_ms"]),
            f"{single_n['p99_ms']['median']:.2f}", f"{point[f'batch{BATCH}_qps_{tn}t']['median']:.0f}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated collection sizes")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=500, help="held-out queries for recall and timing")
    parser.add_argument("--datasets", default="clip,uniform", help="comma-separated: clip, uniform")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {', '.join(KINDS)}")
    parser.add_argument(
        "--skip", default="uniform:hnsw:1000000", help="dataset:kind:n triples to leave out (comma-separated)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of each timing")
    parser.add_argument("--threads", default="1,2", help="FAISS threads for single-query timings")
    parser.add_argument(
        "--build-threads",
        type=int,
        default=1,
        help="FAISS threads while building (on a 2-core box shared with other work, 2 stall on the busy core)",
    )
    parser.add_argument("--flat-max", type=int, default=None, help="auto: flat threshold (default: the indexer's)")
    parser.add_argument("--only", choices=("blas", "flat", "indexes"), default=None, help="run one part")
    parser.add_argument("--workdir", type=Path, default=None, help="cache folder (default: a temporary directory)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 repetition: checks the script in < 60 s")
    parser.add_argument("--no-write", action="store_true", help="do not write a results file")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the JSON results go")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON results to this file instead")
    parser.add_argument("--tag", default="", help="appended to the results file name")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one index kind, JSON spec
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.dim, args.queries, args.repeat = "3000", 64, 100, 1
        args.flat_max = 1000 if args.flat_max is None else args.flat_max
    return args


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Every part the arguments ask for; the results dict (also written to bench/results unless --no-write)."""
    from indexer import index_choice

    sizes = [int(s) for s in args.sizes.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    datasets = [d for d in args.datasets.split(",") if d]
    flat_max = index_choice.FLAT_MAX_VECTORS if args.flat_max is None else args.flat_max
    skip = {tuple(s.split(":")) for s in args.skip.split(",") if s}
    results = new_results()
    results["machine"] |= faiss_machine_info()
    results |= {
        "settings": {"sizes": sizes, "dim": args.dim, "queries": args.queries, "datasets": datasets,
                     "repeat": args.repeat, "threads": threads, "build_threads": args.build_threads,
                     "flat_max": flat_max, "generator": {"version": GENERATOR_VERSION, "clusters": CLUSTERS,
                     "weights": [MEAN_WEIGHT, CENTRE_WEIGHT, NOISE_WEIGHT], "spectrum_power": SPECTRUM_POWER}},
        "indexes": [],
    }  # fmt: skip
    blas_size = min(BLAS_SIZE, max(sizes))
    for dataset in datasets:
        print(f"{dataset}: preparing data", flush=True)
        prepare_dataset(workdir, dataset, sorted({*sizes, blas_size}), args.dim, args.queries)
    if "clip" in datasets and args.only in (None, "blas", "flat"):
        files = dataset_files(workdir, "clip", max(sizes), args.dim, args.queries)
        vectors = np.load(files["vectors"], mmap_mode="r")
        queries = np.load(files["queries"])
        if args.only in (None, "blas"):
            print("blas threshold", flush=True)
            results["blas"] = bench_blas(
                np.ascontiguousarray(vectors[:blas_size]), queries, threads, max(args.repeat, 3)
            )
        if args.only in (None, "flat"):
            print("flat scaling", flush=True)
            flat_sizes = [n for n in FLAT_SIZES if n <= max(sizes)] or [max(sizes) // 4, max(sizes) // 2, max(sizes)]
            results["flat_scaling"] = bench_flat_scaling(vectors, queries, flat_sizes, threads, args.repeat)
    if args.only in (None, "indexes"):
        for dataset in datasets:
            for n in sizes:
                for kind in [k for k in args.kinds.split(",") if k]:
                    if (dataset, kind, str(n)) in skip:
                        continue
                    print(f"{dataset} n={n:,} {kind}", flush=True)
                    started = time.perf_counter()
                    files = dataset_files(workdir, dataset, n, args.dim, args.queries)
                    spec = {"dataset": dataset, "n": n, "dim": args.dim, "kind": kind, "repeat": args.repeat,
                            "threads": threads, "build_threads": args.build_threads, "flat_max": flat_max,
                            "workdir": str(workdir), "files": {k: str(v) for k, v in files.items()}}  # fmt: skip
                    row = {"dataset": dataset, **run_child(spec), "wall_s": time.perf_counter() - started}
                    results["indexes"].append(row)
                    if "error" in row:
                        print(f"  error: {row['error']}", flush=True)
                    else:
                        point = operating_point(row)
                        print(f"  {row['factory']}: build {row['build_s']['median']:.1f} s, {point.get('params')}, "
                              f"recall {point.get('recall', 0):.3f} ({row['wall_s']:.0f} s)", flush=True)  # fmt: skip
    print("\n" + markdown(results))
    if args.out is not None or not args.no_write:
        path = results_file(
            "index-types", "smoke" if args.smoke else "", args.tag, out=args.out, folder=args.results_dir
        )
        write_json(path, results)
        print(f"\nwrote {path}")
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark (see the module doc); returns the results dict for a suite runner."""
    args = parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child))))
        return {}
    with workdir_or_temporary(args.workdir, "bench_index_types_") as workdir:
        return run(args, workdir)


if __name__ == "__main__":
    main()
