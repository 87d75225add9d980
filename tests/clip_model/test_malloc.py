"""tune_malloc: applies both thresholds on glibc, and leaves the user's MALLOC_* environment alone."""

from __future__ import annotations

import subprocess
import sys

import pytest

from clip_model.process_tuning.malloc import ENV_VARIABLES, MMAP_THRESHOLD_BYTES, TRIM_THRESHOLD_BYTES, tune_malloc

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")

# A process that frees a 24 MiB buffer and allocates one of 20 MiB, 20 times: with glibc's defaults each of the
# 20 MiB blocks lands in memory that was trimmed or unmapped meanwhile (page faults every round); with the tuned
# thresholds the freed heap is reused (almost no new faults).
FAULTS = """
import ctypes, resource, sys
from clip_model.process_tuning.malloc import tune_malloc
if sys.argv[1] == "tuned":
    assert tune_malloc() is not None
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
def touch(size):
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    return block
def one_round(extra):
    a = touch((20 << 20) + extra)
    b = touch((24 << 20) + extra)
    libc.free(b)
    libc.free(a)
one_round(20 * 4096)  # warm-up: the largest round first
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for round in range(20):
    one_round(round * 4096)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_both_thresholds_are_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert tune_malloc() == {"mmap_threshold": MMAP_THRESHOLD_BYTES, "trim_threshold": TRIM_THRESHOLD_BYTES}


@pytest.mark.parametrize("name", ENV_VARIABLES)
def test_the_users_environment_wins(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(name, "65536")
    assert tune_malloc() is None


def test_tuned_malloc_reuses_freed_buffers_instead_of_faulting_them_in_again() -> None:
    env = {"PATH": "/usr/bin:/bin"}

    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", FAULTS, mode], env=env, capture_output=True, text=True, check=True)
        return int(out.stdout)

    default, tuned = faults("default"), faults("tuned")
    assert default > 1000 and tuned * 10 < default, (tuned, default)
