"""clip-index encode without Ray: the partition rule, the local engine's shards, resuming, incremental runs against an
index, stale shards, build through shards, the decode workers an encoder keeps, and the CLI (the Ray engine's
checks that need no cluster included)."""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from clip_model.process_tuning import ThreadPlan
from indexer import ray_engine
from indexer.build import BuildOptions, build_index
from indexer.cli import main as cli_main
from indexer.decode import DecodeFailure
from indexer.encode import (
    ENCODE_SHARDS_DIR,
    EncodeOptions,
    build_on_engine,
    encode_folder,
    shard_file,
)
from indexer.errors import IndexerError, ModelMismatchError, ShardError
from indexer.ingest import IngestOptions, ingest
from indexer.partition_encoder import EncodeJob, LocalEngine, Work, WorkRows
from indexer.partitions import MAX_FACTOR, Partition, partition_name, split
from indexer.pipeline import DecodeWorkers, encode_files
from indexer.ray_engine import INSTALL_HINT, PartitionActor, RayEngine, RaySettings, actor_device
from indexer.report import index_info
from indexer.scan import PassedOver, ScannedFile, iter_images
from indexer.shards import list_shards
from indexer.store import Catalog, ModelInfo
from tests.indexer.conftest import write_photo, write_photos
from tests.indexer.encoding_checks import (
    UNINDEXABLE,
    image_folder,
    index_vectors,
    max_vector_difference,
    search_by_path,
    shard_rows,
)

IN_PROCESS = ThreadPlan.for_indexing(workers=0)  # decoding in the test's own process
TOLERANCE = 1e-6  # max abs difference between two engines' vectors (fp32 on the CPU)


def entries(count: int, prefix: str = "d/img_") -> list[ScannedFile | PassedOver]:
    return [ScannedFile(f"{prefix}{n:05d}.jpg", 1000 + n, 1_700_000_000_000_000_000 + n) for n in range(count)]


def paths_of(partition: Partition) -> list[str]:
    return sorted([*(f.path for f in partition.files), *(e.path for e in partition.passed)])


# --- the partition rule -----------------------------------------------------------------------------------------------


def test_partitions_cover_every_entry_once_in_path_order_and_the_same_on_every_run() -> None:
    listing = entries(3000) + [PassedOver("d/link.jpg", 10, 20, "dangling symlink: its target x does not exist")]
    shuffled = random.Random(0).sample(listing, len(listing))

    partitions = split(listing, size=100)

    assert [p.name for p in split(shuffled, size=100)] == [p.name for p in partitions]
    assert [path for p in partitions for path in paths_of(p)] == sorted(entry.path for entry in listing)
    assert all(1 <= len(p) <= MAX_FACTOR * 100 for p in partitions)
    assert 0.7 < len(listing) / len(partitions) / 100 < 1.3  # about the size asked for
    assert len({p.name for p in partitions}) == len(partitions)
    [with_link] = [p for p in partitions if p.passed]
    assert with_link.passed[0].path == "d/link.jpg"


def test_a_new_file_changes_only_the_partitions_around_it() -> None:
    listing = entries(3000)
    before = {p.name for p in split(listing, size=100)}
    after = split([*listing, ScannedFile("d/img_01500x.jpg", 5, 5)], size=100)

    changed = [p for p in after if p.name not in before]
    assert 1 <= len(changed) <= 2
    assert any(f.path == "d/img_01500x.jpg" for p in changed for f in p.files)


def test_a_partition_is_named_by_every_fact_of_its_entries() -> None:
    file = ScannedFile("a.jpg", 10, 20)
    names = {
        partition_name([file]),
        partition_name([dataclasses.replace(file, size=11)]),
        partition_name([dataclasses.replace(file, mtime_ns=21)]),
        partition_name([dataclasses.replace(file, path="b.jpg")]),
        partition_name([PassedOver("a.jpg", 10, 20, "not a regular file: a FIFO")]),
        partition_name([file, ScannedFile("b.jpg", 1, 1)]),
    }
    assert len(names) == 6


def test_split_refuses_a_path_twice_and_a_size_below_one() -> None:
    with pytest.raises(ValueError, match="twice"):
        split([ScannedFile("a.jpg", 1, 1), ScannedFile("a.jpg", 2, 2)], size=10)
    with pytest.raises(ValueError, match="at least 1"):
        split(entries(3), size=0)
    assert [len(p) for p in split(entries(3), size=1)] == [1, 1, 1]


# --- the local engine -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def built(folder: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``folder`` indexed by the local build."""
    index_dir = tmp_path_factory.mktemp("built") / "index"
    build_index(BuildOptions(root=folder, index_dir=index_dir, model=str(tiny_model), plan=IN_PROCESS))
    return index_dir


def encode(root: Path, out: Path, model: Path, engine: Any = None, **options: Any) -> Any:
    return encode_folder(EncodeOptions(root, out, str(model), **options), engine or LocalEngine(IN_PROCESS))


def test_the_local_engine_writes_each_file_once_with_the_builds_vectors_and_reasons(
    folder: Path, built: Path, tiny_model: Path, tmp_path: Path
) -> None:
    result = encode(folder, tmp_path / "shards", tiny_model, partition_size=4)

    rows = shard_rows(tmp_path / "shards")
    scanned = {f.path for f in iter_images(folder)} | set(UNINDEXABLE)
    assert rows.keys() == scanned
    for path, category in UNINDEXABLE.items():
        assert rows[path][5].startswith(category + ":") or rows[path][5] == category
    stats = result.stats
    assert stats.shards == stats.partitions == len(list_shards(tmp_path / "shards")) > 1
    assert stats.encoded == len(scanned) - len(UNINDEXABLE) and stats.skipped == len(UNINDEXABLE)
    from_shards = {path: row[6] if row[5] is None else row[5] for path, row in rows.items()}
    assert max_vector_difference(from_shards, index_vectors(built)) <= TOLERANCE


def test_ingesting_the_shards_gives_the_builds_index_and_info_shows_the_skipped_files(
    folder: Path, built: Path, tiny_model: Path, tmp_path: Path
) -> None:
    encode(folder, tmp_path / "shards", tiny_model, partition_size=5)
    ingest(IngestOptions(tmp_path / "shards", tmp_path / "index"))

    assert max_vector_difference(index_vectors(tmp_path / "index"), index_vectors(built)) <= TOLERANCE
    queries = np.stack([v for v in index_vectors(built).values() if not isinstance(v, str)][:5])
    assert search_by_path(tmp_path / "index", queries) == search_by_path(built, queries)
    info = index_info(tmp_path / "index")
    assert info["images_skipped"] == len(UNINDEXABLE)
    assert {path for path, _ in info["skipped_files"]} == set(UNINDEXABLE)
    assert photo_formats(tmp_path / "index") == photo_formats(built) and photo_formats(built)  # metadata came along


def photo_formats(index_dir: Path) -> dict[str, str | None]:
    """path -> the format its photo metadata records, for the index's ok images."""
    with Catalog.open(index_dir, readonly=True) as catalog:
        files = {r.path: r.content_hash for r in catalog.files().values() if r.status == "ok" and r.content_hash}
        found = catalog.photos.of(list(files.values()))
    return {path: found[digest].format for path, digest in files.items() if digest in found}


class Interrupting:
    """The local engine, interrupted (as by Ctrl-C) once ``after`` partitions have come back."""

    name = "local"

    def __init__(self, after: int) -> None:
        self.engine, self.after = LocalEngine(IN_PROCESS), after

    def start(self, job: EncodeJob) -> ModelInfo:
        return self.engine.start(job)

    def run(self, works: Sequence[Work], reusable: frozenset[str]) -> Iterator[WorkRows]:
        for number, rows in enumerate(self.engine.run(works, reusable)):
            if number == self.after:
                raise KeyboardInterrupt
            yield rows

    def describe(self) -> str:
        return "interrupting " + self.engine.describe()

    def close(self) -> None:
        self.engine.close()


def test_a_rerun_after_an_interruption_writes_only_the_missing_partitions(
    folder: Path, tiny_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "shards"
    with pytest.raises(KeyboardInterrupt):
        encode(folder, out, tiny_model, Interrupting(after=3), partition_size=3)
    first = {path.name: path.stat().st_mtime_ns for path in list_shards(out)}
    assert len(first) >= 3

    stats = encode(folder, out, tiny_model, partition_size=3).stats

    assert stats.partitions_before == len(first) and stats.shards == stats.partitions - len(first) > 0
    assert {path.name: path.stat().st_mtime_ns for path in list_shards(out) if path.name in first} == first
    assert shard_rows(out).keys() == {f.path for f in iter_images(folder)} | set(UNINDEXABLE)  # each file once
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]
    again = encode(folder, out, tiny_model, partition_size=3).stats
    assert again.shards == 0 and again.partitions_before == again.partitions


def test_an_incremental_run_encodes_only_what_the_index_does_not_hold(tiny_model: Path, tmp_path: Path) -> None:
    root = image_folder(tmp_path / "images", photos=12)
    index_dir = tmp_path / "index"
    build_index(BuildOptions(root=root, index_dir=index_dir, model=str(tiny_model), plan=IN_PROCESS))
    write_photo(root / "photo_00000.jpg", seed=500)  # changed content
    os.utime(root / "photo_00001.jpg", ns=(1, 1_600_000_000_000_000_000))  # touched: same content, other mtime
    write_photo(root / "new.jpg", seed=501)  # new
    os.rename(root / "photo_00002.jpg", root / "trip" / "moved.jpg")  # moved: its vector is the index's

    result = encode(root, tmp_path / "shards", tiny_model, index_dir=index_dir)

    rows = shard_rows(tmp_path / "shards")
    assert rows.keys() == {"photo_00000.jpg", "photo_00001.jpg", "new.jpg", "trip/moved.jpg"}
    assert (result.stats.encoded, result.stats.reused) == (2, 2)
    assert result.stats.unchanged == result.stats.scanned - 4
    assert set(result.vanished) == {"photo_00002.jpg"}
    held = index_vectors(index_dir)
    assert np.array_equal(rows["photo_00001.jpg"][6], held["photo_00001.jpg"])
    assert np.array_equal(rows["trip/moved.jpg"][6], held["photo_00002.jpg"])

    ingest(IngestOptions(tmp_path / "shards", index_dir))  # then the index holds it all, and a rerun has no work
    again = encode(root, tmp_path / "again", tiny_model, index_dir=index_dir).stats
    assert (again.partitions, again.encoded) == (0, 0)


def test_an_incremental_run_refuses_an_index_of_other_weights(
    folder: Path, built: Path, other_tiny_model: Path, tmp_path: Path
) -> None:
    with pytest.raises(ModelMismatchError, match="leave out --index-dir"):
        encode(folder, tmp_path / "shards", other_tiny_model, index_dir=built)
    with pytest.raises(IndexerError, match="holds no index"):
        encode(folder, tmp_path / "shards", other_tiny_model, index_dir=tmp_path / "nothing")


def test_shards_of_another_listing_are_refused_unless_the_index_ingested_them(tiny_model: Path, tmp_path: Path) -> None:
    root = image_folder(tmp_path / "images", photos=6)
    out, index_dir = tmp_path / "shards", tmp_path / "index"
    encode(root, out, tiny_model)
    write_photo(root / "late.jpg", seed=77)  # the listing changes: the old shard names no partition now

    with pytest.raises(ShardError, match="no partition of this listing"):
        encode(root, out, tiny_model)

    ingest(IngestOptions(out, index_dir))  # once ingested, it is finished business for a run against that index
    stats = encode(root, out, tiny_model, index_dir=index_dir).stats
    assert stats.shards == 1 and stats.encoded == 1
    replaced = encode(root, tmp_path / "shards", tiny_model, replace_stale=True).stats
    assert replaced.stale_removed == 2 and shard_rows(out).keys() == {f.path for f in iter_images(root)} | set(
        UNINDEXABLE
    )


def test_a_shards_directory_of_another_folder_is_refused(folder: Path, tiny_model: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    write_photos(other, 2)
    encode(folder, tmp_path / "shards", tiny_model)
    with pytest.raises(ShardError, match="use another directory"):
        encode(other, tmp_path / "shards", tiny_model)


def test_build_on_an_engine_ingests_deletes_what_vanished_and_removes_its_shards(
    tiny_model: Path, tmp_path: Path
) -> None:
    root = image_folder(tmp_path / "images", photos=10)
    local, through = tmp_path / "local", tmp_path / "through"
    options = BuildOptions(root=root, index_dir=local, model=str(tiny_model), plan=IN_PROCESS)
    build_index(options)
    build_on_engine(dataclasses.replace(options, index_dir=through), LocalEngine(IN_PROCESS), partition_size=4)
    (root / "photo_00003.jpg").unlink()
    write_photo(root / "photo_00004.jpg", seed=404)
    build_index(options)

    stats = build_on_engine(dataclasses.replace(options, index_dir=through), LocalEngine(IN_PROCESS), 4)

    assert (stats.deleted, stats.encode.encoded, stats.ingest.modified) == (1, 1, 1)
    assert max_vector_difference(index_vectors(through), index_vectors(local)) <= TOLERANCE
    assert not (through / ENCODE_SHARDS_DIR).exists()
    with pytest.raises(IndexerError, match="--retrain"):
        build_on_engine(dataclasses.replace(options, index_dir=through, retrain=True), LocalEngine(IN_PROCESS))


# --- the decode workers an encoder keeps ------------------------------------------------------------------------------


def mean_encoder(batch: np.ndarray) -> np.ndarray:
    vectors = batch.mean(axis=(2, 3)).astype(np.float32)  # [B, 3]
    normalized: np.ndarray = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return normalized


@pytest.fixture(scope="module")
def decode_spec(tiny_model: Path) -> Any:
    from indexer.build import load_model

    return load_model(str(tiny_model)).decode_spec(draft=True)


def test_kept_decode_workers_serve_every_call(decode_spec: Any, tmp_path: Path) -> None:
    write_photos(tmp_path, 6)
    files = list(iter_images(tmp_path))
    kept = DecodeWorkers(1)
    try:
        first = list(encode_files(tmp_path, files[:3], decode_spec, mean_encoder, workers=0, batch_size=2, kept=kept))
        pool = kept.pool()
        second = list(encode_files(tmp_path, files[3:], decode_spec, mean_encoder, workers=0, batch_size=2, kept=kept))
        assert kept.pool() is pool and len(first) == len(second) == 3  # the same processes served both calls
    finally:
        kept.close()


@pytest.mark.slow  # the files in flight when the worker died are decoded again one process each: seconds
def test_kept_decode_workers_are_replaced_after_one_dies(decode_spec: Any, tmp_path: Path) -> None:
    write_photos(tmp_path, 4)
    (tmp_path / "poison.jpg").write_bytes(b"crash")
    files = list(iter_images(tmp_path))
    kept = DecodeWorkers(1)
    try:
        pool = kept.pool()
        results = list(
            encode_files(
                tmp_path, files, decode_spec, mean_encoder, workers=0, batch_size=1, kept=kept, decode=crash_on
            )
        )
        assert sorted(r.path for r in results if isinstance(r, DecodeFailure)) == ["poison.jpg"]
        assert len(results) == len(files) and kept.pool() is not pool  # a new pool after the crash
    finally:
        kept.close()


def crash_on(root: Path, scanned: ScannedFile, spec: Any) -> Any:
    """``decode_file``, but the process dies on a file named poison.jpg (as a decoder segfault would end it)."""
    from indexer.decode import decode_file

    if scanned.path == "poison.jpg":
        os._exit(1)
    return decode_file(root, scanned, spec)


# --- the Ray engine's checks that need no cluster ---------------------------------------------------------------------


class FakeRay:
    """What RayEngine reads of a cluster: its nodes' resources."""

    def __init__(self, *nodes: dict[str, float]) -> None:
        self._nodes = [{"Alive": True, "Resources": node} for node in nodes]

    def nodes(self) -> list[dict[str, Any]]:
        return self._nodes


@pytest.mark.parametrize(
    ("settings", "nodes", "expected"),
    [
        (RaySettings(), [{"CPU": 2.0}, {"CPU": 3.0}], 5),
        (RaySettings(cpus_per_worker=2), [{"CPU": 3.0}, {"CPU": 3.0}], 2),  # a worker lives on one node
        (RaySettings(workers=3), [{"CPU": 4.0}], 3),
        (RaySettings(workers=5), [{"CPU": 4.0}], "holds 4 worker"),
        (RaySettings(cpus_per_worker=8), [{"CPU": 4.0}], "the largest has 4"),
        (RaySettings(gpus_per_worker=0.5), [{"CPU": 8.0}], "has no GPUs"),
        (RaySettings(gpus_per_worker=1), [{"CPU": 8.0, "GPU": 2.0}], 2),  # one actor a GPU
        (RaySettings(gpus_per_worker=0.5), [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}], 3),
    ],
)
def test_the_ray_engine_sizes_its_pool_to_the_cluster_or_says_why_not(
    settings: RaySettings, nodes: list[dict[str, float]], expected: int | str
) -> None:
    engine = RayEngine(settings)
    if isinstance(expected, int):
        assert engine._worker_count(FakeRay(*nodes)) == expected
    else:
        with pytest.raises(IndexerError, match=expected):
            engine._worker_count(FakeRay(*nodes))


@pytest.mark.parametrize(
    ("device", "gpus", "expected"),
    [
        ("auto", 0.0, "cpu"),
        ("cpu", 0.0, "cpu"),
        ("auto", 1.0, "cuda"),  # actors that reserve GPUs encode on them
        ("cuda", 0.5, "cuda"),
        ("cuda:0", 2.0, "cuda"),
        ("cuda", 0.0, "needs --gpus-per-worker"),
        ("cuda:1", 0.0, "needs --gpus-per-worker"),
        ("cpu", 1.0, "would hold GPUs it does not use"),
        ("cuda:1", 2.0, "which it sees from cuda:0 on"),
        ("tpu", 1.0, r"\(--device / CLIPSEARCH_DEVICE\) is not one of"),
    ],
)
def test_ray_actors_encode_on_the_gpus_they_reserve_and_the_device_setting_must_agree(
    device: str, gpus: float, expected: str
) -> None:
    if expected in ("cpu", "cuda"):
        assert actor_device(device, gpus) == expected
    else:
        with pytest.raises(IndexerError, match=expected):
            actor_device(device, gpus)


def test_the_ray_engine_refuses_a_precision_its_actors_cannot_run_before_connecting(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_cluster() -> None:
        raise AssertionError("the engine connected before checking the settings")

    monkeypatch.setattr(ray_engine, "import_ray", no_cluster)
    job = EncodeJob(tmp_path, str(tiny_model), precision="int8", device="auto")
    with pytest.raises(IndexerError, match=r"'int8' \(--precision / CLIPSEARCH_PRECISION\) runs on the CPU only"):
        RayEngine(RaySettings(gpus_per_worker=1)).start(job)
    with pytest.raises(IndexerError, match="runs on CUDA only"):
        RayEngine(RaySettings()).start(dataclasses.replace(job, precision="fp16"))


def test_an_actor_told_to_encode_on_cuda_fails_where_there_is_none(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It never falls back to its CPU while holding a GPU (the run fails at the first actor that cannot start)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(IndexerError, match=r"device 'cuda' \(--device / CLIPSEARCH_DEVICE\) asks for CUDA"):
        PartitionActor(EncodeJob(tmp_path, str(tiny_model), device="cuda"), RaySettings(gpus_per_worker=1))


def test_ray_settings_refuse_counts_below_one() -> None:
    for bad in ({"workers": 0}, {"cpus_per_worker": 0}, {"gpus_per_worker": -1.0}):
        with pytest.raises(IndexerError):
            RaySettings(**bad)


# --- the CLI ----------------------------------------------------------------------------------------------------------


def test_cli_encode_writes_shards_and_ingest_takes_them(
    folder: Path, tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="indexer")
    out = tmp_path / "shards"
    args = ["encode", str(folder), "--out", str(out), "--model", str(tiny_model), "--workers", "0"]
    assert cli_main([*args, "--partition-size", "6"]) == 0
    assert "finished before, " in caplog.text and f"clip-index ingest {out}" in caplog.text
    assert cli_main([*args, "--partition-size", "6"]) == 0  # a rerun: every partition finished
    assert cli_main(["ingest", str(out), "--index-dir", str(tmp_path / "index")]) == 0
    assert index_info(tmp_path / "index")["images_skipped"] == len(UNINDEXABLE)


def test_cli_without_ray_says_how_to_install_it(
    folder: Path, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # makes "import ray" raise ImportError
    monkeypatch.setitem(sys.modules, "ray.data", None)
    model = ["--model", str(tiny_model)]

    assert cli_main(["encode", str(folder), "--out", str(tmp_path / "s"), *model, "--engine", "ray"]) == 1
    assert INSTALL_HINT in caplog.text
    caplog.clear()
    assert cli_main(["build", str(folder), "--index-dir", str(tmp_path / "i"), *model, "--engine", "ray"]) == 1
    assert INSTALL_HINT in caplog.text and not list(tmp_path.glob("i/*.parquet"))


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["encode", "--gpus-per-worker", "1"], "apply to --engine ray only"),
        (["encode", "--address", "auto"], "apply to --engine ray only"),
        (["build", "--partition-size", "10"], "--partition-size applies to --engine ray"),
        (["build", "--engine", "ray", "--rebuild"], "not available with an engine"),
        (["encode", "--partition-size", "0"], "must be at least 1"),
        (["encode", "--engine", "ray", "--workers", "0"], "--workers must be at least 1"),
    ],
)
def test_cli_refuses_options_that_do_not_apply(
    command: list[str], message: str, folder: Path, tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    target = ["--out", str(tmp_path / "s")] if command[0] == "encode" else ["--index-dir", str(tmp_path / "i")]
    in_process = [] if "--engine" in command else ["--workers", "0"]
    argv = [command[0], str(folder), *target, "--model", str(tiny_model), *in_process, *command[1:]]
    assert cli_main(argv) == 1
    assert message in caplog.text
    assert not list_shards(tmp_path / "s") if (tmp_path / "s").exists() else True


def test_shard_file_names_match_the_shard_format() -> None:
    partition = split(entries(1), size=1)[0]
    assert isinstance(partition, Partition) and shard_file(partition.name) == f"shard-{partition.name}.parquet"
