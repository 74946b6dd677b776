"""The distributed job system end to end: one embedded stack per module (a real Redis server,
a real S3 endpoint, two real ``celery worker`` processes with their own node ids, and the
coordinator loop), timelines imported through ``Storage.import_timeline``, and every test
checks reads at all retained LSNs against the independent reference reader.

The fault suite's worker plugin (``tests/faultplugin.py``) stretches a sub-job in its merge,
or holds a meta job just before its one commit, so that the interleavings under test happen on
purpose instead of by luck.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis

from compactor.storage.keys import key_to_int
from compactor.storage.timeline import Storage
from tests.faultplugin import PLUGIN_ENV, hit_key, set_fault
from tests.timelines import TENANT, Layer, Timeline, Value, record, reference_read

T = TypeVar("T")

# Short clocks for tests; production defaults are in storage/settings.py.
STACK_ENV = {
    "COMPACTOR_HEARTBEAT_INTERVAL_S": "0.25",
    "COMPACTOR_HEARTBEAT_TIMEOUT_S": "3",
    "COMPACTOR_LOCK_TTL_S": "2",
    "COMPACTOR_LOCK_RETRY_DELAY_S": "0.2",
    "COMPACTOR_NO_PROGRESS_TIMEOUT_S": "60",
    "COMPACTOR_MAX_ATTEMPTS": "3",
    "COMPACTOR_TASK_HARD_TIME_LIMIT_S": "120",
    "COMPACTOR_TASK_SOFT_TIME_LIMIT_S": "100",
    **PLUGIN_ENV,
    "COMPACTOR_LOG_LEVEL": "INFO",
    "COMPACTOR_S3_MAX_ATTEMPTS": "3",
}


# ----------------------------------------------------------------------------- timelines


def banded_timeline(timeline_id: str, bands: int = 8, keys_per_band: int = 8, seed: int = 1) -> Timeline:
    """Per key band: an image layer at LSN 10 and three delta layers above it; gc cutoff 60,
    branch points 25 and 45. With ``max_job_bytes`` about an eighth of the total it splits
    into one sub-job per band or two."""
    rnd = random.Random(seed)
    layers = []
    for band in range(bands):
        k0, k1 = band * keys_per_band, (band + 1) * keys_per_band
        images = {k: [Value(10, image=f"I{k};".encode())] for k in range(k0, k1)}
        layers.append(Layer("image", (k0, k1), (10, 11), images))
        for lo, hi in ((11, 30), (30, 50), (50, 70)):
            delta = Layer("delta", (k0, k1), (lo, hi))
            for k in range(k0, k1):
                lsns = sorted(rnd.sample(range(lo, hi), 3))
                values = []
                for lsn in lsns:
                    if rnd.random() < 0.1:
                        values.append(Value(lsn, record=record(f"N{k}@{lsn};".encode(), clear=True, will_init=True)))
                    else:
                        values.append(Value(lsn, record=record(f"+{k}@{lsn};".encode())))
                delta.values[k] = values
            layers.append(delta)
    return Timeline(timeline_id, layers, cutoff=60, retain_lsns=[25, 45])


def retained_lsns(tl: Timeline) -> list[int]:
    """Every LSN whose reads must survive: branch points, leases, the horizon and above."""
    return sorted({*tl.retain_lsns, *tl.leases, *range(tl.cutoff, tl.top_lsn + 2)})


def assert_reads_exact(
    storage: Storage, timelines: dict[str, Timeline], timeline_id: str, lsns: list[int] | None = None
) -> None:
    manifest = storage.manifest(TENANT, timeline_id)
    for lsn in lsns or retained_lsns(timelines[timeline_id]):
        expected = reference_read(timelines, timeline_id, lsn)
        got = {key_to_int(k): v for k, v in storage.read(manifest, lsn)}
        assert got == expected, f"read of {timeline_id} at LSN {lsn} differs from the reference"


def manifests_written_by(storage: Storage, tenant: str, timeline: str) -> Counter[str]:
    """How many manifests each writer committed (``meta job <id>`` for a meta job's one commit)."""
    latest = storage.manifest(tenant, timeline)
    counts: Counter[str] = Counter()
    for number in range(1, latest.number + 1):
        counts[storage.manifests.load(tenant, timeline, number).written_by] += 1
    return counts


def wait_for(what: str, probe: Callable[[], T | None], timeout_s: float = 60.0, interval_s: float = 0.1) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


# ----------------------------------------------------------------------------- the stack


def _leftover_processes(stack: Any) -> list[str]:
    """Lines of ``ps`` for any process the stack started that still exists."""
    ours = {pid for _, pid in stack.processes()}
    groups = {p.pid for p in [*stack.workers.values(), *stack._retired]}
    if stack.coordinator is not None:
        groups.add(stack.coordinator.pid)
    out = subprocess.run(["ps", "-eo", "pid=,pgid=,stat=,args="], capture_output=True, text=True, check=True).stdout
    left = []
    for line in out.splitlines():
        pid, pgid, stat, *args = line.split(None, 3)
        if stat.startswith("Z"):
            continue
        socket_path = stack.redis.socket_path or "\0"
        if int(pid) in ours or int(pgid) in groups or socket_path in " ".join(args):
            left.append(line.strip())
    return left


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from compactor.coordinator.local.embedded import EmbeddedStack

    directory = tmp_path_factory.mktemp("stack")
    embedded = EmbeddedStack(
        directory, workers=2, concurrency=2, coordinator=True, coordinator_interval_s=0.5, env=STACK_ENV
    )
    embedded.start()
    try:
        yield embedded
    finally:
        embedded.stop()
        assert not _leftover_processes(embedded), "processes left behind after stop"
        assert not embedded.redis.running()


@pytest.fixture(scope="module")
def storage(stack: Any) -> Storage:
    return Storage(stack.settings)


@pytest.fixture(scope="module")
def records(stack: Any) -> Any:
    from compactor.worker.runtime.records import JobRecords
    from compactor.worker.runtime.redis_client import connect

    return JobRecords(connect(stack.settings))


def import_timeline(storage: Storage, timeline_id: str, **kwargs: Any) -> Timeline:
    tl = banded_timeline(timeline_id, **kwargs)
    storage.import_timeline(json.dumps(tl.to_json()))
    return tl


def total_bytes(storage: Storage, timeline_id: str) -> int:
    return sum(e.size for e in storage.manifest(TENANT, timeline_id).layers.values())


def send_compact(stack: Any, *, wait_result: bool = False, **payload: Any) -> str:
    """Submit through the task API as another service would (docs/task-api.md): a bare Celery
    app, no import of our code, the payload as keyword arguments."""
    from celery import Celery

    from compactor.worker.runtime.redis_client import celery_redis_url

    url = celery_redis_url(stack.settings.redis_url)
    client = Celery(broker=url, backend=url if wait_result else None)
    job_id = payload.setdefault("job_id", os.urandom(16).hex())
    result = client.send_task("compactor.compact_timeline", kwargs={"tenant_id": TENANT, **payload}, queue="light")
    if wait_result:
        planned = result.get(timeout=60)
        assert planned["job_id"] == job_id and planned["state"] == "running" and planned["sub_jobs"] >= 1, planned
    client.close()
    return str(job_id)


def wait_ended(records: Any, job_id: str, timeout_s: float = 60.0) -> Any:
    def probe() -> Any:
        meta = records.get_meta(job_id)
        return meta if meta is not None and meta.state.ended else None

    return wait_for(f"job {job_id} to end", probe, timeout_s)


def cli(stack: Any, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPACTOR_")}
    env.update(stack.env)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    return subprocess.run(
        [sys.executable, "-m", "compactor.coordinator.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def run_intervals(records: Any) -> dict[str, list[tuple[float, float, str]]]:
    """Per node, the intervals during which it held its lock for an attempt."""
    from compactor.worker.runtime.records import MetaJobRecord

    per_node: dict[str, list[tuple[float, float, str]]] = {}
    for meta in records.list_meta(limit=1000):
        assert isinstance(meta, MetaJobRecord)
        for sub in records.get_subs(meta.sub_jobs):
            for attempt in sub.attempts:
                end = attempt.ended_at if attempt.ended_at is not None else time.time()
                per_node.setdefault(attempt.node, []).append((attempt.started_at, end, f"{sub.id}#{attempt.attempt}"))
    return per_node


def overlaps(a: tuple[float, float, str], b: tuple[float, float, str]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


# ----------------------------------------------------------------------------- tests


def test_sub_jobs_run_in_parallel_commit_once_and_finalize_once(stack: Any, storage: Storage, records: Any) -> None:
    from compactor.worker.runtime.records import JobState

    tid = "a1" * 16
    tl = import_timeline(storage, tid)
    job_id = os.urandom(16).hex()
    # Stretch each sub-job a little so that two nodes visibly work at once.
    set_fault(records.r, "pause_in_merge", job_id, {"seconds": 0.2})
    send_compact(stack, timeline_id=tid, max_job_bytes=total_bytes(storage, tid) // 8, job_id=job_id, wait_result=True)
    meta = wait_ended(records, job_id)
    assert meta.state == JobState.SUCCEEDED, meta.error
    subs = records.get_subs(meta.sub_jobs)
    assert len(subs) >= 4
    assert all(s.state == JobState.SUCCEEDED and s.attempt == 1 for s in subs)

    intervals = [(a.started_at, a.ended_at, a.node) for s in subs for a in s.attempts]
    parallel = [(x, y) for x, y in pairwise(sorted(intervals)) if x[2] != y[2] and y[0] < x[1]]
    nodes = {node for _, _, node in intervals}
    events = sorted([(start, 1) for start, _, _ in intervals] + [(end, -1) for _, end, _ in intervals])
    running, most = 0, 0
    for _, step in events:
        running += step
        most = max(most, running)
    wall = max(e for _, e, _ in intervals) - min(s for s, _, _ in intervals)
    busy = sum(e - s for s, e, _ in intervals)
    print(f"\nsub-jobs={len(subs)} nodes={sorted(nodes)} overlapping pairs={len(parallel)} max at once={most} "
          f"busy/wall={busy:.2f}s/{wall:.2f}s")  # fmt: skip
    assert len(nodes) == 2 and parallel, "sub-jobs did not run in parallel on both nodes"

    assert manifests_written_by(storage, TENANT, tid) == Counter({f"meta job {job_id}": 1})
    manifest = storage.manifest(TENANT, tid)
    assert manifest.gc_compaction.last_completed_lsn == 60
    assert meta.statistics.total_sub_compaction_jobs == len(subs)
    assert records.get_inflight(TENANT, tid, "gc") is None
    assert_reads_exact(storage, {tid: tl}, tid)


def test_two_timelines_on_two_nodes_one_compaction_per_node(stack: Any, storage: Storage, records: Any) -> None:
    from compactor.worker.runtime.records import JobState

    tids = ["b1" * 16, "b2" * 16]
    tls = {tid: import_timeline(storage, tid, seed=i + 2) for i, tid in enumerate(tids)}
    job_ids = [os.urandom(16).hex() for _ in tids]
    for job_id in job_ids:
        # Each holds its node's lock for a while: the second must run on the other node.
        set_fault(records.r, "pause_in_merge", job_id, {"seconds": 1.5, "once": True})
    for tid, job_id in zip(tids, job_ids, strict=True):
        send_compact(stack, timeline_id=tid, sub_compaction=False, job_id=job_id)
    metas = [wait_ended(records, job_id) for job_id in job_ids]
    assert all(m.state == JobState.SUCCEEDED for m in metas), [m.error for m in metas]
    attempts = [records.get_sub(m.sub_jobs[0]).attempts for m in metas]
    assert all(len(a) == 1 for a in attempts)
    first, second = attempts[0][0], attempts[1][0]
    assert first.node != second.node, "the two gc-compactions ran on the same node"
    assert first.started_at < second.ended_at and second.started_at < first.ended_at, "they did not run at once"
    for tid in tids:
        assert_reads_exact(storage, tls, tid)
    assert_one_compaction_per_node(records)


def test_meta_job_replans_when_a_concurrent_commit_changes_its_inputs(
    stack: Any, storage: Storage, records: Any, tmp_path: Path
) -> None:
    from compactor.worker.engine.jobs import CompactionJob
    from compactor.worker.engine.run import EngineSettings
    from compactor.worker.runtime.records import JobState
    from compactor.worker.runtime.runner import compact

    tid = "c1" * 16
    tl = import_timeline(storage, tid)
    job_id = os.urandom(16).hex()
    set_fault(records.r, "pause_before_commit", job_id, {"seconds": 4, "once": True})
    send_compact(stack, timeline_id=tid, max_job_bytes=total_bytes(storage, tid) // 3, job_id=job_id)
    wait_for(
        "the meta job to pause before its commit",
        lambda: records.r.get(hit_key("pause_before_commit", job_id)),
    )
    first = records.get_meta(job_id)

    # Meanwhile another writer compacts two bands: layers the meta job selected are gone.
    band = CompactionJob(
        tenant_id=TENANT, timeline_id=tid, key_start="00" * 17 + "00", key_end=f"{16:036X}", lsn_end=60
    )
    outcome = compact(storage, band, EngineSettings(workdir=tmp_path), written_by="concurrent writer")
    assert outcome.manifest_number is not None

    meta = wait_ended(records, job_id)
    assert meta.state == JobState.SUCCEEDED, meta.error
    assert meta.replans == 1 and "is gone" in meta.conflicts[0]
    assert not set(meta.sub_jobs) & set(first.sub_jobs), "a re-plan makes new sub-jobs"
    assert all(s.attempt == 1 for s in records.get_subs(first.sub_jobs + meta.sub_jobs))
    counts = manifests_written_by(storage, TENANT, tid)
    assert counts == Counter({f"meta job {job_id}": 1, "concurrent writer": 1})
    # The first plan's uploads were deleted at the conflict.
    referenced = {e.object_key for n in range(storage.manifest(TENANT, tid).number + 1)
                  for e in storage.manifests.load(TENANT, tid, n).layers.values()}  # fmt: skip
    first_uploads = {e.object_key for s in records.get_subs(first.sub_jobs) for e in s.proposal.added}
    assert first_uploads and not first_uploads & referenced
    assert not first_uploads & {info.key for info in storage.objects.list_keys(f"tenants/{TENANT}/timelines/{tid}/")}
    assert_reads_exact(storage, {tid: tl}, tid)


def test_duplicated_messages_commit_once(stack: Any, storage: Storage, records: Any) -> None:
    from compactor.worker.runtime.app import CeleryPublisher
    from compactor.worker.runtime.records import JobState

    tid = "d1" * 16
    tl = import_timeline(storage, tid)
    job_id = os.urandom(16).hex()
    set_fault(records.r, "pause_in_merge", job_id, {"seconds": 0.3})
    send_compact(stack, timeline_id=tid, max_job_bytes=total_bytes(storage, tid) // 6, job_id=job_id)
    meta = wait_for("planning", lambda: (m := records.get_meta(job_id)) and m.sub_jobs and m)
    publisher = CeleryPublisher()
    for sid in meta.sub_jobs * 2:  # while they run or wait
        publisher.publish("compactor.run_sub_job", {"sub_job_id": sid})
    meta = wait_ended(records, job_id)
    assert meta.state == JobState.SUCCEEDED, meta.error
    for sid in meta.sub_jobs:  # after they ended
        publisher.publish("compactor.run_sub_job", {"sub_job_id": sid})
    publisher.publish("compactor.finalize_meta_job", {"job_id": job_id})
    time.sleep(1.5)  # let the duplicates be delivered
    subs = records.get_subs(meta.sub_jobs)
    assert all(s.state == JobState.SUCCEEDED and s.attempt == 1 for s in subs), [(s.id, s.attempt) for s in subs]
    assert manifests_written_by(storage, TENANT, tid) == Counter({f"meta job {job_id}": 1})
    assert_reads_exact(storage, {tid: tl}, tid)


def test_cancelled_job_commits_nothing(stack: Any, storage: Storage, records: Any) -> None:
    from compactor.storage import layout
    from compactor.worker.runtime.records import JobState

    tid = "e1" * 16
    tl = import_timeline(storage, tid)
    before = storage.manifest(TENANT, tid)
    job_id = os.urandom(16).hex()
    set_fault(records.r, "pause_in_merge", job_id, {"seconds": 30})
    send_compact(stack, timeline_id=tid, max_job_bytes=total_bytes(storage, tid) // 8, job_id=job_id)
    wait_for(
        "a sub-job to pause in its merge",
        lambda: (
            (m := records.get_meta(job_id)) and any(s.progress.phase == "paused" for s in records.get_subs(m.sub_jobs))
        ),
    )
    result = cli(stack, "job", "cancel", job_id)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["cancel_requested"] is True
    meta = wait_ended(records, job_id, timeout_s=30)
    assert meta.state == JobState.CANCELLED
    subs = records.get_subs(meta.sub_jobs)
    assert all(s.state == JobState.CANCELLED for s in subs)
    assert any(s.attempt == 0 for s in subs), "queued sub-jobs are cancelled without running"
    assert any(s.attempt == 1 for s in subs), "running sub-jobs stop at their next check"
    after = storage.manifest(TENANT, tid)
    assert after.number == before.number and after.layers == before.layers, "a cancelled job committed"
    # The stopped attempts deleted what they had uploaded, and finalize what the others had.
    in_bucket = {info.key for info in storage.objects.list_keys(layout.layers_prefix(TENANT, tid))}
    assert in_bucket == {e.object_key for e in after.layers.values()}
    assert_reads_exact(storage, {tid: tl}, tid)
    records.r.delete(f"compactor:fault:pause_in_merge:{job_id}")


def test_cli_compact_wait_jobs_and_show(stack: Any, storage: Storage, records: Any) -> None:
    tid = "f1" * 16
    tl = import_timeline(storage, tid, bands=4)
    result = cli(stack, "compact", TENANT, tid, "--max-job-size", "4KiB", "--wait", "--timeout", "60")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)  # the final status alone, ready for jq
    job_id = status["job_id"]
    assert status["state"] == "succeeded"
    # Not a terminal: progress as whole lines on stderr, the last one the end state.
    progress = [line for line in result.stderr.splitlines() if line.startswith(f"job {job_id[:8]} ")]
    assert progress and progress[-1].startswith(f"job {job_id[:8]} succeeded: sub-jobs ")
    assert status["statistics"]["succeeded_sub_compaction_jobs"] == len(status["sub_jobs"]) >= 2
    assert_reads_exact(storage, {tid: tl}, tid)

    listing = cli(stack, "jobs", "--json")
    assert listing.returncode == 0, listing.stderr
    assert job_id in {job["job_id"] for job in json.loads(listing.stdout)["jobs"]}
    show = cli(stack, "job", "show", job_id[:8])
    assert show.returncode == 0 and json.loads(show.stdout)["state"] == "succeeded"

    missing = cli(stack, "job", "show", "0" * 32)
    assert missing.returncode != 0 and missing.stderr.strip().splitlines()[-1] == f"error: job {'0' * 32} not found"
    bad = cli(stack, "compact", TENANT, tid, "--max-job-size", "4XB")
    assert bad.returncode != 0 and "invalid size" in bad.stderr
    gone = cli(stack, "compact", TENANT, "9" * 32)
    assert gone.returncode != 0 and gone.stderr.strip().splitlines()[-1].startswith("error: timeline")


def test_malformed_messages_are_rejected_in_one_line_and_workers_survive(stack: Any) -> None:
    from kombu import Connection

    from compactor.worker.runtime.app import app
    from compactor.worker.runtime.redis_client import celery_redis_url

    bodies = [
        (b"{not json", "application/json", "message rejected: body not decodable"),
        (b"\x80\x04K\x01.", "application/x-python-serialize", "message rejected: invalid task message"),
        (json.dumps("a string").encode(), "application/json", "message rejected: malformed task message"),
        (json.dumps([["x"], {}, {}]).encode(), "application/json", "payload rejected: expected keyword arguments"),
    ]
    with Connection(celery_redis_url(stack.settings.redis_url)) as conn:
        producer = conn.Producer()
        for body, content_type, _ in bodies:
            task_id = os.urandom(16).hex()
            headers = {"task": "compactor.compact_timeline", "id": task_id, "root_id": task_id, "lang": "py"}
            producer.publish(
                body, exchange="light", routing_key="light", content_type=content_type, content_encoding="utf-8",
                headers=headers,
            )  # fmt: skip

    def logged() -> bool:
        text = "".join(w.log_path.read_text(errors="replace") for w in stack.workers.values())
        return all(expected in text for _, _, expected in bodies)

    wait_for("the rejections to be logged", logged, timeout_s=30)
    replies = app.control.ping(timeout=1)
    assert {n for r in replies for n in r} == {h for n in stack.workers for h in stack.hostnames(n)}, "a worker died"


def test_killed_worker_sub_job_is_reclaimed_and_finishes(stack: Any, storage: Storage, records: Any) -> None:
    from compactor.worker.runtime.payloads import sub_job_id
    from compactor.worker.runtime.records import JobState

    tid = "a2" * 16
    tl = import_timeline(storage, tid)
    job_id = os.urandom(16).hex()
    sid = sub_job_id(job_id, 0)
    set_fault(records.r, "pause_in_merge", sid, {"seconds": 60, "once": True})
    send_compact(stack, timeline_id=tid, sub_compaction=False, job_id=job_id)
    sub = wait_for("the sub-job to pause", lambda: (s := records.get_sub(sid)) and s.progress.phase == "paused" and s)
    victim = sub.owner.node
    killed_at = time.time()
    stack.kill_worker(victim, signal.SIGKILL)

    meta = wait_ended(records, job_id, timeout_s=60)
    assert meta.state == JobState.SUCCEEDED, meta.error
    sub = records.get_sub(sid)
    assert [a.node == victim for a in sub.attempts] == [True, False]
    assert sub.attempts[0].outcome.startswith("preempted: no heartbeat")
    assert sub.attempts[1].outcome == "succeeded" and sub.reclaims == 1
    print(f"\nreclaimed {sub.attempts[1].started_at - killed_at:.1f}s after the kill")
    assert manifests_written_by(storage, TENANT, tid) == Counter({f"meta job {job_id}": 1})
    assert_reads_exact(storage, {tid: tl}, tid)


def assert_one_compaction_per_node(records: Any) -> None:
    for node, intervals in run_intervals(records).items():
        ordered = sorted(intervals)
        for a, b in pairwise(ordered):
            assert not overlaps(a, b), f"node {node} ran {a[2]} and {b[2]} at once"


def test_no_node_ever_ran_two_gc_compactions_at_once(stack: Any, records: Any) -> None:
    per_node = run_intervals(records)
    print(f"\nattempts per node: { {n: len(i) for n, i in per_node.items()} }")
    assert len(per_node) == 2
    assert_one_compaction_per_node(records)
    # Redis answers through the same socket every process uses.
    assert redis.Redis.from_url(stack.settings.redis_url).ping()


def l0_stack_timeline(timeline_id: str, count: int = 6, keys: int = 64, seed: int = 2) -> Timeline:
    """``count`` contiguous L0s as a pageserver flushes them: the first writes an image of every
    key, each later one appends to some keys; no gc cutoff, so gc-compaction stays away."""
    from tests.timelines import KEY_MAX_INT

    rnd = random.Random(seed)
    layers = []
    for i in range(count):
        lo, hi = 10 + 10 * i, 20 + 10 * i
        values: dict[int, list[Value]] = {}
        for k in range(keys):
            if i == 0:
                values[k] = [Value(lo + 1, image=f"I{k};".encode())]
            elif rnd.random() < 0.5:
                lsns = sorted(rnd.sample(range(lo, hi), 2))
                values[k] = [Value(lsn, record=record(f"+{k}@{lsn};".encode())) for lsn in lsns]
        layers.append(Layer("delta", (0, KEY_MAX_INT), (lo, hi), values))
    return Timeline(timeline_id, layers)


def test_l0_compaction_through_workers_in_several_sub_jobs(stack: Any, storage: Storage, records: Any) -> None:
    from compactor.worker.runtime.records import JobState

    tid = "b7" * 16
    tl = l0_stack_timeline(tid)
    document = tl.to_json()
    document["settings"] = {"compaction_threshold": 4, "checkpoint_distance": 2000}
    storage.import_timeline(json.dumps(document))
    job_id = send_compact(
        stack, timeline_id=tid, kind="l0", max_job_bytes=total_bytes(storage, tid) // 4, wait_result=True
    )
    meta = wait_ended(records, job_id)
    assert meta.state == JobState.SUCCEEDED, meta.error
    assert meta.request.kind == "l0" and not meta.pending
    subs = records.get_subs(meta.sub_jobs)
    assert len(subs) >= 3 and all(s.state == JobState.SUCCEEDED for s in subs)
    assert manifests_written_by(storage, TENANT, tid) == Counter({f"meta job {job_id}": 1})
    layers = storage.manifest(TENANT, tid).layer_names()
    assert not [n for n in layers if n.is_l0] and len(layers) > len(subs)
    assert {n.lsn_range for n in layers} == {(10, 70)}
    assert_reads_exact(storage, {tid: tl}, tid, list(range(0, 72)))


def test_l0_compaction_never_waits_behind_gc_compaction(stack: Any, storage: Storage, records: Any) -> None:
    """Issue 11: with every node's one gc slot held by a gc-compaction sub-job, L0 compaction of
    another timeline still runs at once, in its nodes' L0 slots (the ``l0`` queue)."""
    from compactor.worker.runtime.node_lock import LOCK_PREFIX
    from compactor.worker.runtime.records import JobState

    gc_tid, l0_tid = "b8" * 16, "b9" * 16
    import_timeline(storage, gc_tid)
    gc_job = os.urandom(16).hex()
    set_fault(records.r, "pause_in_merge", gc_job, {"seconds": 60})
    send_compact(stack, timeline_id=gc_tid, max_job_bytes=total_bytes(storage, gc_tid) // 2, job_id=gc_job)

    def every_gc_slot_held() -> bool:
        # Held by this job's paused sub-jobs, or by another test's: either way no gc slot is free.
        meta = records.get_meta(gc_job)
        paused = meta is not None and any(s.progress.phase == "paused" for s in records.get_subs(meta.sub_jobs))
        live = [node for node, proc in stack.workers.items() if proc.alive()]  # an earlier test kills one
        return paused and all(records.r.exists(LOCK_PREFIX + node) for node in live)

    wait_for("a gc sub-job paused in its merge, and every node's gc slot held", every_gc_slot_held)
    tl = l0_stack_timeline(l0_tid)
    document = tl.to_json()
    document["settings"] = {"compaction_threshold": 4, "checkpoint_distance": 2000}
    storage.import_timeline(json.dumps(document))
    l0_job = send_compact(stack, timeline_id=l0_tid, kind="l0", max_job_bytes=total_bytes(storage, l0_tid) // 2)
    meta = wait_ended(records, l0_job, timeout_s=45)
    assert meta.state == JobState.SUCCEEDED, meta.error
    # (Another test's sub-job may have let its node go meanwhile: this job's own must hold.)
    still = records.require_meta(gc_job)
    paused = [s for s in records.get_subs(still.sub_jobs) if s.progress.phase == "paused"]
    assert not still.state.ended and paused, "a gc sub-job still holds its node's slot: the L0 sub-jobs ran beside it"
    assert not [n for n in storage.manifest(TENANT, l0_tid).layer_names() if n.is_l0]
    assert_reads_exact(storage, {l0_tid: tl}, l0_tid, list(range(0, 72)))
    assert cli(stack, "job", "cancel", gc_job).returncode == 0
    assert wait_ended(records, gc_job, timeout_s=30).state == JobState.CANCELLED
    records.r.delete(f"compactor:fault:pause_in_merge:{gc_job}")
