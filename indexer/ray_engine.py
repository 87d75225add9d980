"""The Ray engine of ``clip-index encode``: partitions encoded by a pool of Ray actors, on a cluster's CPUs or GPUs.

Needs the ``ray`` extra (``pip install 'clip-search[ray]'``); Ray is imported when the engine starts, and its
absence is an IndexerError that says how to install it.

* Connecting (:meth:`RayEngine.start`): ``address`` is ``ray.init``'s. None connects to ``$RAY_ADDRESS`` when it
  is set, else to the cluster last started on this machine with ``ray start``, else starts a one-machine cluster
  inside this process for the run (``"local"`` always does); ``"auto"`` joins the cluster this machine is a node
  of; ``"ray://HOST:10001"`` reaches a remote one through Ray Client. A process that has called ``ray.init``
  already keeps its connection. Every node must have clip-search installed with this extra
  (the actors import ``indexer``) and see the image folder and the model at the paths this process uses; the shards
  are written here.
* Workers: ``workers`` actors of ``cpus_per_worker`` CPUs (and ``gpus_per_worker`` GPUs) each; by default as many
  as the cluster's CPUs (or GPUs) hold when the run starts. A count the cluster cannot host, a worker larger than
  every node, or GPUs on a cluster without any are refused before anything runs, with the numbers.
* Devices (:func:`actor_device`): an actor that reserves GPUs (``gpus_per_worker`` > 0) encodes on CUDA, on the GPU
  Ray gave it (``cuda:0`` as the actor sees it), in fp16 unless the precision says fp32; the others encode on their
  CPUs, as the local indexer does there. The device setting must agree (``auto`` always does; ``cuda`` needs GPUs
  reserved, ``cpu`` none), and the precision must run on that device (int8 is CPU-only): both are checked here
  before connecting, and each actor resolves the device again where it runs (no CUDA there: its start fails).
* Each actor (:class:`PartitionActor`) loads the model once, with the thread plan of its own CPUs
  (``ThreadPlan.for_indexing(cores=cpus_per_worker)``: encode streams and decode worker processes, kept between
  calls), and encodes one partition per call with :class:`~indexer.partition_encoder.PartitionEncoder`: the local
  indexer's decoding and encoding, so the vectors are the local engine's.
* Ray Data carries the work: one row (a pickled :class:`~indexer.partition_encoder.Work`) and one block per
  partition, ``map_batches`` over the actor class with ``batch_size=1`` and ``compute=ActorPoolStrategy(size=...)``,
  at most one call queued per actor so that the last partitions spread over every actor; each call returns one row,
  the partition's :class:`~indexer.partition_encoder.WorkRows` pickled. This process reads them as they come and
  writes each partition's shard (:mod:`indexer.encode`).
* Faults: Ray Data restarts the pool's actors and retries their calls without limit (its default for an actor
  pool, ``max_restarts=-1`` and ``max_task_retries=-1``; the fault tests hold it to that): an actor killed
  mid-partition starts again and encodes the partition anew, and the partitions of one whose node left the cluster
  are retried on the actors that remain. A partition that comes back twice is written once (:mod:`indexer.encode`).
  An image that crashes its decoder is skipped with a reason, as by the local indexer: decoding runs in the actor's
  own worker processes. An error that ends the Ray job ends the run with an IndexerError; the shards written until
  then are kept, and a rerun writes the rest.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from clip_model import choose_precision, parse_device
from clip_model.process_tuning import ThreadPlan, run_in_fresh_thread, set_own_thread_count, tune_malloc

from .build import load_model, resolve_placement
from .errors import IndexerError
from .partition_encoder import EncodeJob, PartitionEncoder, Work, WorkRows
from .store import ModelInfo

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'clip-search[ray]'"
RAY_ADDRESS_ENV = "RAY_ADDRESS"  # what ray.init(address=None) connects to when it is set
LOCAL = "local"  # ray.init's address for "start a new one-machine cluster"
GPU_DEVICE = "cuda"  # an actor's device when it reserves GPUs: the first that Ray gave it
CALLS_QUEUED_PER_ACTOR = 1  # a partition waits for a free actor, not behind a busy one
Column = npt.NDArray[Any]


def import_ray() -> Any:
    """The ``ray`` module with ``ray.data`` loaded; IndexerError saying how to install it when it is missing."""
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise IndexerError(f"--engine ray needs Ray, which is not installed here: {INSTALL_HINT}") from exc
    return ray


@dataclass(frozen=True)
class RaySettings:
    """Where the Ray engine runs and how large its workers are (see ``indexer.cli`` for each option)."""

    address: str | None = None  # ray.init's: None, "local", "auto", "HOST:PORT" or "ray://HOST:10001"
    workers: int | None = None  # None: as many as the cluster holds
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0.0
    threads: int = 0  # each actor's torch threads (0: one per CPU of the actor)
    streams: int = 0  # each actor's encode streams (0: automatic)

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise IndexerError(f"--workers must be at least 1, got {self.workers}")
        if self.cpus_per_worker < 1:
            raise IndexerError(f"--cpus-per-worker must be at least 1, got {self.cpus_per_worker}")
        if self.gpus_per_worker < 0:
            raise IndexerError(f"--gpus-per-worker cannot be negative, got {self.gpus_per_worker}")


def actor_device(setting: str, gpus_per_worker: float) -> str:
    """The device the actors encode on for the device setting ``setting``: :data:`GPU_DEVICE` for actors that
    reserve GPUs, ``"cpu"`` for the others (Ray gives an actor GPUs only when it reserves them).

    Raises:
        IndexerError: ``setting`` is malformed, or disagrees with ``gpus_per_worker``: ``cpu`` with GPUs reserved,
            ``cuda`` without, or a ``cuda:N`` other than the actor's first GPU.
    """
    try:
        form = parse_device(setting)
    except ValueError as exc:
        raise IndexerError(str(exc)) from exc
    if not gpus_per_worker:
        if form != "auto" and form != "cpu":
            raise IndexerError(
                f"--device {setting} with --engine ray needs --gpus-per-worker (e.g. 1): Ray gives an actor a GPU only "
                "when it reserves one; leave --device out (or set it to cpu) to encode on the actors' CPUs"
            )
        return "cpu"
    if form == "cpu":
        raise IndexerError(
            f"--device cpu with --gpus-per-worker {gpus_per_worker:g}: every actor would hold GPUs it does not use; "
            "leave --gpus-per-worker out to encode on CPUs, or set --device to cuda (or auto)"
        )
    if form not in ("auto", "cuda:0"):
        raise IndexerError(
            f"--device {setting} with --engine ray: Ray gives each actor its own GPUs, which it sees from cuda:0 on; "
            "set --device to cuda (or auto)"
        )
    return GPU_DEVICE


class PartitionActor:
    """The callable class of the actor pool: a :class:`PartitionEncoder` for the actor's life, a partition a call."""

    def __init__(self, job: EncodeJob, settings: RaySettings) -> None:
        tune_malloc()  # this actor's process is an entry point of its own (clip_model.process_tuning.malloc)
        placement = resolve_placement(job.device, job.precision)  # on this node: its CUDA, if the job says cuda
        plan = ThreadPlan.for_indexing(
            placement.precision, threads=settings.threads, streams=settings.streams, cores=settings.cpus_per_worker
        )
        self._encoder = PartitionEncoder.load(job, plan)

    def __call__(self, batch: dict[str, Column]) -> dict[str, Column]:
        """``batch["work"]``: pickled Works -> ``{"partition": names, "rows": pickled WorkRows}``, one row each."""
        works: list[Work] = [pickle.loads(blob) for blob in batch["work"]]
        rows = list(self._encoder.encode(works))
        return {
            "partition": np.asarray([r.partition for r in rows], dtype=object),
            "rows": np.asarray([pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL) for r in rows], dtype=object),
        }


class RayEngine:
    """Encodes partitions on a Ray cluster (module docstring)."""

    name = "ray"

    def __init__(self, settings: RaySettings) -> None:
        self.settings = settings
        self._ray: Any = None
        self._started_ray = False
        self._job: EncodeJob | None = None
        self._workers = 0

    def start(self, job: EncodeJob) -> ModelInfo:
        """Check the device settings, connect, check that the cluster can host the workers, and read the model's
        provenance here (the actors load it again where they run). ``job.device`` is the device setting: the actors
        get :func:`actor_device`'s and the precision it runs in there."""
        device = actor_device(job.device, self.settings.gpus_per_worker)
        try:
            precision = choose_precision(torch.device(device), job.precision, job.device)
        except ValueError as exc:
            raise IndexerError(str(exc)) from exc
        ray = import_ray()
        self._ray, self._job = ray, replace(job, device=device, precision=precision)
        if not ray.is_initialized():
            where: dict[str, Any] = {"address": self.settings.address}
            if self._address() in (None, LOCAL):  # a cluster of its own, if it starts one: no dashboard
                where["include_dashboard"] = False
            ray.init(**where, logging_level=logging.WARNING)
            self._started_ray = True
        ray.data.DataContext.get_current().enable_progress_bars = False  # clip-index reports its own progress
        self._workers = self._worker_count(ray)
        plan = ThreadPlan.for_indexing()

        def provenance() -> ModelInfo:
            set_own_thread_count(plan.torch_threads)
            return load_model(job.model, job.arch).info  # on this CPU: the fp32 fingerprint is every placement's

        return run_in_fresh_thread(provenance, name="load-model")

    def describe(self) -> str:
        settings = self.settings
        gpus = f" and {settings.gpus_per_worker:g} GPU" if settings.gpus_per_worker else ""
        where = self._address() or "the local cluster (ray.init())"
        on = f", encoding on {self._job.device} ({self._job.precision})" if self._job else ""
        return f"ray engine at {where}: {self._workers} worker(s) of {settings.cpus_per_worker} CPU{gpus} each{on}"

    def run(self, works: Sequence[Work], reusable: frozenset[str]) -> Iterator[WorkRows]:
        """Each work's rows, as the actors finish them (call :meth:`start` first)."""
        if self._ray is None or self._job is None:
            raise RuntimeError("RayEngine.run before start")
        ray, settings = self._ray, self.settings
        job = replace(self._job, reusable=reusable)
        items = [{"partition": work.partition, "work": pickle.dumps(work)} for work in works]
        dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            PartitionActor,
            fn_constructor_args=(job, settings),
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(
                size=min(self._workers, len(items)), max_tasks_in_flight_per_actor=CALLS_QUEUED_PER_ACTOR
            ),
            num_cpus=settings.cpus_per_worker,
            num_gpus=settings.gpus_per_worker or None,
        )  # the pool's actors restart, and their calls are retried, without limit: Ray Data's default for actors
        try:
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                for blob in batch["rows"]:
                    yield pickle.loads(blob)
        except ray.exceptions.RayError as exc:
            raise IndexerError(
                f"the Ray job failed ({type(exc).__name__}): {exc}\nThe shards written so far are kept and a rerun "
                "writes the rest. An actor that cannot start needs clip-search with the ray extra on its node, and the "
                "model and the image folder at the paths this machine uses"
            ) from exc

    def close(self) -> None:
        if self._started_ray and self._ray is not None:
            self._ray.shutdown()
        self._started_ray = False

    def _address(self) -> str | None:
        """The cluster's address as ``ray.init`` reads it: the setting, else ``$RAY_ADDRESS``; None: a new one."""
        return self.settings.address or os.environ.get(RAY_ADDRESS_ENV) or None

    def _worker_count(self, ray: Any) -> int:
        """``settings.workers``, or as many as the cluster holds; IndexerError when the cluster cannot host them."""
        settings = self.settings
        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        cpus = sum(node.get("CPU", 0.0) for node in nodes)
        gpus = sum(node.get("GPU", 0.0) for node in nodes)
        if settings.gpus_per_worker and not gpus:
            raise IndexerError(
                f"--gpus-per-worker {settings.gpus_per_worker:g}: the Ray cluster has no GPUs ({cpus:g} CPUs "
                f"on {len(nodes)} node(s)): leave the option out to encode on CPUs"
            )
        fits = sum(self._fits(node) for node in nodes)
        if fits < 1:
            largest = max((node.get("CPU", 0.0) for node in nodes), default=0.0)
            raise IndexerError(
                f"no node of the Ray cluster can host a worker of {settings.cpus_per_worker} CPU(s): the largest has "
                f"{largest:g}; lower --cpus-per-worker"
            )
        workers = settings.workers or fits
        if workers > fits:
            raise IndexerError(
                f"--workers {workers}: the Ray cluster holds {fits} worker(s) of {settings.cpus_per_worker} CPU(s) "
                f"({cpus:g} CPUs, {gpus:g} GPUs on {len(nodes)} node(s)): ask for fewer, or add nodes"
            )
        return workers

    def _fits(self, node: dict[str, float]) -> int:
        """How many workers ``node`` (its resources) can host."""
        count = math.floor(node.get("CPU", 0.0) / self.settings.cpus_per_worker)
        if self.settings.gpus_per_worker:
            count = min(count, math.floor(node.get("GPU", 0.0) / self.settings.gpus_per_worker))
        return count
