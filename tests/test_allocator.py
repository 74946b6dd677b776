"""A worker process keeps the memory it frees (``compactor.worker.runtime.allocator``)."""

import subprocess
import sys

CHURN = """
import resource, sys
import numpy as np
from compactor.worker.runtime.allocator import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory()
rng = np.random.default_rng(0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):  # arrays of 0.8 to 24 MB made and freed, as merged chunks do
    arrays = [np.ones(int(n), dtype=np.int64) for n in rng.integers(100_000, 3_000_000, 8)]
    del arrays
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True)
    return int(out.stdout)


def test_freed_memory_is_used_again_instead_of_fresh_pages() -> None:
    """Without the setting glibc maps fresh pages for big arrays and gives freed ones back:
    tens of thousands of page faults for the same allocations (65,000 against 7,000 here)."""
    default, kept = faults("default"), faults("kept")
    assert kept * 3 < default, (kept, default)


def test_a_worker_keeps_freed_memory_from_its_start() -> None:
    """The setting is made where the worker's parent starts, so every pool process has it."""
    from celery import signals

    from compactor.worker.runtime import app

    assert app._keep_freed_memory in [receiver() for _, receiver in signals.worker_init.receivers]
