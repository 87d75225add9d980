"""Keep glibc malloc from handing big activation buffers back to the OS after every forward pass.

glibc serves allocations above its mmap threshold with a fresh ``mmap`` and unmaps them on ``free``; it also trims
the top of the heap whenever more than the trim threshold is free. A CPU forward pass allocates and frees the same
few large activation tensors every call, so with the defaults each call pays page faults and zeroing for memory it
had a moment ago (the threshold adapts, but only after a free of a mapped block, and never above 32 MiB). Raising
both thresholds once at start-up keeps those buffers in the heap for reuse: fewer page faults per call and steadier
timings, at the cost of the process keeping its peak heap instead of shrinking between calls.

:func:`tune_malloc` is what ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` in the environment do, but
callable from inside the process (those variables are read only when the process starts). Entry points (server,
indexer, benchmarks) call it; the library never does it on import. If either variable is already set, the user's
choice wins and nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's maximum on 64-bit (HEAP_MAX_SIZE / 2); larger values are refused
TRIM_THRESHOLD_BYTES = 1024 * 1024 * 1024  # keep up to 1 GiB of free heap instead of trimming it
ENV_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def tune_malloc(
    mmap_threshold: int = MMAP_THRESHOLD_BYTES, trim_threshold: int = TRIM_THRESHOLD_BYTES
) -> dict[str, int] | None:
    """Raise glibc's mmap and trim thresholds for this process.

    Returns the settings applied (bytes), or None when nothing was changed: not Linux/glibc, or the user set one of
    ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` (their values then stand). Never raises.
    """
    if not sys.platform.startswith("linux") or any(name in os.environ for name in ENV_VARIABLES):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return None
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    applied = {}
    for name, parameter, value in (
        ("mmap_threshold", M_MMAP_THRESHOLD, mmap_threshold),
        ("trim_threshold", M_TRIM_THRESHOLD, trim_threshold),
    ):
        if mallopt(parameter, int(value)) == 1:
            applied[name] = int(value)
        else:
            logger.warning("glibc refused mallopt(%s=%d); keeping its default", name, value)
    logger.debug("malloc tuned: %s", applied)
    return applied or None
