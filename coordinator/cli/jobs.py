"""Job commands of the ``compactor`` CLI (README: Command line): ``compact``, ``jobs``, ``job show``,
``job cancel``, ``worker`` and ``coordinator``. Registered on ``compactor.coordinator.cli.main.main``.

Machine-readable output on stdout, logs on stderr, every failure one ``error: ...`` line with a
non-zero exit. Redis is checked up front with a short timeout, so an unreachable Redis is an
error line, not a hang.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import redis
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from compactor.coordinator.cli.common import KEY, LSN, SIZE, F, fail, one_line_errors, settings_from
from compactor.storage.errors import CompactorError, InvalidInput, NotFound, one_line
from compactor.storage.keys import format_key
from compactor.storage.lsn import LSN_MAX
from compactor.storage.settings import Settings
from compactor.storage.timeline import Storage
from compactor.worker.engine.statistics import CompactionStatistics, s3_summary
from compactor.worker.runtime.payloads import CompactRequest
from compactor.worker.runtime.records import (
    KEY_JOBS,
    JobRecords,
    JobState,
    MetaJobRecord,
    MetaStatistics,
    SubJobRecord,
    most_at_once,
)
from compactor.worker.runtime.redis_client import check_connectivity, connect

_NODE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_JOB_ID_PREFIX_RE = re.compile(r"[0-9a-f]{1,32}")


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
    from compactor.worker.runtime.app import CeleryPublisher, configure

    configure(settings)
    return CeleryPublisher()


def _exit_with_parent() -> None:
    """Under the embedded stack, stop (SIGTERM to ourselves) once the process that started us
    is gone, so that a killed ``compactor up`` or test run leaves no worker behind."""

    from compactor.coordinator.local.embedded import PARENT_PID_VARIABLE

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
@click.option("--max-job-size", type=SIZE, default=None,
              help="sub-job size  [default: COMPACTOR_MAX_JOB_BYTES of the planning worker, 4GiB]")  # fmt: skip
@click.option("--no-sub-compaction", is_flag=True, help="one job for the whole range instead of sub-jobs")
@click.option("--dry-run", is_flag=True, help="compute statistics, commit nothing")
@click.option("--kind", type=click.Choice(["gc", "l0", "image"]), default="gc", show_default=True,
              help="gc: gc-compaction; l0: L0 compaction; image: image-layer creation")  # fmt: skip
@click.option("--force", is_flag=True, help="l0 and image: ignore the L0 and image thresholds")
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
    max_job_size: int | None,
    no_sub_compaction: bool,
    dry_run: bool,
    kind: str,
    force: bool,
    wait: bool,
    timeout: float | None,
    inline: bool,
) -> None:
    """Schedule a compaction meta job (gc-compaction, L0 compaction or image creation) and
    print its id.

    With --wait, progress goes to stderr (a progress bar on a terminal, plain lines otherwise)
    and stdout gets only the final JSON status."""
    settings = settings_from(ctx)
    fields: dict[str, Any] = {
        "tenant_id": tenant,
        "timeline_id": timeline_id,
        "lsn_start": lsn_start,
        "lsn_end": LSN_MAX if lsn_end is None else lsn_end,
        "max_job_bytes": max_job_size,
        "sub_compaction": not no_sub_compaction,
        "dry_run": dry_run,
        "kind": kind,
        "force": force,
    }
    if key_start is not None:
        fields["key_start"] = format_key(key_start)
    if key_end is not None:
        fields["key_end"] = format_key(key_end)
    request = CompactRequest.model_validate(fields)
    storage = Storage(settings)
    if inline:
        from compactor.coordinator.jobs.meta_jobs import run_inline

        result = run_inline(storage, request, settings)
        _echo_json(result)
        if result["state"] != JobState.SUCCEEDED.value:
            fail(f"job {result['job_id']} {result['state']}: {result.get('error') or 'see status'}")
        return

    from compactor.coordinator.jobs.meta_jobs import create_meta_job, status
    from compactor.worker.runtime.dispatch import TASK_PLAN

    records = _connect(settings)
    storage.manifest(request.tenant_id, request.timeline_id)  # a missing timeline fails here, not later
    publisher = _publisher(settings)
    meta, _ = create_meta_job(records, request)
    publisher.publish(TASK_PLAN, {"job_id": meta.id})
    if not wait:
        click.echo(meta.id)
        return
    final = watch_job(records, meta.id, Console(stderr=True), timeout)
    _echo_json(status(records, final))
    if not final.state.ended:
        fail(f"timed out after {timeout:g}s waiting for job {meta.id} (state {final.state.value})")
    if final.state != JobState.SUCCEEDED:
        fail(f"job {meta.id} {final.state.value}: {final.error or final.skipped or 'see status'}")


def watch_job(records: JobRecords, job_id: str, console: Console, timeout: float | None = None) -> MetaJobRecord:
    """Wait until a meta job ends (or ``timeout`` passes) and return its record, showing its
    progress on ``console``: a live bar on a terminal; otherwise a whole line each time the
    job's state or sub-job counts change, so that logs and pipes never get a half line."""
    start = time.monotonic()
    deadline = None if timeout is None else start + timeout
    delay = 0.1
    with _ProgressBar(console, job_id) if console.is_terminal else _ProgressLines(console, job_id) as shown:
        while True:
            meta = records.require_meta(job_id)
            shown.update(JobCounts.of(meta, records.get_subs(meta.sub_jobs)), time.monotonic() - start)
            if meta.state.ended or (deadline is not None and time.monotonic() >= deadline):
                return meta
            time.sleep(delay if deadline is None else max(0.0, min(delay, deadline - time.monotonic())))
            delay = min(delay * 1.5, 1.0)


@dataclass(frozen=True)
class JobCounts:
    state: str
    sub_jobs: int  # 0 until planned
    done: int
    running: int
    most_at_once: int  # the most sub-jobs that have run at the same moment so far
    # Value bytes the sub-jobs' merges have read (uncompressed), not layer (file) bytes.
    values_merged: int

    @classmethod
    def of(cls, meta: MetaJobRecord, subs: list[SubJobRecord]) -> JobCounts:
        return cls(
            meta.state.value,
            len(subs),
            sum(1 for s in subs if s.state.ended),
            sum(1 for s in subs if s.state == JobState.RUNNING),
            most_at_once(subs),
            sum(s.progress.bytes_in for s in subs),
        )

    def detail(self, elapsed: float) -> str:
        mb = self.values_merged / 1e6
        return (
            f"{self.running} running (at most {self.most_at_once} at once), "
            f"{mb:.1f} MB of values merged ({mb / max(elapsed, 1e-6):.1f} MB/s)"
        )


class _ProgressBar:
    def __init__(self, console: Console, job_id: str) -> None:
        self.job_id = job_id
        self.progress = Progress(
            TextColumn("[bold]job[/] {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("sub-jobs  {task.fields[detail]}"),
            TimeElapsedColumn(),
            console=console,
        )
        self.task: TaskID | None = None

    def __enter__(self) -> _ProgressBar:
        self.progress.start()
        self.task = self.progress.add_task(self.job_id[:8], total=None, detail="")
        return self

    def update(self, counts: JobCounts, elapsed: float) -> None:
        assert self.task is not None
        self.progress.update(
            self.task,
            description=f"{self.job_id[:8]} {counts.state}",
            total=counts.sub_jobs or None,
            completed=counts.done,
            detail=counts.detail(elapsed),
        )

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()


class _ProgressLines:
    def __init__(self, console: Console, job_id: str) -> None:
        self.console = console
        self.job_id = job_id
        self.last: tuple[str, int, int, int] | None = None

    def __enter__(self) -> _ProgressLines:
        return self

    def update(self, counts: JobCounts, elapsed: float) -> None:
        changed = (counts.state, counts.sub_jobs, counts.done, counts.running)
        if changed == self.last:
            return
        self.last = changed
        line = (
            f"job {self.job_id[:8]} {counts.state}: sub-jobs {counts.done}/{counts.sub_jobs or '?'} done, "
            f"{counts.detail(elapsed)}, {elapsed:.1f}s"
        )
        self.console.print(line, soft_wrap=True, markup=False, highlight=False)

    def __exit__(self, *exc: object) -> None:
        pass


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


def resolve_job_id(records: JobRecords, given: str) -> str:
    """The job id ``given`` names: a whole id, or a unique prefix of one (the demo and the
    progress lines show 8 characters)."""
    if not _JOB_ID_PREFIX_RE.fullmatch(given):  # not match: "$" would let a trailing newline in
        shown = given if len(given) <= 40 else f"{given[:40]}..."
        raise InvalidInput(f"invalid job id {shown!r}: expected up to 32 lowercase hex characters")
    if len(given) == 32:
        return given
    # Expired jobs linger in the index until listed; only jobs that still exist count.
    found = {m.decode() if isinstance(m, bytes) else m for m, _ in records.r.zscan_iter(KEY_JOBS, match=f"{given}*")}
    matches = sorted(job_id for job_id in found if records.get_meta(job_id) is not None)
    if not matches:
        raise NotFound(f"no job id starts with {given}")
    if len(matches) > 1:
        raise InvalidInput(f"job id prefix {given} is ambiguous: {len(matches)} jobs start with it")
    return matches[0]


@job_group.command("show")
@click.argument("job_id", metavar="ID")
@click.pass_context
@one_line_errors
@service_errors
def job_show(ctx: click.Context, job_id: str) -> None:
    """Print the JSON status of a meta job and its sub-jobs, with the object-store requests of
    its own and its sub-jobs' so far (``s3_requests``: by kind, their total and the object bytes moved)."""
    from compactor.coordinator.jobs.meta_jobs import status

    records = _connect(settings_from(ctx))
    out = status(records, records.require_meta(resolve_job_id(records, job_id)))
    _echo_json({**out, "s3_requests": requests_of(out)})


def requests_of(status: dict[str, Any]) -> dict[str, int]:
    """The object-store requests of a meta job (as ``status`` dumps it): its own (planning,
    commit) and those of its sub-jobs that recorded statistics, summed."""
    counters = [
        CompactionStatistics.model_validate(sub["stats"]).s3_requests for sub in status["sub_jobs"] if sub.get("stats")
    ]
    if status.get("statistics"):
        counters.append(MetaStatistics.model_validate(status["statistics"]).s3_requests)
    return s3_summary(*counters)


@job_group.command("cancel")
@click.argument("job_id", metavar="ID")
@click.pass_context
@one_line_errors
@service_errors
def job_cancel(ctx: click.Context, job_id: str) -> None:
    """Cancel a meta job: waiting sub-jobs never run, running ones commit nothing."""
    from compactor.coordinator.jobs.meta_jobs import cancel

    settings = settings_from(ctx)
    records = _connect(settings)
    meta, cancelled = cancel(records, _publisher(settings), resolve_job_id(records, job_id))
    _echo_json({"job_id": meta.id, "cancel_requested": True, "cancelled_sub_jobs": cancelled})


# ----------------------------------------------------------------------------- processes


class _QueueWorker:
    """The Celery worker for one more queue that ``compactor worker`` starts beside the one it
    runs itself: planning and finalize never wait behind a sub-job, L0 work never waits behind
    gc-compaction, and the gc worker keeps its one slot. It runs as long as the node's main
    worker; if it stops on its own the whole node stops, with an error, so that a supervisor
    restarts them all."""

    def __init__(self, queue: str, args: list[str], env: dict[str, str]) -> None:
        self.queue = queue
        # The same process group: a Ctrl-C, or a kill of the group, reaches it too.
        self.proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL)
        self.stopping = False
        self.failed = False
        threading.Thread(target=self._watch, name=f"{queue}-worker-watch", daemon=True).start()

    def _watch(self) -> None:
        code = self.proc.wait()
        if not self.stopping:
            self.failed = True
            click.echo(f"the {self.queue}-queue worker exited with code {code}; stopping this node", err=True)
            os.kill(os.getpid(), signal.SIGTERM)  # Celery's warm shutdown of the main worker

    def stop(self, sig: int) -> None:
        self.stopping = True
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)


def _start_queue_worker(
    ctx: click.Context, node: str, queue: str, concurrency: int, pool: str, loglevel: str | None
) -> _QueueWorker:
    import sys

    from celery.signals import worker_shutting_down

    from compactor.coordinator.local.embedded import PARENT_PID_VARIABLE

    env_file = ctx.obj.get("env_file") if ctx.obj else None
    args = [
        *(sys.executable, "-m", "compactor.coordinator.cli.main"),
        *(["--env-file", str(env_file)] if env_file else []),
        *("worker", "--node-id", node, "--queues", queue, "--concurrency", str(concurrency), "--pool", pool),
        *(["--loglevel", loglevel] if loglevel else []),
        "--no-metrics",  # the node's main worker exports on the node's metrics port
    ]
    child = _QueueWorker(queue, args, {**os.environ, PARENT_PID_VARIABLE: str(os.getpid())})

    def forward(how: str, **_: Any) -> None:
        # SIGTERM, not the SIGINT a terminal may have sent both: a second SIGINT would turn
        # the child's warm shutdown into a cold one.
        child.stop(signal.SIGQUIT if how == "Cold" else signal.SIGTERM)

    worker_shutting_down.connect(forward, weak=False)
    return child


@click.command("worker")
@click.option("--node-id", default=None, help="this node's id (default: COMPACTOR_NODE_ID, else the host name)")
@click.option(
    "--concurrency",
    type=click.IntRange(1, 64),
    default=2,
    show_default=True,
    help="processes for the light queue; the gc queue runs one sub-job at a time per node",
)
@click.option(
    "--queues",
    default="gc,l0,light",
    show_default=True,
    help="queues to consume, comma-separated: gc, l0, light (the first of them in this order runs in this process, "
    "each other one in a Celery worker it starts)",
)
@click.option("--loglevel", default=None, help="log level (default: COMPACTOR_LOG_LEVEL, else WARNING)")
@click.option(
    "--pool",
    type=click.Choice(["prefork", "solo", "threads"]),
    default="prefork",
    show_default=True,
    help="Celery pool; prefork enforces the time limits, solo/threads export all metrics from one process",
)
@click.option("--no-metrics", is_flag=True, help="export no metrics, whatever COMPACTOR_METRICS_PORT says")
@click.pass_context
@one_line_errors
@service_errors
def worker_command(
    ctx: click.Context,
    node_id: str | None,
    concurrency: int,
    queues: str,
    loglevel: str | None,
    pool: str,
    no_metrics: bool,
) -> None:
    """Run this node's Celery workers: the gc queue with one slot, the l0 queue with
    COMPACTOR_L0_SLOTS, the light queue with --concurrency, each in a Celery worker of its own."""

    settings = settings_from(ctx)
    if node_id is not None:
        settings = settings.model_copy(update={"node_id": node_id})
        os.environ["COMPACTOR_NODE_ID"] = node_id
    from compactor.worker.runtime.app import node_id as resolve_node_id
    from compactor.worker.runtime.app import worker_hostname

    node = resolve_node_id(settings)
    if not _NODE_ID_RE.match(node):
        raise InvalidInput(f"invalid node id {node!r}: letters, digits, '.', '_' and '-', at most 64")
    from compactor.worker.runtime.dispatch import QUEUE_GC, QUEUE_L0, QUEUE_LIGHT, QUEUES

    wanted = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = sorted(set(wanted) - set(QUEUES))
    if not wanted or unknown:
        raise InvalidInput(f"invalid --queues {queues!r}: choose from {', '.join(QUEUES)}")
    check_connectivity(settings)
    # Found by the bad-input tests: with the object store unreachable (or the bucket missing)
    # the worker started anyway and took jobs only to fail each after its retries. Fail here,
    # in one line, like an unreachable Redis.
    Storage(settings).objects.check_bucket()
    from compactor.worker.runtime.app import configure

    configure(settings)
    from compactor.coordinator.jobs.meta_jobs import MetaJobs
    from compactor.worker.runtime import plugins, tasks  # registers the tasks

    tasks.install(MetaJobs)
    plugins.load(settings)  # a plugin that does not load stops the worker before it takes a job

    _exit_with_parent()
    from compactor.worker.runtime import metrics

    # Served by this (parent) process; see worker/runtime/metrics.py for the pools that export it all.
    metrics.serve(None if no_metrics else settings.metrics_port)
    shared = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if no_metrics and shared:
        metrics.join_pool_processes(Path(shared))  # the node's main worker serves what we count
    elif settings.metrics_port is not None and not no_metrics:
        metrics.export_pool_processes()  # before the other queues' workers start: they inherit the directory
    # One gc slot per node, and as many l0 processes as L0 slots: more would take sub-jobs only
    # to bounce them off the node's locks ("node busy"), holding their messages where a kill
    # loses them.
    slots = {QUEUE_GC: 1, QUEUE_L0: settings.l0_slots, QUEUE_LIGHT: concurrency}
    here, *others = [queue for queue in QUEUES if queue in wanted]
    children = [_start_queue_worker(ctx, node, queue, concurrency, pool, loglevel) for queue in others]
    from celery.bin.celery import celery as celery_main

    try:
        # Celery's own command line on the app configured above: app.worker_main and app.start
        # both drop the exit code Celery stops with, its main returns it.
        code = celery_main.main(
            args=[
                "--app=compactor.worker.runtime.app:app",
                "worker",
                f"--hostname={worker_hostname(node, here)}",
                f"--queues={here}",
                f"--concurrency={slots[here]}",
                f"--pool={pool}",
                f"--loglevel={loglevel or os.environ.get('COMPACTOR_LOG_LEVEL', 'WARNING')}",
                "--without-mingle",
                "--without-gossip",
            ],
            standalone_mode=False,
        )
    finally:
        for child in children:
            child.stop(signal.SIGTERM)
        for child in children:
            child.proc.wait()
    if code:
        # A supervisor that restarts on failure only must see Celery giving up as one.
        fail(f"the Celery worker stopped with exit code {code}; see its log above", code)
    for child in children:
        if child.failed:
            fail(f"the {child.queue}-queue worker exited with code {child.proc.returncode}; see its log above")


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
    from compactor.coordinator.jobs.scheduler import Scheduler

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
    from compactor.worker.runtime import metrics

    metrics.serve(settings.metrics_port)
    period = interval if interval is not None else settings.coordinator_interval_s
    if period <= 0:
        raise InvalidInput(f"invalid --interval {period}: must be positive")
    click.echo(f"coordinator running interval={period}s", err=True)
    scheduler.run(period, stop)


def register(main: click.Group) -> None:
    for command in (compact_command, jobs_command, job_group, worker_command, coordinator_command):
        main.add_command(command)
