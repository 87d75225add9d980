"""Relevance on the demo model: does one cut-off keep the true matches of queries for what the collection holds and
drop everything a query for something absent finds?

Random weights say nothing about meaning, so this runs on the trained demo model (``clip-train demo``; trained here
or reused from the demo cache, ``--steps`` as the demo's) over the images it never trained on (its test and
held-out splits, 900 shapes), indexed by ``clip-index build`` and served by ``python -m app`` as ``make demo`` does.
Every query goes through ``GET /api/search`` with ``k`` covering the whole collection, so each image's score and
relevance are the server's own (:mod:`app.relevance`).

- Attribute queries (``synthetic.attribute_query``): every colour ("a red shape"), shape ("a circle"), colour and
  shape ("a red circle"), size, colour and shape ("a small red circle"), colour, shape and background ("a red
  circle on a black background") that the collection holds; an image is a true match when its caption's
  attributes are the query's. Per query and cut-off: recall (true matches at or above the cut-off / all true
  matches), precision (true matches among the results at or above it), ``kept`` (the true matches among the
  query's first ``TOP`` results that are at or above it / those true matches: what the web page keeps of what the
  model ranks first), and whether it finds any result at or above it.
- Absent queries (``ABSENT_QUERIES``: documents, animals, vehicles, food, people, places, objects; no word of them
  in ``app/data/unrelated_prompts.txt``): the best result's relevance, and how many queries have any result at or
  above each cut-off.

``--random-vit`` runs the same over an index built with ViT-B/32 with random weights, a model for which every
query is about something absent: the share of queries that find anything at a cut-off c should then be about
1 - c, whatever its scores' scale. Run from the repository root::

    .venv/bin/python -m bench.bench_relevance [--steps N] [--random-vit] [--demo-dir DIR] [--workdir DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from bench.bench_server import running_server
from bench.common import new_results, results_file, write_json

CUTOFFS = (0.5, 0.8, 0.9, 0.95, 0.99)
TOP = 10  # the first results: what a user looks at, and what kept is measured on
FIELD_SETS: tuple[tuple[str, ...], ...] = (
    ("color",),
    ("shape",),
    ("color", "shape"),
    ("size", "color", "shape"),
    ("color", "shape", "background"),
)
ABSENT_QUERIES = (
    "a tax form",
    "an invoice",
    "a receipt",
    "a letter",
    "a passport",
    "a cat",
    "a dog",
    "a bird",
    "a horse",
    "a fish",
    "a car",
    "a bicycle",
    "an airplane",
    "a boat",
    "a pizza",
    "a banana",
    "a sandwich",
    "a person",
    "a baby",
    "a family portrait",
    "a man with a beard",
    "a beach",
    "a mountain",
    "a city at night",
    "a laptop",
    "a chair",
    "a tree",
    "a house",
    "a sunset",
    "a wedding",
)
FUNCTION_WORDS = {"a", "an", "the", "with", "at", "in", "on", "of"}  # words an absent query may share with the prompts
HTTP_TIMEOUT_S = 60.0


def demo_collection(demo_dir: Path, steps: int | None, workdir: Path, random_vit: bool) -> tuple[Path, Path, Path]:
    """(model, data root, index dir): the demo recipe's model (trained or reused; ViT-B/32 with random weights
    instead if ``random_vit``) and an index of the demo's test and held-out images by that model, built in
    ``workdir`` unless one is there."""
    from bench.inputs import vit_model
    from clip_model.train.demo import Recipe, build_demo, demo_paths
    from indexer.cli import main as clip_index

    recipe = Recipe() if steps is None else Recipe(steps=steps)
    build_demo(demo_dir, recipe)
    paths = demo_paths(demo_dir, recipe)
    model = vit_model(workdir) if random_vit else paths["model"]
    index_dir = workdir / f"index-{recipe.key()}{'-vit-random' if random_vit else ''}"
    if not (index_dir / "CURRENT").is_file():
        command = ["build", str(paths["root"] / "data"), "--exclude", "train/", "--index-dir", str(index_dir)]
        if clip_index([*command, "--model", str(model)]) != 0:
            raise RuntimeError(f"clip-index build of {paths['root'] / 'data'} failed")
    return model, paths["root"] / "data", index_dir


def attribute_truth(data: Path) -> tuple[dict[str, set[str]], dict[str, str]]:
    """({query: catalog paths of its true matches}, {query: its field set's name}) over the test and held-out
    splits, whose images the index holds under ``<split>/images/...``."""
    from clip_model.train import synthetic

    truth: dict[str, set[str]] = {}
    kinds: dict[str, str] = {}
    for split in ("test", "heldout"):
        for record in synthetic.load_records(data / split):
            path = Path(record.path).relative_to(data).as_posix()
            for fields in FIELD_SETS:
                query = synthetic.attribute_query(record, fields)
                truth.setdefault(query, set()).add(path)
                kinds[query] = "+".join(fields)
    return truth, kinds


def ranking(client: httpx.Client, query: str, count: int) -> list[dict[str, Any]]:
    """Every indexed image for ``query``, best first, as ``/api/search`` returns them (path, score, relevance)."""
    response = client.get("/api/search", params={"q": query, "k": count})
    response.raise_for_status()
    results: list[dict[str, Any]] = response.json()["results"]
    if len(results) != count:
        raise RuntimeError(f"{query!r}: {len(results)} results, expected the whole collection ({count})")
    return results


def attribute_report(results: list[dict[str, Any]], true: set[str]) -> dict[str, Any]:
    """Recall, precision and kept (module docstring) of one attribute query at each cut-off in ``CUTOFFS``."""
    relevance = [hit["relevance"] for hit in results]
    is_true = [hit["path"] in true for hit in results]
    top_true = [r for r, t in zip(relevance[:TOP], is_true[:TOP], strict=True) if t]
    true_relevance = sorted(r for r, t in zip(relevance, is_true, strict=True) if t)
    cuts = {}
    for cut in CUTOFFS:
        above = [t for r, t in zip(relevance, is_true, strict=True) if r >= cut]
        cuts[str(cut)] = {
            "recall": sum(above) / len(true),
            "precision": sum(above) / len(above) if above else None,
            "kept": sum(r >= cut for r in top_true) / len(top_true) if top_true else None,
            "results": len(above),
        }
    return {
        "true": len(true),
        f"true_in_top{TOP}": len(top_true),
        "best_score": results[0]["score"],
        "true_relevance_min_median": [true_relevance[0], statistics.median(true_relevance)],
        "cutoffs": cuts,
    }


def absent_report(results: list[dict[str, Any]]) -> dict[str, Any]:
    return {"best_score": results[0]["score"], "best_relevance": results[0]["relevance"]}


def summarize(
    attribute: dict[str, dict[str, Any]], kinds: dict[str, str], absent: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Per field set and cut-off: mean recall, precision and kept, and the share of queries that keep at least 0.9
    of their top true matches; per cut-off: the absent queries with a result at or above it."""
    by_kind: dict[str, dict[str, Any]] = {}
    for kind in dict.fromkeys(kinds.values()):
        reports = [r for q, r in attribute.items() if kinds[q] == kind]
        by_kind[kind] = {"queries": len(reports)}
        for cut in map(str, CUTOFFS):
            values = {
                name: [r["cutoffs"][cut][name] for r in reports if r["cutoffs"][cut][name] is not None]
                for name in ("recall", "precision", "kept")
            }
            by_kind[kind][cut] = {name: statistics.mean(v) if v else None for name, v in values.items()} | {
                "queries_kept_0.9": sum(k >= 0.9 for k in values["kept"]) / len(values["kept"]),
                "queries_finding": sum(r["cutoffs"][cut]["results"] > 0 for r in reports) / len(reports),
            }
    absent_above = {str(cut): sorted(q for q, r in absent.items() if r["best_relevance"] >= cut) for cut in CUTOFFS}
    return {"attribute": by_kind, "absent_above": absent_above}


def measure(index_dir: Path, data: Path, workdir: Path) -> dict[str, Any]:
    from app.relevance import unrelated_prompts

    calibration_words = {word for prompt in unrelated_prompts() for word in prompt.split()} - FUNCTION_WORDS
    if seen := [q for q in ABSENT_QUERIES if set(q.split()) & calibration_words]:
        raise RuntimeError(f"absent queries that share a word with the unrelated prompts: {seen}")
    truth, kinds = attribute_truth(data)
    count = len(set().union(*truth.values()))
    with contextlib.ExitStack() as stack:
        _, url = stack.enter_context(running_server(index_dir, workdir, workdir / "server.log"))
        client = stack.enter_context(httpx.Client(base_url=url, timeout=HTTP_TIMEOUT_S))
        attribute = {q: attribute_report(ranking(client, q, count), truth[q]) for q in sorted(truth)}
        absent = {q: absent_report(ranking(client, q, count)) for q in ABSENT_QUERIES}
    return {"images": count, "attribute": attribute, "absent": absent, "summary": summarize(attribute, kinds, absent)}


def markdown(results: dict[str, Any]) -> str:
    summary = results["summary"]
    lines = [
        f"relevance on `{results['model']}` ({results['images']} images)",
        "",
        f"| queries | n | cut-off | recall | precision | kept (top {TOP}) | keeping >= 0.9 | finding any |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for kind, values in summary["attribute"].items():
        for cut in map(str, CUTOFFS):
            v = values[cut]
            precision = "-" if v["precision"] is None else f"{v['precision']:.3f}"
            kept = "-" if v["kept"] is None else f"{v['kept']:.3f}"
            lines.append(
                f"| {kind} | {values['queries']} | {cut} | {v['recall']:.3f} | {precision} | {kept} | "
                f"{v['queries_kept_0.9']:.2f} | {v['queries_finding']:.2f} |"
            )
    lines += ["", "| cut-off | absent queries with a result at or above it |", "| --- | --- |"]
    for cut, names in summary["absent_above"].items():
        lines.append(f"| {cut} | {len(names)}/{len(results['absent'])}: {', '.join(names) or '-'} |")
    worst = sorted(results["absent"].items(), key=lambda item: -item[1]["best_relevance"])[:5]
    lines += ["", "highest absent: " + ", ".join(f"{q} {r['best_relevance']:.3f}" for q, r in worst)]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    from clip_model.train.demo import default_demo_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="the demo recipe's optimizer steps (default: its own)")
    parser.add_argument("--demo-dir", type=Path, default=None, help="demo cache folder (default: the demo cache)")
    parser.add_argument("--random-vit", action="store_true", help="ViT-B/32, random weights, instead of the demo model")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/clipsearch-bench/relevance"),
                        help="where the index and the server's log are kept")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="JSON result (default: bench/results/relevance-...)")
    args = parser.parse_args(argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = args.workdir.resolve()
    model, data, index_dir = demo_collection(args.demo_dir or default_demo_dir(), args.steps, workdir, args.random_vit)
    results = new_results() | {"model": str(model), "steps": args.steps, "cutoffs": list(CUTOFFS), "top": TOP}
    results |= measure(index_dir, data, workdir)
    tags = ("vit-random" if args.random_vit else "", f"steps{args.steps}" if args.steps else "")
    write_json(results_file("relevance", *tags, out=args.out), results)
    sys.stdout.write(markdown(results) + "\n")


if __name__ == "__main__":
    main()
