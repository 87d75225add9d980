"""Process-wide thread state belongs to the process: running the indexer and starting and stopping the server in one
process, several times, leaves torch's and FAISS's defaults as they were (style C17: one owner, restored)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import NamedTuple

import faiss
import numpy as np
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from app.settings import Settings
from clip_model.process_tuning import ThreadPlan
from clip_model.process_tuning.threads import default_thread_count, run_in_fresh_thread
from indexer.build import BuildOptions, build_index
from tests.support import save_tiny_model

ROUNDS = 3  # server and indexer runs in the one process
PHOTOS_PER_ROUND = 3


class ThreadDefaults(NamedTuple):
    torch_default: int  # torch's count as a thread that has not run torch yet sees it
    torch_own: int  # the calling thread's own torch count
    torch_interop: int
    faiss_default: int  # FAISS's OpenMP count as a new thread sees it


def thread_defaults() -> ThreadDefaults:
    return ThreadDefaults(
        torch_default=default_thread_count(),
        torch_own=torch.get_num_threads(),
        torch_interop=torch.get_num_interop_threads(),
        faiss_default=run_in_fresh_thread(faiss.omp_get_max_threads, name="faiss-default-probe"),
    )


def write_photos(root: Path, first: int, count: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for seed in range(first, first + count):
        blocks = np.random.default_rng(seed).integers(0, 256, size=(4, 6, 3), dtype=np.uint8)
        pixels = np.kron(blocks, np.ones((16, 16, 1), dtype=np.uint8))
        Image.fromarray(pixels).save(root / f"photo_{seed:03d}.jpg", quality=90)


def test_indexer_and_server_runs_leave_the_process_thread_defaults_as_they_were(tmp_path: Path) -> None:
    model = save_tiny_model(tmp_path / "tiny.safetensors", seed=0)
    root, index_dir = tmp_path / "photos", tmp_path / "index"
    settings = Settings(index_dir=index_dir, cache_dir=tmp_path / "cache")
    before = thread_defaults()
    for round_ in range(ROUNDS):
        write_photos(root, round_ * PHOTOS_PER_ROUND, PHOTOS_PER_ROUND)  # new files: each run encodes
        stats = build_index(
            BuildOptions(root, index_dir, str(model), plan=ThreadPlan.for_indexing(workers=0), batch_size=2)
        )
        assert stats.encoded == PHOTOS_PER_ROUND
        with TestClient(create_app(settings, watch=False)) as client:
            response = client.get("/api/search", params={"q": "a photo", "k": 5})
            assert response.status_code == 200 and response.json()["results"]
        assert thread_defaults() == before, f"after round {round_ + 1}"


THREAD_CALLS = {"set_num_threads", "set_num_interop_threads", "omp_set_num_threads"}
THREAD_OWNER = Path("clip_model/process_tuning/threads.py")
CORES_OWNER = Path("clip_model/process_tuning/cores.py")
ROOT = Path(__file__).resolve().parents[1]


def calls_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return {
        node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
    }


def test_one_module_sets_thread_counts_and_one_counts_the_cores() -> None:
    """The bench may record the machine's CPU count as a fact about the machine; it sets no count of its own."""
    offenders = []
    for package in ("clip_model", "indexer", "app", "bench"):
        for path in sorted((ROOT / package).rglob("*.py")):
            relative, calls = path.relative_to(ROOT), calls_in(path)
            if relative != THREAD_OWNER and calls & THREAD_CALLS:
                offenders.append(f"{relative}: {sorted(calls & THREAD_CALLS)}")
            if package != "bench" and relative != CORES_OWNER and {"cpu_count", "sched_getaffinity"} & calls:
                offenders.append(f"{relative}: counts CPUs")
    assert offenders == []
