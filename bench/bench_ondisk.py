"""An image index larger than the memory budget, served memory-mapped: build time, bytes on disk, the reader's
anonymous memory and RSS, single-query latency with a cold and a warm page cache, and recall@10 against exact
search, for CLIP-like vectors generated and added in chunks (10,000,000 x 512 by default).

Run from the repository root: ``.venv/bin/python -m bench.bench_ondisk [--vectors N] [--workdir DIR] [--smoke]``.

Build (this process; the raw vectors are never all in memory): vectors are drawn chunk by chunk from the mixture of
``bench.inputs.make_clip_like``; the index is the type ``choose_index`` picks for N without a budget (``--factory``
overrides), trained as the store trains (``_faiss_io.build_index`` on the first ``TRAIN_POINTS_PER_LIST`` x nlist
vectors, a random sample since draws are independent) and the other chunks added to it. The store's own publish
would need every vector in its catalog (N x dim x 4 bytes of vector files) and in memory at once, so the bench
writes what a publish writes for the image index directly: one segment file under ``segments/``, an empty texts
index and a manifest of format ``FORMAT_VERSION`` naming them, and CURRENT. No catalog: the reader's
``load_generation`` and ``search_segments`` are what the server runs, without the catalog lookups. Exact top-10
ids of every query are accumulated chunk by chunk during the build.

``--through-indexer`` builds with the indexer itself instead, as a user with N embeddings would: the same draws
written chunk by chunk as embedding shards (fake but valid rows, the made-up model of ``bench.bench_update``), then
``clip-index ingest`` in a child process (``bench.bench_update.run_child``: its wall time, its own peak RSS and the
time of each step of ingest and publish), whose one publish builds the image index from the vector files in
parts of at most the memory budget (``indexer.store.segments``, "Size"). The shards are removed after the ingest.
Catalog ids are the rows' numbers plus one (ingest assigns them in shard order; checked).

Queries, ``--queries`` of each kind: image-like, stored vectors perturbed as the indexer's calibration perturbs them
(``index_choice.recall_queries``, cosine ~0.9 to their source); text-like, fresh draws from the mixture moved
along one fixed random direction (a modality gap) and by isotropic noise (``TEXT_GAP``, ``TEXT_NOISE``), so that
their best cosine to the collection is about a third of an image-like query's, as CLIP text queries are. Recall@10
is the share of the exact top-10 ids found.

Serve (a fresh child process, one FAISS thread, as the server's search threads): ``load_generation`` with the
default memory budget (the index exceeds it, so it is memory-mapped), then every query once with the segment's
pages dropped from the page cache (``POSIX_FADV_DONTNEED``; the "cold" pass: later queries find the lists earlier
ones read), then the file read once into the cache and every query again at each nprobe of ``NPROBES`` ("warm").
RssAnon, RssFile and VmRSS after opening and after the queries come from /proc/self/status.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    RESULTS_DIR,
    fill_unset,
    new_results,
    proc_status_kb,
    results_file,
    workdir_or_temporary,
    write_json,
)
from bench.inputs import CENTRE_WEIGHT, CLUSTERS, MEAN_WEIGHT, NOISE_WEIGHT, SPECTRUM_POWER

SEED = 0
K = 10
TEXT_GAP = 1.0  # norm of the shared shift of text-like queries (the unit vectors they start from have norm 1)
TEXT_NOISE = 2.0  # norm of their isotropic noise
NPROBES = (4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)  # warm sweep; the cold pass runs at the first reaching TARGET
TARGET = 0.9  # recall@10 of both query kinds that the operating point must reach
FULL_CHUNK = 250_000  # vectors drawn, added and scored against the queries at once (500 MB of float32 at 512-d)
PROJECTED_SIZES = (100_000_000, 1_000_000_000)
MACHINE_RAM_GB = 24  # of this bench's machine
MACHINE_CACHE_SHARE = 0.8  # of a machine's memory left to the page cache and the server
P50_TARGET_MS = 10.0
IN_MEMORY = 1 << 62  # a reader budget no index exceeds
READ_CHUNK = 1 << 24  # bytes per read when warming the page cache
SEGMENT = "s-000000-000001.g000001.faiss"
GENERATION = "g-000001"


class Mixture:
    """The CLIP-like mixture of ``bench.inputs.make_clip_like`` (same parameters), drawn in chunks of any size."""

    def __init__(self, dim: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.rotation = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)
        spectrum = (1.0 + np.arange(dim)) ** -SPECTRUM_POWER
        self.spectrum = (spectrum / np.linalg.norm(spectrum)).astype(np.float32)
        mean = rng.standard_normal(dim).astype(np.float32)
        self.mean = mean / np.linalg.norm(mean)
        self.centres = (rng.standard_normal((CLUSTERS, dim)).astype(np.float32) * self.spectrum) @ self.rotation.T
        weights = rng.lognormal(0.0, 1.0, CLUSTERS)
        self.weights = weights / weights.sum()

    def draw(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """[count, dim] float32 unit rows."""
        labels = rng.choice(CLUSTERS, size=count, p=self.weights)
        noise = (rng.standard_normal((count, len(self.mean))).astype(np.float32) * self.spectrum) @ self.rotation.T
        x = MEAN_WEIGHT * self.mean + CENTRE_WEIGHT * self.centres[labels] + NOISE_WEIGHT * noise
        return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


def chunks(mixture: Mixture, n: int, size: int, seed: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, vectors) of ``n`` draws, ``size`` at a time."""
    rng = np.random.default_rng(seed)
    for start in range(0, n, size):
        yield start, mixture.draw(min(size, n - start), rng)


def text_like(mixture: Mixture, count: int, seed: int) -> np.ndarray:
    """Text-like queries (module doc): fresh draws shifted by a fixed gap and isotropic noise, unit rows."""
    rng = np.random.default_rng(seed)
    dim = len(mixture.mean)
    gap = rng.standard_normal(dim).astype(np.float32)
    gap *= TEXT_GAP / np.linalg.norm(gap)
    noise = rng.standard_normal((count, dim)).astype(np.float32) * np.float32(TEXT_NOISE / math.sqrt(dim))
    queries = mixture.draw(count, rng) + gap + noise
    return np.ascontiguousarray(queries / np.linalg.norm(queries, axis=1, keepdims=True), dtype=np.float32)


class TopK:
    """The exact top-``k`` (scores, ids) of each query over the chunks seen so far."""

    def __init__(self, queries: np.ndarray, k: int) -> None:
        self.queries, self.k = queries, k
        self.scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
        self.ids = np.empty((len(queries), 0), dtype=np.int64)

    def add(self, first_id: int, vectors: np.ndarray) -> None:
        import faiss

        scores, rows = faiss.knn(self.queries, vectors, self.k, metric=faiss.METRIC_INNER_PRODUCT)
        scores = np.concatenate([self.scores, scores], axis=1)
        ids = np.concatenate([self.ids, rows + first_id], axis=1)
        order = np.argsort(-scores, axis=1)[:, : self.k]
        self.scores, self.ids = np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


# ----------------------------------------------------------------------------------------------------------- build


def build(args: argparse.Namespace, index_dir: Path) -> dict[str, Any]:
    """Build the index in chunks and write it as a published generation; the queries and their exact top-k go to
    ``index_dir`` too. Returns the build's timings and sizes."""
    import faiss

    from clip_model.process_tuning import ThreadPlan, own_threads
    from indexer import _faiss_io
    from indexer.index_choice import choose_index, recall_queries

    factory = _faiss_io.normalize_factory(args.factory or choose_index(args.vectors, args.dim).factory)
    nlist = int(faiss.extract_index_ivf(faiss.index_factory(args.dim, factory)).nlist)
    train_rows = nlist * _faiss_io.TRAIN_POINTS_PER_LIST
    mixture = Mixture(args.dim, SEED)
    times = {"generate_s": 0.0, "train_s": 0.0, "add_s": 0.0, "exact_s": 0.0}
    index: Any = None
    pending: list[np.ndarray] = []  # the training sample, while it is gathered
    top: TopK | None = None
    with own_threads(ThreadPlan.for_indexing(workers=0).faiss_threads):
        started = time.perf_counter()
        for start, vectors in chunks(mixture, args.vectors, args.chunk, SEED + 1):
            times["generate_s"] += time.perf_counter() - started
            if top is None:
                image = recall_queries(vectors, args.queries, seed=SEED)
                queries = np.concatenate([image, text_like(mixture, args.queries, SEED + 2)])
                top = TopK(queries, K)
            clock = time.perf_counter()
            top.add(start, vectors)
            times["exact_s"] += time.perf_counter() - clock
            clock = time.perf_counter()
            if index is None:
                pending.append(vectors)
                gathered = sum(len(p) for p in pending)
                if gathered >= train_rows or start + len(vectors) == args.vectors:
                    sample = np.concatenate(pending)
                    pending.clear()
                    ids = np.arange(start + len(vectors) - gathered, start + len(vectors), dtype=np.int64)
                    index = _faiss_io.build_index(ids, sample, args.dim, factory)
                    del sample
                    times["train_s"] = time.perf_counter() - clock
            else:
                index.add_with_ids(vectors, np.arange(start, start + len(vectors), dtype=np.int64))
                times["add_s"] += time.perf_counter() - clock
            print(f"  {start + len(vectors):,} vectors ({time.perf_counter() - started:.0f} s)", flush=True)
            started = time.perf_counter()
    assert top is not None and index is not None
    clock = time.perf_counter()
    digest = write_generation(index_dir, index, factory, args.dim)
    times["write_s"] = time.perf_counter() - clock - digest
    np.save(index_dir / "queries.npy", top.queries)
    np.save(index_dir / "exact_ids.npy", top.ids)
    np.save(index_dir / "exact_scores.npy", top.scores)
    segment_bytes = (index_dir / "segments" / SEGMENT).stat().st_size
    return {
        "factory": factory,
        "nlist": nlist,
        "train_vectors": train_rows,
        **times,
        "build_s": times["train_s"] + times["add_s"] + times["write_s"],
        "checksum_s": digest,
        "segment_bytes": segment_bytes,
        "disk_bytes": sum(p.stat().st_size for p in index_dir.rglob("*") if p.is_file() and p.suffix != ".npy"),
        "builder_peak_rss_kb": proc_status_kb("self", "VmHWM"),
        "top1_cosine": {
            "image": float(np.mean(top.scores[: args.queries, 0])),
            "text": float(np.mean(top.scores[args.queries :, 0])),
        },
    }


def build_through_indexer(args: argparse.Namespace, workdir: Path, index_dir: Path) -> dict[str, Any]:
    """Write the draws as embedding shards, then ``clip-index ingest`` them into ``index_dir`` (module doc); the
    queries and their exact top-k (by catalog id) go to ``index_dir`` too. Returns the timings and sizes."""
    import shutil

    import faiss

    from bench.bench_update import FILES_PER_DIR, bench_model, run_child, shard_rows
    from indexer._faiss_io import TRAIN_POINTS_PER_LIST
    from indexer.index_choice import recall_queries
    from indexer.shards import ShardWriter, write_manifest
    from indexer.store import Catalog, current_generation, read_manifest

    shards_dir, model = workdir / "shards", bench_model()
    shutil.rmtree(shards_dir, ignore_errors=True)
    shutil.rmtree(index_dir, ignore_errors=True)
    (workdir / "images").mkdir(parents=True, exist_ok=True)  # the shards' image root: the rows are fake
    write_manifest(shards_dir, model, workdir / "images")
    mixture = Mixture(args.dim, SEED)
    times = {"generate_s": 0.0, "exact_s": 0.0, "shards_s": 0.0}
    top: TopK | None = None
    started = time.perf_counter()
    for start, vectors in chunks(mixture, args.vectors, args.chunk, SEED + 1):
        times["generate_s"] += time.perf_counter() - started
        if top is None:
            image = recall_queries(vectors, args.queries, seed=SEED)
            top = TopK(np.concatenate([image, text_like(mixture, args.queries, SEED + 2)]), K)
        clock = time.perf_counter()
        top.add(start + 1, vectors)  # catalog ids start at 1
        times["exact_s"] += time.perf_counter() - clock
        clock = time.perf_counter()
        paths = [f"seed/{n // FILES_PER_DIR:06d}/img_{n:08d}.jpg" for n in range(start, start + len(vectors))]
        with ShardWriter(shards_dir, f"{start // args.chunk:06d}", model) as writer:
            writer.add(shard_rows(paths, vectors, start))
        times["shards_s"] += time.perf_counter() - clock
        print(
            f"  {start + len(vectors):,} vectors written as shards ({time.perf_counter() - started:.0f} s)", flush=True
        )
        started = time.perf_counter()
    assert top is not None
    shard_bytes = sum(path.stat().st_size for path in shards_dir.iterdir())
    print(f"ingesting {shard_bytes / 1e9:.1f} GB of shards with clip-index ingest", flush=True)
    ingest = run_child("add", index_dir, shards_dir)
    shutil.rmtree(shards_dir)
    with Catalog.open(index_dir, readonly=True) as catalog:
        first = catalog.files_at(["seed/000000/img_00000000.jpg"])["seed/000000/img_00000000.jpg"]
        if first.id != 1:
            raise RuntimeError(f"the first row got catalog id {first.id}, not 1: the exact ids would be wrong")
    np.save(index_dir / "queries.npy", top.queries)
    np.save(index_dir / "exact_ids.npy", top.ids)
    np.save(index_dir / "exact_scores.npy", top.scores)
    manifest = read_manifest(index_dir, current_generation(index_dir) or "")
    sizes = {part: sum(p.stat().st_size for p in (index_dir / part).rglob("*") if p.is_file())
             for part in ("segments", "vectors")}  # fmt: skip
    steps = ingest["steps"]

    def step_s(label: str) -> float:
        return float(steps.get(label, {}).get("seconds", 0.0))

    nlist = int(faiss.extract_index_ivf(faiss.index_factory(args.dim, manifest.factory)).nlist)
    return {
        "factory": manifest.factory,
        "nlist": nlist,
        "train_vectors": min(args.vectors, nlist * TRAIN_POINTS_PER_LIST),
        "segments": len(manifest.segments),
        "search_params": manifest.search_params,
        "publish_recall_at_10": manifest.recall_at_10,
        **times,
        "shard_bytes": shard_bytes,
        "ingest_command_s": ingest["command_s"],
        "ingest_rows_s": step_s("ingest: read shards, write rows"),
        "publish_s": ingest["publish_s"],
        "train_s": step_s("image index: train"),
        "add_s": step_s("image index: add vectors"),
        "write_s": step_s("image index: write a part (split rebuild)") + step_s("publish: write segment files"),
        "ground_truth_s": step_s("image index: ground truth (rebuild)"),
        "recalibrate_s": step_s("image index: recalibrate"),
        "build_s": ingest["publish_s"],
        "checksum_s": step_s("publish: sha256 of files"),
        "segment_bytes": sizes["segments"],
        "vector_file_bytes": sizes["vectors"],
        "disk_bytes": sum(p.stat().st_size for p in index_dir.rglob("*") if p.is_file() and p.suffix != ".npy"),
        "builder_peak_rss_kb": int(ingest["peak_rss_mb"] * 1024),
        "builder_rss_after_imports_kb": int(ingest["rss_after_imports_mb"] * 1024),
        "builder_peak_rss_anon_kb": int(ingest.get("peak_rss_anon_mb", 0) * 1024),
        "ingest_steps": steps,
        "top1_cosine": {
            "image": float(np.mean(top.scores[: args.queries, 0])),
            "text": float(np.mean(top.scores[args.queries :, 0])),
        },
    }


def write_generation(index_dir: Path, index: Any, factory: str, dim: int) -> float:
    """Write ``index`` as the one segment of a published generation (module doc). Returns the seconds spent hashing
    the segment file (what a reader that verifies checksums spends on it at start-up)."""
    from indexer import _faiss_io
    from indexer.store.format import FORMAT_VERSION, METRIC, TEXT_FACTORY, TEXTS_FILE, Manifest, _digest

    segments, generation = index_dir / "segments", index_dir / "generations" / GENERATION
    segments.mkdir(parents=True, exist_ok=True)
    generation.mkdir(parents=True, exist_ok=True)
    _faiss_io.write_index(index, segments / SEGMENT)
    count = int(index.ntotal)
    del index
    texts = _faiss_io.build_index(np.empty(0, np.int64), np.empty((0, dim), np.float32), dim, TEXT_FACTORY)
    _faiss_io.write_index(texts, generation / TEXTS_FILE)
    clock = time.perf_counter()
    files = {SEGMENT: _digest(segments / SEGMENT)}
    hashing = time.perf_counter() - clock
    files[TEXTS_FILE] = _digest(generation / TEXTS_FILE)
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        generation=GENERATION,
        created_at=time.time(),
        model_name="bench-clip-like",
        weights_sha256="0" * 64,
        embed_dim=dim,
        preprocess={},
        metric=METRIC,
        factory=factory,
        text_factory=TEXT_FACTORY,
        counts={"images": count, "texts": 0},
        files=files,
        requested_factory=factory,
        segments=[{"file": SEGMENT, "first_gen": 0, "last_gen": 1, "count": count}],
    )
    (generation / "manifest.json").write_text(manifest.to_json(), encoding="utf-8")
    (index_dir / "CURRENT").write_text(f"{GENERATION}\n", encoding="utf-8")
    return hashing


# ----------------------------------------------------------------------------------------------------------- serve


def memory() -> dict[str, int]:
    """This process's RssAnon, RssFile and VmRSS, kB."""
    return {key: proc_status_kb("self", key) for key in ("RssAnon", "RssFile", "VmRSS")}


def cached_kb() -> int:
    """The machine's page cache ("Cached" of /proc/meminfo), kB."""
    with open("/proc/meminfo", encoding="ascii") as info:
        return next(int(line.split()[1]) for line in info if line.startswith("Cached:"))


def drop_cached(path: Path) -> dict[str, Any]:
    """Drop ``path``'s pages from the page cache (no process may have them mapped), with the cache's size before
    and after as evidence."""
    before = cached_kb()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return {"how": "posix_fadvise(DONTNEED)", "cached_kb_before": before, "cached_kb_after": cached_kb()}


def segment_paths(index_dir: Path) -> list[Path]:
    """The segment files of the published generation."""
    from indexer.store.reader import current_generation, read_manifest

    manifest = read_manifest(index_dir, current_generation(index_dir) or GENERATION)
    return [index_dir / "segments" / record["file"] for record in manifest.segments]


def drop_all_cached(index_dir: Path) -> dict[str, Any]:
    """:func:`drop_cached` for every segment file; the page cache's size before the first and after the last."""
    reports = [drop_cached(path) for path in segment_paths(index_dir)]
    return {**reports[0], "cached_kb_after": reports[-1]["cached_kb_after"], "files": len(reports)}


def warm(path: Path) -> float:
    """Read ``path`` once, so that its pages are in the page cache; seconds."""
    started = time.perf_counter()
    with path.open("rb", buffering=0) as file:
        while file.read(READ_CHUNK):
            pass
    return time.perf_counter() - started


def timed_queries(segments: Any, queries: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Each query alone through ``search_segments``: (ids [Q, K], milliseconds per query)."""
    from indexer.store.segments import search_segments

    found, latencies = np.empty((len(queries), K), dtype=np.int64), []
    for row, query in enumerate(queries):
        started = time.perf_counter()
        _, ids = search_segments(segments, query[None], K)
        latencies.append((time.perf_counter() - started) * 1000)
        found[row] = ids[0]
    return found, latencies


def measured(segments: Any, nprobe: int, queries: np.ndarray, exact: np.ndarray, per_kind: int) -> dict[str, Any]:
    """Every query once at ``nprobe``: latency percentiles and recall@10 of each kind."""
    from indexer import _faiss_io

    for segment in segments:
        _faiss_io.set_search_params(segment.index, {"nprobe": nprobe})
    found, times = timed_queries(segments, queries)
    row: dict[str, Any] = {"nprobe": nprobe, "p50_ms": np.percentile(times, 50), "p99_ms": np.percentile(times, 99)}
    for kind, rows in (("image", slice(0, per_kind)), ("text", slice(per_kind, 2 * per_kind))):
        row[kind] = float(np.mean([len(set(f) & set(e)) / K for f, e in zip(found[rows], exact[rows], strict=True)]))
    return {key: float(value) if key != "nprobe" else value for key, value in row.items()}


def serve(index_dir: Path, per_kind: int, nprobe: int | None, budget: int | None) -> dict[str, Any]:
    """The child: open the generation as the server does and run the queries, once at ``nprobe`` as they come
    ("cold"), or, without ``nprobe``, after reading the segment into the page cache, at each of ``NPROBES``.
    ``budget``: the memory budget of the reader (None: the store's default rule)."""
    from clip_model.process_tuning import own_threads
    from indexer.store.reader import current_generation, load_generation

    queries, exact = np.load(index_dir / "queries.npy"), np.load(index_dir / "exact_ids.npy")
    report: dict[str, Any] = {"after_imports": memory()}
    with own_threads(1):
        started = time.perf_counter()
        generation = current_generation(index_dir) or GENERATION
        loaded = load_generation(index_dir, generation, verify_checksums=False, memory_budget=budget)
        report |= {"open_s": time.perf_counter() - started, "after_open": memory()}
        report["memory_mapped"] = loaded.memory_mapped
        if nprobe is not None:
            report["cold"] = measured(loaded.segments, nprobe, queries, exact, per_kind)
        else:
            report["warm_read_s"] = sum(warm(path) for path in segment_paths(index_dir))
            report["warm"] = [measured(loaded.segments, n, queries, exact, per_kind) for n in NPROBES]
        report |= {"after_queries": memory(), "peak_rss_kb": proc_status_kb("self", "VmHWM")}
    return report


def run_child(index_dir: Path, args: argparse.Namespace, nprobe: int | None = None, budget: int | None = None) -> Any:
    """:func:`serve` in a fresh interpreter, under ``budget`` (default: ``--memory-budget``); its report."""
    budget = args.memory_budget if budget is None else budget
    command = [sys.executable, "-m", "bench.bench_ondisk", "--child", str(index_dir), "--queries", str(args.queries)]
    command += ["--memory-budget", str(budget)] if budget is not None else []
    command += ["--nprobe", str(nprobe)] if nprobe is not None else []
    child = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(child.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------------- reporting


def projection(results: dict[str, Any], sizes: Sequence[int] = PROJECTED_SIZES) -> list[dict[str, float]]:
    """What ``sizes`` vectors would take, from the measured per-vector costs: disk (the segment's bytes per vector),
    the reader's anonymous memory (its growth on opening the mapped index, per vector), the RAM a warm page cache
    needs (disk + anonymous), the build on this machine (adding scales with N x nlist, training with nlist^2), the
    warm p50 at the operating nprobe (scaling with the vectors a list holds, N / nlist), and the machines of
    ``MACHINE_RAM_GB`` it takes to keep it warm and, sharded, within ``P50_TARGET_MS`` (each shard searched in
    parallel). ``nlist`` is :func:`choose_index`'s for each size."""
    from indexer.index_choice import ivf_lists

    n, built, warm = results["vectors"], results["build"], results["warm"]
    disk = built["segment_bytes"] / n
    anon = (warm["after_open"]["RssAnon"] - warm["after_imports"]["RssAnon"]) * 1024 / n
    p50 = results["operating_point"]["p50_ms"]
    rows = []
    for size in sizes:
        lists = ivf_lists(size) / built["nlist"]
        build_h = (built["add_s"] * size / n * lists + built["train_s"] * lists**2) / 3600
        p50_size = p50 * (size / ivf_lists(size)) / (n / built["nlist"])
        ram = (disk + anon) * size
        machines = max(
            math.ceil(ram / (MACHINE_RAM_GB * 2**30 * MACHINE_CACHE_SHARE)), math.ceil(p50_size / P50_TARGET_MS)
        )
        rows.append({"vectors": size, "nlist": ivf_lists(size), "disk_gb": disk * size / 1e9,
                     "anon_gb": anon * size / 1e9, "ram_gb": ram / 1e9, "build_h": build_h, "p50_ms": p50_size,
                     "machines": machines})  # fmt: skip
    return rows


def markdown(results: dict[str, Any]) -> str:
    """The results as the tables of bench/README.md's "ondisk" section."""
    built, warm, cold = results["build"], results["warm"], results["cold"]
    point = results["operating_point"]

    def mib(report: dict[str, Any], when: str, key: str = "RssAnon") -> str:
        return f"{report[when][key] / 1024:.0f}"

    lines = [
        f"{results['vectors']:,} x {results['dim']} CLIP-like vectors, {built['factory']} (trained on "
        f"{built['train_vectors']:,}), served memory-mapped: {warm['memory_mapped']}; one FAISS thread",
        "",
        "| build s (train + add + write) | segment GB | bytes/vector on disk | open s (warm, cold) "
        "| RssAnon MiB (imports, open, queries) | RSS MiB after warm queries | sha256 of the segment s |",
        "|---|---|---|---|---|---|---|",
        f"| {built['build_s']:.0f} ({built['train_s']:.0f} + {built['add_s']:.0f} + {built['write_s']:.0f}) "
        f"| {built['segment_bytes'] / 1e9:.2f} | {built['segment_bytes'] / results['vectors']:.0f} "
        f"| {warm['open_s']:.2f}, {cold['open_s']:.2f} | {mib(warm, 'after_imports')}, {mib(warm, 'after_open')}, "
        f"{mib(warm, 'after_queries')} | {mib(warm, 'after_queries', 'VmRSS')} | {built['checksum_s']:.1f} |",
        "",
        "| nprobe | recall@10 image-like | recall@10 text-like | warm p50 ms | warm p99 ms |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['nprobe']} | {r['image']:.3f} | {r['text']:.3f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |"
        for r in warm["warm"]
    ]
    lines += [
        "",
        f"Operating point (smallest nprobe with recall@10 >= {TARGET} for both kinds): nprobe {point['nprobe']}, warm "
        f"p50 {point['p50_ms']:.2f} ms, p99 {point['p99_ms']:.2f} ms; cold page cache "
        f"({results['dropped']['how']}): p50 {cold['cold']['p50_ms']:.2f} ms, p99 {cold['cold']['p99_ms']:.2f} ms, "
        f"RssFile after the cold pass {mib(cold, 'after_queries', 'RssFile')} MiB. Mean top-1 cosine: image-like "
        f"{built['top1_cosine']['image']:.2f}, text-like {built['top1_cosine']['text']:.2f}.",
    ]
    if results.get("through_indexer"):
        lines.append(
            f"Built by `clip-index ingest` of {built['shard_bytes'] / 1e9:.1f} GB of shards: the command "
            f"{built['ingest_command_s']:.0f} s (rows {built['ingest_rows_s']:.0f} s, publish {built['publish_s']:.0f} "
            f"s: train {built['train_s']:.0f}, add {built['add_s']:.0f}, write {built['write_s']:.0f}, ground truth "
            f"{built['ground_truth_s']:.0f}, calibration {built['recalibrate_s']:.0f}), peak RSS "
            f"{built['builder_peak_rss_kb'] / 2**20:.2f} GiB (anonymous "
            f"{built['builder_peak_rss_anon_kb'] / 2**20:.2f} GiB, the rest pages of the vector files it read); "
            f"{built['segments']} segment(s), vector files "
            f"{built['vector_file_bytes'] / 1e9:.1f} GB (RSS after the command's imports "
            f"{built['builder_rss_after_imports_kb'] / 2**20:.2f} GiB); the publish's own recall@10 "
            f"{built['publish_recall_at_10']:.3f} at {built['search_params']}."
        )
    memory = results["in_memory"]
    same = next(r for r in memory["warm"] if r["nprobe"] == point["nprobe"])
    lines.append(
        f"The same index read into memory: open {memory['open_s']:.1f} s, RssAnon {mib(memory, 'after_queries')} "
        f"MiB, warm p50 {same['p50_ms']:.2f} ms, p99 {same['p99_ms']:.2f} ms at nprobe {point['nprobe']}."
    )
    lines += [
        "",
        f"| projected vectors | nlist | disk GB | RssAnon GB | RAM for a warm cache GB | build h (2 cores) "
        f"| p50 ms, one shard | machines of {MACHINE_RAM_GB} GB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['vectors']:,} | {r['nlist']} | {r['disk_gb']:.0f} | {r['anon_gb']:.1f} | {r['ram_gb']:.0f} "
        f"| {r['build_h']:.1f} | {r['p50_ms']:.0f} | {r['machines']} |"
        for r in projection(results)
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=None, help="collection size (default 10,000,000)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=None, help="queries of each kind (default 200)")
    parser.add_argument("--factory", default=None, help="index type (default: choose_index's for --vectors)")
    parser.add_argument("--chunk", type=int, default=FULL_CHUNK, help="vectors generated and added at once")
    parser.add_argument("--workdir", type=Path, default=None, help="where the index is written (default: temporary)")
    parser.add_argument("--smoke", action="store_true", help="50,000 vectors: checks the script in < 60 s")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON results to this file instead")
    parser.add_argument("--tag", default="", help="appended to the results file name")
    parser.add_argument(
        "--memory-budget", type=int, default=None, help="the reader's, bytes (default: the store's; --smoke: 0)"
    )
    parser.add_argument(
        "--through-indexer", action="store_true", help="build with clip-index ingest from shards (module doc)"
    )
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)  # internal: serve this index
    parser.add_argument("--nprobe", type=int, default=None, help=argparse.SUPPRESS)  # internal: the cold pass's
    args = parser.parse_args(argv)
    fill_unset(args, {"vectors": 50_000 if args.smoke else 10_000_000, "queries": 50 if args.smoke else 200})
    if args.smoke and args.memory_budget is None:
        args.memory_budget = 0  # memory-mapped, as the full size is under the default budget
    return args


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    index_dir = workdir / f"index-{args.vectors}"
    results = new_results() | {"vectors": args.vectors, "dim": args.dim, "queries_per_kind": args.queries}
    results["memory_budget"] = args.memory_budget
    print(f"building {args.vectors:,} x {args.dim} in {index_dir}", flush=True)
    results["through_indexer"] = args.through_indexer
    results["build"] = (
        build_through_indexer(args, workdir, index_dir) if args.through_indexer else build(args, index_dir)
    )
    print(json.dumps(results["build"], indent=1), flush=True)
    results["warm"] = run_child(index_dir, args)
    sweep = results["warm"]["warm"]
    point = next((r for r in sweep if min(r["image"], r["text"]) >= TARGET), sweep[-1])
    results["operating_point"] = point
    results["dropped"] = drop_all_cached(index_dir)
    results["cold"] = run_child(index_dir, args, point["nprobe"])
    results["in_memory"] = run_child(index_dir, args, budget=IN_MEMORY)  # the same index read into memory
    print("\n" + markdown(results))
    path = results_file("ondisk", "smoke" if args.smoke else "", args.tag, out=args.out, folder=RESULTS_DIR)
    if args.smoke and args.out is None:
        path = workdir / path.name
    write_json(path, results)
    print(f"\nwrote {path}")
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark (see the module doc); returns the results dict for a suite runner."""
    args = parse_args(argv)
    if args.child is not None:
        print(json.dumps(serve(args.child, args.queries, args.nprobe, args.memory_budget)))
        return {}
    with workdir_or_temporary(args.workdir, "bench_ondisk_") as workdir:
        return run(args, workdir)


if __name__ == "__main__":
    main()
