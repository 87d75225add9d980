"""int8 vs fp32 retrieval quality on a model the project trains: recall@1/5/10 both ways, top-10 overlap, cosine.

Random weights say nothing about retrieval quality, so this runs on trained weights: ``--demo`` trains (or reuses,
from the demo cache) the demo model and evaluates on its test split; ``--model PATH --data DIR`` evaluates any
checkpoint on any captioned folder (what ``clip-train eval`` reads). :mod:`bench.bench_emoji` calls :func:`compare`
on the emoji model it trains. For each precision (``clip_model.load(..., precision=...)`` on the same file):

- recall@1/5/10 text->image and image->text over the folder's captions (relevance: caption equality, as
  ``clip-train eval``), and for the demo also over attribute queries ("a small red circle", as its e2e test);
- top-10 overlap with fp32: for every query, |top-10 of int8 & top-10 of fp32| / 10, averaged, in both directions;
- the cosine of each int8 embedding to its fp32 one after subtracting the fp32 batch mean (min and median).

Targets: recall within 1 point of fp32 and top-10 overlap >= 0.9. Run from the repository root::

    .venv/bin/python -m bench.bench_int8_quality --demo [--out bench/results/int8-quality-demo-<date>.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import clip_model
from bench.common import write_json
from bench.inputs import tiny_model
from clip_model import PRECISIONS
from clip_model.train.data import Pair
from clip_model.train.evaluate import encode_dataset, read_eval_pairs, retrieval_metrics

OVERLAP_K = 10
TARGET_RECALL_POINTS = 1.0  # int8 recall within this many points (x100) of fp32
TARGET_OVERLAP = 0.9


def top_k_overlap(queries_a: torch.Tensor, items_a: torch.Tensor, queries_b: torch.Tensor, items_b: torch.Tensor,
                  k: int = OVERLAP_K) -> float:  # fmt: skip
    """Mean over queries of |top-k(a) & top-k(b)| / k, where top-k(x) ranks ``items_x`` [N, D] by inner product
    with each row of ``queries_x`` [Q, D]; a and b are the same queries and items embedded two ways."""
    k = min(k, items_a.shape[0])
    top_a = (queries_a @ items_a.T).topk(k, dim=1).indices  # [Q, k]
    top_b = (queries_b @ items_b.T).topk(k, dim=1).indices
    shared = (top_a[:, :, None] == top_b[:, None, :]).any(dim=2).sum(dim=1)  # [Q]
    return float(shared.float().mean().item()) / k


def centred_cosines(features: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Row-wise cosine of ``features`` to ``reference`` [N, D] after subtracting the reference's mean row."""
    mean = reference.mean(dim=0)
    cosine = F.cosine_similarity(features - mean, reference - mean, dim=-1)
    return {"min": round(cosine.min().item(), 5), "median": round(cosine.median().item(), 5)}


def compare(model_path: Path, pairs: Sequence[Pair], name: str) -> dict[str, Any]:
    """fp32 vs int8 on ``pairs`` (see the module docstring); ``name`` labels the query set in the report."""
    encoded, metrics, seconds = {}, {}, {}
    for precision in PRECISIONS:
        model, preprocess = clip_model.load(model_path, precision=precision)
        started = time.perf_counter()
        encoded[precision] = encode_dataset(model, preprocess, pairs)
        seconds[precision] = round(time.perf_counter() - started, 2)
        images, texts, captions = encoded[precision]
        metrics[precision] = {
            k: round(v, 4) for k, v in retrieval_metrics(images, texts, [p.caption for p in pairs], captions).items()
        }
    (img32, txt32, _), (img8, txt8, _) = encoded["fp32"], encoded["int8"]
    deltas = {k: round(100 * (metrics["int8"][k] - metrics["fp32"][k]), 2) for k in metrics["fp32"]}
    overlap = {
        "text_to_image": round(top_k_overlap(txt32, img32, txt8, img8), 4),
        "image_to_text": round(top_k_overlap(img32, txt32, img8, txt8), 4),
    }
    return {
        "queries": name,
        "images": len(pairs),
        "texts": len(encoded["fp32"].texts),
        "metrics": metrics,
        "int8_minus_fp32_points": deltas,
        f"top{OVERLAP_K}_overlap": overlap,
        "centred_cosine": {"image": centred_cosines(img8, img32), "text": centred_cosines(txt8, txt32)},
        "encode_seconds": seconds,
        "meets_targets": max(abs(d) for d in deltas.values()) <= TARGET_RECALL_POINTS
        and min(overlap.values()) >= TARGET_OVERLAP,
    }


def demo_reports(out_dir: Path | None) -> tuple[Path, list[dict[str, Any]]]:
    """Train or reuse the demo model; compare on its test split with full captions and attribute queries."""
    from clip_model.train import demo, synthetic

    report = demo.build_demo(out_dir or demo.default_demo_dir(), demo.Recipe())
    split = demo.demo_paths(out_dir or demo.default_demo_dir(), demo.Recipe())["test"]
    pairs = synthetic.pairs_of(split)
    queries = [synthetic.attribute_query(r, demo.QUERY_FIELDS) for r in synthetic.load_records(split)]
    attribute_pairs = [replace(p, caption=q) for p, q in zip(pairs, queries, strict=True)]
    model = Path(report["model"])
    return model, [compare(model, pairs, "full captions"), compare(model, attribute_pairs, "attribute queries")]


def smoke_reports(workdir: Path) -> tuple[Path, list[dict[str, Any]]]:
    """A tiny random model on 40 generated shapes: checks the script, says nothing about quality."""
    from clip_model.train import synthetic

    split = workdir / "shapes-smoke"
    synthetic.generate(split, 40, split="test", seed=0, image_size=32)
    model = tiny_model(workdir)
    return model, [compare(model, synthetic.pairs_of(split), "full captions (smoke: random tiny model)")]


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"int8 vs fp32 on `{results['model']}`",
        "",
        "| queries | images | texts | metric | fp32 | int8 | points | top-10 overlap | centred cos min (img/txt) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for report in results["reports"]:
        for metric, fp32 in report["metrics"]["fp32"].items():
            direction = metric.split("_recall")[0]
            overlap = report["top10_overlap"][direction]
            cos = report["centred_cosine"]
            lines.append(
                f"| {report['queries']} | {report['images']} | {report['texts']} | {metric} | {fp32:.4f} | "
                f"{report['metrics']['int8'][metric]:.4f} | {report['int8_minus_fp32_points'][metric]:+.2f} | "
                f"{overlap:.3f} | {cos['image']['min']:.4f} / {cos['text']['min']:.4f} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--demo", action="store_true", help="the demo model (trained here, ~8 min, or reused)")
    source.add_argument("--model", type=Path, help="a checkpoint clip_model.load accepts (with --data)")
    source.add_argument("--smoke", action="store_true", help="tiny random model, to check the script (seconds)")
    parser.add_argument("--data", type=Path, help="captioned folder (folder + captions.jsonl/csv or .txt files)")
    parser.add_argument("--demo-dir", type=Path, default=None, help="demo cache folder (default: the demo cache)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/clipsearch-bench/int8-quality"),
                        help="cached inputs of --smoke")  # fmt: skip
    args = parser.parse_args(argv)
    if args.smoke:
        model, reports = smoke_reports(args.workdir)
    elif args.demo:
        model, reports = demo_reports(args.demo_dir)
    else:
        if args.data is None:
            parser.error("--model needs --data")
        model, reports = args.model, [compare(args.model, read_eval_pairs(args.data), "captions")]
    results = {"model": str(model), "torch_threads": torch.get_num_threads(), "reports": reports}
    if args.out is not None:
        write_json(args.out, results)
    sys.stdout.write(markdown(results) + "\n")


if __name__ == "__main__":
    main()
