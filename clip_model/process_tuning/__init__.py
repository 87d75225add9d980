"""Process tuning, apart from the model code: the CPUs this process may use (:mod:`.cores`), the thread counts made
from them once per process (:mod:`.plan`), the calls that set torch's and FAISS's counts (:mod:`.threads`, the only
module that makes them) and the allocator's thresholds (:mod:`.malloc`). Entry points use these; the library's
model code never does."""

from .cores import available_cores
from .malloc import tune_malloc
from .plan import MAX_ENCODE_STREAMS, ThreadPlan, even_streams
from .threads import (
    default_thread_count,
    own_threads,
    run_in_fresh_thread,
    set_own_thread_count,
    set_thread_count,
    single_threaded_elsewhere,
)

__all__ = [
    "MAX_ENCODE_STREAMS",
    "ThreadPlan",
    "available_cores",
    "default_thread_count",
    "even_streams",
    "own_threads",
    "run_in_fresh_thread",
    "set_own_thread_count",
    "set_thread_count",
    "single_threaded_elsewhere",
    "tune_malloc",
]
