"""The benchmark suite: every speed benchmark in one command, one JSON result and a short markdown report.

Run from the repository root: ``.venv/bin/python -m bench.suite [--workdir DIR] [--only a,b] [--smoke]``
(``make bench``; ``make bench-smoke`` for the CI check). Each member also runs alone, see ``bench/README.md``.

``MEMBERS`` maps a name to a benchmark module of this package and its arguments. Each member runs as its own
process (``python -m bench.<module>``: a fresh interpreter, allocator and thread pool, as a user's server or indexer
would start), one after another, never two at once (a timing shares the machine with nothing else of the suite;
``--smoke --jobs N`` runs N smoke commands at a time, since nothing is timed there): ``--workdir DIR/<member>``
holds its cached inputs and
``--out`` its JSON. The suite then writes ``bench/results/suite-<date>[-tag].json`` (machine, the command of each
member, its wall time, exit status and results) and ``suite-<date>[-tag].md`` (each member's own
``markdown(results)`` table). ``--smoke`` runs every member at tiny sizes (no targets asserted on time; results in
the workdir, not in bench/results/), so that the benchmark code cannot rot: the CI runs it
(``tests/test_bench_smoke.py``). A member whose smoke command is an earlier member's is not run twice: its record
is that member's, marked ``same_smoke_run_as``.

A member that fails does not stop the others; the suite exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import REPO, RESULTS_DIR, new_results, results_file, workdir_or_temporary, write_json

COMMAND_WORDS_SHOWN = 9  # words of a member's command in the report: "-m", the module and the first arguments
FAMILY_SMOKE = ("--no-compile", "--repeat", "2", "--text-calls", "10", "--batches", "1,2")  # encoders_siglip, _xlmr


@dataclass(frozen=True)
class Member:
    """One benchmark run: ``python -m bench.<module>`` with ``args`` (``smoke_args`` instead under ``--smoke``)."""

    module: str
    args: tuple[str, ...] = ()
    smoke_args: tuple[str, ...] = ("--smoke",)
    what: str = ""


MEMBERS: dict[str, Member] = {
    "encoders": Member("bench_encoders", what="image/text encoders vs transformers; int8; torch.compile"),
    # the other families' smoke runs skip torch.compile (the encoders one covers it) and time less, to stay short
    "encoders_siglip": Member(
        "bench_encoders",
        ("--family", "siglip"),
        ("--smoke", "--family", "siglip", *FAMILY_SMOKE),
        "SigLIP ViT-B/16 (SigLIP 2's tokenizer in the smoke run) vs transformers' SiglipModel",
    ),
    "encoders_xlmr": Member(
        "bench_encoders",
        ("--family", "xlm-roberta"),
        ("--smoke", "--family", "xlm-roberta", *FAMILY_SMOKE),
        "multilingual text tower (xlm-roberta-base-ViT-B-32) vs transformers' XLMRobertaModel + projection",
    ),
    "index_types": Member("bench_index_types", what="flat vs HNSW vs IVF at 100k and 1M vectors"),
    "ondisk": Member(
        "bench_ondisk",
        what="10M x 512 IVF-SQ8 served memory-mapped: build s, bytes, RssAnon, cold/warm latency, recall@10",
    ),
    "indexer": Member(
        "bench_indexer", ("--only", "pipeline"), ("--smoke", "--only", "pipeline"), "indexing end to end, fp32"
    ),
    "indexer_int8": Member(
        "bench_indexer",
        ("--only", "pipeline", "--precision", "int8"),
        ("--smoke", "--only", "pipeline", "--precision", "int8"),
        "indexing end to end, int8",
    ),
    "indexer_noop": Member("bench_indexer", ("--only", "noop"), ("--smoke", "--only", "noop"), "no-op rerun"),
    "indexer_full": Member(
        "bench_indexer",
        ("--only", "full", "--precision", "int8"),
        ("--smoke", "--only", "full", "--precision", "int8"),
        "a whole first build over 100,000 files, int8: images/s and peak RSS (~35 min on 2 cores)",
    ),
    "ray": Member(
        "bench_ray", what="clip-index encode on Ray (1 and 2 CPU workers) vs the local engine, 2,000 photos, fp32"
    ),
    # ray_int8's smoke command is ray's, so it runs once: the same code at another precision
    "ray_int8": Member("bench_ray", ("--precision", "int8"), what="the same in int8"),
    "server": Member("bench_server", what="text queries over HTTP at concurrency 1, 8, 32 (100k vectors)"),
    "server_int8": Member("bench_server", ("--precision", "int8"), ("--smoke", "--precision", "int8"), "int8"),
    "server_int8_compiled": Member(
        "bench_server",
        ("--precision", "int8", "--server-env", "CLIPSEARCH_COMPILE_TEXT=1"),
        ("--smoke", "--precision", "int8"),  # the smoke run skips the ~1 min compile of ViT-B/32's text tower
        "int8 with the text tower compiled in the background (the fastest server settings)",
    ),
    "int8_quality": Member(
        "bench_int8_quality", ("--demo",), ("--smoke",), "int8 vs fp32 recall and top-10 overlap, demo model"
    ),
    "server_1m": Member(
        "bench_server",
        ("--vectors", "1000000", "--concurrency", "1,8", "--repeat", "1", "--duration", "10"),
        ("--smoke", "--vectors", "3000", "--concurrency", "1"),
        "memory and latency over 1M vectors",
    ),
    "update": Member(
        "bench_update",
        what="adding and deleting 1,000 images in a 1M-image index: publish s, peak RSS, recall vs a rebuild",
    ),
    "filters": Member(
        "bench_filters", what="filtered search at 1M images: p50 at 0.1-50% selectivity vs unfiltered, recall@10"
    ),
    "duplicates": Member(
        "bench_duplicates",
        what="duplicate groups over 100k images: seconds and peak RSS per threshold; similarity of planted copies",
    ),
}


def command(member: Member, smoke: bool, workdir: Path, out: Path) -> list[str]:
    """The member's command line (run from the repository root)."""
    args = member.smoke_args if smoke else member.args
    return [sys.executable, "-m", f"bench.{member.module}", *args, "--workdir", str(workdir), "--out", str(out)]


def run_member(name: str, member: Member, smoke: bool, workdir: Path) -> dict[str, Any]:
    """Run one member to completion; its record: command, seconds, exit status, results (None if it failed)."""
    out = workdir / "results" / f"{name}.json"
    out.unlink(missing_ok=True)
    argv = command(member, smoke, workdir / name, out)
    (workdir / name).mkdir(parents=True, exist_ok=True)
    log = workdir / f"{name}.log"
    print(f"== {name}: {' '.join(argv[1:])} (log: {log})", flush=True)
    started = time.perf_counter()
    with log.open("w", encoding="utf-8") as stream:
        status = subprocess.run(argv, cwd=REPO, stdout=stream, stderr=subprocess.STDOUT, check=False).returncode
    seconds = time.perf_counter() - started
    results = json.loads(out.read_text(encoding="utf-8")) if status == 0 and out.is_file() else None
    if results is None:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        print(f"   FAILED (exit {status}) after {seconds:.0f} s; end of its log:\n{tail}", flush=True)
    else:
        print(f"   done in {seconds:.0f} s", flush=True)
    return {"command": argv[1:], "seconds": seconds, "exit_status": status, "log": str(log), "results": results}


def member_markdown(name: str, member: Member, record: dict[str, Any]) -> str:
    """The member's section of the report, from its module's own ``markdown(results)``."""
    title = f"## {name}: {member.what}" if member.what else f"## {name}"
    if record["results"] is None:
        return f"{title}\n\nFAILED (exit {record['exit_status']}), see `{record['log']}`.\n"
    module = importlib.import_module(f"bench.{member.module}")
    body = module.markdown(record["results"]) if hasattr(module, "markdown") else "(no markdown summary)"
    shown = " ".join(record["command"][:COMMAND_WORDS_SHOWN])
    return f"{title}\n\n`python {shown}` ({record['seconds']:.0f} s)\n\n{body.rstrip()}\n"


def report(results: dict[str, Any]) -> str:
    machine = results["machine"]
    lines = [
        f"# Benchmark suite, {results['date']}{' (smoke)' if results['smoke'] else ''}",
        "",
        f"Machine: {machine.get('cpu')}, {machine.get('nproc')} cores, {machine.get('memory_gb', 0):.0f} GB; "
        f"python {machine.get('python')}, torch {machine.get('torch')}, faiss {machine.get('faiss')}, "
        f"numpy {machine.get('numpy')}. Medians of the repetitions with (min-max). Suite wall time "
        f"{results['seconds']:.0f} s.",
        "",
    ]
    for name, record in results["members"].items():
        lines.append(member_markdown(name, MEMBERS[name], record))
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="cache folder (default: a temporary directory)")
    parser.add_argument("--only", default="", help=f"comma-separated members ({', '.join(MEMBERS)}; default all)")
    parser.add_argument("--skip", default="", help="comma-separated members to leave out")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check that every benchmark runs")
    parser.add_argument("--tag", default="", help="appended to the results file names")
    parser.add_argument("--jobs", type=int, default=1, help="smoke commands run at a time (--smoke only; default 1)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.jobs > 1 and not args.smoke:
        parser.error("--jobs applies to --smoke runs only: a timed member shares the machine with nothing else")
    for option in ("only", "skip"):
        names = [n.strip() for n in getattr(args, option).split(",") if n.strip()]
        unknown = [n for n in names if n not in MEMBERS]
        if unknown:
            parser.error(f"unknown members in --{option}: {', '.join(unknown)} (known: {', '.join(MEMBERS)})")
        setattr(args, option, names)
    return args


def run(args: argparse.Namespace, workdir: Path) -> int:
    names = [n for n in (args.only or MEMBERS) if n not in args.skip]
    started = time.perf_counter()
    results = new_results() | {"smoke": args.smoke, "members": {}}
    first: dict[tuple[str, ...], str] = {}  # a smoke command -> the first member that runs it (the others share it)
    for name in names:
        member = MEMBERS[name]
        first.setdefault((member.module, *member.smoke_args) if args.smoke else (name,), name)
    runs = list(first.values())
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # one worker: in order, one at a time
        records = dict(zip(runs, pool.map(lambda n: run_member(n, MEMBERS[n], args.smoke, workdir), runs), strict=True))
    for name in names:
        member = MEMBERS[name]
        same = first[(member.module, *member.smoke_args) if args.smoke else (name,)]
        if same == name:
            results["members"][name] = records[name]
        else:  # e.g. server_int8_compiled, whose smoke run skips the compile: server_int8's own
            results["members"][name] = {**records[same], "same_smoke_run_as": same}
            print(f"== {name}: the same smoke command as {same}, not run again", flush=True)
    results["seconds"] = time.perf_counter() - started
    path = results_file("suite", "smoke" if args.smoke else "", args.tag, folder=workdir if args.smoke else RESULTS_DIR)
    write_json(path, results)
    path.with_suffix(".md").write_text(report(results), encoding="utf-8")
    failed = [n for n, r in results["members"].items() if r["results"] is None]
    print(f"\nwrote {path} and .md ({results['seconds']:.0f} s); failed: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with workdir_or_temporary(args.workdir, "bench_suite_") as workdir:
        return run(args, workdir)


if __name__ == "__main__":
    sys.exit(main())
