"""Engine overhead and scaling: ``clip-index encode`` on Ray with CPU workers against the local engine, on the same
photos.

Run from the repository root: ``.venv/bin/python -m bench.bench_ray [--workdir DIR] [--images 2000]
[--precision fp32|int8] [--workers 1,2] [--repeat 3] [--smoke]``.

Photos: ``--images`` photo-like JPEGs of ``--size`` (:func:`bench.bench_indexer.photo_folder`, the indexer
member's corpus); model: ViT-B/32 with random weights (:func:`bench.inputs.vit_model`), ``--precision``. Each
repetition, in turn:

- local: :func:`indexer.encode.encode_folder` with the local engine (the build's pipeline, its default thread
  plan) into a fresh shards directory, no Ray running;
- ray: a one-machine Ray cluster of every core started (``ray.init(address="local")``, timed apart), then the same
  call with the Ray engine and each count of ``--workers`` (1-CPU actors), then the cluster stopped.

Each run's images/s is the files encoded over the whole call: the model loaded (by this process, and by each actor),
the scan, encoding, the shards written; "steady" is the rate from the first shard written to the last. The ratio
is the Ray engine's images/s with the most workers over the local engine's, per repetition (target:
``RATIO_TARGET``); the 1-worker run gives the rate of one worker. ``--partition-size`` is small by default so that
2,000 photos spread over the workers to the end. Results: a table on stdout and JSON in ``bench/results/`` (or
``--out``); ``--smoke``: a few small photos and the tiny test model (< 1 min), results in the workdir.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.bench_indexer import photo_folder
from bench.common import (
    RESULTS_DIR,
    fill_unset,
    median_min_max,
    new_results,
    results_file,
    summary,
    workdir_or_temporary,
    write_json,
)
from bench.inputs import MODEL_ARCH, tiny_model, vit_model

RATIO_TARGET = 0.8  # the Ray engine's images/s over the local engine's, on this machine's cores
DEFAULTS = {"images": 2000, "size": "3000x2000", "repeat": 3, "workers": "1,2", "partition_size": 50, "model": "vit"}
SMOKE = {"images": 40, "size": "640x480", "repeat": 1, "workers": "2", "partition_size": 10, "model": "tiny"}


def encode_run(root: Path, model: Path, out: Path, args: argparse.Namespace, engine: Any) -> dict[str, float]:
    """One ``encode_folder`` into a fresh ``out``: images/s over the call and from the first shard to the last."""
    from indexer.encode import EncodeOptions, encode_folder

    shutil.rmtree(out, ignore_errors=True)
    options = EncodeOptions(
        root, out, str(model), partition_size=args.partition_size, batch_size=args.batch_size, precision=args.precision
    )
    progress: list[tuple[float, int]] = []
    started = time.perf_counter()
    stats = encode_folder(options, engine, lambda done, total: progress.append((time.perf_counter(), done))).stats
    elapsed = time.perf_counter() - started
    if stats.encoded != args.images or stats.skipped:
        raise RuntimeError(f"expected {args.images} photos encoded, got {stats.as_dict()}")
    written = [(when, done) for when, done in progress if done > 0]
    (first, done_first), (last, done_last) = written[0], written[-1]
    steady = (done_last - done_first) / (last - first) if last > first else float("nan")
    return {"images_per_s": stats.encoded / elapsed, "seconds": elapsed, "steady_images_per_s": steady}


def bench(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import ray

    from clip_model.process_tuning import ThreadPlan, available_cores
    from indexer.partition_encoder import LocalEngine
    from indexer.ray_engine import LOCAL, RayEngine, RaySettings

    width, height = (int(side) for side in args.size.lower().split("x"))
    root = photo_folder(workdir, args.images, width, height)
    model = tiny_model(workdir) if args.model == "tiny" else vit_model(workdir)
    cores = available_cores()
    runs: dict[str, list[dict[str, float]]] = {"local": [], **{f"ray_{n}": [] for n in args.workers}}
    starts: list[float] = []
    for rep in range(args.repeat):
        plan = ThreadPlan.for_indexing(args.precision)
        runs["local"].append(encode_run(root, model, workdir / "shards-local", args, LocalEngine(plan)))
        started = time.perf_counter()
        ray.init(address=LOCAL, num_cpus=cores, include_dashboard=False, log_to_driver=False)
        starts.append(time.perf_counter() - started)
        try:
            for n in args.workers:
                engine = RayEngine(RaySettings(workers=n))
                runs[f"ray_{n}"].append(encode_run(root, model, workdir / f"shards-ray-{n}", args, engine))
        finally:
            ray.shutdown()
        shown = ", ".join(f"{name} {run[-1]['images_per_s']:.2f}" for name, run in runs.items())
        print(f"  rep {rep + 1}: images/s {shown}; cluster start {starts[-1]:.1f} s", flush=True)
    most = f"ray_{max(args.workers)}"
    ratios = [
        ray_run["images_per_s"] / local["images_per_s"]
        for ray_run, local in zip(runs[most], runs["local"], strict=True)
    ]
    return {
        "settings": {
            "images": args.images,
            "size": args.size,
            "model": MODEL_ARCH if args.model == "vit" else "tiny",
            "precision": args.precision,
            "batch_size": args.batch_size,
            "partition_size": args.partition_size,
            "workers": args.workers,
            "cores": cores,
            "local_plan": ThreadPlan.for_indexing(args.precision).describe(),
        },
        "cluster_start_s": summary(starts),
        "runs": {
            name: {key: summary([run[key] for run in values]) for key in values[0]} for name, values in runs.items()
        },
        "ratio": summary(ratios),
        "ratio_target": RATIO_TARGET,
    }


def markdown(results: dict[str, Any]) -> str:
    """A short markdown table of ``results`` (for the suite's report)."""
    r = results["ray"]
    st = r["settings"]
    lines = [
        f"{st['images']} JPEGs {st['size']}, {st['model']}, precision {st['precision']}, batch {st['batch_size']}, "
        f"partitions of ~{st['partition_size']}, {st['cores']} cores; Ray cluster start "
        f"{median_min_max(r['cluster_start_s'], '.1f')} s (not in the rates):",
        "",
        "| engine | images/s | steady images/s | seconds |",
        "| --- | --- | --- | --- |",
    ]
    for name, run in r["runs"].items():
        engine = "local" if name == "local" else f"ray, {name.removeprefix('ray_')} worker(s) of 1 CPU"
        values = (run["images_per_s"], run["steady_images_per_s"], run["seconds"])
        lines.append(f"| {engine} | " + " | ".join(median_min_max(v, ".2f") for v in values) + " |")
    lines += ["", f"Ray / local (target >= {r['ratio_target']}): {median_min_max(r['ratio'], '.3f')}."]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="cache folder (default: a temporary directory)")
    parser.add_argument("--images", type=int, help=f"photos (default {DEFAULTS['images']})")
    parser.add_argument("--size", help=f"photo WIDTHxHEIGHT (default {DEFAULTS['size']})")
    parser.add_argument("--repeat", type=int, help=f"repetitions (default {DEFAULTS['repeat']})")
    parser.add_argument("--workers", help=f"comma-separated Ray worker counts (default {DEFAULTS['workers']})")
    parser.add_argument("--partition-size", type=int, help=f"default {DEFAULTS['partition_size']}")
    parser.add_argument("--model", choices=("vit", "tiny"), help="ViT-B/32 (random weights) or the tiny test model")
    parser.add_argument("--precision", default="fp32", help="encoder precision (clip_model.PRECISIONS)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per encoder call")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and model, to check the script (< 1 min)")
    parser.add_argument("--tag", default="", help="appended to the results file name")
    parser.add_argument("--out", type=Path, default=None, help="results JSON path (default: bench/results/...)")
    args = parser.parse_args(argv)
    fill_unset(args, SMOKE if args.smoke else DEFAULTS)
    args.workers = sorted({int(n) for n in str(args.workers).split(",") if n.strip()})
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from clip_model.process_tuning import tune_malloc

    tune_malloc()  # as clip-index does
    with workdir_or_temporary(args.workdir, "bench_ray_") as workdir:
        results = new_results() | {"ray": bench(args, workdir)}
        print("\n" + markdown(results))
        path = results_file(
            "ray", args.precision, args.tag, out=args.out, folder=workdir if args.smoke else RESULTS_DIR
        )
        write_json(path, results)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
