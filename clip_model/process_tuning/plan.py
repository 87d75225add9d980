"""Every thread count of one process, decided once at its entry point from the CPUs it may use.

Each entry point (``clip-index``, ``clip-serve``, ``clip-train``, a bench member) builds one :class:`ThreadPlan`
with the constructor for its role and hands it on as a value; nothing below an entry point asks torch, FAISS or
the OS for a count. The plan says how many threads each part gets; :mod:`.threads` is what sets them.

The rules, by role (``cores``: :func:`.cores.available_cores` unless given):

- serving: the inference thread runs torch and FAISS on ``threads`` (0: one per core); every other thread runs
  torch on one (a second OpenMP team would slow the first, see :mod:`.threads`).
- indexing: encoding uses ``threads`` torch threads (0: one per core, shared with the decode workers: end to end
  this beats keeping cores for the encoder alone), split into ``streams`` batches encoded at once (0: the most
  streams, up to :data:`MAX_ENCODE_STREAMS`, that split the threads evenly: single-threaded streams scale, one
  batch over several threads waits at every op's barrier). Decode workers (None: automatic): with fp32 encoding a
  photo costs several times what decoding it draft-scaled does, so the workers fill the encoder's gaps on all cores
  but one; with int8 the two cost about the same, so half the cores. Building the FAISS index uses every core.
- training: torch runs on ``threads`` (0: the cores split evenly between the training processes of this machine).
"""

from __future__ import annotations

from dataclasses import dataclass

from .cores import available_cores

MAX_ENCODE_STREAMS = 4  # each stream holds a batch's activations: ~0.5 GB for ViT-L/14 at batch 32
INT8 = "int8"  # the precision whose encoder costs about what decoding does


@dataclass(frozen=True)
class ThreadPlan:
    """Thread counts for one process. All counts are at least 1 except ``decode_workers`` (0: decode in-process).

    ``torch_threads``: threads of the thread that does the main compute (the server's inference thread, torch and
    FAISS alike; the indexer's model loader, and its encode streams together; the training loop). ``encode_streams``
    of ``stream_threads`` threads each split them in the indexer. ``faiss_threads``: threads of the indexer's FAISS
    index building (the server searches on its inference thread's count). ``decode_workers``: the indexer's decode
    processes."""

    cores: int
    torch_threads: int
    faiss_threads: int
    encode_streams: int = 1
    decode_workers: int = 0

    def __post_init__(self) -> None:
        counts = {
            "cores": self.cores,
            "torch_threads": self.torch_threads,
            "faiss_threads": self.faiss_threads,
            "encode_streams": self.encode_streams,
        }
        low = {name: value for name, value in counts.items() if value < 1}
        if low or self.decode_workers < 0:
            raise ValueError(f"thread counts must be at least 1 (decode workers 0), got {self}")
        if self.encode_streams > self.torch_threads:
            raise ValueError(f"{self.encode_streams} encode streams need as many torch threads, got {self}")

    @property
    def stream_threads(self) -> int:
        """Torch threads of each encode stream (the threads left over by an uneven split stay unused)."""
        return self.torch_threads // self.encode_streams

    @classmethod
    def for_serving(cls, threads: int = 0, *, cores: int | None = None) -> ThreadPlan:
        """The server's plan: ``threads`` torch and FAISS threads on the inference thread (0: one per core)."""
        cores = _cores(cores)
        inference = _requested("threads", threads) or cores
        return cls(cores=cores, torch_threads=inference, faiss_threads=inference)

    @classmethod
    def for_indexing(
        cls,
        precision: str = "fp32",
        *,
        threads: int = 0,
        streams: int = 0,
        workers: int | None = None,
        cores: int | None = None,
    ) -> ThreadPlan:
        """The indexer's plan (module docstring): 0 means automatic for ``threads`` and ``streams``, None for
        ``workers``; streams beyond the threads are cut to one per thread."""
        cores = _cores(cores)
        encode = _requested("threads", threads) or cores
        streams = min(_requested("streams", streams) or even_streams(encode), encode)
        if workers is None:
            workers = max(1, cores // 2) if precision == INT8 else max(1, cores - 1)
        return cls(
            cores=cores,
            torch_threads=encode,
            faiss_threads=cores,
            encode_streams=streams,
            decode_workers=_requested("workers", workers),
        )

    @classmethod
    def for_training(cls, threads: int = 0, *, processes: int = 1, cores: int | None = None) -> ThreadPlan:
        """The training loop's plan: ``threads`` torch threads (0: the cores split between ``processes`` training
        processes on this machine, at least one each)."""
        cores = _cores(cores)
        torch_threads = _requested("threads", threads) or max(1, cores // max(1, processes))
        return cls(cores=cores, torch_threads=torch_threads, faiss_threads=torch_threads)

    def describe(self) -> str:
        """One line for a start-up log."""
        streams = f" in {self.encode_streams} streams" if self.encode_streams > 1 else ""
        workers = f", {self.decode_workers} decode worker(s)" if self.decode_workers else ""
        torch_part = f"torch on {self.torch_threads} thread(s){streams}"
        return f"{self.cores} core(s): {torch_part}, FAISS on {self.faiss_threads}{workers}"


def even_streams(threads: int) -> int:
    """The most streams, up to :data:`MAX_ENCODE_STREAMS`, that split ``threads`` evenly: 2 -> 2 of 1, 8 -> 4 of 2,
    7 -> one of 7."""
    return max(s for s in range(1, min(threads, MAX_ENCODE_STREAMS) + 1) if threads % s == 0)


def _cores(cores: int | None) -> int:
    return available_cores() if cores is None else cores


def _requested(name: str, count: int) -> int:
    if count < 0:
        raise ValueError(f"{name} must be 0 or more, got {count}")
    return count
