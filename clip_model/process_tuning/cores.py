"""The CPUs this process may run on: the one definition of "one per core" for every thread count.

``os.cpu_count()`` counts the machine's CPUs. A process pinned to some of them (``taskset``, a cpuset) or given a CPU
quota (a container's ``--cpus``: a cgroup's ``cpu.max``, or ``cpu.cfs_quota_us`` under cgroup v1) may use fewer,
and one thread per machine CPU then oversubscribes what it has. :func:`available_cores` takes the smallest of the
affinity mask and the quota (rounded up), and falls back to ``os.cpu_count()`` where neither can be read.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")  # where cgroup v2's cpu.max, or v1's cpu controller directory, is mounted
CGROUP_V1_CPU_DIRS = ("cpu", "cpu,cpuacct")  # the cpu controller's directory names under cgroup v1
NO_QUOTA = "max"  # cgroup v2's cpu.max quota for "no limit"


def available_cores(cgroup_root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may use: its affinity mask, limited by its cgroup CPU quota; at least 1.

    Args: cgroup_root: where the cgroup filesystem is mounted (tests point it at a fake one)."""
    cores = _affinity_cores()
    quota = cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        cores = min(cores, quota) if cores else quota
    return max(1, cores or os.cpu_count() or 1)


def cgroup_cpu_quota(cgroup_root: Path = CGROUP_ROOT) -> int | None:
    """The CPU quota of the cgroup mounted at ``cgroup_root`` in whole CPUs (rounded up, at least 1); None: none.

    cgroup v2's ``cpu.max`` holds ``"<quota> <period>"`` in microseconds (``"max <period>"``: no limit); cgroup v1's
    ``cpu.cfs_quota_us`` and ``cpu.cfs_period_us`` hold them apart (a quota of -1: no limit)."""
    cpu_max = _read(cgroup_root / "cpu.max")
    if cpu_max is not None:
        quota, _, period = cpu_max.partition(" ")
        return None if quota == NO_QUOTA else _whole_cpus(quota, period)
    for name in CGROUP_V1_CPU_DIRS:
        quota_us = _read(cgroup_root / name / "cpu.cfs_quota_us")
        period_us = _read(cgroup_root / name / "cpu.cfs_period_us")
        if quota_us is not None and period_us is not None:
            return _whole_cpus(quota_us, period_us)
    return None


def _affinity_cores() -> int | None:
    if not hasattr(os, "sched_getaffinity"):  # macOS, Windows
        return None
    return len(os.sched_getaffinity(0))


def _whole_cpus(quota: str, period: str) -> int | None:
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:
        return None
    if quota_us <= 0 or period_us <= 0:
        return None
    return max(1, math.ceil(quota_us / period_us))


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
