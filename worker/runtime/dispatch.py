"""What goes onto the queues, and when: the task API's names and queues (docs/task-api.md), the
publisher the flow sends through, and the steps that follow a sub-job's end. Free of Celery, so
that planning code does not import the app, and free of the meta-job flow, which calls in here.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from compactor.worker.engine.jobs import JobKind
from compactor.worker.runtime import attempts
from compactor.worker.runtime.records import JobRecords, SubJobRecord

log = logging.getLogger(__name__)

TASK_COMPACT = "compactor.compact_timeline"
TASK_PLAN = "compactor.plan_meta_job"
TASK_RUN = "compactor.run_sub_job"
TASK_FINALIZE = "compactor.finalize_meta_job"
QUEUE_GC = "gc"
QUEUE_L0 = "l0"
QUEUE_LIGHT = "light"
SUB_JOB_QUEUES = (QUEUE_GC, QUEUE_L0)
QUEUES = (*SUB_JOB_QUEUES, QUEUE_LIGHT)
"""gc: gc-compaction sub-jobs, one at a time per node (the node lock); l0: L0-compaction and
image-creation sub-jobs, up to ``COMPACTOR_L0_SLOTS`` at a time per node, so that they never
wait behind gc-compaction (the seed's separate L0 semaphore); light: creating, planning and
finalizing meta jobs."""
TASK_QUEUES = {TASK_COMPACT: QUEUE_LIGHT, TASK_PLAN: QUEUE_LIGHT, TASK_RUN: QUEUE_GC, TASK_FINALIZE: QUEUE_LIGHT}
"""Each task's queue; ``run_sub_job`` goes to the queue of its job's kind (``queue_of``)."""


def queue_of(kind: JobKind) -> str:
    """The queue of a kind's sub-jobs (gc, or l0 for L0 compaction and image creation); also the
    lane of its in-flight marker on a timeline (``JobRecords.set_inflight``)."""
    return QUEUE_GC if kind == "gc" else QUEUE_L0


class Publisher(Protocol):
    """Sends a task message (``compactor.worker.runtime.app.CeleryPublisher`` in production)."""

    def publish(
        self, task: str, kwargs: dict[str, Any], *, countdown: float | None = None, queue: str | None = None
    ) -> None:
        """Send ``task`` to ``queue``, by default the task's own (``TASK_QUEUES``)."""
        ...


def enqueue_sub(records: JobRecords, publisher: Publisher, sub: SubJobRecord, countdown: float | None = None) -> None:
    """Publish ``run_sub_job`` for a waiting sub-job, on the queue of its kind. A duplicate
    message is harmless (its claim finds the sub-job taken or ended), so this may run more than
    once."""
    sub_id = sub.id
    # Before publishing: a worker may receive the message, and say it holds it, at once (a
    # deletion after the publish lost that mark, and a message lost with that worker then
    # waited for the no-progress timeout; found by the random-kill fault test).
    records.forget_holder(sub_id)
    publisher.publish(TASK_RUN, {"sub_job_id": sub_id}, countdown=countdown, queue=queue_of(sub.spec.job.kind))
    attempts.mark_enqueued(records, sub_id)


def sub_job_ended(records: JobRecords, publisher: Publisher, sub: SubJobRecord) -> None:
    """Everything that follows the end of a sub-job, in an order that survives a crash at any
    point (a redelivered message repeats it): add it to the finished set, and enqueue finalize
    once every sub-job has ended."""
    records.mark_finished(sub.meta_id, sub.id)
    maybe_finalize(records, publisher, sub.meta_id)


def maybe_finalize(records: JobRecords, publisher: Publisher, meta_id: str) -> bool:
    """Enqueue finalize if every sub-job has ended and nobody claimed it yet; True if we did."""
    meta = records.get_meta(meta_id)
    if meta is None or meta.state.ended or meta.planned_at is None:
        return False
    if not set(meta.sub_jobs) <= records.finished(meta_id):
        return False
    if not records.claim_finalize(meta_id):
        return False
    log.info("meta job finalize claimed job=%s sub_jobs=%d", meta_id, len(meta.sub_jobs))
    publisher.publish(TASK_FINALIZE, {"job_id": meta_id})
    return True
