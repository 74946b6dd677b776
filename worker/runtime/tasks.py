"""The Celery tasks: a thin shell around the meta-job flow (planning, the one commit in finalize),
which the ``compactor worker`` command installs (``install``; the coordination layer implements
``MetaJobFlow``), and around ``compactor.worker.runtime.runner`` (one sub-job). Task names are
the stable API of docs/task-api.md.

Running a sub-job (``compactor.run_sub_job``):

1. a sub-job that has ended, or runs elsewhere with a live heartbeat, is a duplicate delivery:
   nothing to do;
2. take the node's slot for the job's kind without waiting (the node lock for gc, an L0 slot for
   l0 and image: ``node_lock.take_slot``); a busy node sends the message back to the queue with a
   delay (not holding a worker slot, not counting as an attempt);
3. claim the record: attempt + 1 and a fresh owner token; over the attempt cap it fails;
4. run the sub-job with a heartbeat thread that renews the lock, writes heartbeat and progress
   through the attempt-guarded record, and notices cancellation, a lost lock or a superseded
   attempt; the engine stops at its next check, and lock, attempt and cancellation are verified
   once more before the outcome is recorded (an attempt that may not record it deletes its
   uploads);
5. record the outcome (statistics and this sub-job's part of the proposal) and hand over to
   ``dispatch.sub_job_ended`` (finalize, which commits, once every sub-job has ended).

A task whose job ended failed or cancelled ends FAILURE or REVOKED (``JobEnded``), so that
Flower and the result backend tell the truth; the job record stays the source of truth.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import redis
from celery.exceptions import Ignore, SoftTimeLimitExceeded
from celery.utils.saferepr import saferepr
from pydantic import BaseModel, ValidationError

from compactor.storage.errors import CompactorError, StoreError, one_line
from compactor.storage.object_store import RequestCounter
from compactor.storage.settings import Settings
from compactor.storage.timeline import Checkpoint, Storage
from compactor.worker.engine.run import EngineSettings, Hooks, Progress
from compactor.worker.runtime import (
    allocator,
    attempts,
    deliveries,  # noqa: F401  (connects the worker's delivery signals)
    dispatch,
    metrics,
    plugins,
    runner,
)
from compactor.worker.runtime.app import CeleryPublisher, app, current_settings, node_id
from compactor.worker.runtime.attempts import ClaimOutcome, StaleAttempt
from compactor.worker.runtime.dispatch import TASK_COMPACT, TASK_FINALIZE, TASK_PLAN, TASK_RUN, Publisher
from compactor.worker.runtime.node_lock import Heartbeat, NodeLock, take_slot
from compactor.worker.runtime.payloads import MetaJobRef, SubJobRef
from compactor.worker.runtime.plugins import Attempt, Plugins
from compactor.worker.runtime.records import JobProgress, JobRecords, JobState, MetaJobRecord, SubJobRecord, now
from compactor.worker.runtime.redis_client import connect

log = logging.getLogger(__name__)


class JobStopped(CompactorError):
    """The running attempt must stop without committing."""


class JobCancelled(JobStopped):
    pass


class AttemptSuperseded(JobStopped):
    pass


class NodeLockLost(JobStopped):
    pass


class JobEnded(Exception):
    """Raised by a task's Celery shell once the job it ran has ended failed, its record stored:
    the task ends FAILURE with the job's one-line error. Expected (``Task.throws``): Celery logs
    one line without a traceback and acknowledges the message (``task_acks_on_failure_or_timeout``)
    instead of delivering it again, since only the job record decides what runs again."""


class JobEndedCancelled(JobEnded, Ignore):  # type: ignore[misc]
    """The job ended cancelled: the shell marks the task REVOKED, as Celery does for a task
    revoked through it, and Celery then leaves that state alone (``Ignore``)."""


class RetryLater(Exception):
    def __init__(self, countdown: float) -> None:
        super().__init__(f"retry in {countdown}s")
        self.countdown = countdown


PROGRESS_INTERVAL_S = 1.0
"""How often a running sub-job's progress reaches its record, and Flower, when it changed."""

PROGRESS_EVENT = "task-STARTED"
"""The task event that carries a sub-job's progress. Flower keeps only Celery's own task fields,
so the numbers ride in ``result`` too (the final result replaces them). Celery's event state
takes the state of an unknown event from its upper-cased name: this one keeps the task STARTED.
A custom state such as PROGRESS would rank after REVOKED in Celery's order of states, and a
cancelled task could then never show REVOKED; ``task-started`` itself would count as a second
start in Flower's metrics."""

# Errors worth another attempt: the object store or Redis failing after their own retries.
_RETRYABLE: tuple[type[BaseException], ...] = (StoreError, redis.ConnectionError, redis.TimeoutError)


class MetaJobFlow(Protocol):
    """The coordination work that light-queue tasks carry out: creating and planning meta jobs,
    and finalize with its one commit. The runtime calls up into the coordination layer only
    through this (``compactor.coordinator.jobs.meta_jobs.MetaJobs`` implements it)."""

    def submit(self, payload: dict[str, Any]) -> MetaJobRecord:
        """Create the meta job of a ``compact_timeline`` payload (or find it, for a resent job id)
        and plan it; an invalid payload becomes a failed meta job. Raises CompactorError when the
        payload's job id belongs to another request."""
        ...

    def plan(self, job_id: str) -> MetaJobRecord: ...

    def finalize(self, job_id: str, storage: Storage, reached: Checkpoint | None) -> MetaJobRecord:
        """Commit and end the meta job; ``reached`` is told of ``before_commit`` and
        ``in_commit`` (``compactor.worker.runtime.plugins``)."""
        ...


FlowFactory = Callable[[Storage, JobRecords, Publisher, Settings], MetaJobFlow]
_flow_factory: FlowFactory | None = None


def install(factory: FlowFactory) -> None:
    """Set the meta-job flow of this process's tasks (before the pool forks: children inherit it)."""
    global _flow_factory
    _flow_factory = factory


@dataclass
class Context:
    """What a worker process needs; built once per process (never shared across fork)."""

    settings: Settings
    storage: Storage
    records: JobRecords
    publisher: Publisher
    node_id: str
    flow: MetaJobFlow
    plugins: Plugins


_context: Context | None = None
_context_pid = 0
_context_lock = threading.Lock()


def context() -> Context:
    global _context, _context_pid
    with _context_lock:
        if _context is None or _context_pid != os.getpid():
            if _flow_factory is None:
                raise CompactorError("no meta-job flow installed: start workers with `compactor worker`")
            settings = current_settings()
            storage = Storage(settings, store_observer=metrics.StoreMetrics(), commit_observer=metrics.CommitMetrics())
            records = JobRecords(connect(settings))
            publisher = CeleryPublisher()
            _context = Context(
                settings=settings,
                storage=storage,
                records=records,
                publisher=publisher,
                node_id=node_id(settings),
                flow=_flow_factory(storage, records, publisher, settings),
                plugins=plugins.load(settings),
            )
            _context_pid = os.getpid()
        return _context


# ----------------------------------------------------------------------------- payloads


class Rejected(CompactorError):
    """A payload that is not keyword arguments of the expected shape."""


def payload_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The payload as a dict: keyword arguments, or one positional dict."""
    if args and not kwargs and len(args) == 1 and isinstance(args[0], dict):
        return dict(args[0])
    if args:
        raise Rejected(f"payload rejected: expected keyword arguments (or one JSON object), got {len(args)} positional")
    return dict(kwargs)


def parse(model: type[BaseModel], args: tuple[Any, ...], kwargs: dict[str, Any], task: str) -> Any:
    try:
        return model.model_validate(payload_of(args, kwargs))
    except ValidationError as err:
        raise Rejected(one_line(err)) from None


def _rejected(task: str, err: Rejected) -> dict[str, Any]:
    log.error("task payload rejected task=%s error=%r", task, str(err))
    return {"state": "rejected", "error": str(err)}


# ----------------------------------------------------------------------------- meta jobs


def compact_timeline(ctx: Context, payload: dict[str, Any]) -> dict[str, Any]:
    """Create (or find, for a resent job id) a meta job and plan it."""
    try:
        meta = ctx.flow.submit(payload)
    except CompactorError as err:
        log.error("compact request rejected error=%r", one_line(err))
        return {"job_id": payload.get("job_id"), "state": "rejected", "error": one_line(err)}
    finally:
        # The message has been handled: nothing is left to send again if this process dies.
        if isinstance(job_id := payload.get("job_id"), str):
            ctx.records.release_request(job_id)
    return _meta_result(meta)


def _meta_result(meta: Any) -> dict[str, Any]:
    return {
        "job_id": meta.id,
        "state": meta.state.value,
        "sub_jobs": len(meta.sub_jobs),
        "error": meta.error,
        "skipped": meta.skipped,
    }


# ----------------------------------------------------------------------------- sub-jobs


class _Stop:
    """The first reason the running attempt must stop, set from any thread."""

    def __init__(self) -> None:
        self._reason: JobStopped | None = None
        self._lock = threading.Lock()

    def set(self, reason: JobStopped) -> None:
        with self._lock:
            if self._reason is None:
                self._reason = reason

    def check(self) -> None:
        if self._reason is not None:
            raise self._reason


def _cancel_requested(records: JobRecords, meta_id: str) -> bool:
    meta = records.get_meta(meta_id)
    return meta is None or meta.cancel_requested


def run_sub_job(ctx: Context, sub_id: str, report_state: Any = None) -> dict[str, Any]:
    """Run one sub-job attempt. Raises RetryLater when the node lock is busy."""
    records, settings = ctx.records, ctx.settings
    sub = records.get_sub(sub_id)
    if sub is None:
        log.error("unknown sub-job sub_job=%s", sub_id)
        return {"sub_job_id": sub_id, "state": "missing"}
    if sub.state.ended:
        return _duplicate_of_ended(ctx, sub)
    if sub.state == JobState.RUNNING and sub.heartbeat_at and now() - sub.heartbeat_at < settings.heartbeat_timeout_s:
        log.info("sub-job runs elsewhere, duplicate delivery ignored sub_job=%s attempt=%d", sub_id, sub.attempt)
        return {"sub_job_id": sub_id, "state": sub.state.value, "duplicate": True}

    # The lock expires before the scheduler gives a silent attempt away, so a preempted
    # attempt never overlaps the next job on its node.
    ttl_s = min(settings.lock_ttl_s, settings.heartbeat_timeout_s)
    waited = time.perf_counter()
    lock = take_slot(records.r, ctx.node_id, sub.spec.job.kind, l0_slots=settings.l0_slots, ttl_s=ttl_s)
    if lock is None:
        log.info("node busy, sub-job back to the queue sub_job=%s node=%s", sub_id, ctx.node_id)
        metrics.observe_lock_wait(0.0, contended=True)
        raise RetryLater(settings.lock_retry_delay_s)
    metrics.observe_lock_wait(time.perf_counter() - waited, contended=False)
    ended: SubJobRecord | None = None
    try:
        outcome, claimed = attempts.claim(
            records,
            sub_id,
            node=ctx.node_id,
            pid=os.getpid(),
            heartbeat_timeout_s=settings.heartbeat_timeout_s,
            max_attempts=settings.max_attempts,
            cancel_requested=lambda: _cancel_requested(records, sub.meta_id),
        )
        if outcome == ClaimOutcome.CLAIMED:
            assert claimed is not None
            ended, result = _run_claimed(ctx, claimed, lock, time.perf_counter() - waited, report_state)
        else:
            ended = claimed if outcome in (ClaimOutcome.GAVE_UP, ClaimOutcome.CANCELLED) else None
            (log.warning if outcome == ClaimOutcome.GAVE_UP else log.info)(
                "sub-job not claimed sub_job=%s outcome=%s", sub_id, outcome.value
            )
            current = records.get_sub(sub_id)
            result = {
                "sub_job_id": sub_id,
                "state": current.state.value if current else "missing",
                "claim": outcome.value,
            }
            if outcome == ClaimOutcome.ENDED and current is not None:
                return _duplicate_of_ended(ctx, current)
    finally:
        lock.release()
    if ended is not None and ended.state.ended:
        dispatch.sub_job_ended(records, ctx.publisher, ended)
    return result


def _duplicate_of_ended(ctx: Context, sub: SubJobRecord) -> dict[str, Any]:
    if sub.id in ctx.records.finished(sub.meta_id):
        log.info("duplicate delivery of an ended sub-job ignored sub_job=%s state=%s", sub.id, sub.state.value)
    else:
        # Its worker ended it but died before the follow-ups: finish them (idempotent).
        dispatch.sub_job_ended(ctx.records, ctx.publisher, sub)
    return {"sub_job_id": sub.id, "state": sub.state.value, "duplicate": True}


def _run_claimed(
    ctx: Context, claimed: SubJobRecord, lock: NodeLock, lock_wait_s: float, report_state: Any
) -> tuple[SubJobRecord | None, dict[str, Any]]:
    records, settings = ctx.records, ctx.settings
    sub_id, meta_id, attempt = claimed.id, claimed.meta_id, claimed.attempt
    assert claimed.owner is not None
    token = claimed.owner.token
    stop = _Stop()
    progress = [JobProgress(phase="running")]
    stored = [progress[0]]
    last_state_report = [0.0]
    log.info(
        "sub-job started sub_job=%s attempt=%d node=%s pid=%d keys=%s-%s",
        sub_id, attempt, ctx.node_id, os.getpid(), claimed.spec.key_start, claimed.spec.key_end,
    )  # fmt: skip

    def superseded() -> None:
        stop.set(AttemptSuperseded(f"attempt {attempt} of sub-job {sub_id} is no longer current"))

    def tick() -> None:
        if not lock.renew():
            stop.set(NodeLockLost(f"node lock {lock.node_id} lost while running"))
        current = progress[0]
        try:
            attempts.heartbeat(records, sub_id, attempt, token, current)
            stored[0] = current
        except StaleAttempt:
            superseded()
        if _cancel_requested(records, meta_id):
            stop.set(JobCancelled("cancelled while running; nothing committed"))

    def store_progress() -> None:
        current = progress[0]
        if current is stored[0]:
            return
        try:
            attempts.report_progress(records, sub_id, attempt, token, current)
            stored[0] = current
        except StaleAttempt:
            superseded()

    # A plugin holds one of the attempt's threads (``hold``). The main loop may go on meanwhile
    # with what it has (a decode-ahead thread is held, say): the record says paused all along.
    held = threading.Event()

    def on_progress(p: Progress) -> None:
        phase = "paused" if held.is_set() else "compacting"
        progress[0] = JobProgress(
            phase=phase, keys=p.keys, versions_in=p.versions_in, bytes_in=p.bytes_in, bytes_out=p.bytes_out
        )
        at = time.monotonic()
        if report_state is not None and at - last_state_report[0] >= PROGRESS_INTERVAL_S:
            last_state_report[0] = at
            report_state({"sub_job_id": sub_id, "attempt": attempt, **progress[0].model_dump()})

    def verify() -> None:
        stop.check()
        if not lock.owned():
            raise NodeLockLost(f"node lock {lock.node_id} lost before the outcome was recorded")
        current = records.get_sub(sub_id)
        if current is None or not current.is_current(attempt, token):
            raise AttemptSuperseded(f"attempt {attempt} of sub-job {sub_id} is no longer current")
        if _cancel_requested(records, meta_id):
            raise JobCancelled("cancelled; nothing committed")

    def hold(seconds: float) -> None:
        before = progress[0].phase
        held.set()
        progress[0] = progress[0].model_copy(update={"phase": "paused"})
        store_progress()  # at once: whoever holds it may wait to see it paused
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                stop.check()
                time.sleep(0.05)
        finally:
            held.clear()
            progress[0] = progress[0].model_copy(update={"phase": before})

    # Every request of this attempt, from whichever of its threads, and only of this attempt.
    requests = RequestCounter()
    attempt_of = Attempt(meta_id=meta_id, sub_id=sub_id, number=attempt, node=ctx.node_id, pid=os.getpid())
    storage = ctx.plugins.watching(ctx.storage.observed_by(requests), attempt_of, hold)

    hooks = Hooks(on_progress=on_progress, check_cancelled=stop.check)
    heartbeat = Heartbeat(settings.heartbeat_interval_s, tick, name=f"heartbeat-{sub_id}").start()
    # The heartbeat interval (10 s by default) is too long for `job show` to follow a sub-job.
    progress_writer = Heartbeat(PROGRESS_INTERVAL_S, store_progress, name=f"progress-{sub_id}").start()
    state, error, outcome = JobState.FAILED, None, None
    retry = False
    try:
        verify()  # a cancel or takeover between claim and here
        workroot = settings.cache_dir / "work"
        workroot.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=workroot, prefix=f"{sub_id}-{attempt}-") as workdir:
            engine = EngineSettings(target_layer_bytes=settings.target_layer_bytes, workdir=Path(workdir))
            outcome = runner.run_sub_job(storage, claimed.spec, engine, hooks)
        try:
            verify()
        except BaseException:
            _delete_uploads(ctx, outcome)  # recorded nowhere: nobody else would delete them
            raise
        state = JobState.SUCCEEDED
    except AttemptSuperseded as err:
        heartbeat.stop()
        progress_writer.stop()
        log.warning("sub-job attempt superseded, stopping sub_job=%s attempt=%d reason=%r", sub_id, attempt, str(err))
        return None, {"sub_job_id": sub_id, "state": "superseded", "attempt": attempt}
    except JobCancelled as err:
        state, error = JobState.CANCELLED, str(err)
    except NodeLockLost as err:
        state, error, retry = JobState.PREEMPTED, str(err), True
    except SoftTimeLimitExceeded:
        state, error = JobState.FAILED, f"soft time limit of {settings.task_soft_time_limit_s:.0f}s exceeded"
    except _RETRYABLE as err:
        error = one_line(err)
        if attempt < settings.max_attempts:
            state, retry = JobState.PREEMPTED, True
    except CompactorError as err:
        error = one_line(err)
    except Exception as err:  # a bug: the record gets one line, the log the traceback
        log.exception("sub-job failed unexpectedly sub_job=%s attempt=%d", sub_id, attempt)
        error = one_line(err)
    finally:
        heartbeat.stop()
        progress_writer.stop()

    final_progress = progress[0].model_copy(update={"phase": state.value})
    if outcome is not None and outcome.stats is not None:
        stats = outcome.stats
        stats.add_requests(requests.counts())
        final_progress.bytes_out = stats.delta_layer_produced.size + stats.image_layer_produced.size

    def change(rec: SubJobRecord) -> None:
        rec.error = error
        rec.progress = final_progress
        if outcome is not None:
            rec.stats, rec.skipped, rec.proposal = outcome.stats, outcome.skipped, outcome.proposal
        if rec.stats is not None:
            rec.stats.time_acquire_lock_secs = lock_wait_s

    try:
        ended = attempts.finish(records, sub_id, attempt, token, state, change)
    except StaleAttempt:
        _delete_uploads(ctx, outcome)
        return None, {"sub_job_id": sub_id, "state": "superseded", "attempt": attempt}
    _observe(ended, state, outcome)
    # A failure is news on the node where it happened, at the default level (WARNING).
    (log.warning if state == JobState.FAILED else log.info)(
        "sub-job ended sub_job=%s attempt=%d state=%s added=%d removed=%d error=%r",
        sub_id, attempt, state.value, len(ended.proposal.added) if ended.proposal else 0,
        len(ended.proposal.removed) if ended.proposal else 0, error,
    )  # fmt: skip
    if retry:
        dispatch.enqueue_sub(records, ctx.publisher, ended, countdown=settings.lock_retry_delay_s)
    result = {"sub_job_id": sub_id, "state": state.value, "attempt": attempt, "error": error}
    return ended, result


def _delete_uploads(ctx: Context, outcome: runner.SubJobOutcome | None) -> None:
    if outcome is not None and outcome.proposal is not None:
        ctx.storage.delete_uploads(outcome.proposal.added)


def _observe(ended: SubJobRecord, state: JobState, outcome: Any) -> None:
    attempt = ended.attempts[-1] if ended.attempts else None
    seconds = (attempt.ended_at or now()) - attempt.started_at if attempt else 0.0
    metrics.observe_job("sub", state.value, seconds)
    stats = outcome.stats if outcome is not None else None
    if stats is not None:
        metrics.add_bytes(
            read=stats.delta_layer_visited.size + stats.image_layer_visited.size,
            written=stats.delta_layer_produced.size + stats.image_layer_produced.size,
        )


# ----------------------------------------------------------------------------- finalize


def finalize_meta_job(ctx: Context, job_id: str) -> dict[str, Any]:
    attempt = Attempt(meta_id=job_id, sub_id=None, number=0, node=ctx.node_id, pid=os.getpid())
    meta = ctx.flow.finalize(job_id, ctx.storage, ctx.plugins.checkpoint(attempt, time.sleep))
    return _meta_result(meta)


# ----------------------------------------------------------------------------- Celery shell


def _ended(task: Any, result: dict[str, Any]) -> dict[str, Any]:
    """``result`` of a task whose job goes on or succeeded; raises JobEnded when the job ended
    failed or cancelled (a duplicate delivery of an ended job changed nothing and succeeds).
    Not for a task that found no job to end (an unknown id): it returns its one-line error."""
    state = result.get("state")
    if result.get("duplicate") or state not in (JobState.FAILED.value, JobState.CANCELLED.value):
        return result
    reason = str(result.get("error") or state)
    if state == JobState.CANCELLED.value:
        task.backend.mark_as_revoked(task.request.id, reason, request=task.request)
        task.send_event("task-revoked", terminated=False, signum=None, expired=False)
        raise JobEndedCancelled(reason)
    raise JobEnded(reason)


def _compact_timeline_task(task: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    try:
        payload = payload_of(args, kwargs)
    except Rejected as err:
        return _rejected(TASK_COMPACT, err)
    return compact_timeline(context(), payload)


def _plan_meta_job_task(task: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    try:
        ref: MetaJobRef = parse(MetaJobRef, args, kwargs, TASK_PLAN)
    except Rejected as err:
        return _rejected(TASK_PLAN, err)
    ctx = context()
    try:
        meta = ctx.flow.plan(ref.job_id)
    except CompactorError as err:
        log.error("planning failed job=%s error=%r", ref.job_id, one_line(err))
        return {"job_id": ref.job_id, "state": "failed", "error": one_line(err)}
    return _ended(task, _meta_result(meta))


def _run_sub_job_task(task: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    try:
        ref: SubJobRef = parse(SubJobRef, args, kwargs, TASK_RUN)
    except Rejected as err:
        return _rejected(TASK_RUN, err)

    def report_state(meta: dict[str, Any]) -> None:
        if task.request.id is not None and not task.request.called_directly:
            task.update_state(state="PROGRESS", meta=meta)
            task.send_event(PROGRESS_EVENT, result=saferepr(meta), **meta)

    try:
        result = run_sub_job(context(), ref.sub_job_id, report_state)
    except RetryLater as later:
        # Back to the queue with a delay; the wait holds no worker slot and is no attempt.
        raise task.retry(countdown=later.countdown) from None
    except (redis.ConnectionError, redis.TimeoutError) as err:
        # Before the claim (or while recording its end): keep the message alive until Redis is back.
        log.warning("redis unavailable, sub-job back to the queue sub_job=%s error=%r", ref.sub_job_id, one_line(err))
        delay = context().settings.lock_retry_delay_s
        raise task.retry(countdown=delay) from None
    finally:
        # The attempt's memory stayed with the process for its chunks (allocator); the process
        # may now wait idle for a long time.
        allocator.give_back_freed_memory()
    return _ended(task, result)


def _finalize_meta_job_task(task: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    try:
        ref: MetaJobRef = parse(MetaJobRef, args, kwargs, TASK_FINALIZE)
    except Rejected as err:
        return _rejected(TASK_FINALIZE, err)
    try:
        result = finalize_meta_job(context(), ref.job_id)
    except CompactorError as err:
        log.error("finalize failed job=%s error=%r", ref.job_id, one_line(err))
        return {"job_id": ref.job_id, "state": "failed", "error": one_line(err)}
    return _ended(task, result)


# compact_timeline keeps returning a failed job as its result (docs/task-api.md): clients wait
# for that result to learn that the job was planned.
compact_timeline_task = app.task(name=TASK_COMPACT, bind=True)(_compact_timeline_task)
plan_meta_job_task = app.task(name=TASK_PLAN, bind=True, throws=(JobEnded,))(_plan_meta_job_task)
# max_retries=None on the task: retry(max_retries=None) alone falls back to the default of 3.
run_sub_job_task = app.task(name=TASK_RUN, bind=True, max_retries=None, throws=(JobEnded,))(_run_sub_job_task)
finalize_meta_job_task = app.task(name=TASK_FINALIZE, bind=True, throws=(JobEnded,))(_finalize_meta_job_task)
