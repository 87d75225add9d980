"""kill -9 of a real indexer process at many moments: the published index survives, committed work is kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from indexer.store import Catalog, PublishedIndex, verify
from tests.indexer.conftest import write_photos

ROOT = Path(__file__).resolve().parents[2]
KILL_AFTER_SECONDS = (0.5, 1.5, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0)  # from process start: import, scan, encode, publish


def start_indexer(root: Path, index_dir: Path, model: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "indexer", "build", str(root), "--index-dir", str(index_dir),
               "--model", str(model), "--workers", "1", "--batch-size", "16"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def committed_ids(index_dir: Path) -> set[int]:
    with Catalog.open(index_dir, readonly=True) as catalog:
        return {rec.id for rec in catalog.files().values() if rec.status == "ok"}


def test_kill_9_at_any_moment_keeps_published_index_and_committed_work(tiny_model: Path, tmp_path: Path) -> None:
    root, index_dir = tmp_path / "photos", tmp_path / "index"
    write_photos(root, 200)
    first = start_indexer(root, index_dir, tiny_model)
    assert first.wait(timeout=120) == 0, first.stderr.read().decode() if first.stderr else ""
    published = PublishedIndex.open(index_dir).manifest.generation
    write_photos(root, 1500, start=200, subdir="new")

    kills = 0
    for delay in KILL_AFTER_SECONDS:
        before = committed_ids(index_dir)
        process = start_indexer(root, index_dir, tiny_model)
        time.sleep(delay)
        if process.poll() is not None:  # finished before the kill: nothing left to interrupt
            break
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        kills += 1
        assert verify(index_dir) == [], f"after kill at {delay}s"
        index = PublishedIndex.open(index_dir)  # the last published generation, never a torn one
        assert index.manifest.generation >= published
        assert before <= committed_ids(index_dir), f"committed rows lost after kill at {delay}s"
    assert kills >= 3, "the indexer finished too fast to be interrupted: make the folder bigger"

    committed = len(committed_ids(index_dir))
    final = start_indexer(root, index_dir, tiny_model)
    stderr = final.communicate(timeout=300)[1].decode()
    assert final.returncode == 0, stderr
    assert f"{1700 - committed} encoded" in stderr  # resumed: committed images were not encoded again
    assert verify(index_dir) == [] and PublishedIndex.open(index_dir).manifest.counts["images"] == 1700


@pytest.mark.parametrize("delay", [0.3])
def test_kill_before_anything_was_published_leaves_a_rerunnable_directory(
    delay: float, tiny_model: Path, tmp_path: Path
) -> None:
    root, index_dir = tmp_path / "photos", tmp_path / "index"
    write_photos(root, 50)
    process = start_indexer(root, index_dir, tiny_model)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    rerun = start_indexer(root, index_dir, tiny_model)
    assert rerun.wait(timeout=120) == 0
    assert verify(index_dir) == [] and PublishedIndex.open(index_dir).manifest.counts["images"] == 50
