"""One timeline over many machines (issue 10): a meta job on a layer map whose delta bands and
image layers are each cut at their own keys, as L0 compaction and image creation leave them, runs
its sub-jobs at once on three worker nodes and commits once.

Real processes: the embedded Redis and S3 endpoint, three nodes' ``compactor worker`` and the
coordinator loop.
"""

from __future__ import annotations

import itertools
import json
import os
import random
from collections.abc import Iterator
from typing import Any

import pytest

from compactor.storage.timeline import Storage
from compactor.worker.runtime.records import JobRecords, JobState, most_at_once
from compactor.worker.runtime.redis_client import connect
from tests.faultplugin import set_fault
from tests.test_distributed import (
    STACK_ENV,
    assert_reads_exact,
    manifests_written_by,
    send_compact,
    total_bytes,
    wait_ended,
)
from tests.timelines import TENANT, Layer, Timeline, Value, record

pytestmark = [pytest.mark.integration]

N_KEYS = 96


def unpartitioned_timeline(timeline_id: str, seed: int = 3) -> Timeline:
    """Six image layers at LSN 10 and four delta bands above them, every one cut at keys of its
    own: no key but the ends is a boundary of all layers, so no partition of the keys lines
    the layers up. Gc cutoff 80, branch point 25 and a lease at 55."""
    rnd = random.Random(seed)

    def cuts(pieces: int) -> list[int]:
        return [0, *sorted(rnd.sample(range(4, N_KEYS - 4), pieces - 1)), N_KEYS]

    layers = []
    for k0, k1 in itertools.pairwise(cuts(6)):
        layers.append(
            Layer("image", (k0, k1), (10, 11), {k: [Value(10, image=f"I{k};".encode())] for k in range(k0, k1)})
        )
    for lo, hi in ((11, 30), (30, 50), (50, 70), (70, 90)):
        for k0, k1 in itertools.pairwise(cuts(rnd.randint(2, 5))):
            delta = Layer("delta", (k0, k1), (lo, hi))
            for k in range(k0, k1):
                delta.values[k] = [
                    Value(lsn, record=record(f"+{k}@{lsn};".encode())) for lsn in sorted(rnd.sample(range(lo, hi), 3))
                ]
            layers.append(delta)
    return Timeline(timeline_id, layers, cutoff=80, retain_lsns=[25], leases=[55])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from compactor.coordinator.local.embedded import EmbeddedStack

    embedded = EmbeddedStack(
        tmp_path_factory.mktemp("three-nodes"),
        workers=3,
        concurrency=1,
        coordinator=True,
        coordinator_interval_s=0.5,
        env=STACK_ENV,
    )
    embedded.start()
    try:
        yield embedded
    finally:
        embedded.stop()


def test_sub_jobs_of_an_unpartitioned_timeline_run_at_once_and_commit_once(stack: Any) -> None:
    storage = Storage(stack.settings)
    records = JobRecords(connect(stack.settings))
    tid = "5a" * 16
    tl = unpartitioned_timeline(tid)
    storage.import_timeline(json.dumps(tl.to_json()))
    before = storage.manifest(TENANT, tid)
    job_id = os.urandom(16).hex()
    # Each sub-job holds a moment at every layer it reads, long enough for the others to start.
    set_fault(records.r, "pause_in_merge", job_id, {"seconds": 0.3})
    send_compact(stack, timeline_id=tid, max_job_bytes=total_bytes(storage, tid) // 6, job_id=job_id)
    meta = wait_ended(records, job_id, timeout_s=120)
    assert meta.state == JobState.SUCCEEDED, meta.error

    subs = records.get_subs(meta.sub_jobs)
    nodes = {attempt.node for sub in subs for attempt in sub.attempts}
    at_once = most_at_once(subs)
    print(f"\nsub-jobs={len(subs)} nodes={sorted(nodes)} most at once={at_once}")
    assert len(subs) >= 6
    assert at_once >= 3, "sub-jobs of one timeline did not run at once on three nodes"
    assert nodes == {"node-1", "node-2", "node-3"}
    # Slices cut through layers: some layer was read by more than one sub-job.
    inputs = [name for sub in subs if sub.proposal for name in sub.proposal.removed]
    assert len(inputs) > len(set(inputs)), "no layer spanned a cut: the timeline lined up after all"

    after = storage.manifest(TENANT, tid)
    assert after.number == before.number + 1
    assert manifests_written_by(storage, TENANT, tid) == {f"meta job {job_id}": 1}
    assert after.gc_compaction.last_completed_lsn == tl.cutoff
    assert_reads_exact(storage, {tid: tl}, tid)
    records.r.delete(f"compactor:fault:pause_in_merge:{job_id}")
