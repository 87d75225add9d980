"""Duplicate groups (``indexer.duplicates``): how long finding them takes at 100,000 images, and how similar planted
copies, second exposures and unrelated photos are under the models at hand (what the default threshold rests on).

Run from the repository root: ``.venv/bin/python -m bench.bench_duplicates [--workdir DIR] [--vectors 100000]
[--thresholds 0.995,0.9] [--repeat 3] [--demo-model PATH] [--smoke]``.

Scale. ``--vectors`` CLIP-like 512-d unit vectors (:func:`bench.inputs.make_clip_like`), of which ``PLANTED_SHARE``
are replaced by planted copies of other rows, in groups of 2 to 4: most a near copy (the source plus noise, cosine
``NEAR_COPY_COSINE`` to it), one in ``EXACT_EVERY`` an exact one (the same vector and content hash). They go into a
new index directory through the store's API (``Catalog.add_images``, then ``publish`` with an exact index), made
once per workdir (``seed-n<vectors>/seed.json``). Each threshold is then timed in a fresh child process that opens
the published index and runs ``find_duplicates`` on every core: seconds, the child's peak RSS (VmHWM) and its RSS
once the index is open, groups and images in them, and how many planted groups came out whole; ``--repeat`` runs
per threshold, the thresholds interleaved (median, min and max of the times).

Separation. The folder of the tests (:mod:`tests.indexer.scenes`: ``SCENES`` photo-like scenes, the first
``PLANTED_SCENES`` with a resized, a recompressed, a cropped and an EXIF-rotated copy, the next ``BURST_SCENES``
with a second exposure) is indexed with each model: the tiny random-weight model of the tests, ViT-B/32 with random
weights, and the demo model if ``--demo-model`` names its checkpoint (``clip-train demo --print-model-path``). For
each kind of copy: the lowest, median and highest cosine similarity to its original; for unrelated pairs, the
highest. ``--smoke``: ``SMOKE`` sizes, the tiny model only.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
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
PLANTED_SHARE = 0.01  # of the vectors replaced by planted copies
NEAR_COPY_COSINE = 0.998  # of a planted near copy to its source
EXACT_EVERY = 4  # one planted copy in this many is exact (same vector and content hash)
ADD_ROWS = 10_000  # rows per Catalog.add_images while seeding
SEED_FILE = "seed.json"
PLANTED_FILE = "planted.json"
SCENES, PLANTED_SCENES, BURST_SCENES = 60, 10, 10
MB = 2**20
DEFAULTS = {"vectors": 100_000, "thresholds": "0.995,0.9", "repeat": 3, "scenes": SCENES}
SMOKE = {"vectors": 3_000, "thresholds": "0.995", "repeat": 1, "scenes": 12}


# ------------------------------------------------------------------------------------------------------------ scale


def planted_vectors(count: int) -> tuple[np.ndarray, list[str], list[list[int]]]:
    """(vectors [count, DIM], content hashes, planted groups as row lists): CLIP-like rows with copies planted."""
    from bench.inputs import make_clip_like

    vectors = make_clip_like(count, DIM, VECTOR_SEED, 0)[0]
    hashes = [hashlib.sha256(f"row {n}".encode()).hexdigest() for n in range(count)]
    rng = np.random.default_rng(VECTOR_SEED)
    rows = rng.permutation(count)[: int(count * PLANTED_SHARE)]
    groups, at = [], 0
    while at + 1 < len(rows):
        size = int(rng.integers(2, 5))
        source, copies = int(rows[at]), [int(r) for r in rows[at + 1 : at + size]]
        for copy in copies:
            if rng.integers(EXACT_EVERY) == 0:
                vectors[copy], hashes[copy] = vectors[source], hashes[source]
            else:  # noise of norm r gives cosine 1 / sqrt(1 + r^2)
                spread = np.sqrt(1 / NEAR_COPY_COSINE**2 - 1) / np.sqrt(DIM)
                noisy = vectors[source] + rng.normal(0, spread, DIM).astype(np.float32)
                vectors[copy] = noisy / np.linalg.norm(noisy)
        groups.append(sorted([source, *copies]))
        at += size
    return vectors, hashes, groups


def seeded(workdir: Path, count: int) -> Path:
    """The index directory of ``count`` planted vectors (rows n at ``seed/<n // 1000>/img_<n>.jpg``), made once."""
    from clip_model.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from indexer.store import Catalog, ModelInfo, NewImage, publish

    seed_dir = workdir / f"seed-n{count}"
    if (seed_dir / SEED_FILE).is_file():
        print(f"seed: cached {seed_dir}", flush=True)
        return seed_dir
    shutil.rmtree(seed_dir, ignore_errors=True)
    started = time.perf_counter()
    vectors, hashes, groups = planted_vectors(count)
    weights = hashlib.sha256(b"bench_duplicates synthetic weights").hexdigest()
    model = ModelInfo.of("bench-duplicates-synthetic", weights, DIM, 224, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
    with Catalog.open(seed_dir / "index", create=True) as catalog:
        catalog.set_model(model)
        for start in range(0, count, ADD_ROWS):
            numbers = range(start, min(start + ADD_ROWS, count))
            images = [NewImage(f"seed/{n // 1000:04d}/img_{n:07d}.jpg", 1, 1, hashes[n], 640, 480) for n in numbers]
            catalog.add_images(images, vectors[numbers.start : numbers.stop])
        publish(seed_dir / "index", catalog, "Flat")
    write_json(seed_dir / PLANTED_FILE, {"groups": [[n + 1 for n in group] for group in groups]})  # ids from 1
    write_json(seed_dir / SEED_FILE, {"vectors": count, "seconds": time.perf_counter() - started})
    print(f"seed: {count} vectors, {len(groups)} planted groups, in {time.perf_counter() - started:.0f} s", flush=True)
    return seed_dir


def child_main(index_dir: Path, threshold: float, planted_file: Path) -> None:
    """Find the groups once at ``threshold`` and print what the parent reports, as JSON."""
    from clip_model.process_tuning import available_cores, own_threads
    from indexer.duplicates import find_duplicates
    from indexer.store import PublishedIndex

    started = time.perf_counter()
    with PublishedIndex.open(index_dir, verify_checksums=False) as index:
        open_s, open_rss = time.perf_counter() - started, proc_status_kb("self", "VmRSS")
        with own_threads(available_cores()):
            found = find_duplicates(index, threshold)
    found_groups = {tuple(m.id for m in sorted(g.members, key=lambda m: m.id)) for g in found.groups}
    planted = [tuple(group) for group in json.loads(planted_file.read_text(encoding="utf-8"))["groups"]]
    print(
        json.dumps(
            {
                "threshold": threshold,
                "images": found.images,
                "seconds": found.seconds,
                "open_s": open_s,
                "groups": len(found.groups),
                "grouped_images": sum(len(g.members) for g in found.groups),
                "largest_group": max((len(g.members) for g in found.groups), default=0),
                "planted_groups": len(planted),
                "planted_found_whole": sum(group in found_groups for group in planted),
                "rss_open_mb": open_rss / 1024,
                "peak_rss_mb": proc_status_kb("self", "VmHWM") / 1024,
            }
        )  # fmt: skip
    )


def run_child(index_dir: Path, threshold: float, planted_file: Path) -> dict[str, Any]:
    argv = [sys.executable, "-m", "bench.bench_duplicates", "--child", str(index_dir), str(threshold)]
    done = subprocess.run([*argv, str(planted_file)], cwd=REPO, capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# ------------------------------------------------------------------------------------------------------- separation


def separation(model: Path, workdir: Path, scenes: int) -> dict[str, dict[str, float]]:
    """Per kind of copy (and "burst", "unrelated"): lowest, median and highest cosine similarity to the original
    (unrelated: between scenes) under ``model``, over the planted folder of the tests."""
    from indexer.store import Catalog
    from tests.indexer.scenes import index_library, plant_library, write_burst

    shutil.rmtree(workdir, ignore_errors=True)
    library = plant_library(workdir / "photos", scenes=scenes, planted=min(PLANTED_SCENES, scenes // 2))
    copies = dict(library.copies)
    for seed in range(len(library.groups), min(len(library.groups) + BURST_SCENES, scenes)):
        burst = write_burst(workdir / "photos" / "bursts" / f"scene_{seed:03d}.jpg", seed)
        copies[burst.relative_to(library.root).as_posix()] = "burst"
    index_dir = index_library(library, workdir / "index", model)
    with Catalog.open(index_dir, readonly=True) as catalog:
        ids, vectors = catalog.embeddings()
        records = catalog.images(ids.tolist())
    scene_of = {path: path.rsplit("/", 1)[1].split(".")[0] for path in copies}
    rows = {records[int(i)].path: n for n, i in enumerate(ids)}
    scores: dict[str, list[float]] = {}
    for a, b in itertools.combinations(sorted(rows), 2):
        if scene_of[a] != scene_of[b]:
            kind = "unrelated"
        elif "original" in (copies[a], copies[b]):
            kind = copies[b] if copies[a] == "original" else copies[a]
        else:
            continue  # two copies of one scene
        scores.setdefault(kind, []).append(float(vectors[rows[a]] @ vectors[rows[b]]))
    return {
        kind: {"min": min(v), "median": float(np.median(v)), "max": max(v), "pairs": len(v)}
        for kind, v in scores.items()
    }


def separation_models(workdir: Path, demo_model: Path | None, smoke: bool) -> dict[str, Path]:
    """The models the separation is measured under: name -> checkpoint."""
    import clip_model
    from bench.inputs import saved_model, tiny_model

    models = {"tiny (random)": tiny_model(workdir)}
    if not smoke:
        models["ViT-B/32 (random)"] = saved_model(
            workdir, "ViT-B-32-seed0", lambda: clip_model.create_model("ViT-B-32", seed=0)[0]
        )
    if demo_model is not None:
        models["demo"] = demo_model
    return models


# ----------------------------------------------------------------------------------------------------------- report


def run(args: argparse.Namespace, workdir: Path) -> None:
    results = new_results() | {"settings": {"vectors": args.vectors, "planted_share": PLANTED_SHARE}}
    seed_dir = seeded(workdir, args.vectors)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    runs: dict[float, list[dict[str, Any]]] = {threshold: [] for threshold in thresholds}
    for _ in range(args.repeat):  # the thresholds interleaved, so a busy spell of the machine hits them alike
        for threshold in thresholds:
            measured = run_child(seed_dir / "index", threshold, seed_dir / PLANTED_FILE)
            print(f"threshold {threshold}: {measured['seconds']:.1f} s, {measured['groups']} groups", flush=True)
            runs[threshold].append(measured)
    results["scale"] = [
        {
            **measured[0],
            **{key: summary([m[key] for m in measured]) for key in ("seconds", "peak_rss_mb", "rss_open_mb")},
        }
        for measured in runs.values()
    ]
    results["separation"] = {}
    for name, model in separation_models(workdir, args.demo_model, args.smoke).items():
        print(f"separation under {name} ({model})", flush=True)
        results["separation"][name] = separation(model, workdir / "separation", args.scenes)
    folder = workdir if args.smoke else RESULTS_DIR
    path = results_file("duplicates", "smoke" if args.smoke else "", args.tag, out=args.out, folder=folder)
    write_json(path, results)
    print()
    print(markdown(results))
    print(f"wrote {path}")


def markdown(results: dict[str, Any]) -> str:
    """Markdown tables of ``results`` (for the suite's report and bench/README.md)."""
    s = results["settings"]
    lines = [
        f"{s['vectors']:,} CLIP-like 512-d vectors, {s['planted_share']:.0%} of them planted copies in groups of 2-4 "
        f"(near copies at cosine {NEAR_COPY_COSINE}, one in {EXACT_EVERY} exact); RSS once the index is open and "
        "peak RSS (VmHWM) of the child, which includes the file pages of the vectors it read.",
        "",
        "| threshold | seconds | groups | images in groups | largest | planted found whole | RSS open MB | peak RSS MB "
        "|",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in results["scale"]:
        lines.append(
            f"| {m['threshold']} | {median_min_max(m['seconds'], '.1f')} | {m['groups']:,} | {m['grouped_images']:,} | "
            f"{m['largest_group']:,} | {m['planted_found_whole']}/{m['planted_groups']} | "
            f"{m['rss_open_mb']['median']:.0f} | {m['peak_rss_mb']['median']:.0f} |"
        )
    kinds = ["exact", "resized", "recompressed", "rotated", "cropped", "burst", "unrelated"]
    lines += ["", "Cosine similarity to the original, min / median / max (unrelated: between scenes):", ""]
    lines += ["| model | " + " | ".join(kinds) + " |", "| --- |" + " --- |" * len(kinds)]
    for name, by_kind in results["separation"].items():
        cells = [
            f"{by_kind[k]['min']:.4f} / {by_kind[k]['median']:.4f} / {by_kind[k]['max']:.4f}" if k in by_kind else "-"
            for k in kinds
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="cache folder (default: a temporary directory)")
    parser.add_argument("--vectors", type=int, help=f"images of the timed index (default {DEFAULTS['vectors']:,})")
    parser.add_argument("--thresholds", help=f"comma-separated thresholds to time (default {DEFAULTS['thresholds']})")
    parser.add_argument("--repeat", type=int, help=f"runs per threshold (default {DEFAULTS['repeat']})")
    parser.add_argument("--scenes", type=int, help=f"scenes of the separation folder (default {DEFAULTS['scenes']})")
    parser.add_argument("--demo-model", type=Path, default=None, help="the demo model's checkpoint, if trained")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, the tiny model only (< 1 min)")
    parser.add_argument("--tag", default="", help="appended to the results file name")
    parser.add_argument("--out", type=Path, default=None, help="results JSON path (default: bench/results/...)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)  # internal: INDEX_DIR THRESHOLD PLANTED_FILE
    args = parser.parse_args(argv)
    fill_unset(args, SMOKE if args.smoke else DEFAULTS)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        index_dir, threshold, planted_file = args.child
        child_main(Path(index_dir), float(threshold), Path(planted_file))
        return
    with workdir_or_temporary(args.workdir, "bench_duplicates_") as workdir:
        run(args, workdir)


if __name__ == "__main__":
    main()
