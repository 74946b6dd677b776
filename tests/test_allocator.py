"""A worker process keeps the memory it frees while a sub-job runs and trims its heap when the
sub-job ends (``compactor.worker.runtime.allocator``); Arrow's pool keeps freed blocks
(``compactor.storage``)."""

import os
import subprocess
import sys
from typing import Any

import pytest

from compactor.worker.runtime import allocator, tasks

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


ARROW_CHURN = """
import resource
import compactor.storage  # chooses Arrow's pool and how it keeps freed memory
import numpy as np
import pyarrow as pa
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):  # blocks of 16 MiB made, written and freed, as a chunk's columns are
    blocks = [pa.allocate_buffer(16 << 20) for _ in range(3)]
    for block in blocks:
        np.frombuffer(block, dtype=np.uint8)[::4096] = 1
    del blocks, block
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

HUGE_PAGES = """
import compactor.storage  # chooses Arrow's pool and how it maps memory
import pyarrow as pa
block = pa.allocate_buffer(64 << 20)
with open("/proc/self/smaps") as f:
    inside = False
    for line in f:
        first = line.split()[0]
        if "-" in first and not first.endswith(":"):
            start, end = (int(bound, 16) for bound in first.split("-"))
            inside = start <= block.address < end  # start inclusive, end exclusive
        elif inside and first == "THPeligible:":
            print(line.split()[1])
"""

TRIM = """
import numpy as np
from compactor.worker.runtime.allocator import give_back_freed_memory, keep_freed_memory
assert keep_freed_memory()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
arrays = [np.ones(2_500_000, dtype=np.int64) for _ in range(10)]  # 200 MB in blocks of 20 MB
del arrays
kept = rss()
give_back_freed_memory()
print(kept - rss())
"""


def run(script: str, *args: str, env: dict[str, str] | None = None) -> int:
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=True, env=env)
    return int(out.stdout)


def faults(mode: str) -> int:
    return run(CHURN, mode)


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


def test_arrow_writes_into_blocks_it_freed_instead_of_fresh_pages() -> None:
    """Arrow's jemalloc, as configured by default, gives a freed 16 MiB block back at once: every
    page of the next one faults (about 1 fault per page against 0.03 kept)."""
    default = {**os.environ, "JE_ARROW_MALLOC_CONF": "dirty_decay_ms:1000"}
    ours = {k: v for k, v in os.environ.items() if k != "JE_ARROW_MALLOC_CONF"}
    kept, given_back = run(ARROW_CHURN, env=ours), run(ARROW_CHURN, env=default)
    assert kept * 5 < given_back, (kept, given_back)


def huge_pages_on_request() -> bool:
    """Whether the kernel gives transparent huge pages only to memory that asks for them: with
    "always" every mapping is eligible whatever Arrow asks, with "never" none is."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[madvise]" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not huge_pages_on_request(), reason="the kernel's huge pages are not given on request")
def test_arrow_memory_may_be_backed_by_huge_pages() -> None:
    """Where the kernel gives huge pages only on request (Debian's "madvise"), Arrow's blocks
    ask for them: a job's chunks then fault once per 2 MiB instead of once per 4 KiB."""
    ours = {k: v for k, v in os.environ.items() if k != "JE_ARROW_MALLOC_CONF"}
    assert run(HUGE_PAGES, env=ours) == 1


def test_the_heap_a_sub_job_kept_goes_back_when_it_ends() -> None:
    """200 MB freed stays with the process (under the 512 MiB trim threshold) until trimmed."""
    assert run(TRIM) > 150_000_000


@pytest.mark.parametrize("ending", ["returns", "retries", "raises"])
def test_every_sub_job_attempt_ends_by_giving_memory_back(monkeypatch: pytest.MonkeyPatch, ending: str) -> None:
    calls: list[str] = []

    def run_sub_job(ctx: Any, sub_id: str, report_state: Any = None) -> dict[str, Any]:
        calls.append("ran")
        if ending == "retries":
            raise tasks.RetryLater(1.0)
        if ending == "raises":
            raise RuntimeError("a bug")
        return {"sub_job_id": sub_id, "state": "succeeded"}

    class Task:
        def retry(self, countdown: float) -> Exception:
            return RuntimeError(f"retry in {countdown}")

    monkeypatch.setattr(tasks, "context", lambda: None)
    monkeypatch.setattr(tasks, "run_sub_job", run_sub_job)
    monkeypatch.setattr(allocator, "give_back_freed_memory", lambda: calls.append("gave back"))
    if ending == "returns":
        assert tasks._run_sub_job_task(Task(), sub_job_id="a" * 32 + ".0")["state"] == "succeeded"
    else:
        with pytest.raises(RuntimeError):
            tasks._run_sub_job_task(Task(), sub_job_id="a" * 32 + ".0")
    assert calls == ["ran", "gave back"]
