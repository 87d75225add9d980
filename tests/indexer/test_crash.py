"""kill -9 of a real indexer process at many moments: the published index survives, committed work is kept, and no
process of the run (decode workers, the multiprocessing resource tracker) outlives the killed one; nor does the
indexer that a killed server started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path

import pytest

from indexer.store import Catalog, PublishedIndex, current_generation, verify
from tests.indexer.conftest import write_photos

ROOT = Path(__file__).resolve().parents[2]
KILL_AFTER_SECONDS = (0.5, 1.5, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0)  # from process start: import, scan, encode, publish
RUN_MARKER_ENV = "CLIPSEARCH_TEST_RUN"  # set on a started process; its children inherit it
HAS_PROC = Path("/proc/self/environ").exists()  # where a run's processes are found, by their environment
LEFTOVER_WAIT_SECONDS = 5.0  # for the children of a killed process to notice and exit
STARTUP_SECONDS = 120.0  # most a run may take to reach its encoding stage on a loaded machine
DECODE_WORKER = "multiprocessing.spawn"  # in a decode worker's command line
RESOURCE_TRACKER = "multiprocessing.resource_tracker"
REINDEX_LAUNCHER = """
import sys, threading, time
from app.reindex import Reindexer, indexer_command
reindexer = Reindexer()
command = indexer_command(sys.argv[1], sys.argv[2], sys.argv[3], None) + ["--workers", "1", "--batch-size", "8"]
thread = threading.Thread(target=reindexer.start, args=(command,))  # ends at once, as a request thread may
thread.start()
thread.join()
time.sleep(600)
"""  # the server's side of a reindex, as a process to kill


def start_indexer(root: Path, index_dir: Path, model: Path, marker: str, workers: int = 1) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "indexer", "build", str(root), "--index-dir", str(index_dir),
               "--model", str(model), "--workers", str(workers), "--batch-size", "16"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), RUN_MARKER_ENV: marker}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def processes_of(marker: str) -> dict[int, str]:
    """pid -> command line of each live process whose environment carries ``marker`` (a zombie's is empty)."""
    needle = f"{RUN_MARKER_ENV}={marker}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # ended meanwhile, or another user's
            continue
    return found


def wait_for_processes(marker: str, done: Callable[[dict[int, str]], bool], seconds: float) -> dict[int, str]:
    """The run's processes once ``done`` accepts them, or when ``seconds`` have passed."""
    deadline = time.monotonic() + seconds
    while True:
        found = processes_of(marker)
        if done(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def assert_nothing_left(marker: str) -> None:
    """Wait a bounded time for the run's processes to end; fail naming those left."""
    if HAS_PROC:
        left = wait_for_processes(marker, lambda found: not found, LEFTOVER_WAIT_SECONDS)
        assert left == {}, f"still running {LEFTOVER_WAIT_SECONDS}s after the kill: {left}"


def count(found: dict[int, str], kind: str) -> int:
    return sum(kind in command for command in found.values())


@pytest.fixture
def new_marker() -> Iterator[Callable[[], str]]:
    """Makes run markers; at teardown (of a failed test too) kills every process of those runs still left."""
    made: list[str] = []

    def make() -> str:
        made.append(uuid.uuid4().hex)
        return made[-1]

    yield make
    for marker in made if HAS_PROC else ():
        for pid in processes_of(marker):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def committed_ids(index_dir: Path) -> set[int]:
    with Catalog.open(index_dir, readonly=True) as catalog:
        return {rec.id for rec in catalog.files().values() if rec.status == "ok"}


@pytest.mark.slow  # kills at many moments of a build over 1,700 photos
def test_kill_9_at_any_moment_keeps_published_index_and_committed_work(
    tiny_model: Path, tmp_path: Path, new_marker: Callable[[], str]
) -> None:
    root, index_dir = tmp_path / "photos", tmp_path / "index"
    write_photos(root, 200)
    first = start_indexer(root, index_dir, tiny_model, new_marker())
    assert first.wait(timeout=120) == 0, first.stderr.read().decode() if first.stderr else ""
    published = PublishedIndex.open(index_dir).manifest.generation
    write_photos(root, 1500, start=200, subdir="new")

    kills = 0
    for delay in KILL_AFTER_SECONDS:
        before = committed_ids(index_dir)
        marker = new_marker()
        process = start_indexer(root, index_dir, tiny_model, marker)
        time.sleep(delay)
        if process.poll() is not None:  # finished before the kill: nothing left to interrupt
            break
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        kills += 1
        assert_nothing_left(marker)
        assert verify(index_dir) == [], f"after kill at {delay}s"
        index = PublishedIndex.open(index_dir)  # the last published generation, never a torn one
        assert index.manifest.generation >= published
        assert before <= committed_ids(index_dir), f"committed rows lost after kill at {delay}s"
    assert kills >= 3, "the indexer finished too fast to be interrupted: make the folder bigger"

    committed = len(committed_ids(index_dir))
    final = start_indexer(root, index_dir, tiny_model, new_marker())
    stderr = final.communicate(timeout=300)[1].decode()
    assert final.returncode == 0, stderr
    assert f"{1700 - committed} encoded" in stderr  # resumed: committed images were not encoded again
    assert verify(index_dir) == [] and PublishedIndex.open(index_dir).manifest.counts["images"] == 1700


@pytest.mark.slow  # heavy end to end (seconds): CI runs it, make check leaves it out
@pytest.mark.parametrize("delay", [0.3])
def test_kill_before_anything_was_published_leaves_a_rerunnable_directory(
    delay: float, tiny_model: Path, tmp_path: Path, new_marker: Callable[[], str]
) -> None:
    root, index_dir = tmp_path / "photos", tmp_path / "index"
    write_photos(root, 50)
    marker = new_marker()
    process = start_indexer(root, index_dir, tiny_model, marker)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert_nothing_left(marker)
    rerun = start_indexer(root, index_dir, tiny_model, marker)
    assert rerun.wait(timeout=120) == 0
    assert_nothing_left(marker)  # a run that ends normally leaves nothing either
    assert verify(index_dir) == [] and PublishedIndex.open(index_dir).manifest.counts["images"] == 50


@pytest.mark.skipif(not HAS_PROC, reason="finds the run's processes in /proc")
def test_kill_9_during_encoding_ends_the_decode_workers_and_the_resource_tracker(
    tiny_model: Path, tmp_path: Path, new_marker: Callable[[], str]
) -> None:
    root, index_dir = tmp_path / "photos", tmp_path / "index"
    write_photos(root, 600)
    marker = new_marker()
    process = start_indexer(root, index_dir, tiny_model, marker, workers=2)

    def encoding(found: dict[int, str]) -> bool:
        return process.poll() is not None or (count(found, DECODE_WORKER) == 2 and count(found, RESOURCE_TRACKER) == 1)

    running = wait_for_processes(marker, encoding, STARTUP_SECONDS)
    process.kill()
    process.wait(timeout=30)
    assert count(running, DECODE_WORKER) == 2 and count(running, RESOURCE_TRACKER) == 1, running
    assert_nothing_left(marker)
    assert current_generation(index_dir) is None  # killed while encoding, not finished before the kill


@pytest.mark.slow  # heavy end to end (seconds): CI runs it, make check leaves it out
@pytest.mark.skipif(not HAS_PROC, reason="finds the run's processes in /proc")
def test_kill_9_of_the_server_ends_the_indexer_it_started_and_its_workers(
    tiny_model: Path, tmp_path: Path, new_marker: Callable[[], str]
) -> None:
    root, index_dir = tmp_path / "photos", tmp_path / "index"
    write_photos(root, 600)
    marker = new_marker()
    server = subprocess.Popen(
        [sys.executable, "-c", REINDEX_LAUNCHER, str(root), str(index_dir), str(tiny_model)], cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), RUN_MARKER_ENV: marker}, stdin=subprocess.DEVNULL,
    )  # fmt: skip

    def encoding(found: dict[int, str]) -> bool:
        return server.poll() is not None or count(found, DECODE_WORKER) == 1

    running = wait_for_processes(marker, encoding, STARTUP_SECONDS)
    server.kill()
    server.wait(timeout=30)
    assert count(running, "-m indexer build") == 1 and count(running, DECODE_WORKER) == 1, running
    assert_nothing_left(marker)
    assert current_generation(index_dir) is None  # the indexer was ended, not finished before the kill
