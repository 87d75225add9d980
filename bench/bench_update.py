"""Updating a large index: adding and deleting a batch of images in an index of a million, and the recall the
updated index keeps against a fresh rebuild.

Run from the repository root: ``.venv/bin/python -m bench.bench_update [--workdir DIR] [--vectors 1000000]
[--batch 1000] [--repeat 3] [--smoke]``.

Seed (once per ``--workdir``, reused while ``seed-n<vectors>/seed.json`` matches): ``--vectors`` CLIP-like 512-d
unit vectors (:func:`bench.inputs.make_clip_like`) written as embedding shards (:class:`indexer.shards.ShardWriter`,
fake but valid rows: ``seed/000123/img_0123456.jpg``, the sha256 of the path, a size, an mtime, 3000x2000) under
a made-up model with ViT-B/32's preprocessing, then :func:`indexer.ingest.ingest` into a new index directory, whose
first publish builds and calibrates the automatic index (IVF + SQ8 at 1M). The shards are removed afterwards; the
rows to add later (``ADD_POOL_ROWS``, from the same mixture) are kept as ``add-pool.npy``.

Each run copies the seeded index directory and updates the copy, ``--repeat`` times in turn, each step a fresh
child process with fresh rows. Its peak RSS is its own VmHWM, read by the child as it ends (it loads no model, so
nothing is subtracted). Not ``wait4``'s ``ru_maxrss``: Linux counts in it the memory the child held before exec,
which is this process's (a vforked child shares it), so it reports at least this process's RSS (several GB here,
the recall measurement's vectors). The updates:

- add: ``clip-index ingest`` of one new shard of ``--batch`` rows (the child runs ``indexer.cli.main`` as
  ``python -m indexer ingest`` does, with timers around its steps). Reported: the whole command's wall time
  (interpreter start included), the time of its ``publish`` call ("publishes in": the target's measure), peak RSS.
- delete: a child that takes the WriterLock, opens the catalog, deletes ``--batch`` ids of seeded rows
  (``Catalog.delete``, one transaction) and publishes (``indexer.store.publish``): the delete's and the publish's
  time, peak RSS.

Each child times the steps of ingest and publish (``STEPS``: cumulative seconds and VmHWM after the step; nested
steps overlap) and reports its RSS after imports and its ``write_bytes`` from ``/proc/self/io``. The bytes each
update added under segments/, vectors/ and generations/ (new files and appended bytes) are measured from the
directory listing. After the updates: the number of segments, the index directory's size and recall@10 on
``RECALL_QUERIES`` queries near stored vectors (:func:`indexer.index_choice.recall_queries`, seed ``QUERY_SEED``)
against exact search over the catalog's vectors (numpy, chunked); then ``publish(retrain=True)`` on the same copy
(a fresh rebuild of the same collection, also a child: time and peak RSS) and recall@10 again on the same queries.

Targets (reported, not asserted): ``TARGETS``. Results: a table on stdout and JSON in ``bench/results/`` (or
``--out``); ``--smoke`` runs the same flow on ``SMOKE['vectors']`` vectors (past the exact-search threshold, so
that the index is an IVF as at 1M) in under a minute and writes into the workdir.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    REPO,
    RESULTS_DIR,
    fill_unset,
    median_min_max,
    new_results,
    proc_status_kb,
    results_file,
    summary,
    workdir_or_temporary,
    write_json,
)

DIM = 512
VECTOR_SEED = 0
ADD_POOL_ROWS = 20_000  # rows kept for the adds: --repeat x --batch may not exceed it
SEED_WRITE_ROWS = 10_000  # rows per ShardWriter.add while seeding
FILES_PER_DIR = 1000
FAKE_WIDTH, FAKE_HEIGHT = 3000, 2000
FAKE_SIZE_BYTES = 1_900_000
FAKE_MTIME_NS = 1_700_000_000 * 10**9
RECALL_QUERIES = 200
QUERY_SEED = 1  # the publish calibrates on seed 0's queries (indexer.index_choice.RECALL_SEED): these are others
K = 10
SCORE_TOLERANCE = 1e-5  # a hit scoring this close to the exact k-th score counts as found (ties, float error)
SEED_FILE = "seed.json"
POOL_FILE = "add-pool.npy"
WRITTEN_PARTS = ("segments", "vectors", "generations")  # where an update writes besides the SQLite catalog
MB = 2**20
KIB = 1024
ANON_SAMPLE_S = 0.05
DEFAULTS = {"vectors": 1_000_000, "batch": 1000, "repeat": 3}
SMOKE = {"vectors": 30_000, "batch": 1000, "repeat": 2}
TARGETS = {"publish_s_max": 5.0, "peak_rss_mb_max": 1.5 * 1024, "recall_difference_max": 0.01}
# (label, module, attribute) of the steps each child times; "Class.method" patches the class (a classmethod only
# where it is called on the class). Nested steps overlap: "publish" holds the "publish:" ones, "publish: image
# index" the "image index:" ones. A step the code does not have (renamed, or another version) goes untimed.
STEPS = (
    ("ingest: catalog.files()", "indexer.store.catalog", "Catalog.files"),
    ("ingest: read shards, write rows", "indexer.ingest", "_ingest_shards"),
    ("ingest: up_to_date", "indexer.ingest", "up_to_date"),
    ("catalog.delete", "indexer.store.catalog", "Catalog.delete"),
    ("publish", "indexer.ingest", "publish"),
    ("publish", "indexer.store.publishing", "publish"),
    ("publish: prior manifest", "indexer.store.publishing", "_prior_manifest"),
    ("publish: stamp generation", "indexer.store.catalog", "Catalog.stamp_generation"),
    ("publish: text embeddings", "indexer.store.catalog", "Catalog.text_embeddings"),
    ("publish: image index", "indexer.store.publishing", "next_image_index"),
    ("image index: image_count", "indexer.store.catalog", "Catalog.image_count"),
    ("image index: superseded", "indexer.store.catalog", "Catalog.superseded"),
    ("image index: read FAISS files", "indexer._faiss_io", "read_index"),
    ("image index: deletion lists", "indexer.store.image_index", "_with_deletions"),
    ("image index: stamped rows' pointers", "indexer.store.catalog", "Catalog.stamped_rows"),
    ("image index: ground truth, load", "indexer.store.calibration", "GroundTruth.load"),
    ("image index: ground truth, deletions", "indexer.store.calibration", "GroundTruth.without"),
    ("image index: ground truth, new vectors", "indexer.store.calibration", "GroundTruth.with_added"),
    ("image index: new segment", "indexer.store.image_index", "_segment"),
    ("image index: load segments to recalibrate", "indexer.store.image_index", "_loaded_segments"),
    ("image index: recalibrate", "indexer.store.image_index", "recalibrate"),
    ("image index: all rows' pointers (rebuild)", "indexer.store.catalog", "Catalog.embedding_rows"),
    ("image index: build + calibrate (rebuild)", "indexer.store.image_index", "build_calibrated"),
    ("image index: build split by size (rebuild)", "indexer.store.image_index", "_rebuild_split"),
    ("image index: train", "indexer._faiss_io", "trained_index"),
    ("image index: add vectors", "indexer._faiss_io", "add_rows"),
    ("image index: write a part (split rebuild)", "indexer.store.image_index", "stage_file"),
    ("image index: ground truth (rebuild)", "indexer.store.calibration", "GroundTruth.of"),
    ("publish: faiss build_index (texts; images on a rebuild)", "indexer._faiss_io", "build_index"),
    ("publish: write segment files", "indexer.store.publishing", "_write_segment_files"),
    ("publish: write generation", "indexer.store.publishing", "_write_generation"),
    ("publish: sha256 of files", "indexer.store.publishing", "_digest"),
    ("publish: fsync", "indexer.store.publishing", "_fsync"),
    ("publish: remove old files", "indexer.store.publishing", "_remove_unreferenced"),
    ("publish: forget old versions", "indexer.store.catalog", "Catalog.forget_before"),
)


# ------------------------------------------------------------------------------------------------- child processes


class StepTimes:
    """Cumulative seconds, calls and the VmHWM after the step (MB) of each patched step of :data:`STEPS`."""

    def __init__(self) -> None:
        self.steps: dict[str, dict[str, float]] = {}

    def patch_all(self) -> list[str]:
        """Wrap every step that exists; returns the ``module:attribute`` of those that do not."""
        import importlib

        missing = []
        for label, module_name, attribute in STEPS:
            owner: Any = importlib.import_module(module_name)
            *path, name = attribute.split(".")
            for part in path:
                owner = getattr(owner, part, None)
            if not hasattr(owner, name):
                missing.append(f"{module_name}:{attribute}")
                continue
            setattr(owner, name, self._wrap(getattr(owner, name), label))
        return missing

    def _wrap(self, function: Callable[..., Any], label: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                step = self.steps.setdefault(label, {"seconds": 0.0, "calls": 0, "hwm_mb": 0.0})
                step["seconds"] += time.perf_counter() - started
                step["calls"] += 1
                step["hwm_mb"] = proc_status_kb("self", "VmHWM") / KIB

        return timed


class AnonymousPeak:
    """The largest RssAnon of this process, sampled every ``ANON_SAMPLE_S`` on a thread until :meth:`stop`: its own
    memory, unlike VmHWM, which also counts the pages of files it maps (vector files read during a rebuild)."""

    def __init__(self) -> None:
        import threading

        self._peak = proc_status_kb("self", "RssAnon")
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-anon", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(ANON_SAMPLE_S):
            self._peak = max(self._peak, proc_status_kb("self", "RssAnon"))

    def stop(self) -> int:
        """kB."""
        self._done.set()
        self._thread.join()
        return max(self._peak, proc_status_kb("self", "RssAnon"))


def _io_write_mb() -> float:
    """Bytes this process caused to be written to storage so far (``/proc/self/io`` write_bytes), in MB."""
    try:
        with open("/proc/self/io", encoding="ascii") as io:
            fields = dict(line.split(": ") for line in io.read().splitlines())
    except OSError:
        return float("nan")
    return int(fields["write_bytes"]) / MB


def child_main(kind: str, index_dir: Path, argument: Path | None) -> None:
    """One update in a fresh process: ``add`` ingests the shards directory ``argument`` as ``clip-index ingest``
    does; ``delete`` deletes the ids of the .npy file ``argument`` and publishes; ``rebuild`` publishes with
    retrain. Prints its timings as one JSON line."""
    import indexer.cli  # what `python -m indexer` imports

    rss_after_imports = proc_status_kb("self", "VmRSS") / KIB
    anonymous = AnonymousPeak()
    times = StepTimes()
    untimed = times.patch_all()
    started = time.perf_counter()
    if kind == "add":
        status = indexer.cli.main(["ingest", str(argument), "--index-dir", str(index_dir)])
        if status != 0:
            raise SystemExit(status)
    else:
        _publish_child(index_dir, argument, retrain=kind == "rebuild")
    report = {
        "seconds": time.perf_counter() - started,
        "rss_after_imports_mb": rss_after_imports,
        "vmhwm_mb": proc_status_kb("self", "VmHWM") / KIB,
        "peak_rss_anon_mb": anonymous.stop() / KIB,
        "io_write_mb": _io_write_mb(),
        "steps": times.steps,
        "untimed": untimed,
    }
    print(json.dumps(report))


def _publish_child(index_dir: Path, ids_file: Path | None, retrain: bool) -> None:
    """Delete the ids of ``ids_file`` (if given) under the WriterLock and publish, as an indexer process would."""
    import logging

    from clip_model.process_tuning import ThreadPlan, own_threads, tune_malloc
    from indexer.store import Catalog, WriterLock, publishing

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tune_malloc()  # as clip-index does
    with WriterLock(index_dir), Catalog.open(index_dir) as catalog:
        if ids_file is not None:
            ids = np.load(ids_file)
            deleted = catalog.delete(ids.tolist())
            if deleted != len(ids):
                raise RuntimeError(f"deleted {deleted} of {len(ids)} ids: the seeded rows are not ids 1..N")
        with own_threads(ThreadPlan.for_indexing(workers=0).faiss_threads):
            publishing.publish(index_dir, catalog, retrain=retrain)


def run_child(kind: str, index_dir: Path, argument: Path | None = None) -> dict[str, Any]:
    """Run :func:`child_main` in a fresh interpreter: its report plus its wall time and the bytes it wrote."""
    from bench.bench_indexer import _child

    command = [sys.executable, "-m", "bench.bench_update", "--child", kind, str(index_dir)]
    command += [str(argument)] if argument is not None else []
    before = tree_sizes(index_dir)
    wall_s, stdout, _ = _child(command)  # its wait4 peak is not the child's own (module docstring)
    report = json.loads(stdout.strip().splitlines()[-1])
    steps = report.pop("steps")
    return {
        **report,
        "command_s": wall_s,
        "peak_rss_mb": report["vmhwm_mb"],
        "publish_s": steps.get("publish", {}).get("seconds", 0.0),
        "delete_s": steps.get("catalog.delete", {}).get("seconds", 0.0),
        "written_mb": written_bytes(before, tree_sizes(index_dir)) / MB,
        "steps": steps,
    }


# ----------------------------------------------------------------------------------------------------------- seed


def bench_model() -> Any:
    """The made-up model of the shards: 512-d, ViT-B/32's preprocessing, a fixed weights sha256."""
    from clip_model.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from indexer.store import ModelInfo

    weights = hashlib.sha256(b"bench_update synthetic weights").hexdigest()
    return ModelInfo.of("bench-update-synthetic", weights, DIM, 224, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)


def shard_rows(paths: list[str], vectors: np.ndarray, first: int) -> Any:
    """Fake but valid rows for ``paths`` with ``vectors`` [N, DIM]; ``first`` varies the sizes and mtimes."""
    from indexer.shards import ShardRows

    count = len(paths)
    return ShardRows(
        paths=paths,
        sha256=[hashlib.sha256(path.encode()).hexdigest() for path in paths],
        size=FAKE_SIZE_BYTES + first + np.arange(count, dtype=np.int64),
        mtime_ns=FAKE_MTIME_NS + first + np.arange(count, dtype=np.int64),
        width=[FAKE_WIDTH] * count,
        height=[FAKE_HEIGHT] * count,
        errors=[None] * count,
        embeddings=vectors,
    )


def write_seed_shards(shards_dir: Path, vectors: np.ndarray, image_root: Path) -> None:
    """``vectors`` [N, DIM] as shards of ``DEFAULT_ROWS_PER_SHARD`` rows, row n at ``seed/<n // 1000>/img_<n>.jpg``."""
    from indexer.ingest import DEFAULT_ROWS_PER_SHARD
    from indexer.shards import ShardWriter, write_manifest

    model = bench_model()
    write_manifest(shards_dir, model, image_root)
    for shard_start in range(0, len(vectors), DEFAULT_ROWS_PER_SHARD):
        shard_stop = min(shard_start + DEFAULT_ROWS_PER_SHARD, len(vectors))
        with ShardWriter(shards_dir, f"{shard_start // DEFAULT_ROWS_PER_SHARD:06d}", model) as writer:
            for start in range(shard_start, shard_stop, SEED_WRITE_ROWS):
                numbers = range(start, min(start + SEED_WRITE_ROWS, shard_stop))
                paths = [f"seed/{n // FILES_PER_DIR:06d}/img_{n:07d}.jpg" for n in numbers]
                writer.add(shard_rows(paths, vectors[numbers.start : numbers.stop], start))


def code_version() -> dict[str, Any]:
    """The commit checked out and the tracked files changed since, outside bench/ (commit None outside git)."""

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)

    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return {"commit": None, "modified": []}
    status = git("status", "--porcelain", "--untracked-files=no").stdout.splitlines()
    return {
        "commit": head.stdout.strip(),
        "modified": [line[3:] for line in status if not line[3:].startswith("bench/")],
    }


def seeded(workdir: Path, count: int, reseed: bool) -> tuple[Path, dict[str, Any]]:
    """The seed directory of ``count`` vectors (its ``index/``, ``add-pool.npy``, ``seed.json``), made once, or
    again with ``reseed``."""
    from bench.inputs import GENERATOR_VERSION, make_clip_like

    seed_dir = workdir / f"seed-n{count}"
    expected = {"vectors": count, "dim": DIM, "generator_version": GENERATOR_VERSION, "pool_rows": ADD_POOL_ROWS}
    if (seed_dir / SEED_FILE).is_file() and not reseed:
        seed = json.loads((seed_dir / SEED_FILE).read_text(encoding="utf-8"))
        if {key: seed.get(key) for key in expected} == expected:
            print(f"seed: cached {seed_dir} (seeded in {seed['seconds']:.0f} s)", flush=True)
            if seed["code"]["commit"] != code_version()["commit"]:
                print(f"  seeded at commit {seed['code']['commit']}: --reseed if the index format changed since")
            return seed_dir, seed
    shutil.rmtree(seed_dir, ignore_errors=True)  # none, another size, or left half-made by an interrupted run
    (seed_dir / "images").mkdir(parents=True)  # the shards' image root: empty, the rows are fake
    started = time.perf_counter()
    vectors = make_clip_like(count + ADD_POOL_ROWS, DIM, VECTOR_SEED, 0)[0]
    np.save(seed_dir / POOL_FILE, vectors[count:])
    write_seed_shards(seed_dir / "shards", vectors[:count], seed_dir / "images")
    del vectors
    shards_s = time.perf_counter() - started
    print(f"seed: {count} vectors generated and written as shards in {shards_s:.1f} s", flush=True)
    seed = {**expected, "code": code_version(), "shards_s": shards_s, **ingest_seed(seed_dir)}
    seed["seconds"] = time.perf_counter() - started
    shutil.rmtree(seed_dir / "shards")  # ingested: the catalog holds the rows now
    write_json(seed_dir / SEED_FILE, seed)
    print(f"seed: done in {seed['seconds']:.1f} s ({seed['ingest_s']:.1f} s of it in ingest)", flush=True)
    return seed_dir, seed


def ingest_seed(seed_dir: Path) -> dict[str, Any]:
    """Ingest ``seed_dir/shards`` into ``seed_dir/index`` (in this process); what the first publish built."""
    from indexer.ingest import IngestOptions, ingest
    from indexer.store import current_generation, read_manifest

    started = time.perf_counter()
    stats = ingest(IngestOptions(shards_dir=seed_dir / "shards", index_dir=seed_dir / "index"))
    ingest_s = time.perf_counter() - started
    manifest = read_manifest(seed_dir / "index", current_generation(seed_dir / "index") or "")
    return {
        "ingest_s": ingest_s,
        "rows": stats.rows,
        "factory": manifest.factory,
        "search_params": manifest.search_params,
        "publish_recall_at_10": manifest.recall_at_10,
        "index_dir_mb": sum(tree_sizes(seed_dir / "index").values()) / MB,
    }


# ---------------------------------------------------------------------------------------------------- measurements


def tree_sizes(root: Path) -> dict[str, int]:
    """Size in bytes of every file under ``root``, by path relative to it."""
    return {str(path.relative_to(root)): path.stat().st_size for path in root.rglob("*") if path.is_file()}


def written_bytes(before: dict[str, int], after: dict[str, int]) -> int:
    """Bytes added under ``WRITTEN_PARTS`` between two :func:`tree_sizes`: new files, and what files grew by."""
    return sum(
        size - before.get(name, 0)
        for name, size in after.items()
        if name.split(os.sep, 1)[0] in WRITTEN_PARTS and size > before.get(name, 0)
    )


class RecallProbe:
    """Queries near the catalog's vectors and their exact k-th scores, to measure a published index's recall@k."""

    def __init__(self, index_dir: Path) -> None:
        from indexer.index_choice import exact_kth_scores, recall_queries
        from indexer.store import Catalog

        with Catalog.open(index_dir, readonly=True) as catalog:
            self.ids, self.vectors = catalog.embeddings()  # [N] sorted, [N, DIM]
        self.queries = recall_queries(self.vectors, RECALL_QUERIES, seed=QUERY_SEED)
        self.kth = exact_kth_scores(self.vectors, self.queries, K)

    def recall(self, index_dir: Path) -> float:
        """Recall@k of the generation published in ``index_dir``: the share of its hits that score at least the
        exact k-th score (so a tie with another vector counts as found), as the publish's calibration counts."""
        from indexer.store import PublishedIndex

        with PublishedIndex.open(index_dir, verify_checksums=False) as index:
            hits = index.search(self.queries, K)
        found = np.full((len(hits), K), -1, dtype=np.int64)
        for row, row_hits in enumerate(hits):
            found[row, : len(row_hits)] = [hit.id for hit in row_hits]
        rows = np.clip(np.searchsorted(self.ids, found), 0, len(self.ids) - 1)
        valid = (found >= 0) & (self.ids[rows] == found)
        scores = np.einsum("qd,qkd->qk", self.queries, self.vectors[rows])
        return float((valid & (scores >= self.kth[:, None] - SCORE_TOLERANCE)).sum() / found.size)


def index_state(index_dir: Path) -> dict[str, Any]:
    """The published generation's image count, segments, search parameters and the directory's size by part."""
    from indexer.store import current_generation, read_manifest

    manifest = read_manifest(index_dir, current_generation(index_dir) or "")
    sizes = tree_sizes(index_dir)
    parts: dict[str, float] = {}
    for name, size in sizes.items():
        part = name.split(os.sep, 1)[0] if os.sep in name else "catalog and others"
        parts[part] = parts.get(part, 0.0) + size / MB
    return {
        "generation": manifest.generation,
        "images": manifest.counts["images"],
        "segments": len(manifest.segments),
        "factory": manifest.factory,
        "search_params": manifest.search_params,
        "publish_recall_at_10": manifest.recall_at_10,
        "index_dir_mb": sum(sizes.values()) / MB,
        "index_dir_parts_mb": parts,
    }


# ------------------------------------------------------------------------------------------------------------ runs


def fresh_copy(seed_dir: Path, workdir: Path) -> Path:
    """A copy of the seeded index directory to update (the seed stays as ingest left it), flushed to disk so that
    the copy's write-back does not slow the fsyncs of the updates."""
    index_dir = workdir / "run" / "index"
    shutil.rmtree(index_dir.parent, ignore_errors=True)
    started = time.perf_counter()
    shutil.copytree(seed_dir / "index", index_dir)
    os.sync()
    print(f"copied the seeded index to {index_dir} in {time.perf_counter() - started:.1f} s", flush=True)
    return index_dir


def add_shard(run_dir: Path, seed_dir: Path, rep: int, batch: int) -> Path:
    """A shards directory with one shard of ``batch`` new rows (the pool's rows of repetition ``rep``)."""
    from indexer.shards import ShardWriter, write_manifest

    pool = np.load(seed_dir / POOL_FILE, mmap_mode="r")
    vectors = np.ascontiguousarray(pool[rep * batch : (rep + 1) * batch])
    shards_dir = run_dir / f"add-{rep:02d}"
    write_manifest(shards_dir, bench_model(), seed_dir / "images")
    with ShardWriter(shards_dir, f"add-{rep:02d}", bench_model()) as writer:
        paths = [f"add/r{rep:02d}/img_{n:07d}.jpg" for n in range(batch)]
        writer.add(shard_rows(paths, vectors, rep * batch))
    return shards_dir


def delete_ids(run_dir: Path, seed_count: int, repeat: int, batch: int) -> list[Path]:
    """``repeat`` .npy files of ``batch`` distinct seeded ids each (ingest numbered the seed's rows 1..N)."""
    rng = np.random.default_rng(VECTOR_SEED)
    ids = rng.choice(seed_count, size=repeat * batch, replace=False).astype(np.int64) + 1
    files = []
    for rep in range(repeat):
        files.append(run_dir / f"delete-{rep:02d}.npy")
        np.save(files[-1], np.sort(ids[rep * batch : (rep + 1) * batch]))
    return files


def update_runs(index_dir: Path, seed_dir: Path, args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """``--repeat`` adds and deletes, alternating, each a child process; their reports by kind."""
    run_dir = index_dir.parent
    deletions = delete_ids(run_dir, args.vectors, args.repeat, args.batch)
    runs: dict[str, list[dict[str, Any]]] = {"add": [], "delete": []}
    for rep in range(args.repeat):
        for kind, argument in (("add", add_shard(run_dir, seed_dir, rep, args.batch)), ("delete", deletions[rep])):
            report = run_child(kind, index_dir, argument)
            runs[kind].append(report)
            print(
                f"  {kind} {rep + 1}/{args.repeat}: publish {report['publish_s']:.2f} s, command "
                f"{report['command_s']:.2f} s, peak RSS {report['peak_rss_mb']:.0f} MB, wrote "
                f"{report['written_mb']:.2f} MB",
                flush=True,
            )
    return runs


def summarize(runs: list[dict[str, Any]], *extra: str) -> dict[str, Any]:
    """Summaries of the repetitions' numbers (and of ``extra`` ones) and of each step's seconds, with every
    repetition's report."""
    keys = ("publish_s", "command_s", "peak_rss_mb", "peak_rss_anon_mb", "rss_after_imports_mb", "written_mb",
            "io_write_mb", *extra)  # fmt: skip
    out: dict[str, Any] = {key: summary([run[key] for run in runs]) for key in keys}
    labels = [
        label for label in dict.fromkeys(label for label, _, _ in STEPS) if any(label in r["steps"] for r in runs)
    ]
    out["steps_s"] = {
        label: summary([run["steps"].get(label, {}).get("seconds", 0.0) for run in runs]) for label in labels
    }
    out["steps_hwm_mb"] = {
        label: max(run["steps"].get(label, {}).get("hwm_mb", 0.0) for run in runs) for label in labels
    }
    out["runs"] = runs
    return out


def run(args: argparse.Namespace, workdir: Path) -> None:
    started = time.perf_counter()
    results = new_results()
    seed_dir, seed = seeded(workdir, args.vectors, args.reseed)
    results["seed"] = seed
    index_dir = fresh_copy(seed_dir, workdir)
    results["settings"] = {
        "vectors": args.vectors, "batch": args.batch, "repeat": args.repeat, "dim": DIM, "k": K,
        "recall_queries": RECALL_QUERIES, "query_seed": QUERY_SEED, "peak_rss": "VmHWM of the child as it ends",
        "code": code_version(),
    }  # fmt: skip
    runs = update_runs(index_dir, seed_dir, args)
    results["add"], results["delete"] = summarize(runs["add"]), summarize(runs["delete"], "delete_s")
    probe = RecallProbe(index_dir)
    results["updated"] = {**index_state(index_dir), "recall_at_10": probe.recall(index_dir)}
    print(f"updated index: recall@10 {results['updated']['recall_at_10']:.4f}; rebuilding it", flush=True)
    results["rebuild"] = run_child("rebuild", index_dir)
    results["rebuilt"] = {**index_state(index_dir), "recall_at_10": probe.recall(index_dir)}
    results["recall_difference"] = results["updated"]["recall_at_10"] - results["rebuilt"]["recall_at_10"]
    results["targets"] = {**TARGETS, "report": target_lines(results)}
    results["wall_s"] = time.perf_counter() - started
    print_table(results)
    path = results_file(
        "update", "smoke" if args.smoke else "", args.tag, out=args.out, folder=workdir if args.smoke else RESULTS_DIR
    )
    write_json(path, results)
    print(f"\nwrote {path} ({results['wall_s']:.0f} s in all)")


# --------------------------------------------------------------------------------------------------------- reports


def target_lines(results: dict[str, Any]) -> list[str]:
    """Each target next to the measured worst case or median: 'ok' or 'MISS' (nothing is asserted)."""

    def mark(ok: bool) -> str:
        return "ok" if ok else "MISS"

    limit_s, limit_mb = TARGETS["publish_s_max"], TARGETS["peak_rss_mb_max"]
    lines = []
    for kind in ("add", "delete"):
        publish_s, peak_mb = results[kind]["publish_s"]["max"], results[kind]["peak_rss_mb"]["max"]
        lines.append(
            f"{kind} publish, slowest run {publish_s:.2f} s (target <= {limit_s:g} s): {mark(publish_s <= limit_s)}"
        )
        lines.append(
            f"{kind} peak RSS, largest run {peak_mb:.0f} MB (target < {limit_mb:.0f} MB): {mark(peak_mb < limit_mb)}"
        )
    difference = results["recall_difference"]
    lines.append(
        f"recall@10 updated minus rebuilt {difference:+.4f} (target within {TARGETS['recall_difference_max']:g}): "
        f"{mark(abs(difference) <= TARGETS['recall_difference_max'])}"
    )
    return lines


def _params(params: dict[str, int]) -> str:
    return ", ".join(f"{name}={value}" for name, value in params.items()) or "no search parameters"


def _table_rows(results: dict[str, Any]) -> list[list[str]]:
    repeat = results["settings"]["repeat"]
    rows = []
    for kind, label in (("add", "add (`clip-index ingest`)"), ("delete", "delete (`Catalog.delete` + publish)")):
        r = results[kind]
        numbers = [median_min_max(r[key], fmt) for key, fmt in (("publish_s", ".2f"), ("command_s", ".2f"))]
        numbers += [median_min_max(r["peak_rss_mb"], ".0f"), median_min_max(r["written_mb"])]
        rows.append([f"{label} x {repeat}", *numbers])
    r = results["rebuild"]
    numbers = [f"{r['publish_s']:.2f}", f"{r['command_s']:.2f}", f"{r['peak_rss_mb']:.0f}", f"{r['written_mb']:.2f}"]
    rows.append(["rebuild (`publish(retrain=True)`) x 1", *numbers])
    return rows


def markdown(results: dict[str, Any]) -> str:
    """A short markdown table of ``results`` (for the suite's report and bench/README.md)."""
    s, updated, rebuilt = results["settings"], results["updated"], results["rebuilt"]
    lines = [
        f"{s['vectors']:,} seeded CLIP-like vectors, batches of {s['batch']:,}; `{updated['factory']}`; peak RSS is "
        "the child's VmHWM, written MB are the bytes added under segments/, vectors/ and generations/.",
        "",
        "| update | publish s | command s | peak RSS MB | written MB |",
        "| --- | --- | --- | --- | --- |",
        *("| " + " | ".join(row) + " |" for row in _table_rows(results)),
        "",
        f"After the updates: {updated['images']:,} images in {updated['segments']} segments, index directory "
        f"{updated['index_dir_mb']:.0f} MB, recall@10 {updated['recall_at_10']:.4f} "
        f"({_params(updated['search_params'])}); rebuilt: {rebuilt['segments']} segment(s), "
        f"{rebuilt['index_dir_mb']:.0f} MB, recall@10 {rebuilt['recall_at_10']:.4f} "
        f"({_params(rebuilt['search_params'])}); difference {results['recall_difference']:+.4f}.",
        "",
        "Targets: " + "; ".join(results["targets"]["report"]),
    ]
    return "\n".join(lines) + "\n"


def print_table(results: dict[str, Any]) -> None:
    print()
    print(markdown(results))
    for kind in ("add", "delete"):
        print(f"{kind}: median seconds (VmHWM MB after the step) of each timed step:")
        steps, hwm = results[kind]["steps_s"], results[kind]["steps_hwm_mb"]
        for label, stats in steps.items():
            print(f"  {label:<56} {median_min_max(stats, '.3f'):>24}  ({hwm[label]:.0f} MB)")
        print(f"  RSS after imports {median_min_max(results[kind]['rss_after_imports_mb'], '.0f')} MB")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="cache folder (default: a temporary directory)")
    parser.add_argument("--vectors", type=int, help=f"seeded images (default {DEFAULTS['vectors']:,})")
    parser.add_argument("--batch", type=int, help=f"images per add and per delete (default {DEFAULTS['batch']:,})")
    parser.add_argument("--repeat", type=int, help=f"adds and deletes (default {DEFAULTS['repeat']})")
    parser.add_argument("--smoke", action="store_true", help="the same flow on a small index (< 1 min)")
    parser.add_argument("--reseed", action="store_true", help="seed again even if the workdir has a seed")
    parser.add_argument("--tag", default="", help="appended to the results file name")
    parser.add_argument("--out", type=Path, default=None, help="results JSON path (default: bench/results/...)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # internal: KIND INDEX_DIR [ARGUMENT]
    args = parser.parse_args(argv)
    fill_unset(args, SMOKE if args.smoke else DEFAULTS)
    if args.repeat * args.batch > ADD_POOL_ROWS:
        parser.error(f"--repeat x --batch may not exceed the {ADD_POOL_ROWS:,} rows kept for the adds")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        kind, index_dir, *rest = args.child
        child_main(kind, Path(index_dir), Path(rest[0]) if rest else None)
        return
    with workdir_or_temporary(args.workdir, "bench_update_") as workdir:
        run(args, workdir)


if __name__ == "__main__":
    main()
