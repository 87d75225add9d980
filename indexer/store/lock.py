"""One writer at a time per index directory: :class:`WriterLock`."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Self

from ..errors import IndexLockedError
from .format import LOCK_FILE

_HELD_LOCKS: set[Path] = set()  # resolved index dirs whose WriterLock this process holds


class WriterLock:
    """Exclusive writer lock on ``<index_dir>/.lock`` via ``fcntl.flock``; creates ``index_dir`` if needed.

    The kernel drops the lock when its holder dies, so a crashed writer never leaves a stale lock. Not reentrant: a
    second WriterLock on the same directory fails even in the same process.
    """

    def __init__(self, index_dir: Path) -> None:
        self.index_dir = Path(index_dir)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise IndexLockedError naming the holder's pid and the directory."""
        self.index_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.index_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise IndexLockedError(
                f"{self.index_dir} is locked by another indexer (pid {holder}); wait for it to finish or stop it"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd
        _HELD_LOCKS.add(self.index_dir.resolve())

    def release(self) -> None:
        if self._fd is not None:
            _HELD_LOCKS.discard(self.index_dir.resolve())
            os.close(self._fd)  # closing the only descriptor releases the flock
            self._fd = None

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
