"""Job commands of the ``compactor`` CLI (CONTRACTS §4): ``compact``, ``jobs``, ``job show``,
``job cancel``, ``worker`` and ``coordinator``. Registered on ``coordinator.cli.main``.

Machine-readable output on stdout, logs on stderr, every failure one ``error: ...`` line with a
non-zero exit. Redis is checked up front with a short timeout, so an unreachable Redis is an
error line, not a hang.
"""

from __future__ import annotations

import functools
import json
import re
import signal
import socket
import threading
import time
from datetime import UTC, datetime
from typing import Any

import click
import redis

from coordinator.cli_common import KEY, LSN, SIZE, F, fail, one_line_errors, settings_from
from coordinator.job_records import (
    CompactRequest,
    JobRecords,
    JobState,
    MetaJobRecord,
    check_connectivity,
    connect,
    one_line,
)
from storage.errors import CompactorError, InvalidInput
from storage.keys import format_key
from storage.lsn import LSN_MAX
from storage.settings import Settings
from storage.timeline import Storage

_NODE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEFAULT_MAX_JOB_SIZE = "4GiB"


def service_errors(func: F) -> F:
    """Redis or broker failures after the up-front check become one-line errors too."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from kombu.exceptions import OperationalError

        try:
            return func(*args, **kwargs)
        except (redis.RedisError, OperationalError) as err:
            raise CompactorError(f"Redis/broker error: {one_line(err)}") from None

    return wrapper  # type: ignore[return-value]


def _connect(settings: Settings) -> JobRecords:
    check_connectivity(settings)
    return JobRecords(connect(settings))


def _publisher(settings: Settings) -> Any:
    # Imported here: the Celery app is configured from these settings (``--env-file``).
    from worker.celery_app import CeleryPublisher, configure

    configure(settings)
    return CeleryPublisher()


def _exit_with_parent() -> None:
    """Under the embedded stack, stop (SIGTERM to ourselves) once the process that started us
    is gone, so that a killed ``compactor up`` or test run leaves no worker behind."""
    import os

    from coordinator.embedded import PARENT_PID_VARIABLE

    parent = os.environ.get(PARENT_PID_VARIABLE)
    if not parent or not parent.isdigit():
        return
    parent_pid = int(parent)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            except PermissionError:
                pass

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, default=str))


# ----------------------------------------------------------------------------- compact


@click.command("compact")
@click.argument("tenant")
@click.argument("timeline_id", metavar="TIMELINE")
@click.option("--key-start", type=KEY, default=None, help="first key (36 hex characters); default: the lowest key")
@click.option("--key-end", type=KEY, default=None, help="end key, exclusive; default: the highest key")
@click.option("--lsn-start", type=LSN, default=0, show_default=True, help="compact history above this LSN only")
@click.option("--lsn-end", type=LSN, default=None, help="compact below this LSN (capped by the gc cutoff)")
@click.option("--max-job-size", type=SIZE, default=DEFAULT_MAX_JOB_SIZE, show_default=True, help="sub-job size")
@click.option("--no-sub-compaction", is_flag=True, help="one job for the whole range instead of sub-jobs")
@click.option("--dry-run", is_flag=True, help="compute statistics, commit nothing")
@click.option("--wait", is_flag=True, help="block until the job ends and print its final JSON status")
@click.option("--timeout", type=float, default=None, help="with --wait: give up after this many seconds")
@click.option("--inline", is_flag=True, help="run in this process without Redis or Celery (debugging)")
@click.pass_context
@one_line_errors
@service_errors
def compact_command(
    ctx: click.Context,
    tenant: str,
    timeline_id: str,
    key_start: bytes | None,
    key_end: bytes | None,
    lsn_start: int,
    lsn_end: int | None,
    max_job_size: int,
    no_sub_compaction: bool,
    dry_run: bool,
    wait: bool,
    timeout: float | None,
    inline: bool,
) -> None:
    """Schedule a gc-compaction meta job and print its id."""
    settings = settings_from(ctx)
    fields: dict[str, Any] = {
        "tenant_id": tenant,
        "timeline_id": timeline_id,
        "lsn_start": lsn_start,
        "lsn_end": LSN_MAX if lsn_end is None else lsn_end,
        "max_job_bytes": max_job_size,
        "sub_compaction": not no_sub_compaction,
        "dry_run": dry_run,
    }
    if key_start is not None:
        fields["key_start"] = format_key(key_start)
    if key_end is not None:
        fields["key_end"] = format_key(key_end)
    request = CompactRequest.model_validate(fields)
    storage = Storage(settings)
    if inline:
        from coordinator.meta_jobs import run_inline

        result = run_inline(storage, request, settings)
        _echo_json(result)
        if result["state"] != JobState.SUCCEEDED.value:
            fail(f"job {result['job_id']} {result['state']}: {result.get('error') or 'see status'}")
        return

    from coordinator.meta_jobs import TASK_PLAN, create_meta_job, status

    records = _connect(settings)
    storage.manifest(request.tenant_id, request.timeline_id)  # a missing timeline fails here, not later
    publisher = _publisher(settings)
    meta, _ = create_meta_job(records, request)
    publisher.publish(TASK_PLAN, {"job_id": meta.id})
    click.echo(meta.id)
    if not wait:
        return
    final = _wait_for(records, meta.id, timeout)
    _echo_json(status(records, final))
    if not final.state.ended:
        fail(f"timed out after {timeout:g}s waiting for job {meta.id} (state {final.state.value})")
    if final.state != JobState.SUCCEEDED:
        fail(f"job {meta.id} {final.state.value}: {final.error or final.skipped or 'see status'}")


def _wait_for(records: JobRecords, job_id: str, timeout: float | None) -> MetaJobRecord:
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 0.1
    while True:
        meta = records.require_meta(job_id)
        if meta.state.ended or (deadline is not None and time.monotonic() >= deadline):
            return meta
        time.sleep(delay if deadline is None else max(0.0, min(delay, deadline - time.monotonic())))
        delay = min(delay * 1.5, 1.0)


# ----------------------------------------------------------------------------- jobs


def _ts(value: float | None) -> str | None:
    if value is None:
        return None
    return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def job_summary(records: JobRecords, meta: MetaJobRecord) -> dict[str, Any]:
    subs = records.get_subs(meta.sub_jobs)
    states: dict[str, int] = {}
    for sub in subs:
        states[sub.state.value] = states.get(sub.state.value, 0) + 1
    return {
        "job_id": meta.id,
        "tenant_id": meta.tenant_id,
        "timeline_id": meta.timeline_id,
        "state": meta.state.value,
        "auto": meta.auto,
        "cancel_requested": meta.cancel_requested,
        "sub_jobs": len(subs),
        "sub_job_states": states,
        "bytes_in": sum(s.progress.bytes_in for s in subs),
        "keys": sum(s.progress.keys for s in subs),
        "created_at": _ts(meta.created_at),
        "ended_at": _ts(meta.ended_at),
        "error": meta.error,
        "skipped": meta.skipped,
    }


@click.command("jobs")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True, help="newest jobs to list")
@click.pass_context
@one_line_errors
@service_errors
def jobs_command(ctx: click.Context, as_json: bool, limit: int) -> None:
    """List recent meta jobs and open circuit breakers."""
    records = _connect(settings_from(ctx))
    jobs = [job_summary(records, meta) for meta in records.list_meta(limit)]
    at = time.time()
    breakers = [
        {**b.model_dump(), "open": b.is_open(at), "open_until": _ts(b.open_until)}
        for b in records.breakers()
        if b.consecutive_failures or b.is_open(at)
    ]
    if as_json:
        _echo_json({"jobs": jobs, "circuit_breakers": breakers})
        return
    if not jobs:
        click.echo("no jobs")
    for job in jobs:
        done = sum(n for s, n in job["sub_job_states"].items() if JobState(s).ended)
        line = (
            f"{job['job_id']}  {job['state']:9}  {job['tenant_id']}/{job['timeline_id']}  "
            f"sub-jobs {done}/{job['sub_jobs']}  {job['created_at']}"
        )
        if job["error"]:
            line += f"  error: {job['error']}"
        click.echo(line)
    for b in breakers:
        status = f"open until {b['open_until']}" if b["open"] else "closed"
        click.echo(
            f"circuit breaker {b['tenant_id']}/{b['timeline_id']}: {status}, "
            f"{b['consecutive_failures']} consecutive failures, last error: {b['last_error']}"
        )


@click.group("job")
def job_group() -> None:
    """Show or cancel one meta job."""


@job_group.command("show")
@click.argument("job_id", metavar="ID")
@click.pass_context
@one_line_errors
@service_errors
def job_show(ctx: click.Context, job_id: str) -> None:
    """Print the JSON status of a meta job and its sub-jobs."""
    from coordinator.meta_jobs import status

    records = _connect(settings_from(ctx))
    _echo_json(status(records, records.require_meta(job_id)))


@job_group.command("cancel")
@click.argument("job_id", metavar="ID")
@click.pass_context
@one_line_errors
@service_errors
def job_cancel(ctx: click.Context, job_id: str) -> None:
    """Cancel a meta job: waiting sub-jobs never run, running ones commit nothing."""
    from coordinator.meta_jobs import cancel

    settings = settings_from(ctx)
    records = _connect(settings)
    meta, cancelled = cancel(records, _publisher(settings), job_id)
    _echo_json({"job_id": meta.id, "cancel_requested": True, "cancelled_sub_jobs": cancelled})


# ----------------------------------------------------------------------------- processes


@click.command("worker")
@click.option("--node-id", default=None, help="this node's id (default: COMPACTOR_NODE_ID, else the host name)")
@click.option("--concurrency", type=click.IntRange(1, 64), default=2, show_default=True, help="worker processes")
@click.option("--queues", default="gc,light", show_default=True, help="queues to consume: gc, light or both")
@click.option("--loglevel", default=None, help="log level (default: COMPACTOR_LOG_LEVEL, else WARNING)")
@click.option(
    "--pool",
    type=click.Choice(["prefork", "solo", "threads"]),
    default="prefork",
    show_default=True,
    help="Celery pool; prefork enforces the time limits, solo/threads export all metrics from one process",
)
@click.pass_context
@one_line_errors
@service_errors
def worker_command(
    ctx: click.Context, node_id: str | None, concurrency: int, queues: str, loglevel: str | None, pool: str
) -> None:
    """Run a Celery worker for the gc and light queues in this process."""
    import os

    settings = settings_from(ctx)
    if node_id is not None:
        settings = settings.model_copy(update={"node_id": node_id})
        os.environ["COMPACTOR_NODE_ID"] = node_id
    from worker.celery_app import node_id as resolve_node_id

    node = resolve_node_id(settings)
    if not _NODE_ID_RE.match(node):
        raise InvalidInput(f"invalid node id {node!r}: letters, digits, '.', '_' and '-', at most 64")
    wanted = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = sorted(set(wanted) - {"gc", "light"})
    if not wanted or unknown:
        raise InvalidInput(f"invalid --queues {queues!r}: choose from gc, light")
    check_connectivity(settings)
    # Found by the bad-input tests: with the object store unreachable (or the bucket missing)
    # the worker started anyway and took jobs only to fail each after its retries. Fail here,
    # in one line, like an unreachable Redis.
    Storage(settings).objects.check_bucket()
    from worker.celery_app import configure

    configure(settings)
    import worker.tasks  # noqa: F401  (registers the tasks)

    _exit_with_parent()
    from worker import metrics

    # Served by this (parent) process; see worker/metrics.py for the pools that export it all.
    metrics.serve(settings.metrics_port)
    from celery.bin.celery import celery as celery_main

    # Celery's own command line on the app configured above: app.worker_main and app.start
    # both drop the exit code Celery stops with, its main returns it.
    code = celery_main.main(
        args=[
            "--app=worker.celery_app:app",
            "worker",
            f"--hostname={node}@{socket.gethostname()}",
            f"--queues={','.join(wanted)}",
            f"--concurrency={concurrency}",
            f"--pool={pool}",
            f"--loglevel={loglevel or os.environ.get('COMPACTOR_LOG_LEVEL', 'WARNING')}",
            "--without-mingle",
            "--without-gossip",
        ],
        standalone_mode=False,
    )
    if code:
        # A supervisor that restarts on failure only must see Celery giving up as one.
        fail(f"the Celery worker stopped with exit code {code}; see its log above", code)


@click.command("coordinator")
@click.option(
    "--interval", type=float, default=None, help="seconds between ticks (default COMPACTOR_COORDINATOR_INTERVAL_S)"
)
@click.option("--once", is_flag=True, help="run one tick, print its report as JSON and exit")
@click.option("--no-auto-trigger", is_flag=True, help="only watch liveness; never start jobs on its own")
@click.pass_context
@one_line_errors
@service_errors
def coordinator_command(ctx: click.Context, interval: float | None, once: bool, no_auto_trigger: bool) -> None:
    """Run the coordinator loop: auto-trigger and liveness of running jobs."""
    from coordinator.scheduler import Scheduler

    settings = settings_from(ctx)
    records = _connect(settings)
    scheduler = Scheduler(Storage(settings), records, _publisher(settings), settings, auto_trigger=not no_auto_trigger)
    if once:
        _echo_json(scheduler.tick().as_dict())
        return
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    _exit_with_parent()
    from worker import metrics

    metrics.serve(settings.metrics_port)
    period = interval if interval is not None else settings.coordinator_interval_s
    if period <= 0:
        raise InvalidInput(f"invalid --interval {period}: must be positive")
    click.echo(f"coordinator running interval={period}s", err=True)
    scheduler.run(period, stop)


def register(main: click.Group) -> None:
    for command in (compact_command, jobs_command, job_group, worker_command, coordinator_command):
        main.add_command(command)
