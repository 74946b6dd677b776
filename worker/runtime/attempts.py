"""The attempt protocol: every change of a sub-job's state, in one place.

``JobState`` (``compactor.worker.runtime.records``) draws the transitions; each is one function
here, and each says who calls it. A sub-job runs as a sequence of *attempts*. ``claim`` starts
one: attempt number + 1 and a fresh owner token. From then on only that attempt may change the
record: every report carries the sub-job id, the attempt number and the token, and is applied
with WATCH/MULTI only while all three still match and the record is running (``report``).
Anything else is a report from a stale attempt (preempted, superseded, cancelled): it is
ignored, logged, and the attempt told so (StaleAttempt), so that it stops and deletes what it
uploaded.

Who calls what:

- the worker running a sub-job (``compactor.worker.runtime.tasks``): ``claim``, then
  ``heartbeat`` and ``report_progress`` while it runs, then ``finish``;
- the coordinator (``compactor.coordinator.jobs.scheduler``): ``preempt`` an attempt that is
  silent or stuck, ``give_up`` on one preempted over the attempt cap;
- whoever publishes a sub-job's message (``compactor.worker.runtime.dispatch``):
  ``mark_enqueued``;
- ``compactor job cancel``: ``cancel_waiting`` (a running attempt sees the cancel request at
  its next heartbeat and finishes cancelled).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from enum import StrEnum

from compactor.storage.errors import CompactorError
from compactor.worker.runtime.records import AttemptInfo, JobProgress, JobRecords, JobState, Owner, SubJobRecord, now

log = logging.getLogger(__name__)


class StaleAttempt(CompactorError):
    """A report from an attempt that is no longer the current one; it was ignored."""


class ClaimOutcome(StrEnum):
    CLAIMED = "claimed"
    GAVE_UP = "gave-up"  # over the attempt cap: the record is now failed
    ENDED = "ended"  # the sub-job has ended already (a duplicate delivery)
    BUSY = "busy"  # another attempt is running and alive
    CANCELLED = "cancelled"  # cancel was requested: the record is now cancelled
    MISSING = "missing"


def claim(
    records: JobRecords,
    sub_id: str,
    *,
    node: str,
    pid: int,
    heartbeat_timeout_s: float,
    max_attempts: int,
    cancel_requested: Callable[[], bool],
) -> tuple[ClaimOutcome, SubJobRecord | None]:
    """Make a new attempt of the sub-job current, owned by ``node``/``pid``.

    Claims a queued or preempted sub-job, or a running one whose heartbeat is older than
    ``heartbeat_timeout_s`` (its attempt is preempted). The attempt number goes up by one;
    over ``max_attempts`` the sub-job fails instead.
    """
    outcome: list[ClaimOutcome] = [ClaimOutcome.MISSING]
    at = now()
    cancelled = cancel_requested()

    def change(rec: SubJobRecord) -> SubJobRecord | None:
        if rec.state.ended:
            outcome[0] = ClaimOutcome.ENDED
            return None
        if rec.state == JobState.RUNNING:
            if rec.heartbeat_at is not None and at - rec.heartbeat_at < heartbeat_timeout_s:
                outcome[0] = ClaimOutcome.BUSY
                return None
            _end_attempt(rec, at, "preempted: heartbeat lost")
            rec.reclaims += 1
        if cancelled:
            outcome[0] = ClaimOutcome.CANCELLED
            rec.state, rec.ended_at, rec.owner = JobState.CANCELLED, at, None
            rec.error = rec.error or "cancelled before it ran"
            return rec
        if rec.attempt >= max_attempts:
            outcome[0] = ClaimOutcome.GAVE_UP
            rec.state, rec.ended_at, rec.owner = JobState.FAILED, at, None
            last = rec.attempts[-1].outcome if rec.attempts else None
            rec.error = f"gave up after {rec.attempt} attempts" + (f" (last: {last})" if last else "")
            return rec
        outcome[0] = ClaimOutcome.CLAIMED
        rec.attempt += 1
        rec.state = JobState.RUNNING
        rec.owner = Owner(node=node, pid=pid, token=uuid.uuid4().hex)
        rec.heartbeat_at = at
        rec.progress = JobProgress(phase="starting")
        rec.progress_changed_at = at
        rec.started_at = rec.started_at or at
        rec.error = None
        rec.attempts.append(AttemptInfo(attempt=rec.attempt, node=node, pid=pid, started_at=at))
        return rec

    written = records.update_sub(sub_id, change)
    return outcome[0], written


def report(
    records: JobRecords, sub_id: str, attempt: int, token: str, change: Callable[[SubJobRecord], None]
) -> SubJobRecord:
    """A report of the attempt ``(attempt, token)``: applied only while it is the current,
    running attempt; raises StaleAttempt (after logging) otherwise."""
    stale: list[SubJobRecord | None] = [None]

    def guarded(rec: SubJobRecord) -> SubJobRecord | None:
        if not rec.is_current(attempt, token):
            stale[0] = rec
            return None
        change(rec)
        return rec

    written = records.update_sub(sub_id, guarded)
    if written is None:
        rec = stale[0]
        log.warning(
            "stale report ignored sub_job=%s attempt=%d current_attempt=%s state=%s",
            sub_id, attempt, rec.attempt if rec else None, rec.state if rec else "missing",
        )  # fmt: skip
        raise StaleAttempt(f"sub-job {sub_id} attempt {attempt} is no longer current")
    return written


def heartbeat(
    records: JobRecords, sub_id: str, attempt: int, token: str, progress: JobProgress | None = None
) -> SubJobRecord:
    at = now()

    def change(rec: SubJobRecord) -> None:
        rec.heartbeat_at = at
        if progress is not None:
            _set_progress(rec, progress, at)

    return report(records, sub_id, attempt, token, change)


def report_progress(records: JobRecords, sub_id: str, attempt: int, token: str, progress: JobProgress) -> SubJobRecord:
    """Store the attempt's progress, guarded like :meth:`report`, without renewing its
    heartbeat: only the thread that also renews the node lock may say the attempt is alive."""
    at = now()
    return report(records, sub_id, attempt, token, lambda rec: _set_progress(rec, progress, at))


def finish(
    records: JobRecords,
    sub_id: str,
    attempt: int,
    token: str,
    state: JobState,
    change: Callable[[SubJobRecord], None] | None = None,
) -> SubJobRecord:
    """End the current attempt (guarded like :meth:`report`): in an ended state, or
    ``PREEMPTED`` to have the sub-job run again as a new attempt."""
    at = now()

    def ending(rec: SubJobRecord) -> None:
        if change is not None:
            change(rec)
        outcome = state.value if rec.error is None else f"{state.value}: {rec.error}"
        _end_attempt(rec, at, outcome)
        rec.state, rec.owner = state, None
        rec.progress.phase = state.value
        if state.ended:
            rec.ended_at = at
        else:
            rec.enqueued_at = None

    return report(records, sub_id, attempt, token, ending)


def preempt(records: JobRecords, sub_id: str, attempt: int, token: str, reason: str) -> SubJobRecord | None:
    """Take the running attempt ``(attempt, token)`` away (dead or stuck worker): its later
    reports are ignored. None if it is not the current attempt any more."""
    at = now()

    def change(rec: SubJobRecord) -> SubJobRecord | None:
        if not rec.is_current(attempt, token):
            return None
        _end_attempt(rec, at, f"preempted: {reason}")
        rec.state, rec.owner, rec.enqueued_at = JobState.PREEMPTED, None, None
        rec.reclaims += 1
        rec.progress.phase = "preempted"
        return rec

    return records.update_sub(sub_id, change)


def cancel_waiting(records: JobRecords, sub_id: str) -> SubJobRecord | None:
    """Cancel a sub-job that is not running (queued or preempted); None otherwise."""
    at = now()

    def change(rec: SubJobRecord) -> SubJobRecord | None:
        if rec.state not in (JobState.QUEUED, JobState.PREEMPTED):
            return None
        rec.state, rec.ended_at, rec.owner = JobState.CANCELLED, at, None
        rec.progress.phase = "cancelled"
        rec.error = "cancelled before it ran"
        return rec

    return records.update_sub(sub_id, change)


def mark_enqueued(records: JobRecords, sub_id: str) -> SubJobRecord | None:
    """Note that a message for this waiting sub-job was published; None unless it waits."""
    at = now()

    def change(rec: SubJobRecord) -> SubJobRecord | None:
        if rec.state not in (JobState.QUEUED, JobState.PREEMPTED):
            return None
        rec.enqueued_at = at
        return rec

    return records.update_sub(sub_id, change)


def give_up(records: JobRecords, sub_id: str, attempt: int, reason: str) -> SubJobRecord | None:
    """Fail a sub-job preempted at ``attempt``, the last one the cap allows (the coordinator,
    right after ``preempt``). None if it moved on meanwhile (claimed again, cancelled)."""

    def change(rec: SubJobRecord) -> SubJobRecord | None:
        if rec.state != JobState.PREEMPTED or rec.attempt != attempt:
            return None
        rec.state, rec.ended_at = JobState.FAILED, now()
        rec.error = f"gave up after {attempt} attempts (last: preempted: {reason})"
        rec.progress.phase = "failed"
        return rec

    return records.update_sub(sub_id, change)


def _set_progress(rec: SubJobRecord, progress: JobProgress, at: float) -> None:
    if progress.marker() != rec.progress.marker():
        rec.progress = progress
        rec.progress_changed_at = at


def _end_attempt(rec: SubJobRecord, at: float, outcome: str) -> None:
    if rec.attempts and rec.attempts[-1].ended_at is None:
        rec.attempts[-1].ended_at = at
        rec.attempts[-1].outcome = outcome
