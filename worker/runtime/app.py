"""The one Celery app every compactor process imports: workers, the coordinator, the CLI.

Broker and result backend are ``COMPACTOR_REDIS_URL``. The settings that keep a task from
running twice live here, in the app every process shares (docs/design/README.md):

- JSON only, never pickle;
- ``acks_late`` + ``worker_prefetch_multiplier=1`` + ``task_reject_on_worker_lost``: a message
  is acknowledged when its task ends, so a worker that dies hands the task back; the attempt
  cap lives in the job record (Celery has none); a task that ends FAILURE is acknowledged too;
- the broker's ``visibility_timeout`` exceeds the hard time limit, or Redis would hand a still
  running task to a second worker.

Three queues (``compactor.worker.runtime.dispatch.QUEUES``): ``gc`` for gc-compaction sub-jobs
(heavy, one per node at a time: ``compactor worker`` consumes it with one slot, and the node lock
guards it), ``l0`` for L0-compaction and image-creation sub-jobs (their own per-node limit) and
``light`` for planning and finalize, each consumed by a Celery worker of its own on the node
(:func:`worker_hostname`). Configuration is read lazily from the environment; a
process that has its own :class:`Settings` (``--env-file``) calls :func:`configure` first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from typing import Any

import kombu.entity
from celery import Celery, signals
from celery.worker.consumer import Consumer as _CeleryConsumer

from compactor.storage.errors import one_line
from compactor.storage.settings import Settings
from compactor.worker.runtime import allocator, metrics
from compactor.worker.runtime.dispatch import QUEUE_GC, QUEUE_LIGHT, QUEUES, TASK_QUEUES
from compactor.worker.runtime.redis_client import celery_redis_url

log = logging.getLogger(__name__)

Queue: Any = kombu.entity.Queue

# The broker hands an unacknowledged message to another worker after visibility_timeout; it
# must outlast the longest a task can run (its hard limit) plus the delay of a retry.
VISIBILITY_MARGIN_S = 600.0
RESULT_EXPIRES_S = 24 * 3600


def app_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for ``settings``."""
    url = celery_redis_url(settings.redis_url)
    visibility = int(settings.task_hard_time_limit_s + VISIBILITY_MARGIN_S)
    return {
        "broker_url": url,
        "result_backend": url,
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "worker_prefetch_multiplier": 1,
        "task_reject_on_worker_lost": True,
        # A task that ends FAILURE (its job failed: ``tasks.JobEnded``) is acknowledged, never
        # delivered again: whether a job runs again is for its record to say (Celery's default).
        "task_acks_on_failure_or_timeout": True,
        "task_time_limit": settings.task_hard_time_limit_s,
        "task_soft_time_limit": min(settings.task_soft_time_limit_s, settings.task_hard_time_limit_s),
        "broker_transport_options": {"visibility_timeout": visibility},
        "result_backend_transport_options": {"visibility_timeout": visibility},
        "task_queues": tuple(Queue(queue, routing_key=queue) for queue in QUEUES),
        "task_default_queue": QUEUE_LIGHT,
        "task_routes": {name: {"queue": queue, "routing_key": queue} for name, queue in TASK_QUEUES.items()},
        # Flower: sent/started/progress events of our tasks.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_track_started": True,
        "result_expires": RESULT_EXPIRES_S,
        "result_extended": True,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "broker_connection_retry_on_startup": True,
        "worker_consumer": "compactor.worker.runtime.app:Consumer",
        "enable_utc": True,
        "timezone": "UTC",
    }


app = Celery("compactor", include=["compactor.worker.runtime.tasks"])
_settings: Settings | None = None


def _lazy_defaults() -> dict[str, Any]:
    return app_config(current_settings())


app.add_defaults(_lazy_defaults)


def configure(settings: Settings) -> Any:
    """Use ``settings`` in this process (and in worker processes forked from it)."""
    global _settings
    _settings = settings
    reset_connections()
    app.conf.update(app_config(settings))
    return app


def reset_connections() -> None:
    """Forget broker and result-backend connections made with an earlier configuration."""
    from kombu import pools

    pool = getattr(app, "_pool", None)
    if pool is not None:
        try:
            pool.force_close_all()
        except Exception as err:  # a pool to a server that is gone
            log.debug("closing the broker pool failed error=%r", one_line(err))
        app._pool = None
        # Found by the fault suite, which runs several embedded stacks in one process: kombu's
        # global pool groups keep the closed pool (under its URL, so a later stack on the same
        # URL gets it back), and Celery caches a producer pool over it for publishing and for
        # remote control; the next stack then fails with "Acquire on closed pool".
        for group in (pools.connections, pools.producers):
            for key, value in list(group.items()):
                if value is pool or getattr(value, "connections", None) is pool:
                    dict.__delitem__(group, key)  # keys are hashes already; its own del re-hashes
    app.amqp._producer_pool = None
    with contextlib.suppress(AttributeError):
        del app.control.mailbox.producer_pool  # a cached_property over the pool above
    local = getattr(app, "_local", None)
    if local is not None and hasattr(local, "backend"):
        del local.backend


def _keep_freed_memory(**_: Any) -> None:
    # In the worker's parent, before the pool forks: its children inherit malloc's settings.
    allocator.keep_freed_memory()


def _collect_pool_metrics(**_: Any) -> None:
    # In the worker's parent, before the pool forks: its children inherit the switch.
    if current_settings().metrics_port is not None:
        metrics.export_pool_processes()


def _pool_process_exited(pid: int, **_: Any) -> None:
    metrics.pool_process_exited(pid)


def _stop_collecting_pool_metrics(**_: Any) -> None:
    metrics.stop_exporting_pool_processes()


signals.worker_init.connect(_keep_freed_memory)
signals.worker_init.connect(_collect_pool_metrics)
signals.worker_process_shutdown.connect(_pool_process_exited)
signals.worker_shutdown.connect(_stop_collecting_pool_metrics)


def current_settings() -> Settings:
    global _settings
    if _settings is None:
        _settings = Settings()
    return _settings


def node_id(settings: Settings) -> str:
    """This machine's node id: ``COMPACTOR_NODE_ID``, else the host name."""
    return settings.node_id or socket.gethostname()


def worker_hostname(node: str, queue: str) -> str:
    """Celery's name for the worker of ``node`` that consumes ``queue``: the gc worker is named
    after the node, the others get the queue as a suffix, so that all run on one machine."""
    return f"{node}{'' if queue == QUEUE_GC else '.' + queue}@{socket.gethostname()}"


class CeleryPublisher:
    """``compactor.worker.runtime.dispatch.Publisher`` over this app: every task to its own queue."""

    def __init__(self, celery: Any = None) -> None:
        self._app = celery if celery is not None else app

    def publish(
        self, task: str, kwargs: dict[str, Any], *, countdown: float | None = None, queue: str | None = None
    ) -> None:
        queue = queue or TASK_QUEUES[task]
        self._app.send_task(task, kwargs=kwargs, queue=queue, routing_key=queue, countdown=countdown)


def _tolerate_dead_channel(message: Any) -> None:
    """Make the late acknowledgement (or rejection) of ``message`` survive the loss of the
    broker connection it came on.

    Found by the fault suite (a Redis restart while tasks run): with ``acks_late`` the ack is
    sent when the task ends, on the channel the message arrived on; after a reconnect kombu
    5.7's Redis channel fails that with AttributeError instead of a connection error, and Celery
    stops the whole worker as an unrecoverable error. The message then simply stays
    unacknowledged and is delivered again after the visibility timeout, which every task
    tolerates (a duplicate delivery).
    """
    ack, reject = message.ack_log_error, message.reject_log_error

    def ack_log_error(logger: Any, errors: Any, multiple: bool = False) -> None:
        try:
            ack(logger, errors, multiple=multiple)
        except AttributeError as err:
            log.warning("message not acknowledged: its broker channel is gone error=%r", one_line(err))

    def reject_log_error(logger: Any, errors: Any, requeue: bool = False) -> None:
        try:
            reject(logger, errors, requeue=requeue)
        except AttributeError as err:
            log.warning("message not rejected: its broker channel is gone error=%r", one_line(err))

    message.ack_log_error, message.reject_log_error = ack_log_error, reject_log_error


class Consumer(_CeleryConsumer):  # type: ignore[misc]
    """Celery's consumer, logging undecodable or malformed messages in one line (the default
    dumps the body and a traceback) before dropping them.

    A JSON body of the wrong shape (a string instead of ``[args, kwargs, embed]``) makes
    Celery's message strategy raise ValueError/TypeError, which stops the whole worker, and the
    restored message stops the next one: a poison message. Such messages are dropped here.
    """

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        handle = super().create_task_handler(*args, **kwargs)

        def on_task_received(message: Any) -> Any:
            _tolerate_dead_channel(message)
            try:
                return handle(message)
            except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
                headers = getattr(message, "headers", None) or {}
                task = headers.get("task") if isinstance(headers, dict) else None
                log.error("message rejected: malformed task message task=%s error=%r", task, one_line(exc))
                message.reject_log_error(log, self.connection_errors)
                return None

        return on_task_received

    def on_connection_error_after_connected(self, exc: BaseException) -> None:
        # Found by the fault suite (a Redis restart under running workers): kombu 5.7's Redis
        # channel, closed after the connection was lost, restores its unacknowledged messages
        # through a transport whose client is already gone and raises AttributeError. Celery
        # calls that an unrecoverable error and the whole worker exits on every Redis restart.
        # Those messages stay in the broker's unacked set and come back after the visibility
        # timeout (the coordinator re-enqueues sub-jobs long before); reconnecting is right.
        try:
            super().on_connection_error_after_connected(exc)
        except AttributeError as err:
            log.warning("broker connection cleanup failed; reconnecting anyway error=%r", one_line(err))
            self.connection = None

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        log.error(
            "message rejected: body not decodable content_type=%s pid=%d error=%r",
            getattr(message, "content_type", None), os.getpid(), one_line(exc),
        )  # fmt: skip
        message.ack()

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        headers = getattr(message, "headers", None) or {}
        log.error("message rejected: invalid task message task=%s error=%r", headers.get("task"), one_line(exc))
        message.reject_log_error(log, self.connection_errors)
