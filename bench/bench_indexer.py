"""Indexer speed: end-to-end images/s against its two ceilings, the no-op rerun, and the JPEG draft's cosine.

Run from the repository root: ``.venv/bin/python -m bench.bench_indexer [--images 2000] [--only pipeline]``.
Benchmarks, each repeated ``--repeat`` times (medians with min-max are reported):

- ``pipeline``: on ``--images`` generated photo-like JPEGs of ``--size`` with a random-weight ViT-B/32, measured in
  one run, per repetition: (a) decode+preprocess alone (``indexer.decode.decode_file`` in a warm pool of spawned
  worker processes, one per core; and in this process, for reference), (b) encode alone (``encode_image`` on
  normalized batches already in memory, with every core: one batch at a time over all threads, and in the
  pipeline's default streams; the faster is the ceiling), (c) ``build_index`` end to end into a
  fresh index directory, images/s over the whole call. The bound is ``1 / (1/decode + 1/encode)``: the two stages
  share the cores. Target: end to end >= ``RATIO_TARGET`` of the bound.
- ``noop``: ``python -m indexer build`` over ``--noop-files`` unchanged 64x64 JPEGs, in a fresh process,
  interpreter start included, with ViT-B/32 (random weights; the catalog is seeded as a finished build leaves it,
  since encoding 100,000 images would take hours) or ``--noop-model tiny`` (built for real).
  Target: < ``NOOP_TARGET_S``. A second child times each phase of the run.
- ``draft``: embeddings with JPEG draft (DCT scaling) on vs off for ``DRAFT_SAMPLE`` photos: cosine, and cosine
  after subtracting the exact batch's mean embedding (random weights map every image to nearly one direction);
  decode images/s with draft on vs off.
- ``full`` (only with ``--only full``): a whole first build over the ``--noop-files`` 64x64 JPEGs with the ViT
  (``--precision``), as ``python -m indexer build`` in a child: images/s and its peak RSS.

Generated photos, models and the no-op folder and index are cached in ``--workdir`` between runs; all runs are
warm-cache (files in the page cache). Results: a table on stdout and JSON in ``bench/results/`` (or ``--out``).
Each indexer child's peak RSS (``wait4``'s ``ru_maxrss``) is reported with its time. ``--smoke``: tiny sizes and
the tiny test model, to check that the script works (< 1 min; the suite's CI smoke run).
torch and the indexer are imported inside functions, so that the ``--noop-profile`` child can time those imports.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from bench.common import (
    REPO,
    RESULTS_DIR,
    median_min_max,
    new_results,
    results_file,
    summary,
    workdir_or_temporary,
    write_json,
)
from bench.inputs import MODEL_ARCH, tiny_model, vit_model

CORPUS_VERSION = 1  # bump when make_photo changes: cached photos of another version are not reused
PHOTO_QUALITY = 90
PHOTO_SUBSAMPLING = 2  # Pillow's code for 4:2:0 chroma subsampling, what cameras write
NOOP_SIDE = 64  # pixels, no-op corpus images
FILES_PER_DIR = 1000
SINGLE_PROCESS_IMAGES = 300  # photos decoded in this process for the single-core decode rate
ENCODE_CEILING_IMAGES = 512  # photos encoded for the encode ceiling
DRAFT_SAMPLE = 50
RATIO_TARGET = 0.85
NOOP_TARGET_S = 10.0
SMOKE_IMAGES, SMOKE_SIZE, SMOKE_NOOP_FILES = 60, (640, 480), FILES_PER_DIR  # --smoke: seconds, not minutes


# ---------------------------------------------------------------------------------------------------------- corpus


def _noise_field(rng: np.random.Generator, width: int, height: int, scale: int, sigma: float) -> np.ndarray:
    """Gaussian noise at 1/``scale`` resolution, bicubic-upsampled: texture of that grain size."""
    small = rng.normal(0, sigma, (max(1, height // scale), max(1, width // scale))).astype(np.float32)
    return np.asarray(Image.fromarray(small, "F").resize((width, height), Image.Resampling.BICUBIC))


def make_photo(seed: int, width: int, height: int) -> bytes:
    """A photo-like JPEG: smooth colour gradients, blurred-edged shapes, multi-scale texture and sensor noise.

    Quality 90 with 4:2:0 subsampling; a 3000x2000 one is ~1.9 MB, like a camera's 6 MP photo.
    """
    rng = np.random.default_rng(seed)
    corners = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    image = Image.fromarray(corners).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(8, 20))):
        x0, y0 = int(rng.integers(-width // 4, width)), int(rng.integers(-height // 4, height))
        x1, y1 = x0 + int(rng.integers(width // 20, width // 2)), y0 + int(rng.integers(height // 20, height // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(1.2))
    texture = sum(_noise_field(rng, width, height, scale, sigma) for scale, sigma in ((16, 10), (4, 6), (2, 4)))
    pixels = np.asarray(image, dtype=np.float32) + texture[..., None]  # [H, W, 3]
    pixels += rng.integers(-11, 12, (height, width, 1), dtype=np.int8)  # luminance grain
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
        out, "JPEG", quality=PHOTO_QUALITY, subsampling=PHOTO_SUBSAMPLING
    )
    return out.getvalue()


def _write_photo(job: tuple[Path, int, int, int]) -> None:
    path, seed, width, height = job
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(make_photo(seed, width, height))
    os.replace(partial, path)  # an interrupted generation leaves no truncated photo behind


def _write_small(job: tuple[Path, int]) -> None:
    directory, start = job
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(start, start + FILES_PER_DIR):
        rng = np.random.default_rng(index)
        blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        pixels = np.kron(blocks, np.ones((NOOP_SIDE // 4, NOOP_SIDE // 4, 1), dtype=np.uint8))
        Image.fromarray(pixels).save(directory / f"img_{index:06d}.jpg", quality=PHOTO_QUALITY)


def _run_pool(function: Callable[[Any], None], jobs: Sequence[Any], what: str) -> None:
    if not jobs:
        return
    started = time.perf_counter()
    from clip_model.process_tuning import available_cores

    with multiprocessing.get_context("spawn").Pool(available_cores()) as pool:
        for done, _ in enumerate(pool.imap_unordered(function, jobs, chunksize=1), 1):
            if done % max(1, len(jobs) // 10) == 0:
                print(f"  {what}: {done}/{len(jobs)} ({time.perf_counter() - started:.0f} s)", flush=True)


def photo_folder(workdir: Path, count: int, width: int, height: int) -> Path:
    """A folder of exactly ``count`` photos: hard links into a cache of generated photos (seed = number)."""
    cache = workdir / f"photo-cache-{width}x{height}-v{CORPUS_VERSION}"
    cache.mkdir(parents=True, exist_ok=True)
    names = [f"photo_{i:05d}.jpg" for i in range(count)]
    jobs = [(cache / name, i, width, height) for i, name in enumerate(names) if not (cache / name).exists()]
    _run_pool(_write_photo, jobs, f"generating {width}x{height} photos")
    root = workdir / f"photos-{width}x{height}-v{CORPUS_VERSION}-n{count}"
    root.mkdir(exist_ok=True)
    for name in names:
        if not (root / name).exists():
            os.link(cache / name, root / name)
    return root


def small_folder(workdir: Path, count: int) -> Path:
    """``count`` distinct 64x64 JPEGs, ``FILES_PER_DIR`` per directory; a hidden marker says it is complete."""
    root = workdir / f"small-{NOOP_SIDE}px-n{count}"
    marker = root / ".complete"
    if not marker.exists():
        jobs = [(root / f"d{start // FILES_PER_DIR:04d}", start) for start in range(0, count, FILES_PER_DIR)]
        _run_pool(_write_small, jobs, f"generating {NOOP_SIDE}px files")
        marker.touch()
    return root


def noop_model(args: argparse.Namespace, workdir: Path) -> Path:
    """The model of the no-op and full-build benchmarks (``--noop-model``): ViT-B/32 (random weights) or tiny."""
    return vit_model(workdir) if args.noop_model == "vit" else tiny_model(workdir)


def pipeline_model(args: argparse.Namespace, workdir: Path) -> Path:
    """The model of the pipeline and draft benchmarks: ViT-B/32 (random weights), or the tiny one (``--smoke``)."""
    return tiny_model(workdir) if args.model == "tiny" else vit_model(workdir)


# -------------------------------------------------------------------------------------------------------- pipeline


def decode_rate_pool(root: Path, files: Sequence[Any], spec: Any, workers: int) -> tuple[float, list[Any]]:
    """images/s of ``decode_file`` over ``files`` in a warm spawned pool; also returns the results, in order."""
    from indexer.decode import decode_file

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(decode_file, repeat(root), files[: 2 * workers], repeat(spec)))  # start every worker
        started = time.perf_counter()
        results = list(pool.map(decode_file, repeat(root), files, repeat(spec)))
        elapsed = time.perf_counter() - started
    return len(files) / elapsed, results


def decode_rate_here(root: Path, files: Sequence[Any], spec: Any) -> float:
    from indexer.decode import decode_file

    started = time.perf_counter()
    for scanned in files:
        decode_file(root, scanned, spec)
    return len(files) / (time.perf_counter() - started)


def encode_rate(loaded: Any, crops: Sequence[np.ndarray], batch_size: int, threads: int, streams: int = 1) -> float:
    """images/s of ``LoadedModel.encode`` (what the pipeline calls) on normalized batches already in memory:
    ``streams`` batches at once, each on a thread of ``threads // streams`` torch threads (as the pipeline runs)."""
    from concurrent.futures import ThreadPoolExecutor

    from clip_model.preprocess import normalize_pixels
    from clip_model.process_tuning import set_own_thread_count

    mean, std = loaded.info.preprocess["mean"], loaded.info.preprocess["std"]
    batches = [
        normalize_pixels(np.stack(crops[i : i + batch_size]), mean, std) for i in range(0, len(crops), batch_size)
    ]
    initargs = (max(1, threads // streams),)
    with ThreadPoolExecutor(streams, initializer=set_own_thread_count, initargs=initargs) as pool:
        list(pool.map(loaded.encode, batches[:streams]))  # warm-up: first-call allocations and kernel selection
        started = time.perf_counter()
        list(pool.map(loaded.encode, batches))
        elapsed = time.perf_counter() - started
    return sum(len(b) for b in batches) / elapsed


def end_to_end(root: Path, model: Path, index_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One ``build_index`` into a fresh ``index_dir``; images/s over the whole call, plus start-up diagnostics."""

    from indexer.build import BuildOptions, build_index

    shutil.rmtree(index_dir, ignore_errors=True)
    options = BuildOptions(
        root=root,
        index_dir=index_dir,
        model=str(model),
        batch_size=args.batch_size,
        precision=args.precision,
        draft=not args.no_draft,
        plan=args.plan,
    )
    stamps: list[float] = []
    started = time.perf_counter()
    stats = build_index(options, progress=lambda done, total: stamps.append(time.perf_counter()))
    elapsed = time.perf_counter() - started
    if stats.encoded != len(stamps) or stats.skipped:
        raise RuntimeError(f"expected every photo encoded, got {stats.as_dict()}")
    steady = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    return {
        "images_per_s": stats.encoded / elapsed,
        "seconds": elapsed,
        "first_result_s": stamps[0] - started,
        "after_last_result_s": started + elapsed - stamps[-1],
        "steady_images_per_s": steady,
    }


def bench_pipeline(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from clip_model.process_tuning import even_streams
    from indexer.build import load_model
    from indexer.scan import iter_images

    root = photo_folder(workdir, args.images, *args.size)
    model = pipeline_model(args, workdir)
    files = list(iter_images(root))
    loaded = load_model(str(model), precision=args.precision)
    spec = loaded.decode_spec(draft=not args.no_draft)
    cores = args.plan.cores
    runs: dict[str, list[float]] = {
        "decode_pool": [],
        "decode_single": [],
        "encode": [],
        "encode_one_stream": [],
        "encode_streams": [],
        "bound": [],
        "end_to_end": [],
        "ratio": [],
        "steady": [],
        "first_result_s": [],
    }
    for rep in range(args.repeat):
        decode, results = decode_rate_pool(root, files, spec, cores)
        single = decode_rate_here(root, files[:SINGLE_PROCESS_IMAGES], spec)
        crops = [r.pixels for r in results[:ENCODE_CEILING_IMAGES]]
        del results
        # the encode ceiling: the faster of one batch at a time over every core and the pipeline's default streams
        one_stream = encode_rate(loaded, crops, args.batch_size, cores)
        streams = encode_rate(loaded, crops, args.batch_size, cores, even_streams(cores))
        encode = max(one_stream, streams)
        e2e = end_to_end(root, model, workdir / "index-pipeline", args)
        bound = 1 / (1 / decode + 1 / encode)
        for key, value in (
            ("decode_pool", decode),
            ("decode_single", single),
            ("encode", encode),
            ("encode_one_stream", one_stream),
            ("encode_streams", streams),
            ("bound", bound),
            ("end_to_end", e2e["images_per_s"]),
            ("ratio", e2e["images_per_s"] / bound),
            ("steady", e2e["steady_images_per_s"]),
            ("first_result_s", e2e["first_result_s"]),
        ):
            runs[key].append(value)
        print(
            f"  rep {rep + 1}: decode {decode:.1f}/s ({cores} proc), {single:.1f}/s (1 proc); encode {encode:.2f}/s"
            f" (1 stream {one_stream:.2f}, {even_streams(cores)} streams {streams:.2f});"
            f" bound {bound:.2f}/s; end to end {e2e['images_per_s']:.2f}/s = {e2e['images_per_s'] / bound:.3f}"
            f" of the bound ({e2e['seconds']:.1f} s, steady {e2e['steady_images_per_s']:.2f}/s)",
            flush=True,
        )
    settings = {
        "images": args.images,
        "size": "x".join(map(str, args.size)),
        "batch_size": args.batch_size,
        "workers": args.plan.decode_workers,
        "encode_threads": args.plan.torch_threads,
        "encode_streams": args.plan.encode_streams,
        "ceiling_streams": even_streams(cores),
        "draft": not args.no_draft,
        "precision": args.precision,
        "model": MODEL_ARCH if args.model == "vit" else "tiny",
        "photo_mb": statistics.mean(f.size for f in files) / 1e6,
    }
    return {"settings": settings, **{key: summary(values) for key, values in runs.items()}}


# ------------------------------------------------------------------------------------------------------------- noop


def _timed(function: Callable[..., Any], times: dict[str, float], key: str) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            times[key] = times.get(key, 0.0) + time.perf_counter() - started

    return wrapper


def _timed_iter(function: Callable[..., Iterator[Any]], times: dict[str, float], key: str) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Iterator[Any]:
        iterator = function(*args, **kwargs)
        while True:
            started = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            finally:
                times[key] = times.get(key, 0.0) + time.perf_counter() - started
            yield item

    return wrapper


def noop_profile(root: Path, index_dir: Path, model: Path) -> None:
    """In a fresh child: time each phase of a no-op ``build_index`` (as ``python -m indexer build`` runs it)."""
    started = time.perf_counter()
    import indexer.cli  # noqa: F401  # what `python -m indexer` imports: torch, clip_model, faiss, the indexer
    from clip_model.process_tuning import ThreadPlan
    from indexer import build
    from indexer.store import Catalog

    times = {"import": time.perf_counter() - started}
    build.load_model = _timed(build.load_model, times, "model load + fingerprint")
    build.iter_images = _timed_iter(build.iter_images, times, "scan")
    Catalog.files = _timed(Catalog.files, times, "catalog.files()")
    build.current_generation = _timed(build.current_generation, times, "publish check")
    build.publish = _timed(build.publish, times, "publish")
    build.encode_files = _timed_iter(build.encode_files, times, "pipeline (no files)")
    options = build.BuildOptions(root=root, index_dir=index_dir, model=str(model), plan=ThreadPlan.for_indexing())
    run_started = time.perf_counter()
    stats = build.build_index(options)
    times["build_index total"] = time.perf_counter() - run_started
    times["build_index other"] = times["build_index total"] - sum(
        v for k, v in times.items() if k not in ("import", "build_index total")
    )
    print(json.dumps({"times": times, "stats": stats.as_dict()}))


def _child(command: Sequence[str]) -> tuple[float, str, float]:
    """Run ``command``: (wall seconds, stdout, peak RSS in MB of the child)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        elapsed = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(f"{command} failed ({process.returncode}): {stderr[-2000:]}")
    return elapsed, stdout, usage.ru_maxrss / 1024  # Linux reports KiB


def _last_stats(index_dir: Path) -> dict[str, Any]:
    from indexer.store import Catalog

    with Catalog.open(index_dir, readonly=True) as catalog:
        run = catalog.last_run()
    return run["stats"] if run else {}


def seed_index(root: Path, index_dir: Path, model: Path) -> int:
    """Catalog every file under ``root`` as indexed by ``model``, with random unit vectors, and publish it.

    What a finished build leaves behind (paths, sizes, mtimes, content hashes, the model's provenance), without
    spending hours encoding 100,000 images with ViT-B/32: a no-op rerun reads none of the vectors.
    """
    import hashlib

    from indexer.build import load_model
    from indexer.scan import iter_images
    from indexer.store import Catalog, WriterLock, publish

    info = load_model(str(model)).info
    rng = np.random.default_rng(0)
    count = 0
    with WriterLock(index_dir), Catalog.open(index_dir, create=True) as catalog:
        catalog.set_model(info)
        with catalog.transaction():
            for scanned in iter_images(root, None):
                vector = rng.standard_normal(info.embed_dim).astype(np.float32)
                digest = hashlib.sha256((root / scanned.path).read_bytes()).hexdigest()
                catalog.add_image(scanned.path, scanned.size, scanned.mtime_ns, digest, NOOP_SIDE, NOOP_SIDE,
                                  vector / np.linalg.norm(vector))  # fmt: skip
                count += 1
        publish(index_dir, catalog)
    return count


def bench_noop(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from indexer.build import BuildOptions, build_index

    root = small_folder(workdir, args.noop_files)
    model = noop_model(args, workdir)
    index_dir = workdir / f"index-small-n{args.noop_files}-{args.noop_model}"
    started = time.perf_counter()  # the first build, or an update bringing a cached index up to date
    if args.noop_model == "vit" and not index_dir.exists():
        seeded = seed_index(root, index_dir, model)
        print(f"  seeded the catalog with {seeded} files in {time.perf_counter() - started:.1f} s", flush=True)
    else:
        stats = build_index(BuildOptions(root=root, index_dir=index_dir, model=str(model), plan=args.plan))
        print(
            f"  initial build/update: {stats.encoded} encoded, {stats.unchanged} unchanged in "
            f"{time.perf_counter() - started:.1f} s",
            flush=True,
        )
    cli = [sys.executable, "-m", "indexer", "build", str(root), "--index-dir", str(index_dir), "--model", str(model)]
    profile = [sys.executable, "-m", "bench.bench_indexer", "--noop-profile", str(root), str(index_dir), str(model)]
    totals, startups, phases, peaks = [], [], [], []
    for rep in range(args.repeat):
        elapsed, _, peak_mb = _child(cli)
        peaks.append(peak_mb)
        stats_dict = _last_stats(index_dir)
        if stats_dict.get("encoded") != 0 or stats_dict.get("unchanged") != args.noop_files:
            raise RuntimeError(f"the rerun was not a no-op: {stats_dict}")
        totals.append(elapsed)
        startups.append(_child([sys.executable, "-c", "pass"])[0])
        phases.append(json.loads(_child(profile)[1])["times"])
        print(
            f"  rep {rep + 1}: `python -m indexer build` {elapsed:.2f} s, peak RSS {peak_mb:.0f} MB; phases "
            + ", ".join(f"{k} {v:.2f}" for k, v in phases[-1].items()),
            flush=True,
        )
    breakdown = {"interpreter start": summary(startups)}
    breakdown.update({key: summary([p[key] for p in phases]) for key in phases[0]})
    return {
        "files": args.noop_files,
        "model": model.name,
        "total_s": summary(totals),
        "peak_rss_mb": summary(peaks),
        "target_s": NOOP_TARGET_S,
        "breakdown_s": breakdown,
    }


def bench_full(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """A whole first build over ``--noop-files`` small files with the ViT (``--precision``), as a user runs it
    (``python -m indexer build`` in a child): seconds, images/s and the child's peak RSS. Only with ``--only full``:
    100,000 files take ~30 min in int8 on 2 cores."""
    root = small_folder(workdir, args.noop_files)
    model = noop_model(args, workdir)
    index_dir = workdir / f"index-full-n{args.noop_files}-{args.noop_model}-{args.precision}"
    shutil.rmtree(index_dir, ignore_errors=True)
    cli = [sys.executable, "-m", "indexer", "build", str(root), "--index-dir", str(index_dir), "--model", str(model),
           "--precision", args.precision]  # fmt: skip
    elapsed, _, peak_mb = _child(cli)
    stats = _last_stats(index_dir)
    if stats.get("encoded") != args.noop_files:
        raise RuntimeError(f"expected {args.noop_files} files encoded, got {stats}")
    return {"files": args.noop_files, "model": model.name, "precision": args.precision, "seconds": elapsed,
            "images_per_s": args.noop_files / elapsed, "peak_rss_mb": peak_mb, "stats": stats}  # fmt: skip


# ------------------------------------------------------------------------------------------------------------ draft


def bench_draft(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from clip_model.preprocess import normalize_pixels
    from indexer.build import load_model
    from indexer.decode import decode_file
    from indexer.scan import iter_images

    root = photo_folder(workdir, max(args.images, DRAFT_SAMPLE), *args.size)
    files = list(iter_images(root))[:DRAFT_SAMPLE]
    loaded = load_model(str(pipeline_model(args, workdir)))
    crops, rates = {}, {}
    for draft in (True, False):
        spec = loaded.decode_spec(draft)
        rates[draft] = summary([decode_rate_here(root, files, spec) for _ in range(args.repeat)])
        crops[draft] = np.stack([decode_file(root, f, spec).pixels for f in files])  # [N, R, R, 3]
    mean, std = loaded.info.preprocess["mean"], loaded.info.preprocess["std"]
    embeddings = {draft: loaded.encode(normalize_pixels(crops[draft], mean, std)) for draft in (True, False)}
    drafted, exact = embeddings[True], embeddings[False]
    cosine = np.sum(drafted * exact, axis=1)
    centre = exact.mean(axis=0)
    a, b = drafted - centre, exact - centre
    centred = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    pixel_diff = np.abs(crops[True].astype(np.int16) - crops[False].astype(np.int16))
    return {
        "images": len(files),
        "cosine": {"min": float(cosine.min()), "median": float(np.median(cosine))},
        "centred_cosine": {"min": float(centred.min()), "median": float(np.median(centred))},
        "crop_abs_diff_levels": {"mean": float(pixel_diff.mean()), "max": int(pixel_diff.max())},
        "decode_images_per_s_1proc": {"draft": rates[True], "no_draft": rates[False]},
    }


# ------------------------------------------------------------------------------------------------------------- main


def print_table(results: dict[str, Any]) -> None:
    if "pipeline" in results:
        p = results["pipeline"]
        print(f"\npipeline: {p['settings']}")
        processes = f"{results['machine']['nproc']} worker processes"
        print(f"  decode+preprocess, {processes}  {median_min_max(p['decode_pool'])} images/s")
        print(f"  decode+preprocess, 1 process            {median_min_max(p['decode_single'])} images/s")
        print(f"  encode alone (the faster of the two)    {median_min_max(p['encode'])} images/s")
        if "encode_streams" in p:
            print(f"    one batch at a time, every core       {median_min_max(p['encode_one_stream'])} images/s")
            streams = f"{p['settings']['ceiling_streams']} streams"
            print(f"    {streams:34s}    {median_min_max(p['encode_streams'])} images/s")
        print(f"  bound 1/(1/decode + 1/encode)           {median_min_max(p['bound'])} images/s")
        print(f"  end to end (build_index)                {median_min_max(p['end_to_end'])} images/s")
        print(f"  ratio to the bound (target >= {RATIO_TARGET})     {median_min_max(p['ratio'], '.3f')}")
    if "full" in results:
        print(f"\n{full_summary(results['full'])}")
    if "noop" in results:
        n = results["noop"]
        print(
            f"\nno-op rerun over {n['files']} files ({n.get('model')}): {median_min_max(n['total_s'])} s "
            f"(target < {NOOP_TARGET_S} s), peak RSS {median_min_max(n['peak_rss_mb'], '.0f')} MB"
        )
        for key, value in n["breakdown_s"].items():
            print(f"  {key:28s} {median_min_max(value)} s")
    if "draft" in results:
        d = results["draft"]
        print(
            f"\ndraft vs exact over {d['images']} photos: cosine min {d['cosine']['min']:.6f} median "
            f"{d['cosine']['median']:.6f}; centred cosine min {d['centred_cosine']['min']:.6f} median "
            f"{d['centred_cosine']['median']:.6f}; crop |diff| mean {d['crop_abs_diff_levels']['mean']:.2f} "
            f"max {d['crop_abs_diff_levels']['max']} levels"
        )
        rates = d["decode_images_per_s_1proc"]
        print(
            f"  decode, 1 process: draft {median_min_max(rates['draft'])} images/s, "
            f"no draft {median_min_max(rates['no_draft'])} images/s"
        )


def full_summary(full: dict[str, Any]) -> str:
    """One line for the full-build result (stdout table and markdown report)."""
    return (f"Whole first build over {full['files']} files ({full['model']}, {full['precision']}): "
            f"{full['seconds']:.0f} s, {full['images_per_s']:.1f} images/s, "
            f"indexer peak RSS {full['peak_rss_mb']:.0f} MB.")  # fmt: skip


def markdown(results: dict[str, Any]) -> str:
    """A short markdown table of ``results`` (for the suite's report)."""
    lines = []
    if "pipeline" in results:
        p = results["pipeline"]
        st = p["settings"]
        lines += [
            f"{st['images']} JPEGs {st['size']}, {st['model']}, precision {st.get('precision', 'fp32')}, batch "
            f"{st['batch_size']}, {st['workers']} decode worker(s), encode threads {st.get('encode_threads')}, "
            f"streams {st.get('encode_streams', 1)}:",
            "",
            "| decode ceiling img/s | encode ceiling img/s | bound img/s | end to end img/s | ratio (target >= "
            f"{RATIO_TARGET}) |",
            "| --- | --- | --- | --- | --- |",
            "| "
            + " | ".join(median_min_max(p[key]) for key in ("decode_pool", "encode", "bound", "end_to_end"))
            + f" | {median_min_max(p['ratio'], '.3f')} |",
            "",
        ]
    if "noop" in results:
        n = results["noop"]
        lines.append(
            f"No-op rerun over {n['files']} files ({n['model']}): {median_min_max(n['total_s'])} s "
            f"(target < {n['target_s']:g} s), indexer peak RSS {median_min_max(n['peak_rss_mb'], '.0f')} MB."
        )
    if "full" in results:
        lines.append(full_summary(results["full"]))
    return "\n".join(lines) + "\n"


def _size(text: str) -> tuple[int, int]:
    width, height = text.lower().split("x")
    return int(width), int(height)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="photos for the pipeline benchmark")
    parser.add_argument("--size", type=_size, default=(3000, 2000), help="photo WIDTHxHEIGHT")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of each measurement")
    parser.add_argument("--workdir", type=Path, default=None, help="cache folder (default: a temporary directory)")
    parser.add_argument("--noop-files", type=int, default=100_000, help="unchanged files in the no-op rerun")
    parser.add_argument(
        "--noop-model",
        choices=("vit", "tiny"),
        default="vit",
        help="model of the no-op rerun: ViT-B/32 (its catalog is seeded, not encoded) or the tiny test model",
    )
    parser.add_argument(
        "--only",
        choices=("pipeline", "noop", "draft", "full"),
        default=None,
        help="run one benchmark (full: a whole build over --noop-files files, only when asked)",
    )
    parser.add_argument("--workers", type=int, default=None, help="decode workers (default: ThreadPlan.for_indexing)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: pipeline.DEFAULT_BATCH_SIZE")
    parser.add_argument("--threads", type=int, default=0, help="build_index encode threads (0: its default)")
    parser.add_argument("--streams", type=int, default=0, help="build_index encode streams (0: its default)")
    parser.add_argument("--no-draft", action="store_true", help="pipeline benchmark without JPEG draft")
    parser.add_argument("--tag", default="", help="appended to the results file name")
    parser.add_argument("--model", choices=("vit", "tiny"), default="vit", help="pipeline and draft model")
    parser.add_argument("--precision", default="fp32", help="pipeline encoder precision (clip_model.PRECISIONS)")
    parser.add_argument("--out", type=Path, default=None, help="results JSON path (default: bench/results/...)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and model, to check the script (< 1 min)")
    parser.add_argument("--noop-profile", nargs=3, type=Path, help=argparse.SUPPRESS)  # internal: the profiling child
    args = parser.parse_args(argv)
    if args.smoke:
        args.images, args.size, args.repeat, args.noop_files = SMOKE_IMAGES, SMOKE_SIZE, 1, SMOKE_NOOP_FILES
        args.model, args.noop_model = "tiny", "tiny"
    return args


def run(args: argparse.Namespace, workdir: Path) -> None:
    from clip_model import PRECISIONS
    from clip_model.process_tuning import ThreadPlan
    from indexer.pipeline import DEFAULT_BATCH_SIZE

    if args.precision not in PRECISIONS:  # checked here: parse_args imports nothing, for --noop-profile's timing
        raise SystemExit(f"--precision must be one of {', '.join(PRECISIONS)}, got {args.precision!r}")
    args.plan = ThreadPlan.for_indexing(
        args.precision, threads=args.threads, streams=args.streams, workers=args.workers
    )
    args.batch_size = args.batch_size or DEFAULT_BATCH_SIZE
    results = new_results()
    benches = {"pipeline": bench_pipeline, "noop": bench_noop, "draft": bench_draft, "full": bench_full}
    for name, bench in benches.items():
        if args.only == name or (args.only is None and name != "full"):  # the full build only when asked
            print(f"{name}:", flush=True)
            results[name] = bench(args, workdir)
    print_table(results)
    path = results_file("indexer", args.only, args.tag, out=args.out, folder=workdir if args.smoke else RESULTS_DIR)
    write_json(path, results)
    print(f"\nwrote {path}")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.noop_profile:
        noop_profile(*args.noop_profile)  # times its own imports: nothing is imported before it
        return
    from clip_model.process_tuning import tune_malloc

    tune_malloc()  # as clip-index and clip-serve do
    with workdir_or_temporary(args.workdir, "bench_indexer_") as workdir:
        run(args, workdir)


if __name__ == "__main__":
    main()
