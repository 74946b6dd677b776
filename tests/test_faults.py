"""Fault suite, processes: SIGKILLed workers at every phase of a sub-job and of the meta job's
one commit, frozen workers, a Redis restart, duplicated task messages and node locks that expire
under a running sub-job.

Real processes throughout (``tests.faultkit``: the embedded Redis and S3 endpoint, two
``celery worker`` processes, the coordinator, S3 behind the fault proxy). The workers' fault
plugin (``tests/faultplugin.py``) holds a sub-job, or the finalize that commits, at a named
point (``compactor.worker.runtime.plugins.POINTS``) so that a kill lands exactly there; other
scenarios kill at random times. After every scenario ``check_invariants`` asserts that reads
are exact, the manifest chain valid, nothing referenced lost, no orphan left after a cleanup,
and every job ended clearly.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections.abc import Iterator

import pytest
import redis

from compactor.storage.keys import KEY_MAX, KEY_MIN
from compactor.worker.runtime.plugins import POINTS
from compactor.worker.runtime.records import JobState, SubJobRecord
from tests.faultkit import (
    FaultStack,
    FaultSummary,
    check_invariants,
    commits_by,
    fault_summary,  # noqa: F401 - the session fixture
    make_fault_stack,
    new_timeline,
    set_fault,
    submit,
    wait_ended,
    wait_for,
    wait_hit,
    wait_planned,
)
from tests.test_distributed import l0_stack_timeline
from tests.timelines import TENANT, Timeline

pytestmark = [pytest.mark.faults, pytest.mark.integration]

COMMIT_POINTS = ["before_commit", "in_commit"]  # finalize, after the last sub-job ended
SUB_JOB_POINTS = [point for point in POINTS if point not in COMMIT_POINTS]
KILL_POINTS = SUB_JOB_POINTS + COMMIT_POINTS  # every point the workers name
SEEDS = [1, 2]


@pytest.fixture(scope="module")
def fs(tmp_path_factory: pytest.TempPathFactory, fault_summary: FaultSummary) -> Iterator[FaultStack]:  # noqa: F811
    yield from make_fault_stack(tmp_path_factory.mktemp("faults"), fault_summary)


def assert_committed_once(fs: FaultStack, tid: str, job_id: str) -> None:
    """The meta job wrote exactly one manifest, and no other writer wrote any since the import."""
    commits = commits_by(fs, tid)
    commits.pop("import", None)
    assert commits == {f"meta job {job_id}": [""]}, commits


# ----------------------------------------------------------------------------- orphans


def test_coordinator_removes_orphans_on_its_own(fs: FaultStack) -> None:
    """The coordinator loop runs orphan cleanup every COMPACTOR_ORPHAN_INTERVAL_S: a stray
    upload goes once it is older than COMPACTOR_ORPHAN_GRACE_S; referenced layers stay. (First
    in the module: with few timelines in the bucket the coordinator's ticks are short.)"""
    from compactor.storage import layout

    fs.ready()
    tid, tl = new_timeline(fs, bands=2, seed=8)
    stray = layout.layers_prefix(TENANT, tid) + "stray-upload-of-a-killed-attempt"
    fs.direct.objects.put_bytes(stray, b"x" * 100)
    fs.summary.faults_injected += 1
    referenced = {e.object_key for e in fs.direct.manifest(TENANT, tid).layers.values()}
    grace = float(fs.settings.orphan_grace_s)
    wait_for("the coordinator to delete the stray object", lambda: fs.direct.objects.head(stray) is None, grace + 15)
    left = {i.key for i in fs.direct.objects.list_keys(layout.layers_prefix(TENANT, tid))}
    assert left == referenced
    check_invariants(fs, {tid: tl}, tid, [], kind="periodic orphan cleanup")


# ----------------------------------------------------------------------------- kills at named points


@pytest.mark.parametrize("where", KILL_POINTS)
def test_sigkill_at_each_phase(fs: FaultStack, where: str) -> None:
    """Hold one sub-job (or the meta job's finalize) at ``where``, SIGKILL its worker (the whole
    machine, or only the pool process running it), restart the worker: the sub-job is reclaimed
    and runs again, or the finalize is repeated; the meta job commits exactly once and nothing
    leaks."""
    for seed in SEEDS:
        rnd = random.Random(f"{where}/{seed}")
        fs.ready()
        tid, tl = new_timeline(fs, bands=4, seed=seed)
        job_id = os.urandom(16).hex()
        set_fault(fs, f"pause_{where}", job_id, seconds=15, once=True)
        submit(fs, tid, job_id=job_id, parts=rnd.choice([2, 3, 4]))
        hit = wait_hit(fs, f"pause_{where}", job_id)
        whole_machine = seed % 2 == 1
        if whole_machine:
            fs.kill(hit["node"])
        else:
            fs.kill_pid(hit["pid"])
        meta = wait_ended(fs, job_id)
        check_invariants(fs, {tid: tl}, tid, [job_id], kind=f"sigkill {where}")
        assert_committed_once(fs, tid, job_id)
        assert meta.state == JobState.SUCCEEDED
        if where in COMMIT_POINTS:
            assert hit["sub_job"] == job_id
            continue
        sub = fs.records.get_sub(hit["sub_job"])
        assert sub is not None and sub.attempt >= 2, f"the killed attempt was not replaced: {sub}"
        assert (sub.attempts[0].outcome or "").startswith("preempted"), sub.attempts[0]


def new_l0_timeline(fs: FaultStack) -> tuple[str, Timeline]:
    """A timeline of L0 deltas over every key, enough of them for L0 compaction to be due."""
    tid = os.urandom(16).hex()
    tl = l0_stack_timeline(tid)
    document = tl.to_json()
    document["settings"] = {"compaction_threshold": 4, "checkpoint_distance": 2000}
    fs.direct.import_timeline(json.dumps(document))
    return tid, tl


@pytest.mark.parametrize(("kind", "where"), [("l0", "in_merge"), ("l0", "in_commit"), ("image", "in_upload")])
def test_sigkill_during_l0_compaction_and_image_creation(fs: FaultStack, kind: str, where: str) -> None:
    """L0 compaction (``--kind l0``) and image creation (``--kind image --force``) under kills:
    one of its sub-jobs held in its merge or right after an upload, or its finalize right after
    the manifest was written, and that node SIGKILLed and restarted. The job succeeds, commits
    once, leaves no L0 (or an image layer over every key), and reads at every LSN are exact."""
    fs.ready()
    tid, tl = new_l0_timeline(fs)
    job_id = os.urandom(16).hex()
    set_fault(fs, f"pause_{where}", job_id, seconds=15, once=True)
    submit(fs, tid, job_id=job_id, parts=3, kind=kind, force=kind == "image")
    fs.kill(wait_hit(fs, f"pause_{where}", job_id)["node"])
    meta = wait_ended(fs, job_id)
    check_invariants(fs, {tid: tl}, tid, [job_id], kind=f"sigkill {kind} {where}")
    assert_committed_once(fs, tid, job_id)
    assert meta.state == JobState.SUCCEEDED
    names = fs.direct.manifest(TENANT, tid).layer_names()
    if kind == "l0":
        assert not [name for name in names if name.is_l0]
    else:
        images = sorted(name.key_range for name in names if not name.is_delta)
        assert images and images[0].start == KEY_MIN and images[-1].end == KEY_MAX


def test_sigkill_at_random_times(fs: FaultStack) -> None:
    """Sub-jobs stretched a little at random points; a worker (both, in one round) SIGKILLed at
    a random moment of the run, then restarted."""
    for seed in range(2):
        rnd = random.Random(seed)
        fs.ready()
        tid, tl = new_timeline(fs, bands=4, seed=seed + 10)
        job_id = os.urandom(16).hex()
        for where in rnd.sample(KILL_POINTS, 2):
            set_fault(fs, f"pause_{where}", job_id, seconds=rnd.uniform(0.2, 0.6))
        submit(fs, tid, job_id=job_id, parts=4)
        wait_planned(fs, job_id)
        time.sleep(rnd.uniform(0.2, 2.0))
        nodes = sorted(fs.stack.workers) if seed == 1 else [rnd.choice(sorted(fs.stack.workers))]
        for node in nodes:
            fs.kill(node)
        wait_ended(fs, job_id)
        check_invariants(fs, {tid: tl}, tid, [job_id], kind="sigkill random")
        assert_committed_once(fs, tid, job_id)


def test_frozen_worker_is_superseded_and_never_records(fs: FaultStack) -> None:
    """SIGSTOP a worker holding a sub-job at its last upload (a long GC pause, a partitioned
    node) until the coordinator gives the sub-job to the other node and it finishes; SIGCONT:
    the old attempt finds itself superseded (lock gone, attempt stale), records nothing and
    deletes what it uploaded."""
    fs.ready(wait=True)  # the other node must be there to take over
    tid, tl = new_timeline(fs, bands=4, seed=3)
    job_id = os.urandom(16).hex()
    set_fault(fs, "pause_in_upload", job_id, seconds=1.5, once=True)
    submit(fs, tid, job_id=job_id, sub_compaction=False)
    hit = wait_hit(fs, "pause_in_upload", job_id)
    frozen = fs.stack.workers[hit["node"]]
    frozen.signal_group(signal.SIGSTOP)
    fs.summary.faults_injected += 1

    def finished() -> SubJobRecord | None:
        sub = fs.records.get_sub(hit["sub_job"])
        return sub if sub is not None and sub.state == JobState.SUCCEEDED else None

    try:
        sub = wait_for("the other node to finish the sub-job", finished, timeout_s=60)
    finally:
        frozen.signal_group(signal.SIGCONT)
    assert sub.attempts[-1].node != hit["node"]
    time.sleep(2.5)  # the thawed attempt runs into its checks
    check_invariants(fs, {tid: tl}, tid, [job_id], kind="frozen worker")
    assert_committed_once(fs, tid, job_id)
    log = frozen.log_path.read_text(errors="replace")
    assert "superseded" in log or "lock of" in log, "the old attempt did not stop"


# ----------------------------------------------------------------------------- node lock


@pytest.mark.parametrize("how", ["deleted", "expired", "stolen"])
def test_node_lock_lost_while_a_sub_job_runs(fs: FaultStack, how: str) -> None:
    """The node lock disappears (deleted, TTL cut to a millisecond, or taken over by another
    token) while a sub-job is held in its merge: that attempt must stop and record nothing;
    the sub-job runs again and the job succeeds."""
    fs.ready()
    tid, tl = new_timeline(fs, bands=3, seed=4)
    job_id = os.urandom(16).hex()
    set_fault(fs, "pause_in_merge", job_id, seconds=2.0, once=True)
    submit(fs, tid, job_id=job_id, sub_compaction=False)
    hit = wait_hit(fs, "pause_in_merge", job_id)
    lock_key = f"compactor:node-lock:{hit['node']}"
    r = fs.records.r
    assert r.exists(lock_key), "the sub-job runs without its node lock"
    if how == "deleted":
        r.delete(lock_key)
    elif how == "expired":
        r.pexpire(lock_key, 1)
    else:
        r.set(lock_key, "someone-else", px=1500)
    fs.summary.faults_injected += 1
    meta = wait_ended(fs, job_id)
    check_invariants(fs, {tid: tl}, tid, [job_id], kind=f"lock {how}")
    sub = fs.records.get_sub(hit["sub_job"])
    assert sub is not None and sub.attempt >= 2, [a.outcome for a in sub.attempts] if sub else None
    assert "node lock" in (sub.attempts[0].outcome or ""), sub.attempts[0]
    assert sub.attempts[-1].outcome == "succeeded" and len(sub.attempts) >= 2
    assert_committed_once(fs, tid, job_id)
    assert meta.state == JobState.SUCCEEDED


# ----------------------------------------------------------------------------- duplicates


@pytest.mark.parametrize("kind", ["gc", "l0"])
def test_duplicate_deliveries_of_every_task(fs: FaultStack, kind: str) -> None:
    """Every task message delivered more than once, at every stage: the request, the plan,
    each sub-job (while it waits, while it runs on the other node, after it ended; for L0
    compaction also on the gc queue, where it is not routed) and the finalize (early, while it
    commits, and after the end). One attempt per sub-job, one commit."""
    fs.ready()
    tid, tl = new_timeline(fs, bands=6, seed=5) if kind == "gc" else new_l0_timeline(fs)
    job_id = os.urandom(16).hex()
    set_fault(fs, "pause_in_merge", job_id, seconds=0.3)
    set_fault(fs, "pause_before_commit", job_id, seconds=1.0, once=True)
    submit(fs, tid, job_id=job_id, parts=4, kind=kind)
    submit(fs, tid, job_id=job_id, parts=4, kind=kind)  # the same request again: the same job
    publisher = fs.publisher()
    for _ in range(2):
        publisher.publish("compactor.plan_meta_job", {"job_id": job_id})
    meta = wait_planned(fs, job_id)
    assert len(meta.sub_jobs) >= 3
    duplicates = 3
    for sid in meta.sub_jobs * 2:  # waiting or running
        publisher.publish("compactor.run_sub_job", {"sub_job_id": sid})
        duplicates += 1
    publisher.publish("compactor.finalize_meta_job", {"job_id": job_id})  # early: refused
    duplicates += 1
    wait_hit(fs, "pause_before_commit", job_id)
    publisher.publish("compactor.finalize_meta_job", {"job_id": job_id})  # while it commits
    duplicates += 1
    wait_ended(fs, job_id)
    for sid in meta.sub_jobs:  # after the end
        publisher.publish("compactor.run_sub_job", {"sub_job_id": sid})
        duplicates += 1
    publisher.publish("compactor.finalize_meta_job", {"job_id": job_id})
    duplicates += 1
    time.sleep(1.5)  # let them be delivered
    fs.summary.faults_injected += duplicates
    check_invariants(fs, {tid: tl}, tid, [job_id], kind=f"duplicate delivery ({kind})")
    subs = fs.records.get_subs(meta.sub_jobs)
    assert all(s.state == JobState.SUCCEEDED and s.attempt == 1 for s in subs), [(s.id, s.attempt) for s in subs]
    assert_committed_once(fs, tid, job_id)
    jobs_for_timeline = [m for m in fs.records.list_meta(200) if m.timeline_id == tid]
    assert [m.id for m in jobs_for_timeline] == [job_id], "the resent request made a second job"


def test_duplicate_while_reclaimed_attempt_is_alive(fs: FaultStack) -> None:
    """The message of a sub-job whose first attempt was taken away (its worker killed) is
    delivered again while the second attempt runs: the duplicate is ignored."""
    fs.ready()
    tid, tl = new_timeline(fs, bands=3, seed=6)
    job_id = os.urandom(16).hex()
    set_fault(fs, "pause_in_merge", job_id, seconds=15, once=True)
    submit(fs, tid, job_id=job_id, sub_compaction=False)
    hit = wait_hit(fs, "pause_in_merge", job_id)
    set_fault(fs, "pause_in_upload", job_id, seconds=1.0, once=True)
    fs.kill(hit["node"])
    second = wait_hit(fs, "pause_in_upload", job_id)
    assert second["attempt"] >= 2
    publisher = fs.publisher()
    for _ in range(3):
        publisher.publish("compactor.run_sub_job", {"sub_job_id": hit["sub_job"]})
    fs.summary.faults_injected += 3
    wait_ended(fs, job_id)
    time.sleep(1.0)
    check_invariants(fs, {tid: tl}, tid, [job_id], kind="duplicate after reclaim")
    sub = fs.records.get_sub(hit["sub_job"])
    assert sub is not None and sub.attempt == second["attempt"], [a.outcome for a in sub.attempts] if sub else None
    assert_committed_once(fs, tid, job_id)


# ----------------------------------------------------------------------------- redis restart


def save_now(r: redis.Redis, timeout_s: float = 30.0) -> None:
    """SAVE, waiting out a background save the server's own save points may have started
    (Redis refuses SAVE while one runs)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            r.save()
            return
        except redis.ResponseError as e:
            if "in progress" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def restart_redis(fs: FaultStack, *, down_s: float) -> None:
    """Stop the Redis server and start it again on the same socket and database file, as an
    orderly restart (an upgrade, a failover with AOF) does: what was written is kept."""
    server = fs.stack.redis
    socket_path = server.socket_path
    save_now(fs.records.r)
    server.stop()
    time.sleep(down_s)
    server.start()
    assert server.socket_path == socket_path, "Redis came back on another socket"
    fs.summary.faults_injected += 1


@pytest.mark.parametrize("phase", ["running", "paused before commit"])
def test_redis_restart_mid_run(fs: FaultStack, phase: str) -> None:
    """Redis goes away for a moment while sub-jobs run (or the meta job waits at its commit). Workers
    and coordinator reconnect; the job ends succeeded, or in a clear failed state and then a
    second run of the same request succeeds."""
    fs.ready(wait=True)
    tid, tl = new_timeline(fs, bands=6, seed=7)
    job_id = os.urandom(16).hex()
    if phase == "paused before commit":
        set_fault(fs, "pause_before_commit", job_id, seconds=1.0)
    else:
        set_fault(fs, "pause_in_merge", job_id, seconds=0.3)
    submit(fs, tid, job_id=job_id, parts=4)
    if phase == "paused before commit":
        wait_hit(fs, "pause_before_commit", job_id)
    else:
        wait_planned(fs, job_id)
    restart_redis(fs, down_s=1.0)
    meta = wait_ended(fs, job_id, timeout_s=120)
    jobs = [job_id]
    if meta.state != JobState.SUCCEEDED:
        assert meta.error, "a failed job must say why"
        print(f"\nafter the Redis restart the job ended {meta.state.value}: {meta.error}; running it again")
        again = submit(fs, tid, parts=4)
        assert wait_ended(fs, again, timeout_s=120).state == JobState.SUCCEEDED
        jobs.append(again)
    check_invariants(fs, {tid: tl}, tid, jobs, kind=f"redis restart ({phase})", expect=None)
    fs.stack.wait_workers()  # every worker still answers
