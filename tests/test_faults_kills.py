"""Liveness under random kills (issue 12): three nodes, meta jobs submitted all along, worker main
processes and pool processes SIGKILLed at random for a minute, some of them while they hold a
sub-job message they have not started (prefetched, or waiting out the countdown of a "node busy"
bounce). Then no more kills: every meta job must end within the heartbeat timeout plus a minute,
with exact reads, nothing referenced missing and no orphan after cleanup.

The delivery tracking (``compactor.worker.runtime.deliveries``) brings back a message a dead
worker held within the heartbeat timeout. A message the worker took from the broker but died
before recording (the moment between the two) has no holder: the no-progress timeout, set to
20 s here, is its backstop (a sub-job stayed queued for good with it at an hour, 2026-12-02).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from compactor.worker.runtime.node_lock import LOCK_PREFIX
from tests.faultkit import (
    FaultStack,
    FaultSummary,
    check_invariants,
    fault_summary,  # noqa: F401 - the session fixture
    make_fault_stack,
    new_timeline,
    set_fault,
    submit,
)
from tests.timelines import Timeline

pytestmark = [pytest.mark.faults, pytest.mark.integration]

KILLING_S = 60.0
HEARTBEAT_TIMEOUT_S = 2.5


@pytest.fixture(scope="module")
def fs(tmp_path_factory: pytest.TempPathFactory, fault_summary: FaultSummary) -> Iterator[FaultStack]:  # noqa: F811
    env = {"COMPACTOR_NO_PROGRESS_TIMEOUT_S": "20", "COMPACTOR_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S)}
    yield from make_fault_stack(tmp_path_factory.mktemp("kills"), fault_summary, workers=3, env=env)


def pool_pids(fs: FaultStack, node: str) -> list[int]:
    """The processes of a node's worker besides its main process (pool processes, the light worker)."""
    main = fs.stack.workers[node].pid
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[2]) == main and int(entry) != main:  # process group of the node
                pids.append(int(entry))
    return pids


def test_every_job_ends_soon_after_random_kills(fs: FaultStack) -> None:
    rnd = random.Random(12)
    fs.ready(wait=True)
    timelines: dict[str, Timeline] = {}
    jobs: dict[str, str] = {}  # job id -> timeline id
    kills = 0
    started = time.monotonic()
    next_submit = next_kill = started
    last_kill = started
    while time.monotonic() - started < KILLING_S:
        now = time.monotonic()
        if now >= next_submit:
            tid, tl = new_timeline(fs, bands=3, seed=rnd.randrange(1000))
            timelines[tid] = tl
            job_id = os.urandom(16).hex()
            # Sub-jobs that last a little, so that kills land while they run and while messages wait.
            set_fault(fs, "pause_in_merge", job_id, seconds=0.15)
            submit(fs, tid, job_id=job_id, parts=3)
            jobs[job_id] = tid
            next_submit = now + rnd.uniform(2.0, 5.0)
        if now >= next_kill:
            node = rnd.choice(sorted(fs.stack.workers))
            how = rnd.choice(["main", "pool", "busy node"])
            if how == "busy node":
                # A lock the node cannot take for a while: its sub-jobs bounce with a countdown and
                # wait in its memory; then the whole node dies.
                fs.records.r.set(LOCK_PREFIX + node, "someone-else", px=int(rnd.uniform(1.0, 3.0) * 1000))
                time.sleep(rnd.uniform(0.3, 1.5))
            pids = pool_pids(fs, node) if how == "pool" else []
            if pids:
                fs.kill_pid(rnd.choice(pids))
            else:
                fs.kill(node)
            kills += 1
            last_kill = time.monotonic()
            next_kill = last_kill + rnd.uniform(2.0, 6.0)
        fs.ready()
        time.sleep(0.1)
    fs.ready(wait=True)

    deadline = last_kill + HEARTBEAT_TIMEOUT_S + 60.0
    last_kill_at = time.time() - (time.monotonic() - last_kill)  # the same moment on the records' clock
    waits: dict[str, float] = {}
    for job_id in jobs:
        while (meta := fs.records.get_meta(job_id)) is None or not meta.state.ended:
            assert time.monotonic() < deadline, (
                f"job {job_id} still {meta.state if meta else 'missing'} a minute after the last kill"
            )
            time.sleep(0.2)
        waits[job_id] = max(0.0, (meta.ended_at or 0.0) - last_kill_at)
    slowest = max(waits.values(), default=0.0)
    print(
        f"\n{len(jobs)} meta jobs, {kills} kills in {KILLING_S:.0f}s; the slowest ended {slowest:.1f}s after the last"
    )
    for job_id, tid in jobs.items():
        check_invariants(fs, {tid: timelines[tid]}, tid, [job_id], kind="random kills", expect=None)
