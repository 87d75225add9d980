"""clip_model.threads: one-off torch work on a thread that ends, and per-thread torch counts that stick."""

from __future__ import annotations

import threading

import pytest
import torch

from clip_model.threads import (
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
