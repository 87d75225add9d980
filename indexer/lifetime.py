"""Child processes end with the process that started them, however it ends (SIGKILL included).

The one owner of that guarantee in ``indexer``. Its tool is a *lifeline*: a pipe whose write end only the parent
holds. The kernel closes the write end when the parent dies, whatever kills it, and a daemon thread in the child,
blocked reading the read end, sees end-of-file and ends the child at once (``os._exit``, status
``EXIT_STATUS_PARENT_GONE``). This works on every POSIX system and belongs to the parent *process*: Linux's
``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child ends, and both the thread that calls
``ProcessPoolExecutor.submit()`` (which spawns workers lazily) and the thread that starts the server's reindex
(a request thread) may end long before the process.

- Decode workers: :func:`worker_pool` is a spawn-context ``ProcessPoolExecutor`` whose workers hold the read end
  of a lifeline; leaving the block, or the end of this process, ends them. On Linux a worker spawned by the main
  thread (which lives as long as the process) also sets ``PR_SET_PDEATHSIG`` to SIGKILL, so it dies with the
  process even while its Python code cannot run. The multiprocessing resource tracker exits once the parent and
  every worker have closed its pipe, i.e. right after them.
- An indexer started by another program (the server's reindex): the program passes the read end of a pipe it
  keeps open as an inherited file descriptor and names it in ``$CLIPSEARCH_LIFELINE_FD``;
  :func:`exit_with_launcher`, called once at startup by ``clip-index``, arms the watch. Its own decode workers
  follow it through their lifelines.

A lifeline's write end must never reach another process: the pipes are created close-on-exec and workers are
spawned (a forked child would hold the write end itself and keep its own lifeline open).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import stat
import sys
import threading
from collections.abc import Iterator, MutableMapping
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing.connection import Connection
from typing import Any

from .errors import IndexerError

LIFELINE_FD_ENV = "CLIPSEARCH_LIFELINE_FD"  # the inherited read end of the launcher's lifeline, as a number
EXIT_STATUS_PARENT_GONE = 128 + signal.SIGHUP  # as if hung up: the process that would read it is gone
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
READ_BYTES = 64  # a lifeline carries no data: any read returns only at end-of-file


@contextmanager
def worker_pool(max_workers: int) -> Iterator[ProcessPoolExecutor]:
    """A spawn-context ``ProcessPoolExecutor`` whose workers end when this process ends or the block is left.

    Leaving the block shuts the pool down (waiting for its tasks, as ``with ProcessPoolExecutor`` does), then
    cuts the lifeline, which ends any worker still running."""
    reader, writer = multiprocessing.Pipe(duplex=False)  # both ends close-on-exec: only spawned workers get one
    context = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(max_workers, context, initializer=_watch_parent, initargs=(_Lifeline(reader),)) as p:
            yield p
    finally:
        writer.close()
        reader.close()


def exit_with_launcher(environ: MutableMapping[str, str] | None = None) -> bool:
    """End this process as soon as its launcher dies, if ``$CLIPSEARCH_LIFELINE_FD`` names a lifeline.

    Returns whether a watch was armed. The variable is removed from ``environ`` (default ``os.environ``) so that
    no child reads a descriptor number it did not inherit. Raises IndexerError if it does not name the read end of
    an open pipe."""
    value = (os.environ if environ is None else environ).pop(LIFELINE_FD_ENV, "")
    if not value:
        return False
    try:
        fd = int(value)
        is_pipe = stat.S_ISFIFO(os.fstat(fd).st_mode)
    except (ValueError, OSError) as exc:
        raise IndexerError(f"${LIFELINE_FD_ENV}={value!r} does not name an open file descriptor ({exc})") from None
    if not is_pipe:
        raise IndexerError(f"${LIFELINE_FD_ENV}={value!r} names a file descriptor that is not a pipe")
    os.set_inheritable(fd, False)  # this process's lifeline: its children get their own
    _start_watch(fd)
    return True


class _Lifeline:
    """The read end of a worker's lifeline, pickled into each worker as it is spawned.

    Pickling runs on the thread that spawns the worker, so it records that thread along with this process's pid:
    the worker may trust ``PR_SET_PDEATHSIG`` only if it was forked by the main thread."""

    def __init__(self, reader: Connection, parent: int = 0, spawned_by_main_thread: bool = False) -> None:
        self.reader, self.parent, self.spawned_by_main_thread = reader, parent, spawned_by_main_thread

    def __reduce__(self) -> tuple[Any, ...]:
        return _Lifeline, (self.reader, os.getpid(), threading.current_thread() is threading.main_thread())


def _watch_parent(lifeline: _Lifeline) -> None:
    """Pool initializer: arm the lifeline's watch, and the parent-death signal where it is safe."""
    _start_watch(lifeline.reader.fileno(), owner=lifeline.reader)
    if sys.platform == "linux" and lifeline.spawned_by_main_thread:
        # best effort (it fails only for an invalid signal): the lifeline holds without it
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != lifeline.parent:  # the parent died before the signal was armed
            os._exit(EXIT_STATUS_PARENT_GONE)


def _start_watch(fd: int, owner: object = None) -> None:
    """Block on ``fd`` in a daemon thread and end the process at end-of-file; ``owner`` (which closes ``fd`` when
    collected) is kept alive by the thread."""
    threading.Thread(target=_watch, args=(fd, owner), name="lifeline", daemon=True).start()


def _watch(fd: int, owner: object) -> None:
    try:
        while os.read(fd, READ_BYTES):
            pass
    except OSError:
        pass  # a lifeline that cannot be read is as good as cut
    os._exit(EXIT_STATUS_PARENT_GONE)  # no atexit handlers or finalizers: they may wait on the dead parent
