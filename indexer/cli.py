"""``clip-index``: build/update an index directory from an image folder (here or on a Ray cluster), inspect it,
verify it, add texts, encode a folder into embedding shards, ingest and export them.

The only place in ``indexer`` that configures logging, draws progress bars and maps exceptions to exit codes:
0 when the run completed (even with skipped files), 1 when it could not complete (the message says why),
2 for bad command-line usage.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from clip_model import DEFAULT_LONG_TEXT, INFERENCE_PRECISIONS, LONG_TEXT_MODES, LongText, Placement
from clip_model.device import DEFAULT_DEVICE, DEVICE_CHOICES
from clip_model.errors import ClipModelError
from clip_model.process_tuning import ThreadPlan, own_threads, tune_malloc

from . import paths
from .build import BuildOptions, build_index, load_model, resolve_placement
from .encode import DEFAULT_PARTITION_SIZE, EncodeOptions, Engine, build_on_engine, encode_folder
from .errors import IndexerError
from .ingest import DEFAULT_ROWS_PER_SHARD, SOURCES, IngestOptions, export, ingest
from .lifetime import exit_with_launcher
from .partition_encoder import LocalEngine
from .pipeline import DEFAULT_BATCH_SIZE
from .scan import supported_extensions
from .store import CATALOG_FILE, DEFAULT_FACTORY, ENV_PREFIX, Catalog

logger = logging.getLogger("indexer")

DEFAULT_MODEL = "ViT-B-32"
LOG_EVERY_SECONDS = 10.0  # progress line interval when stderr is not a terminal
SKIPPED_SHOWN = 20  # skipped files listed by `info`
ENGINES = ("local", "ray")  # where build and encode encode: this process, or a Ray cluster


def _env(name: str, default: str | None = None) -> str | None:
    """``$CLIPSEARCH_<name>``; an empty variable counts as unset (as for the server's settings)."""
    return os.environ.get(ENV_PREFIX + name) or default


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clip-index",
        description="Index an image folder with CLIP into a FAISS + SQLite index directory for the search server.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", required=True)

    build = sub.add_parser(
        "build",
        aliases=["update"],
        help="index a folder (incremental: rerunning only encodes new or changed files)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _root_argument(build)
    _index_dir_argument(build)
    _encoding_arguments(build)
    _index_type_arguments(build)
    build.add_argument(
        "--rebuild",
        action="store_true",
        help="re-embed every image (e.g. with another model); the old index is served until done",
    )
    build.add_argument(
        "--retrain",
        action="store_true",
        help="build the image index anew over every image (trained again, one segment) instead of adding a segment "
        "of the changes; without it this happens by itself once the collection has doubled or halved",
    )
    build.add_argument(
        "--store-gps",
        action="store_true",
        default=_env("STORE_GPS", "") == "1",
        help="keep the photos' GPS positions from EXIF in the catalog (off by default: positions are dropped, also "
        "those an earlier run kept; turning it on reads every photo's metadata once more) ($CLIPSEARCH_STORE_GPS=1)",
    )
    _engine_arguments(build, build=True)
    build.set_defaults(func=_cmd_build)

    encode = sub.add_parser(
        "encode",
        help="encode a folder into embedding shards (the format ingest reads), here or on a Ray cluster, in "
        "deterministic partitions: a rerun writes only the partitions a killed run left unwritten",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _root_argument(encode)
    encode.add_argument("--out", type=Path, required=True, help="shards directory to write (a rerun into it resumes)")
    encode.add_argument(
        "--index-dir",
        type=Path,
        default=None,
        help="encode only what this index does not hold as it is: files whose size and mtime, then whose sha256, "
        "its catalog does not record (a changed file with the same content takes its vector from the index)",
    )
    _encoding_arguments(encode)
    encode.add_argument(
        "--store-gps",
        action="store_true",
        default=_env("STORE_GPS", "") == "1",
        help="keep the photos' GPS positions in the shards' photo metadata ($CLIPSEARCH_STORE_GPS=1)",
    )
    _engine_arguments(encode, build=False)
    encode.set_defaults(func=_cmd_encode)

    info = sub.add_parser("info", help="what is in an index: model, counts, last run, skipped files")
    _index_dir_argument(info)
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    info.add_argument(
        "--all", action="store_true", help=f"list every skipped file (default: the first {SKIPPED_SHOWN} by path)"
    )
    info.set_defaults(func=_cmd_info)

    verify = sub.add_parser("verify", help="check the published index against its manifest and the catalog")
    _index_dir_argument(verify)
    verify.set_defaults(func=_cmd_verify)

    texts = sub.add_parser("texts", help="index a text corpus (one caption or label per line) for image->text")
    texts.add_argument("file", type=Path, help="UTF-8 text file, one entry per line; blank lines are ignored")
    _index_dir_argument(texts)
    texts.add_argument("--batch-size", type=int, default=256, help="texts per encoder call")
    texts.add_argument(
        "--long-text",
        type=_long_text,
        default=_env("LONG_TEXT", DEFAULT_LONG_TEXT),
        metavar="{" + ",".join(LONG_TEXT_MODES) + "}",
        help="a text longer than the model's context: truncate it, or chunk it into overlapping windows whose "
        "embeddings are averaged; the server's rule for its queries, same setting ($CLIPSEARCH_LONG_TEXT)",
    )
    texts.set_defaults(func=_cmd_texts)

    ingest_parser = sub.add_parser(
        "ingest",
        help="add embeddings computed elsewhere: embedding shards (manifest.json + shard-*.parquet, as export "
        "writes them) or clip-retrieval's inference output",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ingest_parser.add_argument(
        "shards_dir", type=Path, metavar="SHARDS_DIR", help="shards directory, or clip-retrieval's output folder"
    )
    _index_dir_argument(ingest_parser)
    ingest_parser.add_argument(
        "--from",
        dest="source",
        choices=SOURCES,
        default="shards",
        help="what SHARDS_DIR holds: embedding shards, or clip-retrieval's img_emb/*.npy + metadata/*.parquet",
    )
    ingest_parser.add_argument(
        "--model",
        default=None,
        help="the model the embeddings were computed with (registry name or checkpoint path; loaded to fingerprint "
        "its weights): required with --from clip-retrieval; with shards, refuses shards of other weights",
    )
    ingest_parser.add_argument(
        "--image-root",
        type=Path,
        default=None,
        help="the image folder the shards' paths are relative to, as this machine sees it. Default: the shards' "
        "manifest's; required with --from clip-retrieval (the folder its image_path values are under)",
    )
    _index_type_arguments(ingest_parser)
    ingest_parser.set_defaults(func=_cmd_ingest)

    export_parser = sub.add_parser(
        "export",
        help="write an index's embeddings as embedding shards (the format ingest reads)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _index_dir_argument(export_parser)
    export_parser.add_argument(
        "--out", type=Path, required=True, help="shards directory to write: new, or without shards"
    )
    export_parser.add_argument(
        "--rows-per-shard", type=int, default=DEFAULT_ROWS_PER_SHARD, help="image rows per shard"
    )
    export_parser.set_defaults(func=_cmd_export)
    _duplicates_parser(sub)
    return parser


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _bytes(text: str) -> int:
    """ "512M" -> 536870912; "4G", "1.5G", "1000000" (bytes); K/M/G/T are powers of 1024, an optional B ignored."""
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = value[-1:] if value[-1:] in _UNITS else ""
    try:
        number = float(value.removesuffix(unit)) if unit else float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 512M, 4G or a number of bytes)") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"a memory budget cannot be negative: {text!r}")
    return int(number * _UNITS[unit])


def _root_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "root", type=Path, nargs="?", default=_env("IMAGE_ROOT"), help="image folder ($CLIPSEARCH_IMAGE_ROOT)"
    )


def _encoding_arguments(parser: argparse.ArgumentParser) -> None:
    """What build and encode share: the model, the files, and how the local engine decodes and encodes."""
    parser.add_argument(
        "--model",
        default=_env("MODEL"),
        help="pretrained name (see clip_model.available_models()) or checkpoint path ($CLIPSEARCH_MODEL). Default: "
        f"the model the index was built with, {DEFAULT_MODEL} for a new one",
    )
    parser.add_argument("--arch", default=None, help="architecture config for checkpoint files that do not carry one")
    parser.add_argument(
        "--device",
        default=_env("DEVICE", DEFAULT_DEVICE),
        help=f"where to encode: {', '.join(DEVICE_CHOICES)}; auto takes CUDA where torch finds it, else the CPU. "
        "--engine ray: the actors' device (cuda needs --gpus-per-worker) ($CLIPSEARCH_DEVICE)",
    )
    parser.add_argument(
        "--precision",
        choices=INFERENCE_PRECISIONS,
        default=_env("PRECISION"),
        help="encoder arithmetic: fp32; int8 = CPU int8 linear layers, faster encoding on the CPU; fp16 = CUDA only. "
        "Default: fp32 on the CPU, fp16 on CUDA ($CLIPSEARCH_PRECISION)",
    )
    parser.add_argument(
        "--extensions",
        default=None,
        help="comma-separated file extensions to index (default: " + ",".join(sorted(supported_extensions())) + ")",
    )
    parser.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="skip paths matching this glob (relative to the folder; repeatable)",
    )
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="images per encoder call")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="--engine local: decode worker processes (0 decodes in the main process; default: all cores but one "
        "for fp32, half of them for int8, whose encoder is as fast as the decoding). --engine ray: encoding actors "
        "(default: as many as the cluster holds)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=_env("TORCH_THREADS", "0"),  # a string default goes through type=int too: bad values get its error
        help="torch threads for encoding, split between the streams; 0: one per core (with --engine ray: per CPU of "
        "the actor) ($CLIPSEARCH_TORCH_THREADS)",
    )
    parser.add_argument(
        "--streams",
        type=int,
        default=_env("ENCODE_STREAMS", "0"),
        help="batches encoded at once, the torch threads split between them; 0: as many as split them evenly, up "
        "to 4 (single-threaded streams scale better than one batch over several threads) "
        "($CLIPSEARCH_ENCODE_STREAMS)",
    )
    parser.add_argument(
        "--no-draft",
        dest="draft",
        action="store_false",
        help="decode JPEGs at full size instead of DCT-scaled (slower, exact)",
    )


def _engine_arguments(parser: argparse.ArgumentParser, *, build: bool) -> None:
    """--engine and the Ray engine's options."""
    ray_does = "encodes into shards under the index directory, then ingests them" if build else "writes the same shards"
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="local",
        help=f"where to encode: this machine, or a Ray cluster (pip install 'clip-search[ray]'), which {ray_does}",
    )
    parser.add_argument(
        "--address",
        default=None,
        help="--engine ray: the cluster: 'auto' (the one this machine is a node of), ray://HOST:10001 (Ray Client), "
        "HOST:PORT, or 'local' (a one-machine cluster started for the run). Default: $RAY_ADDRESS, else the cluster "
        "started on this machine with `ray start`, else 'local'",
    )
    parser.add_argument(
        "--cpus-per-worker", type=int, default=None, help="--engine ray: CPUs each encoding actor takes (default 1)"
    )
    parser.add_argument(
        "--gpus-per-worker", type=float, default=None, help="--engine ray: GPUs each encoding actor takes (default 0)"
    )
    parser.add_argument(
        "--partition-size",
        type=int,
        default=None,
        help=("--engine ray: " if build else "")
        + f"files per partition (and shard), on average (default {DEFAULT_PARTITION_SIZE})",
    )


def _index_type_arguments(parser: argparse.ArgumentParser) -> None:
    """--factory and --memory-budget: which image index a publish builds."""
    parser.add_argument(
        "--factory",
        default=None,
        help=f"image index type: '{DEFAULT_FACTORY}' (chosen by collection size at every publish: exact Flat for "
        "small collections, IVF with SQ8 codes for large ones, with the IVF nprobe calibrated to recall@10 >= 0.95) "
        "or a FAISS index factory string such as 'HNSW32,Flat' (inner product). Default: what the index was last "
        f"built with, '{DEFAULT_FACTORY}' for a new index",
    )
    parser.add_argument(
        "--memory-budget",
        type=_bytes,
        default=None,
        metavar="BYTES",
        help="most memory the auto-chosen image index may take, e.g. 512M or 4G: smaller codes when they fit it, "
        "else IVF-SQ8 whose lists the server memory-maps from disk; also the most one segment holds while the "
        "indexer builds it (0: no budget, segments and the server's in-memory share then default to 2G). Default: "
        "the last one given to this index, none for a new index",
    )


def _index_dir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--index-dir",
        type=Path,
        default=_env("INDEX_DIR"),
        required=_env("INDEX_DIR") is None,
        help="index directory ($CLIPSEARCH_INDEX_DIR)",
    )


class _ProgressReporter:
    """tqdm bar on a terminal; otherwise one log line every LOG_EVERY_SECONDS."""

    def __init__(self, unit: str = "files") -> None:
        self._unit = unit
        self._bar: Any = None  # tqdm, created on the first update so its total is known
        self._last = time.monotonic()
        self._started = self._last

    def __call__(self, done: int, total: int) -> None:
        if sys.stderr.isatty():
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(total=total, unit=self._unit, desc="indexing", dynamic_ncols=True)
            self._bar.update(done - self._bar.n)
            return
        now = time.monotonic()
        if now - self._last >= LOG_EVERY_SECONDS or done == total:
            rate = done / max(now - self._started, 1e-9)
            eta = (total - done) / rate if rate else float("inf")
            logger.info("%d/%d %s (%.1f/s, ETA %.0fs)", done, total, self._unit, rate, eta)
            self._last = now

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _model(args: argparse.Namespace) -> str:
    """--model, else the model the index directory was built with (as the server follows its index), else
    DEFAULT_MODEL."""
    if args.model is not None:
        return str(args.model)
    index_dir = getattr(args, "index_dir", None)
    if index_dir is not None and (Path(index_dir) / CATALOG_FILE).is_file():
        with Catalog.open(Path(index_dir), readonly=True) as catalog:
            built_with = catalog.model()
        if built_with is not None:
            logger.info("model: %s, which the index was built with", built_with.name)
            return built_with.name
    return DEFAULT_MODEL


def _cmd_build(args: argparse.Namespace) -> int:
    if args.root is None:
        raise IndexerError("no image folder given: pass it as an argument or set CLIPSEARCH_IMAGE_ROOT")
    options = BuildOptions(
        root=args.root,
        index_dir=args.index_dir,
        model=_model(args),
        arch=args.arch,
        extensions=_extensions(args),
        exclude=tuple(args.exclude),
        factory=args.factory,
        memory_budget=args.memory_budget,
        batch_size=args.batch_size,
        draft=args.draft,
        rebuild=args.rebuild,
        retrain=args.retrain,
        precision=args.precision,
        device=args.device,
        store_gps=args.store_gps,
    )
    if args.engine != "local":
        return _build_on_engine(args, options)
    if args.partition_size is not None:
        raise IndexerError("--partition-size applies to --engine ray: the local build encodes in one pipeline")
    _check_local(args)
    options = dataclasses.replace(options, plan=_local_plan(args, _placement(args)))
    reporter = _ProgressReporter()
    try:
        stats = build_index(options, progress=reporter)
    finally:
        reporter.close()
    summary = {
        **stats.as_dict(),
        "root": args.root,
        "index_dir": args.index_dir,
        "reasons": stats.skipped_reasons or "",
    }
    logger.info(
        "indexed %(root)s into %(index_dir)s: %(scanned)d files, %(unchanged)d unchanged, %(added)d added, "
        "%(modified)d modified, %(renamed)d renamed, %(deleted)d deleted, %(skipped)d skipped %(reasons)s; "
        "%(encoded)d encoded in %(seconds).1fs (%(images_per_second).1f images/s); published %(generation)s",
        summary,
    )
    return 0


def _build_on_engine(args: argparse.Namespace, options: BuildOptions) -> int:
    engine = _engine(args)
    reporter = _ProgressReporter()
    try:
        stats = build_on_engine(
            options,
            engine,
            DEFAULT_PARTITION_SIZE if args.partition_size is None else args.partition_size,
            progress=reporter,
        )
    finally:
        reporter.close()
    encoded, ingested = stats.encode, stats.ingest
    logger.info(
        "indexed %s into %s on the %s engine: %d files, %d unchanged, %d encoded, %d reused, %d skipped %s in %d "
        "partitions (%d finished before) in %.1fs (%.1f images/s); %d rows of vanished files deleted; ingested "
        "%d added, %d modified, %d skipped; published %s",
        args.root,
        args.index_dir,
        engine.name,
        encoded.scanned,
        encoded.unchanged,
        encoded.encoded,
        encoded.reused,
        encoded.skipped,
        encoded.skipped_reasons or "",
        encoded.partitions,
        encoded.partitions_before,
        encoded.seconds,
        encoded.images_per_second,
        stats.deleted,
        ingested.added,
        ingested.modified,
        ingested.skipped,
        ingested.generation,
    )
    return 0


def _cmd_encode(args: argparse.Namespace) -> int:
    if args.root is None:
        raise IndexerError("no image folder given: pass it as an argument or set CLIPSEARCH_IMAGE_ROOT")
    options = EncodeOptions(
        root=args.root,
        out=args.out,
        model=_model(args),
        arch=args.arch,
        extensions=_extensions(args),
        exclude=tuple(args.exclude),
        index_dir=args.index_dir,
        partition_size=DEFAULT_PARTITION_SIZE if args.partition_size is None else args.partition_size,
        batch_size=args.batch_size,
        draft=args.draft,
        precision=args.precision,
        device=args.device,
        store_gps=args.store_gps,
    )
    engine = _engine(args)
    reporter = _ProgressReporter()
    try:
        stats = encode_folder(options, engine, progress=reporter).stats
    finally:
        reporter.close()
    logger.info(
        "encoded %(root)s into %(out)s on the %(engine)s engine: %(scanned)d files, %(unchanged)d unchanged; "
        "%(partitions)d partitions, %(partitions_before)d finished before, %(shards)d written (%(rows)d rows: "
        "%(encoded)d encoded, %(reused)d reused, %(skipped)d skipped %(reasons)s) in %(seconds).1fs "
        "(%(images_per_second).1f images/s). Next: clip-index ingest %(out)s --index-dir DIR",
        {
            **stats.as_dict(),
            "root": args.root,
            "out": args.out,
            "engine": engine.name,
            "reasons": stats.skipped_reasons or "",
        },
    )
    return 0


def _extensions(args: argparse.Namespace) -> frozenset[str] | None:
    if not args.extensions:
        return None
    return frozenset(e.strip().lower().lstrip(".") for e in args.extensions.split(",") if e.strip())


def _placement(args: argparse.Namespace) -> Placement:
    """Where this machine encodes for --device and --precision; IndexerError (before anything is read or written)
    for settings it refuses."""
    placement = resolve_placement(args.device, args.precision)
    logger.info("encoding on %s", placement)
    return placement


def _local_plan(args: argparse.Namespace, placement: Placement) -> ThreadPlan:
    try:
        return ThreadPlan.for_indexing(
            placement.precision, threads=args.threads, streams=args.streams, workers=args.workers
        )
    except ValueError as exc:
        raise IndexerError(str(exc)) from exc


def _check_local(args: argparse.Namespace) -> None:
    """Refuse the Ray engine's options without it."""
    given = [
        option
        for option, value in (
            ("--address", args.address),
            ("--cpus-per-worker", args.cpus_per_worker),
            ("--gpus-per-worker", args.gpus_per_worker),
        )
        if value is not None
    ]
    if given:
        raise IndexerError(f"{', '.join(given)} apply to --engine ray only")


def _engine(args: argparse.Namespace) -> Engine:
    """The engine the command line asks for (Ray is imported when that engine starts)."""
    if args.engine == "local":
        _check_local(args)
        return LocalEngine(_local_plan(args, _placement(args)))
    from .ray_engine import RayEngine, RaySettings

    settings = RaySettings(
        address=args.address,
        workers=args.workers,
        cpus_per_worker=1 if args.cpus_per_worker is None else args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker or 0.0,
        threads=args.threads,
        streams=args.streams,
    )
    return RayEngine(settings)


def _cmd_info(args: argparse.Namespace) -> int:
    from .report import index_info

    info = index_info(args.index_dir, skipped_limit=None if args.all else SKIPPED_SHOWN)
    sys.stdout.write(json.dumps(info, indent=2) + "\n" if args.json else _format_info(info))
    return 0


def _when(timestamp: float | None) -> str:
    return datetime.fromtimestamp(timestamp).isoformat(sep=" ", timespec="seconds") if timestamp else "never"


_INDEX_KEYS = ("index_type", "index_reason", "memory_budget", "search_params", "recall_at_10", "recall_queries")


def _format_index(info: dict[str, Any]) -> list[str]:
    """The image index lines of ``info``: type (and why), search parameters, measured recall."""
    if info.get("factory") is None:
        return []
    lines = []
    if info.get("index_type"):
        why = f": {info['index_reason']}" if info.get("index_reason") else ""
        budget = f", memory budget {info['memory_budget']:,} bytes" if info.get("memory_budget") else ""
        lines.append(f"index type: {info['index_type']}{budget}{why}")
    params = info.get("search_params") or {}
    if params:
        lines.append("search parameters: " + ", ".join(f"{name}={value}" for name, value in params.items()))
    recall = info.get("recall_at_10")
    if recall is None:
        lines.append("recall@10: not measured" + (" (empty index)" if info.get("published_images") == 0 else ""))
    elif not info.get("recall_queries"):
        lines.append(f"recall@10: {recall:.3f} (exact search)")
    else:
        lines.append(
            f"recall@10: {recall:.3f} against exact search, measured at publish on {info['recall_queries']} "
            "queries made from the indexed vectors"
        )
    return lines


def _encoded_on(stats: dict[str, Any]) -> str:
    """The ", on cuda:0 in fp16" of a run that recorded where it encoded (local builds); "" for one that did not."""
    if not stats.get("device"):
        return ""
    return f", on {stats['device']} in {stats['precision']}" if stats.get("precision") else f", on {stats['device']}"


def _format_info(info: dict[str, Any]) -> str:
    shown = {**info, "published_at": _when(info.get("published_at"))}
    run = shown.pop("last_run", None)
    lines = [f"{key}: {value}" for key, value in shown.items() if key != "skipped_files" and key not in _INDEX_KEYS]
    lines += _format_index(info)
    if run:
        stats = run.get("stats") or {}
        counts = ", ".join(f"{stats.get(k, 0)} {k}" for k in ("scanned", "added", "modified", "renamed", "deleted"))
        lines.append(
            f"last run: {paths.display(str(run.get('root')))} finished {_when(run.get('finished_at'))}: {counts}, "
            f"{stats.get('skipped', 0)} skipped, {stats.get('encoded', 0)} encoded "
            f"({stats.get('images_per_second', 0.0):.1f} images/s{_encoded_on(stats)})"
        )
    skipped: list[tuple[str, str]] = info.get("skipped_files") or []
    if skipped:  # one line each, whatever the name holds (a newline in a name cannot forge a line)
        lines.append("skipped files (path: reason):")
        lines += [f"  {paths.display(path)}: {paths.display(reason)}" for path, reason in skipped]
    if len(skipped) < info.get("images_skipped", 0):
        lines.append(f"  ... and {info['images_skipped'] - len(skipped)} more: `clip-index info --all` lists them")
    return "\n".join(lines) + "\n"


def _cmd_verify(args: argparse.Namespace) -> int:
    from .store import verify

    problems = verify(args.index_dir)
    for problem in problems:
        sys.stdout.write(f"PROBLEM: {problem}\n")
    if problems:
        return 1
    sys.stdout.write(f"OK: {args.index_dir} matches its manifest and catalog\n")
    return 0


def _long_text(value: str) -> LongText:
    """--long-text / $CLIPSEARCH_LONG_TEXT (argparse checks a default string through this too)."""
    for mode in LONG_TEXT_MODES:
        if value == mode:
            return mode
    raise argparse.ArgumentTypeError(f"{value!r} is not one of {', '.join(LONG_TEXT_MODES)} ($CLIPSEARCH_LONG_TEXT)")


def _cmd_texts(args: argparse.Namespace) -> int:
    from .texts import index_texts

    plan = ThreadPlan.for_indexing(workers=0)
    done = index_texts(args.index_dir, args.file, batch_size=args.batch_size, plan=plan, long_text=args.long_text)
    longer = f"{done.chunked} chunked" if done.long_text == "chunk" else f"{done.truncated} truncated"
    logger.info(
        "indexed %d texts from %s into %s (long_text=%s: %s; the index's texts: %s)",
        done.count,
        args.file,
        args.index_dir,
        done.long_text,
        longer,
        done.recorded,
    )
    return 0


def _cmd_ingest(args: argparse.Namespace) -> int:
    plan = ThreadPlan.for_indexing(workers=0)
    model = None
    if args.model:
        with own_threads(plan.torch_threads):
            model = load_model(args.model).info
    options = IngestOptions(
        shards_dir=args.shards_dir,
        index_dir=args.index_dir,
        source=args.source,
        model=model,
        image_root=args.image_root,
        factory=args.factory,
        memory_budget=args.memory_budget,
        plan=plan,
    )
    reporter = _ProgressReporter(unit="shards")
    try:
        stats = ingest(options, progress=reporter)
    finally:
        reporter.close()
    logger.info(
        "ingested %(shards_dir)s into %(index_dir)s: %(shards)d shards (%(shards_before)d ingested before), "
        "%(rows)d rows: %(added)d added, %(modified)d modified, %(skipped)d skipped, %(unchanged)d unchanged; "
        "in %(seconds).1fs; published %(generation)s",
        {**stats.as_dict(), "shards_dir": args.shards_dir, "index_dir": args.index_dir},
    )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    stats = export(args.index_dir, args.out, rows_per_shard=args.rows_per_shard)
    logger.info(
        "exported %(index_dir)s to %(out)s: %(rows)d rows (%(skipped)d skipped) in %(shards)d shards in %(seconds).1fs",
        {**stats.as_dict(), "index_dir": args.index_dir, "out": args.out},
    )
    return 0


# --- duplicates ---------------------------------------------------------------------------------------------------


def _duplicates_parser(sub: Any) -> None:
    from .duplicates import DEFAULT_THRESHOLD

    duplicates = sub.add_parser(
        "duplicates",
        help="groups of duplicate images in the published index: byte-identical files and near-duplicates (resized, "
        "recompressed, slightly cropped, rotated copies)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _index_dir_argument(duplicates)
    duplicates.add_argument(
        "--threshold",
        type=_threshold,
        default=DEFAULT_THRESHOLD,
        help="cosine similarity from which two images count as near-duplicates: raise it toward 1 for copies of the "
        "same pixels only, lower it (down to 0.9) to also group similar photos such as bursts",
    )
    duplicates.add_argument(
        "--folder", default=None, metavar="PREFIX", help="compare only the images under this folder of the image root"
    )
    duplicates.add_argument("--json", action="store_true", help="print machine-readable JSON")
    duplicates.set_defaults(func=_cmd_duplicates)


def _threshold(text: str) -> float:
    from .duplicates import check_threshold

    try:
        return check_threshold(float(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cmd_duplicates(args: argparse.Namespace) -> int:
    from .duplicates import find_duplicates
    from .store import PublishedIndex

    with PublishedIndex.open(args.index_dir, verify_checksums=False) as index:
        with own_threads(ThreadPlan.for_indexing(workers=0).faiss_threads):
            found = find_duplicates(index, args.threshold, args.folder)
    if args.folder is not None and found.images == 0:
        raise IndexerError(
            f"no indexed image lies under the folder {args.folder!r}: give one relative to the image root"
        )
    if args.json:
        sys.stdout.write(json.dumps(dataclasses.asdict(found), indent=2) + "\n")
        return 0
    where = f" under {paths.display(found.folder)}" if found.folder is not None else ""
    lines = [
        f"{found.generation}: {len(found.groups)} group(s) of duplicates among {found.images} image(s){where} at "
        f"similarity >= {found.threshold} ({found.seconds:.1f}s)"
    ]
    for number, group in enumerate(found.groups, 1):
        lines.append(f"group {number}: {len(group.members)} images, {group.kind}")
        lines += [f"  {m.similarity:.4f}  {m.kind:5}  {m.id:>9}  {paths.display(m.path)}" for m in group.members]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    tune_malloc()  # activation buffers stay in the heap between encoder calls (clip_model.process_tuning.malloc)
    try:
        exit_with_launcher()  # a launcher that passed a lifeline ends this run by dying (indexer.lifetime)
        return int(args.func(args))
    except (IndexerError, ClipModelError) as exc:
        logger.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        logger.error("interrupted; committed work is kept and the next run resumes from it")
        return 130


if __name__ == "__main__":
    sys.exit(main())
