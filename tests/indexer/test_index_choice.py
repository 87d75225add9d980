"""Choosing the index type by collection size: the rule, its memory budget, calibrated search parameters that
survive write/read, the recall recorded in the manifest and shown by ``info``, and collections too small to train.
No torch except the one CLI build test: clustered unit vectors from numpy."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import faiss
import numpy as np
import numpy.typing as npt
import pytest

from indexer import _faiss_io, index_choice
from indexer.cli import _bytes
from indexer.cli import main as cli_main
from indexer.index_choice import AUTO, FLAT_MAX_VECTORS, choose_index, estimated_bytes, ivf_lists
from indexer.store import Catalog, Manifest, ModelInfo, PublishedIndex, publish, verify

DIM = 32
CLUSTERS = 40
MODEL = ModelInfo("test-model", "cd" * 32, DIM, {"image_size": 32})
SMALL_FLAT_MAX = 1000  # flat threshold override: a few thousand vectors exercise the IVF path in well under 1 s


def clustered(n: int, seed: int, dim: int = DIM) -> npt.NDArray[np.float32]:
    """Unit vectors around CLUSTERS fixed centres (the same centres for every seed), like embeddings of a few
    topics: IVF lists are meaningful, unlike on uniform random vectors."""
    centres = np.random.default_rng(1234).standard_normal((CLUSTERS, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    vectors = centres[rng.integers(0, CLUSTERS, n)] + 0.7 * rng.standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def make_catalog(index_dir: Path, vectors: npt.NDArray[np.float32], prefix: str = "img") -> None:
    with Catalog.open(index_dir, create=True) as catalog:
        if catalog.model() is None:
            catalog.set_model(MODEL)
        with catalog.transaction():
            for i, vector in enumerate(vectors):
                catalog.add_image(f"{prefix}/{i:05d}.jpg", 100, 10**9 + i, f"{prefix}-{i}", 8, 8, vector)


def recall_at_10(index: PublishedIndex, vectors: npt.NDArray[np.float32], queries: npt.NDArray[np.float32]) -> float:
    """Recall@10 of ``index`` against brute force over ``vectors`` (catalog ids are row + 1)."""
    expected = np.argsort(-(queries @ vectors.T), axis=1)[:, :10] + 1
    found = index.search(queries, 10)
    overlaps = [len({h.id for h in hits} & set(row.tolist())) for hits, row in zip(found, expected, strict=True)]
    return float(np.mean(overlaps)) / 10


# --- the rule ---------------------------------------------------------------------------------------------------


def test_flat_up_to_the_threshold_then_ivf_sq8() -> None:
    assert choose_index(0, 512).factory == "IDMap2,Flat"
    assert choose_index(FLAT_MAX_VECTORS, 512).factory == "IDMap2,Flat"
    assert choose_index(FLAT_MAX_VECTORS, 512).search_params == {}
    above = choose_index(FLAT_MAX_VECTORS + 1, 512)
    assert above.factory == f"IDMap2,IVF{ivf_lists(FLAT_MAX_VECTORS + 1)},SQ8" and "nprobe" in above.search_params
    assert choose_index(1_000_000, 512).factory == "IDMap2,IVF2048,SQ8"
    assert choose_index(100_000, 512).factory == "IDMap2,IVF512,SQ8"
    assert choose_index(3000, DIM, flat_max_vectors=SMALL_FLAT_MAX).factory == "IDMap2,IVF64,SQ8"
    # too few vectors for IVF lists, but above an (overridden) flat threshold: exhaustive SQ8 codes
    assert choose_index(100, DIM, flat_max_vectors=10).factory == "IDMap2,SQ8"
    with pytest.raises(ValueError):
        choose_index(-1, 512)


@pytest.mark.parametrize("n", [624, 625, 1000, 5000, 20_001, 99_999, 1_000_000, 10**8])
def test_ivf_lists_are_powers_of_two_with_enough_training_points(n: int) -> None:
    nlist = ivf_lists(n)
    assert nlist & (nlist - 1) == 0 and index_choice.IVF_MIN_LISTS <= nlist <= index_choice.IVF_MAX_LISTS
    assert nlist * index_choice.IVF_MIN_POINTS_PER_LIST <= n
    assert nlist <= 2 * index_choice.IVF_LISTS_PER_SQRT_N * math.sqrt(n)
    assert ivf_lists(623) == 0


def test_memory_budget_picks_smaller_codes() -> None:
    n, dim = 1_000_000, 512
    sizes = {
        body: estimated_bytes(body, n, dim) for body in ("Flat", "IVF2048,SQ8", "IVF2048,SQ4", "IVF2048,PQ256x4fs")
    }
    assert sizes["Flat"] > 2 * 10**9 > sizes["IVF2048,SQ8"] > sizes["IVF2048,SQ4"] > sizes["IVF2048,PQ256x4fs"]
    assert choose_index(n, dim, 10**10).factory == "IDMap2,IVF2048,SQ8"  # a roomy budget changes nothing
    assert choose_index(n, dim, sizes["IVF2048,SQ8"]).factory == "IDMap2,IVF2048,SQ8"
    assert choose_index(n, dim, sizes["IVF2048,SQ8"] - 1).factory == "IDMap2,IVF2048,SQ6"
    assert choose_index(n, dim, sizes["IVF2048,SQ4"]).factory == "IDMap2,IVF2048,SQ4"
    assert choose_index(n, dim, 250 * 10**6).factory == "IDMap2,IVF2048,PQ256x4fs"
    on_disk = choose_index(n, dim, 10**6)  # nothing fits in memory: SQ8 codes, their lists memory-mapped
    assert on_disk.factory == "IDMap2,IVF2048,SQ8" and "memory-mapped" in on_disk.reason
    # a small collection whose Flat index exceeds the budget gets codes without lists, which train on any n
    assert choose_index(1000, dim, 10**6).factory == "IDMap2,SQ8"
    assert choose_index(5, dim, 1).factory == "IDMap2,SQ4"  # PQ would need more training points than vectors
    assert choose_index(1000, dim, 3 * 10**6).factory == "IDMap2,Flat"


# --- publish ----------------------------------------------------------------------------------------------------


def test_publish_above_the_flat_threshold_builds_a_calibrated_ivf(tmp_path: Path) -> None:
    index_dir = tmp_path / "index"
    vectors = clustered(3000, seed=1)
    make_catalog(index_dir, vectors)
    with Catalog.open(index_dir) as catalog:
        manifest = publish(index_dir, catalog, flat_max_vectors=SMALL_FLAT_MAX)
        assert catalog.factory() == AUTO  # the request is remembered, not the choice: it is re-made next time
    assert manifest.factory == "IDMap2,IVF64,SQ8" and manifest.requested_factory == AUTO
    assert set(manifest.search_params) == {"nprobe"} and manifest.recall_queries == index_choice.RECALL_QUERIES
    assert manifest.recall_at_10 is not None and manifest.recall_at_10 >= 0.95
    with PublishedIndex.open(index_dir) as index:
        assert index.manifest == manifest
        assert _faiss_io.get_search_params(index._segments[0].index) == manifest.search_params
        assert recall_at_10(index, vectors, clustered(300, seed=99)) >= 0.95  # fresh queries, not the calibration's
        np.testing.assert_array_equal(index.embedding(7), vectors[6])  # lossy codes: the catalog's exact vector
    # the parameters are in the index file itself too, so any FAISS reader gets them
    saved = faiss.read_index(str(index_dir / "segments" / manifest.segments[0]["file"]))
    assert _faiss_io.get_search_params(saved) == manifest.search_params
    assert verify(index_dir) == []


def test_calibration_raises_nprobe_until_the_target_and_a_manifest_value_wins_on_load(tmp_path: Path) -> None:
    index_dir = tmp_path / "index"
    vectors = clustered(3000, seed=2)
    make_catalog(index_dir, vectors)
    with Catalog.open(index_dir) as catalog:
        manifest = publish(index_dir, catalog, "IVF64,Flat")  # an explicit IVF factory gets calibrated too
    assert manifest.factory == "IDMap2,IVF64,Flat" and manifest.requested_factory == "IDMap2,IVF64,Flat"
    nprobe = manifest.search_params["nprobe"]
    assert manifest.recall_at_10 is not None and manifest.recall_at_10 >= 0.96
    if nprobe > 1:  # the previous rung of the ladder did not reach the target
        ids = np.arange(1, 3001, dtype=np.int64)
        index = faiss.read_index(str(index_dir / "segments" / manifest.segments[0]["file"]))
        lower = max(v for v in index_choice.KNOB_LADDER if v < nprobe)
        _faiss_io.set_search_params(index, {"nprobe": lower})
        queries = index_choice.recall_queries(vectors)
        kth = index_choice.exact_kth_scores(vectors, queries, 10)
        assert index_choice.measure_recall(index, ids, vectors, queries, kth, 10) < 0.96
    # the manifest is what the server is told to use: a generation whose manifest says nprobe=64 serves with it
    generation = index_dir / "generations" / manifest.generation
    data = json.loads((generation / "manifest.json").read_text())
    data["search_params"] = {"nprobe": 64}
    (generation / "manifest.json").write_text(json.dumps(data))
    with PublishedIndex.open(index_dir) as index:
        assert _faiss_io.get_search_params(index._segments[0].index) == {"nprobe": 64}
    assert any("search parameters" in problem for problem in verify(index_dir))


def test_flat_reports_exact_recall_and_hnsw_is_measured(tmp_path: Path) -> None:
    vectors = clustered(800, seed=3)
    make_catalog(tmp_path / "flat", vectors)
    with Catalog.open(tmp_path / "flat") as catalog:
        flat = publish(tmp_path / "flat", catalog)
    assert (flat.factory, flat.recall_at_10, flat.recall_queries, flat.search_params) == ("IDMap2,Flat", 1.0, 0, {})
    make_catalog(tmp_path / "hnsw", vectors)
    with Catalog.open(tmp_path / "hnsw") as catalog:
        hnsw = publish(tmp_path / "hnsw", catalog, "HNSW16,Flat")
    assert hnsw.search_params["efSearch"] >= _faiss_io.HNSW_EF_SEARCH  # the floor that keeps k=100 searches whole
    assert hnsw.recall_at_10 is not None and hnsw.recall_at_10 >= 0.95 and hnsw.recall_queries == 200


@pytest.mark.parametrize("n", [0, 1, 10])
@pytest.mark.parametrize("flat_max", [FLAT_MAX_VECTORS, 0])
def test_small_collections_always_publish(tmp_path: Path, n: int, flat_max: int) -> None:
    index_dir = tmp_path / "index"
    vectors = clustered(n, seed=4)
    make_catalog(index_dir, vectors)
    with Catalog.open(index_dir) as catalog:
        manifest = publish(index_dir, catalog, flat_max_vectors=flat_max)
    assert manifest.counts["images"] == n
    assert manifest.factory == ("IDMap2,Flat" if n == 0 or flat_max else "IDMap2,SQ8")
    assert manifest.recall_at_10 == (None if n == 0 else pytest.approx(1.0))
    with PublishedIndex.open(index_dir) as index:
        hits = index.search(clustered(2, seed=5), 10)
        assert [len(row) for row in hits] == [min(n, 10)] * 2
    assert verify(index_dir) == []


def test_a_growing_collection_switches_type_and_a_budget_is_remembered(tmp_path: Path) -> None:
    index_dir = tmp_path / "index"
    make_catalog(index_dir, clustered(500, seed=6))
    with Catalog.open(index_dir) as catalog:
        assert publish(index_dir, catalog, flat_max_vectors=SMALL_FLAT_MAX).factory == "IDMap2,Flat"
    make_catalog(index_dir, clustered(2500, seed=7), prefix="more")
    with Catalog.open(index_dir) as catalog:
        grown = publish(index_dir, catalog, flat_max_vectors=SMALL_FLAT_MAX)
        assert grown.factory == "IDMap2,IVF64,SQ8" and grown.counts["images"] == 3000
        budget = estimated_bytes("IVF64,SQ8", 3000, DIM) - 1
        tight = publish(index_dir, catalog, memory_budget=budget, flat_max_vectors=SMALL_FLAT_MAX)
        assert tight.factory == "IDMap2,IVF64,SQ6" and tight.memory_budget == budget
        assert catalog.memory_budget() == budget
        assert publish(index_dir, catalog, flat_max_vectors=SMALL_FLAT_MAX).factory == "IDMap2,IVF64,SQ6"
        cleared = publish(index_dir, catalog, memory_budget=0, flat_max_vectors=SMALL_FLAT_MAX)
        assert cleared.factory == "IDMap2,IVF64,SQ8" and cleared.memory_budget is None
        assert catalog.memory_budget() is None
        explicit = publish(index_dir, catalog, "IVF32,Flat")
        assert explicit.factory == "IDMap2,IVF32,Flat" and catalog.factory() == "IDMap2,IVF32,Flat"
        assert publish(index_dir, catalog).factory == "IDMap2,IVF32,Flat"  # an explicit factory always wins
        assert publish(index_dir, catalog, "auto").factory == "IDMap2,Flat"  # default threshold: 3000 is small


def test_catalogs_and_manifests_from_before_the_choice_still_read(tmp_path: Path) -> None:
    index_dir = tmp_path / "index"
    make_catalog(index_dir, clustered(50, seed=8))
    with Catalog.open(index_dir) as catalog:
        manifest = publish(index_dir, catalog)
        catalog._conn.execute("DELETE FROM meta WHERE key = 'index_type'")
        catalog._set_meta({"factory": "IDMap2,Flat"})  # what every catalog recorded before: the old default
        assert catalog.factory() == AUTO
        catalog._set_meta({"factory": "IDMap2,HNSW32,Flat"})  # somebody chose this one
        assert catalog.factory() == "IDMap2,HNSW32,Flat"
    old = json.loads(manifest.to_json())
    for key in (
        "requested_factory",
        "memory_budget",
        "index_reason",
        "search_params",
        "recall_at_10",
        "recall_queries",
    ):
        del old[key]
    parsed = Manifest.from_json(json.dumps(old), tmp_path / "manifest.json")
    assert parsed.search_params == {} and parsed.recall_at_10 is None and parsed.requested_factory == ""


def test_the_blas_threshold_is_lowered_on_import() -> None:
    assert faiss.cvar.distance_compute_blas_threshold == _faiss_io.BLAS_THRESHOLD_FLOATS < 128_000


def test_measured_recall_counts_duplicates_as_found() -> None:
    vectors = np.repeat(clustered(20, seed=9), 3, axis=0)  # every vector three times: ties at every rank
    ids = np.arange(1, 61, dtype=np.int64)
    index = _faiss_io.build_index(ids, vectors, DIM, "Flat")
    queries = index_choice.recall_queries(vectors, 30)
    kth = index_choice.exact_kth_scores(vectors, queries, 10)
    assert index_choice.measure_recall(index, ids, vectors, queries, kth, 10) == pytest.approx(1.0)


# --- CLI --------------------------------------------------------------------------------------------------------


def test_info_shows_the_index_type_and_its_recall(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    index_dir = tmp_path / "index"
    make_catalog(index_dir, clustered(3000, seed=10))
    with Catalog.open(index_dir) as catalog:
        manifest = publish(index_dir, catalog, flat_max_vectors=SMALL_FLAT_MAX)
    assert cli_main(["info", "--index-dir", str(index_dir)]) == 0
    text = capsys.readouterr().out
    assert f"factory: {manifest.factory}" in text and "index type: auto" in text
    assert f"search parameters: nprobe={manifest.search_params['nprobe']}" in text
    assert f"recall@10: {manifest.recall_at_10:.3f} against exact search" in text and "200 queries" in text
    assert cli_main(["info", "--index-dir", str(index_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["recall_at_10"], info["search_params"]) == (manifest.recall_at_10, manifest.search_params)
    with Catalog.open(index_dir) as catalog:
        publish(index_dir, catalog, "auto")
    assert cli_main(["info", "--index-dir", str(index_dir)]) == 0
    assert "recall@10: 1.000 (exact search)" in capsys.readouterr().out


def test_cli_changing_the_index_type_republishes_an_unchanged_folder(tiny_model: Path, tmp_path: Path) -> None:
    from tests.indexer.conftest import write_photos

    root, index_dir = tmp_path / "photos", tmp_path / "index"
    write_photos(root, 3)
    args = [str(root), "--index-dir", str(index_dir), "--model", str(tiny_model), "--workers", "0"]
    assert cli_main(["build", *args]) == 0
    with PublishedIndex.open(index_dir) as index:
        assert (index.manifest.factory, index.manifest.requested_factory) == ("IDMap2,Flat", AUTO)
        first = index.manifest.generation
    assert cli_main(["build", *args]) == 0  # nothing changed: the published generation stays
    assert cli_main(["build", *args, "--factory", "HNSW8,Flat"]) == 0
    with PublishedIndex.open(index_dir) as index:
        assert index.manifest.factory == "IDMap2,HNSW8,Flat" and index.manifest.generation != first
        second = index.manifest.generation
    assert cli_main(["build", *args]) == 0  # remembered: no republish
    assert cli_main(["build", *args, "--memory-budget", "1K"]) == 0  # a budget only matters for auto
    with PublishedIndex.open(index_dir) as index:
        assert index.manifest.generation == second
    assert cli_main(["build", *args, "--factory", "auto", "--memory-budget", "100"]) == 0
    with PublishedIndex.open(index_dir) as index:  # nothing fits 100 bytes: the smallest codes that train on 3
        assert index.manifest.factory == "IDMap2,SQ4" and index.manifest.memory_budget == 100
        assert "no index type fits" in index.manifest.index_reason


def test_memory_budget_sizes_parse() -> None:
    assert [_bytes(t) for t in ("0", "1000", "512M", "4G", "1.5g", "2GiB", "64kb")] == [
        0, 1000, 512 * 2**20, 4 * 2**30, int(1.5 * 2**30), 2 * 2**30, 64 * 2**10,
    ]  # fmt: skip
    for bad in ("", "lots", "-1G"):
        with pytest.raises(argparse.ArgumentTypeError):
            _bytes(bad)


def test_auto_falls_back_to_flat_when_ivf_would_scan_most_lists(tmp_path: Path) -> None:
    dim = 64  # uniform random unit vectors: no clusters, so IVF needs most of its lists for the recall target
    vectors = np.random.default_rng(11).standard_normal((3000, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(1, 3001, dtype=np.int64)
    ivf = index_choice.build_calibrated(ids, vectors, dim, "IVF64,SQ8")  # not auto: kept, however many probes
    assert ivf.factory == "IVF64,SQ8" and ivf.calibration.search_params["nprobe"] > 32 and ivf.note == ""
    index_dir = tmp_path / "index"
    with Catalog.open(index_dir, create=True) as catalog:
        catalog.set_model(ModelInfo(MODEL.name, MODEL.weights_sha256, dim, MODEL.preprocess))
        with catalog.transaction():
            for i, vector in enumerate(vectors):
                catalog.add_image(f"u/{i:05d}.jpg", 100, 10**9 + i, f"u-{i}", 8, 8, vector)
        manifest = publish(index_dir, catalog, flat_max_vectors=SMALL_FLAT_MAX)
        assert manifest.factory == "IDMap2,Flat" and manifest.recall_at_10 == 1.0
        assert "without cluster structure" in manifest.index_reason
        budget = estimated_bytes("Flat", 3000, dim) - 1  # Flat does not fit: the IVF stays, with many probes
        assert (
            publish(index_dir, catalog, memory_budget=budget, flat_max_vectors=SMALL_FLAT_MAX).factory != "IDMap2,Flat"
        )
