"""Image indexes larger than the memory budget: the reader memory-maps the segments' inverted lists from the files
as the publish wrote them, and they answer exactly as when read into memory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

from indexer import _faiss_io
from indexer.store import PublishedIndex, verify
from indexer.store import segments as segments_module
from tests.indexer.test_index_choice import clustered
from tests.indexer.test_segments import DIM, Collection, unit

MAPPED = 0  # a memory budget that every segment file exceeds
IN_MEMORY = 1 << 40


@pytest.fixture
def ivf_collection(tmp_path: Path) -> Collection:
    """IVF segments with deletions: a trained segment and two added after it, some rows changed or deleted."""
    collection = Collection(tmp_path / "index")
    collection.add(3000, clustered(3000, seed=1, dim=DIM))
    collection.publish("IVF32,SQ8")
    for seed in (2, 3):
        collection.add(300, clustered(300, seed=seed, dim=DIM))
        paths = sorted(collection.vectors)
        collection.change(paths[seed * 10 : seed * 10 + 5])
        collection.delete(paths[seed * 100 : seed * 100 + 7])
        collection.publish()
    yield collection  # type: ignore[misc]
    collection.catalog.close()


def search_all(index: PublishedIndex, queries: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
    return [[(hit.id, hit.score) for hit in hits] for hits in index.search(queries, k)]


def test_segments_past_the_budget_are_memory_mapped_and_answer_exactly_as_in_memory(
    ivf_collection: Collection,
) -> None:
    queries = np.concatenate([clustered(50, seed=9, dim=DIM), unit(20, seed=10)])
    index_dir = ivf_collection.index_dir
    with (
        PublishedIndex.open(index_dir, memory_budget=MAPPED) as mapped,
        PublishedIndex.open(index_dir, memory_budget=IN_MEMORY) as in_memory,
    ):
        assert len(mapped.manifest.segments) == 3
        assert mapped.memory_mapped and not in_memory.memory_mapped
        assert all(_faiss_io.is_memory_mapped(s.index) for s in mapped._segments)
        lists = [faiss.downcast_InvertedLists(faiss.extract_index_ivf(s.index).invlists) for s in mapped._segments]
        assert all(isinstance(x, faiss.OnDiskInvertedLists) and x.prefetch_nthread == 0 for x in lists)
        assert not any(_faiss_io.is_memory_mapped(s.index) for s in in_memory._segments)
        assert search_all(mapped, queries, 10) == search_all(in_memory, queries, 10)
        assert search_all(mapped, queries[:2], 5000) == search_all(in_memory, queries[:2], 5000)  # deletions too
    assert verify(index_dir) == []


def test_without_a_budget_the_default_decides(ivf_collection: Collection, monkeypatch: pytest.MonkeyPatch) -> None:
    index_dir = ivf_collection.index_dir
    with PublishedIndex.open(index_dir) as index:
        assert index.manifest.memory_budget is None and not index.memory_mapped  # far below the default
    monkeypatch.setattr(segments_module, "DEFAULT_MEMORY_BUDGET", 1000)
    with PublishedIndex.open(index_dir) as index:
        assert index.memory_mapped
    assert verify(index_dir) == []


def test_an_index_without_plain_inverted_lists_is_read_into_memory(tmp_path: Path) -> None:
    collection = Collection(tmp_path / "index")
    collection.add(200)
    collection.publish("Flat")
    with PublishedIndex.open(collection.index_dir, memory_budget=MAPPED) as index:
        assert not index.memory_mapped
        assert len(index.search(unit(1, seed=5), 10)[0]) == 10
    collection.catalog.close()


_OPEN_AND_SEARCH = """
import sys
from pathlib import Path
import numpy as np
from indexer import _faiss_io

def anon_kb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:"))

before = anon_kb()
index = _faiss_io.read_index(Path(sys.argv[1]), mapped=sys.argv[2] == "mapped")
_faiss_io.set_search_params(index, {"nprobe": 16})
index.search(np.ones((4, index.d), dtype=np.float32) / np.sqrt(index.d), 10)
print(anon_kb() - before)
"""


def test_a_mapped_index_does_not_grow_the_process_anonymous_memory_by_its_size(tmp_path: Path) -> None:
    dim, n = 256, 100_000  # IVF16,Flat: 100 MB of vectors in the inverted lists
    vectors = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    faiss.normalize_L2(vectors)
    index = faiss.index_factory(dim, "IDMap2,IVF16,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(vectors[:4096])
    index.add_with_ids(vectors, np.arange(n, dtype=np.int64))
    path = tmp_path / "segment.faiss"
    faiss.write_index(index, str(path))
    grown_kb = {
        mode: int(
            subprocess.run(
                [sys.executable, "-c", _OPEN_AND_SEARCH, str(path), mode], check=True, capture_output=True, text=True
            ).stdout
        )
        for mode in ("mapped", "in_memory")
    }
    size_kb = path.stat().st_size // 1024
    assert grown_kb["in_memory"] > 0.9 * size_kb
    assert grown_kb["mapped"] < 0.2 * size_kb  # the id maps only
