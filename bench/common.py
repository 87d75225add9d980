"""What the benchmark members share: the machine's description, summaries of repeated measurements and their
"median (min-max)" text, the names and writing of result files, and readings of a process's memory.

Only the standard library is imported here at module level, so a member can still time its own imports of torch,
FAISS and the project.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
RECORDED_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX", "OMP_NUM_THREADS")


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory, library versions and the allocator/OpenMP environment of this process."""
    import faiss
    import numpy as np
    import PIL
    import torch

    cpu = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo", encoding="utf-8") as info:
        mem_kb = int(info.readline().split()[1])
    return {
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "memory_gb": mem_kb / 2**20,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "faiss": faiss.__version__,
        "platform": platform.platform(),
        "env": {name: os.environ[name] for name in RECORDED_ENV if name in os.environ},
    }


def new_results() -> dict[str, Any]:
    """The start of a member's results: the date and time of the run and :func:`machine_info`."""
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine_info()}


def summary(values: Sequence[float]) -> dict[str, Any]:
    """Repeated measurements as their median, min, max and the values themselves (``runs``)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": list(values)}


def median_min_max(stats: Mapping[str, Any], fmt: str = ".2f") -> str:
    """A :func:`summary` as text, ``"median (min-max)"``, each number in ``fmt``: ``"12.30 (11.95-12.41)"``."""
    return f"{stats['median']:{fmt}} ({stats['min']:{fmt}}-{stats['max']:{fmt}})"


def results_file(member: str, *tags: str, out: Path | None = None, folder: Path = RESULTS_DIR) -> Path:
    """``out`` if given, else ``folder/<member>-<today>[-<tag>...].json`` (empty tags left out)."""
    if out is not None:
        return out
    return folder / ("-".join(filter(None, [member, datetime.date.today().isoformat(), *tags])) + ".json")


def write_json(path: Path, results: Mapping[str, Any]) -> None:
    """``results`` as indented JSON at ``path`` (its folder created if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


def fill_unset(args: argparse.Namespace, defaults: Mapping[str, Any]) -> None:
    """Set each option of ``defaults`` that the command line left as None (sizes that depend on ``--smoke``)."""
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


@contextlib.contextmanager
def workdir_or_temporary(workdir: Path | None, prefix: str) -> Iterator[Path]:
    """``workdir`` (created if missing) as an absolute path, or a temporary directory removed at the end."""
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir.resolve()
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def proc_status_kb(pid: int | str, key: str) -> int:
    """A ``/proc/<pid>/status`` field in kB (``VmRSS``, ``VmHWM``; pid ``"self"`` for this process), 0 once the
    process is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8", errors="replace") as status:
            for line in status:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0
