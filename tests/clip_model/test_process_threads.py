"""clip_model.process_tuning's threads and cores: one-off torch work on a thread that ends, per-thread torch counts
that stick, and the CPUs this process may use."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from clip_model.process_tuning.cores import available_cores, cgroup_cpu_quota
from clip_model.process_tuning.threads import (
    own_threads,
    run_in_fresh_thread,
    set_own_thread_count,
    set_thread_count,
    single_threaded_elsewhere,
)


def test_run_in_fresh_thread_returns_the_result_from_another_thread() -> None:
    name = run_in_fresh_thread(lambda: threading.current_thread().name, name="loader")
    assert name == "loader" and threading.current_thread().name != "loader"


def test_run_in_fresh_thread_reraises_in_the_caller() -> None:
    def fail() -> None:
        raise ValueError("broken checkpoint")

    with pytest.raises(ValueError, match="broken checkpoint"):
        run_in_fresh_thread(fail)


def test_a_thread_keeps_its_own_count_when_the_default_changes_after() -> None:
    original = torch.get_num_threads()
    ready, changed, seen = threading.Event(), threading.Event(), []

    def inference() -> None:
        set_thread_count(2)
        ready.set()
        changed.wait()
        seen.append(torch.get_num_threads())

    thread = threading.Thread(target=inference)
    thread.start()
    try:
        ready.wait()
        single_threaded_elsewhere()
        assert run_in_fresh_thread(torch.get_num_threads) == 1
    finally:
        changed.set()
        thread.join()
        torch.set_num_threads(original)
    assert seen == [2]


def test_a_thread_sets_its_own_count_and_leaves_the_default_of_new_threads_alone() -> None:
    original = torch.get_num_threads()
    single_threaded_elsewhere()  # what the server does at start
    try:

        def loader() -> int:
            set_own_thread_count(2)
            return torch.get_num_threads()

        assert run_in_fresh_thread(loader) == 2
        assert run_in_fresh_thread(torch.get_num_threads) == 1  # torch.set_num_threads(2) would have made it 2
    finally:
        torch.set_num_threads(original)


def test_own_threads_sets_the_calling_threads_count_for_the_block_and_gives_it_back() -> None:
    def worker() -> tuple[int, int, int, int]:
        before = torch.get_num_threads()
        with own_threads(before + 1):
            inside, default_inside = torch.get_num_threads(), run_in_fresh_thread(torch.get_num_threads)
        return before, inside, default_inside, torch.get_num_threads()

    before, inside, default_inside, after = run_in_fresh_thread(worker)
    assert inside == before + 1 and after == before
    assert default_inside == before  # new threads keep the process default


def test_own_threads_gives_the_count_back_when_the_block_raises() -> None:
    def worker() -> tuple[int, int]:
        before = torch.get_num_threads()
        with pytest.raises(ValueError), own_threads(before + 1):
            raise ValueError("encode failed")
        return before, torch.get_num_threads()

    before, after = run_in_fresh_thread(worker)
    assert after == before


def fake_cgroup(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text + "\n")
    return tmp_path


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"cpu.max": "max 100000"}, None),
        ({"cpu.max": "200000 100000"}, 2),
        ({"cpu.max": "150000 100000"}, 2),  # 1.5 CPUs: rounded up
        ({"cpu.max": "1000 100000"}, 1),  # a hundredth of a CPU: still one
        ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
        ({"cpu/cpu.cfs_quota_us": "300000", "cpu/cpu.cfs_period_us": "100000"}, 3),
        ({"cpu,cpuacct/cpu.cfs_quota_us": "50000", "cpu,cpuacct/cpu.cfs_period_us": "100000"}, 1),
        ({}, None),
    ],
)
def test_cgroup_cpu_quota_reads_v2_and_v1_limits(tmp_path: Path, files: dict[str, str], quota: int | None) -> None:
    assert cgroup_cpu_quota(fake_cgroup(tmp_path, files)) == quota


def test_available_cores_is_the_affinity_mask_limited_by_the_quota(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    assert available_cores(fake_cgroup(tmp_path / "none", {"cpu.max": "max 100000"})) == affinity
    assert available_cores(fake_cgroup(tmp_path / "one", {"cpu.max": "100000 100000"})) == 1
    many = fake_cgroup(tmp_path / "many", {"cpu.max": f"{100000 * (affinity + 4)} 100000"})
    assert available_cores(many) == affinity  # a quota above the mask does not add CPUs


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
def test_available_cores_follows_the_affinity_mask_of_the_process() -> None:
    pinned = (
        "import os; from clip_model.process_tuning.cores import available_cores; "
        "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); print(available_cores())"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", pinned], capture_output=True, text=True, check=True, cwd=root).stdout
    assert out.strip() == "1"


OWN_THREADS_PROBE = """
import {first}, {second}
import faiss, torch
from clip_model.process_tuning import own_threads
before = (torch.get_num_threads(), faiss.omp_get_max_threads())
with own_threads(1):
    inside = (torch.get_num_threads(), faiss.omp_get_max_threads())
print(before == (torch.get_num_threads(), faiss.omp_get_max_threads()), inside)
"""


@pytest.mark.parametrize(("first", "second"), [("torch", "faiss"), ("faiss", "torch")])
def test_own_threads_sets_torch_and_faiss_alike_whichever_was_imported_first(first: str, second: str) -> None:
    """Imported after torch, FAISS runs on torch's OpenMP runtime; imported first, on its own: one count covers both."""
    probe = OWN_THREADS_PROBE.format(first=first, second=second)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=root, env=env)
    assert out.stdout.split() == ["True", "(1,", "1)"]
