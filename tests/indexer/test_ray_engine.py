"""The Ray engine on a two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``: 1 CPU a node, on the
loopback address, started and stopped by this module): the local indexer's vectors and search results, and a
complete run with every file in exactly one shard when an encoding actor is SIGKILLed mid-run or a node leaves.

Marked slow: starting the cluster and its actors takes most of a minute on two cores. Each test is bounded by
``TIME_LIMIT_S`` (a hung run fails instead of holding up the suite).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import numpy as np
import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read when ray is imported: nodes on 127.0.0.1

import ray  # noqa: E402  # after the variable above
from ray.cluster_utils import Cluster  # noqa: E402

from clip_model.process_tuning import ThreadPlan  # noqa: E402
from indexer.build import BuildOptions, build_index  # noqa: E402
from indexer.cli import main as cli_main  # noqa: E402
from indexer.encode import EncodeOptions, EncodeStats, encode_folder  # noqa: E402
from indexer.errors import IndexerError  # noqa: E402
from indexer.partition_encoder import EncodeJob, LocalEngine  # noqa: E402
from indexer.ray_engine import RayEngine, RaySettings  # noqa: E402
from indexer.report import index_info  # noqa: E402
from indexer.scan import iter_images  # noqa: E402
from indexer.shards import list_shards  # noqa: E402
from tests.indexer.conftest import write_photo  # noqa: E402
from tests.indexer.encoding_checks import (  # noqa: E402
    UNINDEXABLE,
    image_folder,
    index_vectors,
    max_vector_difference,
    search_by_path,
    shard_rows,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context"),  # Ray Data's own, on copying a context
]

IN_PROCESS = ThreadPlan.for_indexing(workers=0)
TOLERANCE = 1e-6  # max abs difference between the engines' vectors (fp32 on the CPU)
TIME_LIMIT_S = 240
ACTOR_TITLE = b"ray::MapWorker(MapBatches(PartitionActor))"  # an encoding actor's process title (its cmdline)
HEALTH_CHECKS = {  # a node that stops answering is declared dead after about 2 s, not Ray's default 15
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 4,
}
BIG_PHOTO = (1600, 1200)  # decoded at full size (no draft): a partition takes long enough to be interrupted


@pytest.fixture(autouse=True)
def time_limit() -> Iterator[None]:
    def expire(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError(f"the test ran past {TIME_LIMIT_S} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TIME_LIMIT_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A head and a worker node of 1 CPU each, this process connected to them."""
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, "_system_config": HEALTH_CHECKS},
    )
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()  # type: ignore[no-untyped-call]  # ray.cluster_utils has no annotations here


def big_photos(root: Path, count: int) -> Path:
    for n in range(count):
        write_photo(root / f"big_{n:04d}.jpg", seed=n, size=BIG_PHOTO)
    return root


def encode_while(
    root: Path, out: Path, model: Path, settings: RaySettings, when: Callable[[], bool], act: Callable[[], None]
) -> tuple[EncodeStats, int]:
    """Encode ``root`` on the Ray engine while a thread waits for ``when()`` and then runs ``act()``; returns the
    run's counts and how many shards there were when ``act`` ran."""
    acted: list[int] = []

    def watch() -> None:
        while not when():
            time.sleep(0.05)
        acted.append(len(list_shards(out)))
        act()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    options = EncodeOptions(root, out, str(model), partition_size=4, draft=False)
    stats = encode_folder(options, RayEngine(settings)).stats
    watcher.join(timeout=1)
    assert acted, "the run ended before the fault"
    return stats, acted[0]


def shards_written(out: Path, count: int) -> Callable[[], bool]:
    return lambda: out.is_dir() and len(list_shards(out)) >= count


def busy_actor() -> int | None:
    """The pid of an encoding actor that is running a call, if any."""
    for entry in os.listdir("/proc"):
        try:
            title = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if title.startswith(ACTOR_TITLE) and title.endswith(b".submit"):
            return int(entry)
    return None


def check_complete(root: Path, out: Path, model: Path, stats: EncodeStats, tmp_path: Path) -> None:
    """Every file of ``root`` in exactly one shard, one shard per partition, and the local engine's vectors."""
    rows = shard_rows(out)
    assert rows.keys() == {f.path for f in iter_images(root)}
    assert stats.shards == stats.partitions == len(list_shards(out))
    local = tmp_path / "local"
    encode_folder(EncodeOptions(root, local, str(model), partition_size=4, draft=False), LocalEngine(IN_PROCESS))
    vectors = {path: row[6] for path, row in shard_rows(local).items()}
    assert max_vector_difference({path: row[6] for path, row in rows.items()}, vectors) <= TOLERANCE


def test_build_on_the_cluster_gives_the_local_indexers_vectors_and_search_results(
    cluster: Cluster, tiny_model: Path, tmp_path: Path
) -> None:
    root = image_folder(tmp_path / "images", photos=30)
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    build_index(BuildOptions(root=root, index_dir=local, model=str(tiny_model), plan=IN_PROCESS))

    command = ["build", str(root), "--index-dir", str(on_ray), "--model", str(tiny_model), "--engine", "ray"]
    assert cli_main([*command, "--address", cluster.address, "--workers", "2", "--partition-size", "5"]) == 0

    assert max_vector_difference(index_vectors(on_ray), index_vectors(local)) <= TOLERANCE
    queries = np.stack([v for v in index_vectors(local).values() if not isinstance(v, str)][:6])
    assert search_by_path(on_ray, queries) == search_by_path(local, queries)
    assert {path for path, _ in index_info(on_ray)["skipped_files"]} == set(UNINDEXABLE)


def test_an_actor_killed_mid_run_is_replaced_and_every_file_is_written_once(
    cluster: Cluster, tiny_model: Path, tmp_path: Path
) -> None:
    root, out = big_photos(tmp_path / "images", 60), tmp_path / "shards"
    killed: list[int] = []

    def kill() -> None:
        pid = busy_actor()
        while pid is None:
            time.sleep(0.05)
            pid = busy_actor()
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    stats, shards_then = encode_while(root, out, tiny_model, RaySettings(workers=2), shards_written(out, 2), kill)

    assert killed and shards_then < stats.partitions
    check_complete(root, out, tiny_model, stats, tmp_path)


def test_a_node_that_leaves_the_cluster_loses_no_file(cluster: Cluster, tiny_model: Path, tmp_path: Path) -> None:
    root, out = big_photos(tmp_path / "images", 60), tmp_path / "shards"
    leaving = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()

    def leave() -> None:
        cluster.remove_node(leaving, allow_graceful=False)

    stats, shards_then = encode_while(root, out, tiny_model, RaySettings(workers=3), shards_written(out, 3), leave)

    assert shards_then < stats.partitions
    check_complete(root, out, tiny_model, stats, tmp_path)


def test_gpus_on_a_cluster_without_any_are_refused_before_anything_runs(
    cluster: Cluster, tiny_model: Path, tmp_path: Path
) -> None:
    engine = RayEngine(RaySettings(gpus_per_worker=1))
    with pytest.raises(IndexerError, match="the Ray cluster has no GPUs"):  # auto: CUDA on actors reserving GPUs
        engine.start(EncodeJob(tmp_path, str(tiny_model), device="auto"))
    engine.close()
    assert ray.is_initialized()  # the engine leaves a connection it did not make
