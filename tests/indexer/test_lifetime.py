"""indexer.lifetime: a child ends when its lifeline is cut, and a parent-death signal is armed only where it is safe.

The kill -9 tests of whole runs (decode workers, the server's reindex) are in test_crash.py."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from indexer.errors import IndexerError
from indexer.lifetime import EXIT_STATUS_PARENT_GONE, LIFELINE_FD_ENV, exit_with_launcher, worker_pool

ROOT = Path(__file__).resolve().parents[2]
PR_GET_PDEATHSIG = 2  # <linux/prctl.h>
ARMED_CHILD = """
import os, time
from indexer.lifetime import LIFELINE_FD_ENV, exit_with_launcher
assert exit_with_launcher() and LIFELINE_FD_ENV not in os.environ
print("armed", flush=True)
time.sleep(60)
"""


def pdeath_signal() -> int:
    """This process's parent-death signal (0: none)."""
    value = ctypes.c_int()
    ctypes.CDLL(None).prctl(PR_GET_PDEATHSIG, ctypes.byref(value), 0, 0, 0)
    return value.value


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_only_a_worker_spawned_by_the_main_thread_gets_a_parent_death_signal() -> None:
    """The signal fires when the thread that forked the worker ends; only the main thread lasts as the process."""
    from_thread: list[int] = []
    with worker_pool(1) as pool:
        thread = threading.Thread(target=lambda: from_thread.append(pool.submit(pdeath_signal).result()))
        thread.start()
        thread.join()
    with worker_pool(1) as pool:
        from_main = pool.submit(pdeath_signal).result()
    assert from_thread == [0] and from_main == signal.SIGKILL


def test_a_launched_process_ends_when_its_launcher_closes_the_lifeline() -> None:
    lifeline, keep_alive = os.pipe()
    env = {**os.environ, "PYTHONPATH": str(ROOT), LIFELINE_FD_ENV: str(lifeline)}
    child = subprocess.Popen([sys.executable, "-c", ARMED_CHILD], env=env, pass_fds=(lifeline,), stdout=subprocess.PIPE)
    os.close(lifeline)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"armed\n"
        time.sleep(0.2)
        assert child.poll() is None  # the launcher is alive: so is the child
        os.close(keep_alive)  # what the kernel does when the launcher dies
        keep_alive, started = -1, time.monotonic()
        assert child.wait(timeout=5) == EXIT_STATUS_PARENT_GONE
        assert time.monotonic() - started < 1.0
    finally:
        if keep_alive >= 0:
            os.close(keep_alive)
        child.kill()
        child.wait()


@pytest.mark.parametrize("value", ["nope", "-1", "999999"])
def test_a_lifeline_that_names_no_open_descriptor_is_refused(value: str) -> None:
    with pytest.raises(IndexerError, match=LIFELINE_FD_ENV):
        exit_with_launcher({LIFELINE_FD_ENV: value})


def test_a_lifeline_that_is_not_a_pipe_is_refused_and_clip_index_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from indexer.cli import main as cli_main  # here: the workers that import this module stay light (no torch)

    with open(tmp_path / "file", "wb") as file:
        with pytest.raises(IndexerError, match="not a pipe"):
            exit_with_launcher({LIFELINE_FD_ENV: str(file.fileno())})
        monkeypatch.setenv(LIFELINE_FD_ENV, str(file.fileno()))
        assert cli_main(["verify", "--index-dir", str(tmp_path / "index")]) == 1
    assert "not a pipe" in caplog.text
    assert exit_with_launcher({}) is False and exit_with_launcher({LIFELINE_FD_ENV: ""}) is False


def test_the_server_names_the_lifeline_as_the_indexer_reads_it() -> None:
    from app.reindex import LIFELINE_FD_ENV as APP_LIFELINE_FD_ENV  # here, as indexer.cli above

    assert APP_LIFELINE_FD_ENV == LIFELINE_FD_ENV
