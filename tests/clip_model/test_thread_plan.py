"""clip_model.process_tuning.plan: each role's thread counts from the cores, decided once and checked."""

from __future__ import annotations

import pytest

from clip_model.process_tuning import ThreadPlan, even_streams
from clip_model.train.cli import training_plan


@pytest.mark.parametrize(
    ("cores", "precision", "workers", "streams"),
    [(2, "fp32", 1, 2), (2, "int8", 1, 2), (8, "fp32", 7, 4), (8, "int8", 4, 4), (1, "int8", 1, 1), (7, "fp32", 6, 1)],
)
def test_indexing_gives_decode_workers_by_precision_and_every_core_to_the_encode_streams(
    cores: int, precision: str, workers: int, streams: int
) -> None:
    plan = ThreadPlan.for_indexing(precision, cores=cores)
    assert (plan.decode_workers, plan.torch_threads, plan.encode_streams) == (workers, cores, streams)
    assert plan.stream_threads * plan.encode_streams == cores and plan.faiss_threads == cores


@pytest.mark.parametrize(
    ("threads", "streams", "encode_streams", "stream_threads"),
    [(4, 0, 4, 1), (4, 2, 2, 2), (2, 8, 2, 1), (5, 2, 2, 2), (1, 0, 1, 1)],
)
def test_requested_threads_and_streams_are_kept_and_streams_never_outnumber_threads(
    threads: int, streams: int, encode_streams: int, stream_threads: int
) -> None:
    plan = ThreadPlan.for_indexing(threads=threads, streams=streams, workers=0, cores=16)
    assert (plan.torch_threads, plan.encode_streams, plan.stream_threads) == (threads, encode_streams, stream_threads)
    assert plan.decode_workers == 0  # 0: decode in the calling process


def test_even_streams_is_the_most_up_to_four_that_split_the_threads_evenly() -> None:
    assert [even_streams(n) for n in range(1, 10)] == [1, 2, 3, 4, 1, 3, 1, 4, 3]


def test_serving_runs_torch_and_faiss_on_the_requested_threads_or_one_per_core() -> None:
    assert ThreadPlan.for_serving(cores=6) == ThreadPlan(cores=6, torch_threads=6, faiss_threads=6)
    assert ThreadPlan.for_serving(3, cores=6) == ThreadPlan(cores=6, torch_threads=3, faiss_threads=3)
    assert ThreadPlan.for_serving().cores >= 1  # from the process's own CPUs


def test_training_splits_the_cores_between_the_local_processes_unless_omp_num_threads_says() -> None:
    assert ThreadPlan.for_training(processes=4, cores=8).torch_threads == 2
    assert ThreadPlan.for_training(processes=16, cores=8).torch_threads == 1
    assert ThreadPlan.for_training(3, processes=4, cores=8).torch_threads == 3
    assert training_plan({"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "2"}).torch_threads == 1  # torchrun's setting
    assert training_plan({}).torch_threads == ThreadPlan.for_training().torch_threads
    with pytest.raises(SystemExit, match="OMP_NUM_THREADS"):
        training_plan({"OMP_NUM_THREADS": "two"})


@pytest.mark.parametrize("field", ["threads", "streams", "workers"])
def test_a_negative_request_is_refused_by_name(field: str) -> None:
    with pytest.raises(ValueError, match=f"{field} must be 0 or more, got -1"):
        ThreadPlan.for_indexing(**{field: -1})  # type: ignore[arg-type]


def test_a_plan_with_no_threads_or_more_streams_than_threads_cannot_be_made() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ThreadPlan(cores=2, torch_threads=0, faiss_threads=1)
    with pytest.raises(ValueError, match="encode streams"):
        ThreadPlan(cores=2, torch_threads=2, faiss_threads=2, encode_streams=3)


def test_describe_names_every_count() -> None:
    plan = ThreadPlan.for_indexing("int8", cores=8)
    assert plan.describe() == "8 core(s): torch on 8 thread(s) in 4 streams, FAISS on 8, 4 decode worker(s)"
    assert ThreadPlan.for_serving(cores=2).describe() == "2 core(s): torch on 2 thread(s), FAISS on 2"
