"""Search server under load: text queries over loopback HTTP, requests/s and latency at several concurrencies.

Run from the repository root: ``.venv/bin/python -m bench.bench_server [--workdir DIR] [--vectors 100000]
[--duration 20] [--concurrency 1,8,32] [--repeat 3] [--smoke]``. Needs ``wrk`` (Debian: ``apt-get install wrk``).

What is measured, per concurrency level C (each repeated ``--repeat`` times after an uncounted warm-up):

- ``wrk -t min(C, 2) -c C`` against ``GET /api/search?q=...&k=10`` of ``python -m app`` (a subprocess, the
  server exactly as ``clip-serve`` runs it) over an index of ``--vectors`` images with ViT-B/32 (random weights;
  synthetic unit vectors from :mod:`bench.inputs`, CLIP-like by default (``--vectors-kind``), catalogued as a
  finished build leaves them, with the FAISS index type the indexer picks for that size; ``--factory`` forces
  one). ``bench/wrk_search.lua`` sends a distinct query text on every request, so the text-embedding cache never
  hits and each request pays for one text encode and one FAISS search, both shared with the requests waiting at
  the same time (one encoder call and one search call per micro-batch).
- requests/s, latency p50/p90/p99/max (wrk's, client side, ms), errors: non-2xx responses plus wrk's socket errors
  (connect, read, write, timeout; wrk's ``status`` errors are a subset of non-2xx and not added twice).
- From the server's ``/metrics``, read before and after each run: mean text encode time per encoder call, mean
  texts per call (the micro-batch), mean FAISS search time, cache hits (must stay 0). From ``/proc``: the
  server's CPU time per request and cores used, wrk's cores used, the server's RSS (sampled ``VmRSS``, and
  ``VmHWM`` at the end).

Client and server share this machine's cores (wrk's threads included), so the numbers are a loopback ceiling on
this hardware, not a network figure. Targets (reported, not asserted): ``TARGETS``. The index is cached in
``--workdir``; results: a table on stdout and JSON in ``bench/results/`` (``--smoke``: in the workdir).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

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
from bench.inputs import MODEL_ARCH, make_clip_like, make_uniform, vit_model
from tests.support import free_port

WRK_SCRIPT = REPO / "bench" / "wrk_search.lua"
WRK_MAX_THREADS = 2  # wrk threads = min(concurrency, this): the client must not take every core
WRK_TIMEOUT = "10s"  # a request slower than this counts as a timeout error
WRK_GRACE_S = 30.0  # beyond --duration before the wrk process is considered hung
K = 10  # results per query
SANITY_QUERIES = 3  # plain GETs whose bodies are checked before any load
READY_TIMEOUT_S = 120.0
READY_POLL_S = 0.25
STOP_TIMEOUT_S = 15.0
HTTP_TIMEOUT_S = 30.0
COMPILE_TIMEOUT_S = 600.0  # most seconds the server may take to compile its text tower in the background
RSS_SAMPLE_S = 0.5
FILES_PER_DIR = 1000
FAKE_WIDTH, FAKE_HEIGHT = 3000, 2000
FAKE_SIZE_BYTES = 1_900_000  # about a 6 MP camera JPEG
FAKE_MTIME_NS = 1_700_000_000 * 10**9
SEED_CHUNK = 10_000  # vectors generated (and progress printed) per chunk
KIB = 1024
DEFAULTS = {"vectors": 100_000, "duration": 20.0, "repeat": 3, "concurrency": (1, 8, 32), "warmup": 3.0}
SMOKE = {"vectors": 1_000, "duration": 2.0, "repeat": 1, "concurrency": (1, 4), "warmup": 1.0}
TARGETS = {"c1_p50_ms_max": 15.0, "c8_rps_min": 150.0, "c8_p99_ms_max": 100.0, "errors_max": 0}
SEARCH_ROUTE = "/api/search"


# ---------------------------------------------------------------------------------------------------------- index


def seeded_index(
    workdir: Path, count: int, model: Path, factory: str | None = None, vectors_kind: str = "clip-like"
) -> Path:
    """An index directory of ``count`` catalogued images with synthetic unit vectors, built once and cached.

    Like ``bench.bench_indexer.seed_index`` but with no files behind the rows: fake relative paths, sizes, mtimes
    and content hashes, the model's provenance, then one published generation. ``vectors_kind``: ``clip-like``
    (:func:`bench.inputs.make_clip_like`: clustered, fast-decaying spectrum, like real CLIP embeddings; what an
    approximate index is calibrated on at publish) or ``uniform`` on the sphere (the worst case for IVF/HNSW).
    """
    from indexer.build import load_model
    from indexer.store import Catalog, WriterLock, current_generation, publish, read_manifest

    tag = hashlib.sha256(factory.encode()).hexdigest()[:8] if factory else "default"
    index_dir = workdir / f"index-server-n{count}-vit-{vectors_kind}-{tag}"
    generation = current_generation(index_dir) if index_dir.exists() else None
    if generation is not None and read_manifest(index_dir, generation).counts.get("images") == count:
        print(f"index: cached {index_dir} ({generation}, {count} images)", flush=True)
        return index_dir
    shutil.rmtree(index_dir, ignore_errors=True)  # none, or left half-built by an interrupted run
    started = time.perf_counter()
    info = load_model(str(model)).info
    make = make_clip_like if vectors_kind == "clip-like" else make_uniform
    all_vectors = make(count, info.embed_dim, 0, 0)[0]
    with WriterLock(index_dir), Catalog.open(index_dir, create=True) as catalog:
        catalog.set_model(info)
        with catalog.transaction():
            for start in range(0, count, SEED_CHUNK):
                vectors = all_vectors[start : start + SEED_CHUNK]
                for offset, vector in enumerate(vectors):
                    number = start + offset
                    path = f"d{number // FILES_PER_DIR:04d}/img_{number:06d}.jpg"
                    digest = hashlib.sha256(path.encode()).hexdigest()
                    catalog.add_image(path, FAKE_SIZE_BYTES + number, FAKE_MTIME_NS + number, digest,
                                      FAKE_WIDTH, FAKE_HEIGHT, vector)  # fmt: skip
                done = start + len(vectors)
                print(f"  catalogued {done}/{count} ({time.perf_counter() - started:.1f} s)", flush=True)
        manifest = publish(index_dir, catalog, factory)
    print(f"index: built {index_dir} ({manifest.generation}) in {time.perf_counter() - started:.1f} s", flush=True)
    return index_dir


# --------------------------------------------------------------------------------------------------------- server


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14 and 15


@dataclass
class RssSampler:
    """Samples a process's VmRSS in a background thread; ``peak_kb`` is reset by the caller per level."""

    pid: int
    peak_kb: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_S):
            self.peak_kb = max(self.peak_kb, proc_status_kb(self.pid, "VmRSS"))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _server_env(workdir: Path, precision: str = "fp32", extra: Sequence[str] = ()) -> dict[str, str]:
    """This environment without any CLIPSEARCH_* setting of its own, plus the benchmark's and ``extra``
    (``NAME=VALUE`` items, e.g. ``CLIPSEARCH_TORCH_THREADS=1``)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("CLIPSEARCH_")}
    env["CLIPSEARCH_CACHE_DIR"] = str(workdir / "server-cache")
    env["CLIPSEARCH_LOG_LEVEL"] = "WARNING"
    env["CLIPSEARCH_PRECISION"] = precision
    for item in extra:
        name, _, value = item.partition("=")
        env[name] = value
    return env


def _setting(item: str) -> str:
    name, sep, _ = item.partition("=")
    if not sep or not name.startswith("CLIPSEARCH_"):
        raise argparse.ArgumentTypeError(f"expected CLIPSEARCH_NAME=VALUE, got {item!r}")
    return item


@contextlib.contextmanager
def running_server(
    index_dir: Path, workdir: Path, log_path: Path, precision: str = "fp32", extra_env: Sequence[str] = ()
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``python -m app`` on a free loopback port, yielded once ``/readyz`` is 200; always terminated after."""
    port = free_port()
    command = [sys.executable, "-m", "app", "--index-dir", str(index_dir), "--port", str(port)]
    with open(log_path, "wb") as log:
        env = _server_env(workdir, precision, extra_env)
        process = subprocess.Popen(command, cwd=workdir, env=env, stdout=log, stderr=log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(process, url, log_path)
        yield process, url
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _log_tail(log_path: Path, chars: int = 3000) -> str:
    return log_path.read_text(encoding="utf-8", errors="replace")[-chars:]


def wait_ready(process: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
    started = time.perf_counter()
    last = "no answer"
    while time.perf_counter() - started < READY_TIMEOUT_S:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{_log_tail(log_path)}")
        try:
            response = httpx.get(f"{url}/readyz", timeout=HTTP_TIMEOUT_S)
            if response.status_code == httpx.codes.OK:
                print(f"server: ready at {url} in {time.perf_counter() - started:.1f} s", flush=True)
                return
            last = f"{response.status_code} {response.text[:300]}"
        except httpx.TransportError as exc:
            last = repr(exc)
        time.sleep(READY_POLL_S)
    raise RuntimeError(f"the server was not ready within {READY_TIMEOUT_S} s ({last}):\n{_log_tail(log_path)}")


def check_search(url: str) -> None:
    """A few plain GETs: 200 with ``K`` results each (an empty index or a broken route must not pass as fast)."""
    with httpx.Client(base_url=url, timeout=HTTP_TIMEOUT_S) as client:
        for number in range(SANITY_QUERIES):
            response = client.get(SEARCH_ROUTE, params={"q": f"sanity check query {number}", "k": K})
            if response.status_code != httpx.codes.OK:
                raise RuntimeError(f"GET {response.url}: {response.status_code} {response.text[:500]}")
            results = response.json()["results"]
            if len(results) != K:
                raise RuntimeError(f"GET {response.url}: {len(results)} results, expected {K}")
    print(f"server: {SANITY_QUERIES} sanity queries answered 200 with {K} results each", flush=True)


def wait_for_text_encoder(url: str, timeout_s: float = COMPILE_TIMEOUT_S) -> str:
    """Wait until /api/stats says the text tower is no longer compiling; its final status (a failed compile raises,
    so a run meant to measure the compiled tower cannot measure the eager one instead)."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=url, timeout=HTTP_TIMEOUT_S) as client:
        while True:
            status = str(client.get("/api/stats").json().get("text_encoder") or "")
            if "compiling" not in status:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the text tower was still compiling after {timeout_s:.0f} s")
            time.sleep(1.0)
    if "failed" in status:
        raise RuntimeError(f"text tower: {status}")
    print(f"server: text encoder {status}", flush=True)
    return status


# -------------------------------------------------------------------------------------------------------- metrics


def scrape(url: str) -> dict[str, float]:
    """The counters this benchmark reads from ``/metrics``, summed over the label values that matter."""
    text = httpx.get(f"{url}/metrics", timeout=HTTP_TIMEOUT_S).text
    wanted = {
        ("clipsearch_encode_seconds", "kind", "text"): "encode",
        ("clipsearch_encode_batch_size", "kind", "text"): "batch",
        ("clipsearch_search_seconds", "index", "images"): "search",
        ("clipsearch_search_batch_size", None, None): "search_batch",
        ("clipsearch_request_seconds", "route", SEARCH_ROUTE): "request",
    }
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if family.name == "clipsearch_text_cache":
                if sample.name.endswith("_total"):
                    key = f"cache_{sample.labels.get('result')}"
                    values[key] = values.get(key, 0.0) + sample.value
                continue
            if family.name == "clipsearch_rejected" and sample.name.endswith("_total"):
                values["rejected"] = values.get("rejected", 0.0) + sample.value
                continue
            for (name, label, value), key in wanted.items():
                if family.name == name and (label is None or sample.labels.get(label) == value):
                    for suffix in ("_sum", "_count"):
                        if sample.name == name + suffix:
                            values[key + suffix] = values.get(key + suffix, 0.0) + sample.value
    return values


def _ratio(numerator: float, denominator: float, scale: float = 1.0) -> float:
    return scale * numerator / denominator if denominator else float("nan")


def server_side(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Means over one run from two scrapes: encode ms per call, texts per call, search ms, request ms."""
    delta = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after.keys() | before.keys()}
    return {
        "encode_calls": delta.get("encode_count", 0.0),
        "encode_ms_mean": _ratio(delta.get("encode_sum", 0.0), delta.get("encode_count", 0.0), 1000),
        "batch_mean": _ratio(delta.get("batch_sum", 0.0), delta.get("batch_count", 0.0)),
        "search_ms_mean": _ratio(delta.get("search_sum", 0.0), delta.get("search_count", 0.0), 1000),
        "search_batch_mean": _ratio(delta.get("search_batch_sum", 0.0), delta.get("search_batch_count", 0.0)),
        "request_ms_mean": _ratio(delta.get("request_sum", 0.0), delta.get("request_count", 0.0), 1000),
        "cache_hits": delta.get("cache_hit", 0.0),
        "cache_misses": delta.get("cache_miss", 0.0),
        "rejected": delta.get("rejected", 0.0),
    }


# ------------------------------------------------------------------------------------------------------------ wrk


def wrk_path() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise SystemExit("bench_server: wrk is not installed (Debian/Ubuntu: apt-get install -y wrk)")
    return path


def run_wrk(wrk: str, url: str, concurrency: int, duration_s: float, tag: str) -> dict[str, Any]:
    """One wrk run; its ``JSON`` line, plus ``errors`` (non-2xx + socket errors) and wrk's CPU use."""
    threads = min(concurrency, WRK_MAX_THREADS)
    command = [
        wrk, "-t", str(threads), "-c", str(concurrency), "-d", f"{duration_s:g}s", "--latency",
        "--timeout", WRK_TIMEOUT, "-s", str(WRK_SCRIPT), f"{url}{SEARCH_ROUTE}", "--", tag, str(K),
    ]  # fmt: skip
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration_s + WRK_GRACE_S, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = [line for line in done.stdout.splitlines() if line.startswith("JSON ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    result: dict[str, Any] = json.loads(lines[-1].removeprefix("JSON "))
    result["errors"] = result["non2xx"] + sum(result[name] for name in ("connect", "read", "write", "timeout"))
    wrk_cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
    result["wrk_cores"] = wrk_cpu / result["duration_s"]
    result["wrk_threads"] = threads
    return result


def measure(wrk: str, url: str, pid: int, concurrency: int, duration_s: float, tag: str) -> dict[str, Any]:
    """One counted run: wrk's numbers plus the server's metrics and CPU over the same interval."""
    before, cpu_before, load_before = scrape(url), proc_cpu_s(pid), os.getloadavg()[0]
    result = run_wrk(wrk, url, concurrency, duration_s, tag)
    result["loadavg_1min"] = [load_before, os.getloadavg()[0]]  # other work's threads and the server's own
    cpu = proc_cpu_s(pid) - cpu_before
    result.update(server_side(before, scrape(url)))
    result["server_cores"] = cpu / result["duration_s"]
    result["server_cpu_ms_per_request"] = _ratio(cpu, result["requests"], 1000)
    return result


LEVEL_KEYS = (
    "requests_per_s", "latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "latency_max_ms", "errors",
    "encode_ms_mean", "batch_mean", "search_ms_mean", "search_batch_mean", "request_ms_mean", "cache_hits",
    "server_cores", "server_cpu_ms_per_request", "wrk_cores",
)  # fmt: skip


def bench_level(wrk: str, url: str, sampler: RssSampler, concurrency: int, args: argparse.Namespace) -> dict[str, Any]:
    run_wrk(wrk, url, concurrency, args.warmup, f"w{concurrency}")  # uncounted: fills the server's thread pool
    sampler.peak_kb = 0
    runs = []
    for rep in range(args.repeat):
        run = measure(wrk, url, sampler.pid, concurrency, args.duration, f"c{concurrency}r{rep}")
        runs.append(run)
        print(
            f"  c={concurrency} rep {rep + 1}: {run['requests_per_s']:.1f} req/s, p50 {run['latency_p50_ms']:.1f} ms,"
            f" p99 {run['latency_p99_ms']:.1f} ms, max {run['latency_max_ms']:.1f} ms, errors {run['errors']};"
            f" encode {run['encode_ms_mean']:.1f} ms x {run['batch_mean']:.2f} texts, search"
            f" {run['search_ms_mean']:.2f} ms x {run['search_batch_mean']:.2f} queries;"
            f" server {run['server_cores']:.2f} cores, wrk {run['wrk_cores']:.2f};"
            f" load {run['loadavg_1min'][1]:.1f}",
            flush=True,
        )
    level: dict[str, Any] = {key: summary([float(run[key]) for run in runs]) for key in LEVEL_KEYS}
    level["peak_rss_mb"] = sampler.peak_kb / KIB
    level["wrk_runs"] = runs
    return level


# ------------------------------------------------------------------------------------------------------------ main


def target_lines(levels: dict[str, dict[str, Any]]) -> list[str]:
    """Each target next to the measured median: 'ok' or 'MISS' (nothing is asserted)."""

    def mark(ok: bool) -> str:
        return "ok" if ok else "MISS"

    lines = []
    if "1" in levels:
        p50, limit = levels["1"]["latency_p50_ms"]["median"], TARGETS["c1_p50_ms_max"]
        lines.append(f"c=1 p50 {p50:.1f} ms (target <= {limit:g} ms): {mark(p50 <= limit)}")
    if "8" in levels:
        rps, p99 = levels["8"]["requests_per_s"]["median"], levels["8"]["latency_p99_ms"]["median"]
        lines.append(f"c=8 {rps:.1f} req/s (target >= {TARGETS['c8_rps_min']:g}): {mark(rps >= TARGETS['c8_rps_min'])}")
        lines.append(
            f"c=8 p99 {p99:.1f} ms (target <= {TARGETS['c8_p99_ms_max']:g} ms): {mark(p99 <= TARGETS['c8_p99_ms_max'])}"
        )
    worst = max(level["errors"]["max"] for level in levels.values())
    lines.append(f"errors, worst run of any level: {worst:g} (target {TARGETS['errors_max']}): {mark(worst == 0)}")
    return lines


def print_table(results: dict[str, Any]) -> None:
    s = results["settings"]
    print(
        f"\n{s['vectors']} vectors ({s['model']}, {s['factory']}), k={s['k']}, {s['duration_s']:g} s x {s['repeat']}"
        f" per level, median (min-max); server peak RSS {results['server']['vmhwm_mb']:.0f} MB (VmHWM)"
    )
    header = (
        f"{'conc':>4}  {'req/s':>19}  {'p50 ms':>19}  {'p99 ms':>19}  {'max ms':>22}  {'errors':>6}"
        f"  {'encode ms':>9}  {'batch':>5}  {'search ms':>9}  {'queries':>7}  {'srv cores':>9}"
    )
    print(header)
    for concurrency, level in results["levels"].items():
        rps, p50, p99, top = (
            median_min_max(level[key], ".1f")
            for key in ("requests_per_s", "latency_p50_ms", "latency_p99_ms", "latency_max_ms")
        )
        print(
            f"{concurrency:>4}  {rps:>19}  {p50:>19}  {p99:>19}  {top:>22}"
            f"  {level['errors']['max']:>6g}  {level['encode_ms_mean']['median']:>9.1f}"
            f"  {level['batch_mean']['median']:>5.2f}  {level['search_ms_mean']['median']:>9.2f}"
            f"  {level['search_batch_mean']['median']:>7.2f}"
            f"  {level['server_cores']['median']:>9.2f}"
        )
    print("targets (reported, not asserted):")
    for line in target_lines(results["levels"]):
        print(f"  {line}")


def markdown(results: dict[str, Any]) -> str:
    """A short markdown table of ``results`` (for the suite's report)."""
    s, server = results["settings"], results["server"]
    lines = [
        f"{s['vectors']} {s.get('vectors_kind', 'uniform')} vectors ({s['model']}, `{s['factory']}` "
        f"{s.get('search_params') or ''}, recall@10 {s.get('recall_at_10')}, precision {s.get('precision', 'fp32')}),"
        f" k={s['k']},"
        f" {s['duration_s']:g} s x {s['repeat']} per level; server peak RSS {server['vmhwm_mb']:.0f} MB "
        f"({server['idle_rss_mb']:.0f} MB idle).",
        "",
        "| concurrency | req/s | p50 ms | p99 ms | errors | encode ms x texts | search ms x queries |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for concurrency, level in results["levels"].items():
        rps, p50, p99 = (
            median_min_max(level[key], ".1f") for key in ("requests_per_s", "latency_p50_ms", "latency_p99_ms")
        )
        lines.append(
            f"| {concurrency} | {rps} | {p50} | {p99} | {level['errors']['max']:g} "
            f"| {level['encode_ms_mean']['median']:.1f} x {level['batch_mean']['median']:.2f} "
            f"| {level['search_ms_mean']['median']:.2f} x {level['search_batch_mean']['median']:.2f} |"
        )
    lines += ["", "Targets: " + "; ".join(results["targets"]["report"])]
    return "\n".join(lines) + "\n"


def _concurrency(text: str) -> tuple[int, ...]:
    levels = tuple(int(part) for part in text.split(",") if part.strip())
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return levels


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from clip_model import PRECISIONS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="cache folder (default: a temporary directory)")
    parser.add_argument("--vectors", type=int, help=f"indexed images (default {DEFAULTS['vectors']})")
    parser.add_argument("--duration", type=float, help=f"seconds per run (default {DEFAULTS['duration']:g})")
    parser.add_argument("--concurrency", type=_concurrency, help="connections per level (default 1,8,32)")
    parser.add_argument("--repeat", type=int, help=f"runs per level (default {DEFAULTS['repeat']})")
    parser.add_argument("--warmup", type=float, help=f"uncounted seconds before each level ({DEFAULTS['warmup']:g})")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check that the script works (< 1 min)")
    parser.add_argument("--tag", default="", help="appended to the results file name")
    parser.add_argument("--out", type=Path, default=None, help="results JSON path (default: bench/results/...)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="CLIPSEARCH_PRECISION")
    parser.add_argument(
        "--server-env",
        type=_setting,
        action="append",
        default=[],
        metavar="CLIPSEARCH_NAME=VALUE",
        help="a server setting (repeatable), e.g. CLIPSEARCH_TORCH_THREADS=1",
    )
    parser.add_argument(
        "--vectors-kind", choices=("clip-like", "uniform"), default="clip-like", help="the indexed vectors"
    )
    parser.add_argument(
        "--factory", default=None, help="FAISS factory of the index (default: the one the indexer picks for the size)"
    )
    args = parser.parse_args(argv)
    fill_unset(args, SMOKE if args.smoke else DEFAULTS)
    return args


def run(args: argparse.Namespace, workdir: Path) -> None:
    wrk = wrk_path()
    started = time.perf_counter()
    from indexer.store import current_generation, read_manifest

    index_dir = seeded_index(workdir, args.vectors, vit_model(workdir), args.factory, args.vectors_kind)
    manifest = read_manifest(index_dir, current_generation(index_dir) or "")
    server_env = _server_env(workdir, args.precision, args.server_env)
    results = new_results()
    results["settings"] = {
        "vectors": args.vectors, "vectors_kind": args.vectors_kind, "model": MODEL_ARCH, "factory": manifest.factory,
        "search_params": manifest.search_params, "recall_at_10": manifest.recall_at_10, "k": K,
        "duration_s": args.duration,
        "repeat": args.repeat, "warmup_s": args.warmup, "concurrency": list(args.concurrency),
        "wrk_threads": f"min(concurrency, {WRK_MAX_THREADS})", "wrk_timeout": WRK_TIMEOUT,
        "precision": args.precision,
        "server_env": {k: v for k, v in server_env.items() if k.startswith("CLIPSEARCH_")},
    }  # fmt: skip
    log_path = workdir / "server.log"
    with running_server(index_dir, workdir, log_path, args.precision, args.server_env) as (process, url):
        check_search(url)
        results["settings"]["text_encoder"] = wait_for_text_encoder(url)
        sampler = RssSampler(process.pid)
        sampler.start()
        idle_rss_kb = proc_status_kb(process.pid, "VmRSS")
        try:
            levels = {}
            for concurrency in args.concurrency:
                print(f"concurrency {concurrency}:", flush=True)
                levels[str(concurrency)] = bench_level(wrk, url, sampler, concurrency, args)
        finally:
            sampler.stop()
        results["levels"] = levels
        results["server"] = {
            "idle_rss_mb": idle_rss_kb / KIB,
            "vmhwm_mb": proc_status_kb(process.pid, "VmHWM") / KIB,
            "peak_sampled_rss_mb": max(level["peak_rss_mb"] for level in levels.values()),
            "final_metrics": scrape(url),
        }
    results["targets"] = {**TARGETS, "report": target_lines(levels)}
    results["wall_s"] = time.perf_counter() - started
    print_table(results)
    out_dir = workdir if args.smoke else RESULTS_DIR  # a smoke check leaves bench/results/ (and git) untouched
    path = results_file("server", "smoke" if args.smoke else "", args.tag, out=args.out, folder=out_dir)
    write_json(path, results)
    print(f"\nwrote {path} ({results['wall_s']:.0f} s in all)")


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks, so the server is stopped


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    with workdir_or_temporary(args.workdir, "bench_server_") as workdir:
        run(args, workdir)


if __name__ == "__main__":
    main()
