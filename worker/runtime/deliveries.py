"""Which worker process holds which sub-job message, so that a message lost with a dead worker
is sent again within the heartbeat timeout instead of the broker's visibility timeout (hours).

A worker holds a ``run_sub_job`` message from the moment it receives it until it runs it: while
it waits for its one gc slot, or for a countdown (a sub-job sent back from a busy node). Killed
then, the message is gone until the broker's visibility timeout. So each worker's main process
notes every such message it receives (``JobRecords.mark_held``) and keeps a liveness key of its
own (``hostname:pid``, renewed every heartbeat interval, expiring after the heartbeat timeout);
the scheduler sends a waiting sub-job again when the process that holds its message is gone.
A duplicate is harmless: the claim ignores a sub-job that runs or has ended.

A ``compact_timeline`` message (a meta job's submission) is held the same way until its task
has created the meta job, with its payload (``JobRecords.hold_request``), since no record
exists yet from which to send it again; a resent request with the same job id finds the job.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import redis
from celery import signals
from pydantic import ValidationError

from compactor.storage.errors import one_line
from compactor.worker.runtime.app import current_settings
from compactor.worker.runtime.dispatch import TASK_COMPACT, TASK_RUN
from compactor.worker.runtime.node_lock import Heartbeat
from compactor.worker.runtime.payloads import CompactRequest, SubJobRef
from compactor.worker.runtime.records import JobRecords
from compactor.worker.runtime.redis_client import connect

log = logging.getLogger(__name__)

_records: JobRecords | None = None
_holder: str | None = None
_heartbeat: Heartbeat | None = None


def _this_process(hostname: str) -> tuple[JobRecords, str]:
    global _records, _holder
    if _records is None or _holder is None:
        _records = JobRecords(connect(current_settings()))
        _holder = f"{hostname}:{os.getpid()}"
    return _records, _holder


def _received(request: Any, **_: Any) -> None:
    if not isinstance(request.kwargs, dict):
        return
    if request.name == TASK_COMPACT:
        _received_request(request)
        return
    if request.name != TASK_RUN:
        return
    try:
        # Payloads come from anyone who can reach the broker: only a valid id names a key.
        sub_id = SubJobRef.model_validate(request.kwargs).sub_job_id
    except ValidationError:
        return  # the task rejects it with a one-line error when it runs
    records, holder = _this_process(request.hostname)
    try:
        records.mark_held(sub_id, holder)
    except redis.RedisError as err:
        # Without the mark the message waits for the no-progress timeout if this worker dies.
        log.warning("delivery not recorded sub_job=%s error=%r", sub_id, one_line(err))


def _received_request(request: Any) -> None:
    """A ``compact_timeline`` message that names its job id: held with its payload until the
    task has created the meta job, so that the coordinator can send it again if this process
    dies first. A request without a job id is not held: sent twice, it would make two jobs."""
    try:
        compact = CompactRequest.model_validate(request.kwargs)
    except ValidationError:
        return  # the task rejects it with a one-line error when it runs
    if compact.job_id is None:
        return
    records, holder = _this_process(request.hostname)
    try:
        records.hold_request(compact, holder)
    except redis.RedisError as err:
        log.warning("delivery not recorded job=%s error=%r", compact.job_id, one_line(err))


def _ready(sender: Any, **_: Any) -> None:
    global _heartbeat
    settings = current_settings()
    records, holder = _this_process(sender.hostname)

    def alive() -> None:
        records.keep_alive(holder, settings.heartbeat_timeout_s)

    try:
        alive()
    except redis.RedisError as err:
        log.warning("liveness key not set yet holder=%s error=%r", holder, one_line(err))
    _heartbeat = Heartbeat(settings.heartbeat_interval_s, alive, name="worker-alive").start()


def _shutdown(**_: Any) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()
    if _records is not None and _holder is not None:
        try:
            _records.gone(_holder)
        except redis.RedisError as err:
            log.warning("liveness key not removed holder=%s error=%r", _holder, one_line(err))


signals.task_received.connect(_received)
signals.worker_ready.connect(_ready)
signals.worker_shutdown.connect(_shutdown)
