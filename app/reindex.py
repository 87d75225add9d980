"""The admin reindex: runs ``python -m indexer build`` as a separate process, as a user would.

The server never writes the index itself; the indexer takes the index's writer lock and publishes a new
generation, which the runtime's watcher then picks up. One reindex at a time per server (a second is a 409; a
second indexer started elsewhere is refused by the indexer's own lock, and its message lands in ``log_tail``).
The indexer ends with the server, however the server ends (SIGKILL included): it inherits the read end of a pipe
whose write end only the server holds, and exits when that closes (the indexer's ``$CLIPSEARCH_LIFELINE_FD``,
see ``indexer/lifetime.py``); its decode workers end with it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence

from .errors import ConflictError
from .schemas import ReindexStatus

logger = logging.getLogger(__name__)

LOG_TAIL_LINES = 50
LIFELINE_FD_ENV = "CLIPSEARCH_LIFELINE_FD"  # indexer.lifetime.LIFELINE_FD_ENV (the app may not import it)


def indexer_command(
    image_root: str, index_dir: str, model: str | None, arch: str | None, rebuild: bool = False
) -> list[str]:
    """The command line the reindex runs (the README's ``clip-index build``, via this interpreter)."""
    command = [sys.executable, "-m", "indexer", "build", image_root, "--index-dir", index_dir]
    if model:
        command += ["--model", model]
    if arch:
        command += ["--arch", arch]
    if rebuild:
        command.append("--rebuild")
    return command


class Reindexer:
    """Starts and tracks one indexer process at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[str] | None = None
        self._status = ReindexStatus(state="idle")
        self._log: deque[str] = deque(maxlen=LOG_TAIL_LINES)

    def start(self, command: Sequence[str]) -> ReindexStatus:
        """Launch ``command``; ConflictError if the previous one still runs."""
        with self._lock:
            if self._process is not None and self._process.poll() is None:
                raise ConflictError(f"a reindex is already running (pid {self._process.pid})")
            self._log.clear()
            lifeline, keep_alive = os.pipe()  # close-on-exec: only the child gets ``lifeline``, by pass_fds
            try:
                self._process = subprocess.Popen(
                    list(command),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    text=True,
                    errors="replace",
                    pass_fds=(lifeline,),
                    env={**os.environ, LIFELINE_FD_ENV: str(lifeline)},
                )
            except BaseException:
                os.close(keep_alive)
                raise
            finally:
                os.close(lifeline)
            self._status = ReindexStatus(
                state="running", pid=self._process.pid, started_at=time.time(), command=list(command)
            )
            logger.info("reindex started (pid %d): %s", self._process.pid, " ".join(command))
            threading.Thread(target=self._follow, args=(self._process, keep_alive), name="reindex", daemon=True).start()
            return self.status()

    def _follow(self, process: subprocess.Popen[str], keep_alive: int) -> None:
        """Collect ``process``'s output until it exits, then close its lifeline's write end ``keep_alive``."""
        assert process.stdout is not None  # Popen was given stdout=PIPE
        for line in process.stdout:
            self._log.append(line.rstrip("\n"))
        code = process.wait()
        os.close(keep_alive)
        with self._lock:
            self._status = self._status.model_copy(
                update={"state": "succeeded" if code == 0 else "failed", "exit_code": code, "finished_at": time.time()}
            )
        logger.log(logging.INFO if code == 0 else logging.ERROR, "reindex (pid %d) exited with %d", process.pid, code)

    def status(self) -> ReindexStatus:
        return self._status.model_copy(update={"log_tail": list(self._log)})

    def wait(self, timeout: float | None = None) -> ReindexStatus:
        """Block until the running reindex ends (for tests and shutdown)."""
        process = self._process
        if process is not None:
            process.wait(timeout)
            deadline = time.monotonic() + 5
            while self._status.state == "running" and time.monotonic() < deadline:
                time.sleep(0.01)
        return self.status()

    def close(self) -> None:
        """Stop a running reindex (its committed work stays; the next run resumes from it)."""
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
