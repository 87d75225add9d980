"""Keeping torch's CPU thread pool fast in a process with several Python threads.

torch's CPU kernels run their parallel loops on OpenMP (libgomp in the CPU wheels). Each Python thread that runs a
parallel loop gets its own team of OpenMP worker threads, which lives as long as that Python thread. libgomp lets
idle workers spin (and so wake at once for the next loop) only while the process has no more OpenMP threads than
CPUs; beyond that every worker sleeps on a futex between loops and each element-wise op pays a wake-up. On a
small model the wake-ups outweigh the arithmetic: once the main thread has loaded a model (its team stays alive),
a text query encoded on a second thread is several times slower than on the main thread.

So a server that encodes on one inference thread must keep every other long-lived thread from starting a team:

- :func:`run_in_fresh_thread` runs one-off torch work (loading, fingerprinting, quantizing a model) on a thread
  that ends when it is done, which frees its team;
- :func:`default_thread_count` reads that default (what a new thread gets), to put it back later;
- :func:`single_threaded_elsewhere` sets torch's default to one thread for every thread that has not run torch
  yet (request handlers, watchers, timers);
- :func:`set_own_thread_count` gives the threads that should run parallel torch or FAISS work (a model loader,
  the inference thread, a background compile matching its count) their count for the rest of their life without
  touching that default; :func:`own_threads` does the same for a block and gives the thread its count back after;
  :func:`set_thread_count` is ``torch.set_num_threads`` made to stick, and sets the default too (a server's
  close puts the default it read at start back with it).

A thread has one count, for torch and FAISS alike. The faiss-cpu wheel bundles a libgomp of its own; whether FAISS
runs on it or on torch's depends on which module the process imported first (imported after torch, FAISS binds to
torch's already-loaded runtime), so a FAISS count set apart from torch's may or may not change torch's. Setting
both runtimes to the same count is right either way; a thread that needs other counts for other work (the indexer:
encoding, then building the FAISS index) sets them block by block with :func:`own_threads`.

Who owns which call: this module makes every thread-count call of ``clip_model``, ``indexer``, ``app`` and
``bench``: torch's (``torch.set_num_threads``, libgomp's ``omp_set_num_threads``) and FAISS's
(``faiss.omp_set_num_threads``). The counts themselves come from one
:class:`~clip_model.process_tuning.plan.ThreadPlan` per process.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch

T = TypeVar("T")
logger = logging.getLogger(__name__)
TORCH_OPENMP = "libgomp.so.1"  # the OpenMP runtime torch's CPU wheels load (found by its soname once loaded)


def run_in_fresh_thread(fn: Callable[[], T], name: str = "torch-oneoff") -> T:
    """``fn()`` on a new thread, waited for; its result is returned and its exception re-raised here.

    The thread's OpenMP team (if ``fn`` ran parallel torch ops) ends with it, so it cannot slow down the threads
    that keep running torch (see the module docstring)."""
    box: dict[str, T] = {}
    error: list[BaseException] = []

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread below
            error.append(exc)

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return box["result"]


def set_thread_count(threads: int) -> None:
    """Set the calling thread's torch thread count (and the default for threads that start using torch later).

    torch fills in a thread's count from the default the first time that thread asks for it (any parallel op
    does), which would undo a ``torch.set_num_threads`` made before then; asking first makes the setting stick."""
    torch.get_num_threads()
    torch.set_num_threads(threads)


def set_own_thread_count(threads: int) -> None:
    """Set only the calling thread's torch and FAISS thread count: the default for new threads stays as it is.

    ``torch.set_num_threads`` also changes that default; this sets the thread's OpenMP count directly (what
    ``torch.get_num_threads`` then returns on this thread). Where torch does not run on libgomp, it falls back to
    ``torch.set_num_threads`` (logged) and the default changes too."""
    torch.get_num_threads()  # torch's per-thread initialisation first, so that it does not undo the setting
    omp = _torch_openmp()
    if omp is None:
        set_thread_count(threads)
    else:
        omp.omp_set_num_threads(int(threads))
    _set_faiss_threads(threads)


def _set_faiss_threads(threads: int) -> None:
    """The calling thread's count in the OpenMP runtime FAISS runs on (torch's or its own, see the module docstring)."""
    import faiss  # here only: the rest of clip_model does not use FAISS

    faiss.omp_set_num_threads(int(threads))


def own_faiss_thread_count() -> int:
    """The calling thread's count in the OpenMP runtime FAISS runs on."""
    import faiss

    return int(faiss.omp_get_max_threads())


@contextmanager
def own_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` torch and FAISS threads on the calling thread, then give the thread its
    previous counts back.

    Only the calling thread's counts change (see :func:`set_own_thread_count`); the defaults of new threads stay."""
    previous, previous_faiss = torch.get_num_threads(), own_faiss_thread_count()
    set_own_thread_count(threads)
    try:
        yield
    finally:
        set_own_thread_count(previous)
        _set_faiss_threads(previous_faiss)  # the same count unless FAISS runs on a runtime of its own


@functools.cache
def _torch_openmp() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(TORCH_OPENMP)
    except OSError as exc:
        logger.warning(
            "no %s (%s): thread counts set with torch.set_num_threads, for new threads too", TORCH_OPENMP, exc
        )
        return None


def default_thread_count() -> int:
    """The torch thread count a thread gets when it first runs torch (the process default).

    ``torch.get_num_threads`` answers for the calling thread, whose own count may differ from the default; a
    fresh thread reads the default."""
    return run_in_fresh_thread(torch.get_num_threads, name="torch-default-probe")


def single_threaded_elsewhere() -> None:
    """Make one torch thread the default for the calling thread and every thread that starts using torch later.

    A thread keeps the count it had when it first ran torch, or the one it set for itself since."""
    torch.set_num_threads(1)
