"""Prometheus metrics of workers and the coordinator.

Every worker and the coordinator exports its metrics on ``COMPACTOR_METRICS_PORT`` through
:func:`serve`; Prometheus sums them. The coordinator's live in ``prometheus_client``'s default
registry, with the process and platform collectors. A worker runs its jobs in pool processes
while its parent serves ``/metrics``, so it switches to ``prometheus_client``'s multiprocess
mode before the pool forks (:func:`export_pool_processes`, called from ``compactor.worker.runtime.app``):
every process writes its values to files in a directory of the worker's own, and the exporter
sums them. The process collectors are not exported then (prometheus_client cannot merge them).

What storage/ does (S3 retries, layer downloads, lost manifest races, commit conflicts) reaches
the metrics through its observer hooks: :class:`StoreMetrics` and :class:`CommitMetrics`.

Label values are kept low-cardinality by :func:`_label`: only short ``snake_case`` words are
accepted, and after :data:`MAX_LABEL_VALUES` distinct values of one label every new value is
reported as ``other``. Never pass ids, key ranges or object names as labels.

Exposed names (what the dashboard and alerts query):

==========================================  =========  ===============================================
``compactor_jobs_total{kind,state}``        counter    jobs that ended, by kind and final state
``compactor_jobs_in_state{state}``          gauge      job records per state (set by the coordinator)
``compactor_bytes_read_total``              counter    layer bytes read (downloaded or from cache)
``compactor_bytes_written_total``           counter    layer bytes written (uploaded)
``compactor_job_duration_seconds{kind}``    histogram  wall time of a job, 1 s to 6 h
``compactor_lock_wait_seconds``             histogram  time spent waiting for the node lock
``compactor_lock_contended_total``          counter    node-lock acquisitions that had to wait
``compactor_commit_conflicts_total``        counter    commits aborted on a real conflict
``compactor_commit_races_lost_total``       counter    create-only manifest writes lost to a racer
``compactor_replans_total``                 counter    jobs sent back to be planned again
``compactor_s3_requests_total{kind}``       counter    S3 requests sent, by kind (get, put, part, ...)
``compactor_s3_retries_total{operation}``   counter    S3 requests retried, by kind (get, put, ...)
``compactor_layer_download_seconds``        histogram  time spent fetching one layer (or slice) file
==========================================  =========  ===============================================
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
    start_http_server,
    values,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from compactor.storage.manifest_store import CommitObserver
from compactor.storage.object_store import RequestKind, StoreObserver

log = logging.getLogger(__name__)

#: The default metrics port of the deploy files (compose, k8s, prometheus.yml).
DEFAULT_PORT = 9095

#: After this many distinct values of one label, new values are reported as ``other``.
MAX_LABEL_VALUES = 32
OTHER = "other"

_LABEL_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")

# 1 s .. 6 h: sub-jobs take seconds to minutes, meta jobs up to hours.
JOB_DURATION_BUCKETS: tuple[float, ...] = (
    1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 900, 1200, 1800, 3600, 7200, 10800, 14400, 21600,
)  # fmt: skip
LOCK_WAIT_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)
DOWNLOAD_BUCKETS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)


JOBS: Counter
JOBS_IN_STATE: Gauge
BYTES_READ: Counter
BYTES_WRITTEN: Counter
JOB_DURATION: Histogram
LOCK_WAIT: Histogram
LOCK_CONTENDED: Counter
COMMIT_CONFLICTS: Counter
COMMIT_RACES_LOST: Counter
REPLANS: Counter
S3_REQUESTS: Counter
S3_RETRIES: Counter
LAYER_DOWNLOAD: Histogram


def _define(registry: CollectorRegistry | None) -> None:
    """Build the metrics, into ``registry``. Done at import, and once more when a worker
    switches to multiprocess mode (:func:`export_pool_processes`): prometheus_client picks how
    a metric stores its value when the metric is built."""
    global JOBS, JOBS_IN_STATE, BYTES_READ, BYTES_WRITTEN, JOB_DURATION, LOCK_WAIT, LOCK_CONTENDED
    global COMMIT_CONFLICTS, COMMIT_RACES_LOST, REPLANS, S3_REQUESTS, S3_RETRIES, LAYER_DOWNLOAD
    JOBS = Counter(
        "compactor_jobs_total",
        "Jobs that ended, by kind (e.g. meta, sub) and final state (e.g. succeeded, failed, aborted).",
        ["kind", "state"],
        registry=registry,
    )
    JOBS_IN_STATE = Gauge(
        "compactor_jobs_in_state",
        "Job records currently in each state, as counted by the coordinator from the job records.",
        ["state"],
        registry=registry,
        # Set by the one coordinator process; a process that is gone no longer counts.
        multiprocess_mode="livemostrecent",
    )
    BYTES_READ = Counter("compactor_bytes_read_total", "Bytes of input layers read by compactions.", registry=registry)
    BYTES_WRITTEN = Counter(
        "compactor_bytes_written_total", "Bytes of output layers written by compactions.", registry=registry
    )
    JOB_DURATION = Histogram(
        "compactor_job_duration_seconds",
        "Wall-clock duration of a job from start to its final state, by kind.",
        ["kind"],
        buckets=JOB_DURATION_BUCKETS,
        registry=registry,
    )
    LOCK_WAIT = Histogram(
        "compactor_lock_wait_seconds",
        "Seconds spent waiting to acquire the node lock (0 when it was free).",
        buckets=LOCK_WAIT_BUCKETS,
        registry=registry,
    )
    LOCK_CONTENDED = Counter(
        "compactor_lock_contended_total",
        "Node-lock acquisitions that found the lock held and had to wait.",
        registry=registry,
    )
    COMMIT_CONFLICTS = Counter(
        "compactor_commit_conflicts_total",
        "Commits abandoned because the newest manifest invalidated the job's read set (a real conflict).",
        registry=registry,
    )
    COMMIT_RACES_LOST = Counter(
        "compactor_commit_races_lost_total",
        "Create-only manifest writes that lost to a concurrent writer and were re-validated.",
        registry=registry,
    )
    REPLANS = Counter(
        "compactor_replans_total", "Jobs sent back to the coordinator to be planned again.", registry=registry
    )
    S3_REQUESTS = Counter(
        "compactor_s3_requests_total",
        "Object-store requests sent, every attempt, by kind (get, put, part, multipart, list, delete, head).",
        ["kind"],
        registry=registry,
    )
    S3_RETRIES = Counter(
        "compactor_s3_retries_total",
        "Object-store requests retried after a transient error, by operation "
        "(get, put, part, multipart, list, delete, head).",
        ["operation"],
        registry=registry,
    )
    LAYER_DOWNLOAD = Histogram(
        "compactor_layer_download_seconds",
        "Seconds to download one layer file from the object store, retries included (cache misses only).",
        buckets=DOWNLOAD_BUCKETS,
        registry=registry,
    )


_define(REGISTRY)

_label_lock = threading.Lock()
_label_values: dict[str, set[str]] = {}
_published_states: set[str] = set()  # states ever set on JOBS_IN_STATE, so stale ones drop to 0


def _label(name: str, value: str) -> str:
    """``value`` if it is a short snake_case word and the label is not yet full, else ``other``."""
    value = value.strip().lower()
    if not _LABEL_RE.match(value):
        return OTHER
    with _label_lock:
        seen = _label_values.setdefault(name, set())
        if value in seen:
            return value
        if len(seen) >= MAX_LABEL_VALUES:
            return OTHER
        seen.add(value)
        return value


# --- helpers the tasks and the coordinator call -------------------------------------------------


def observe_job(kind: str, state: str, seconds: float) -> None:
    """Count a job that ended in ``state`` and record how long it took."""
    kind = _label("kind", kind)
    JOBS.labels(kind=kind, state=_label("state", state)).inc()
    JOB_DURATION.labels(kind=kind).observe(max(0.0, seconds))


def add_bytes(read: int = 0, written: int = 0) -> None:
    """Add layer bytes read and written; negative amounts are a bug and raise ``ValueError``."""
    if read < 0 or written < 0:
        raise ValueError(f"byte counts must not be negative (read={read}, written={written})")
    if read:
        BYTES_READ.inc(read)
    if written:
        BYTES_WRITTEN.inc(written)


def set_jobs_in_state(counts: Mapping[str, int]) -> None:
    """Publish the number of job records per state; states missing from ``counts`` drop to 0."""
    current: dict[str, int] = {}
    for state, count in counts.items():
        label = _label("state", state)
        current[label] = current.get(label, 0) + count
    with _label_lock:
        states = _published_states | set(current)
        _published_states.update(current)
        for state in states:
            JOBS_IN_STATE.labels(state=state).set(current.get(state, 0))


def observe_lock_wait(seconds: float, contended: bool) -> None:
    """Record one node-lock acquisition; ``contended`` when the lock was held by someone else."""
    LOCK_WAIT.observe(max(0.0, seconds))
    if contended:
        LOCK_CONTENDED.inc()


def replanned() -> None:
    REPLANS.inc()


# --- what storage/ reports ------------------------------------------------------------------------


class StoreMetrics(StoreObserver):
    """Object-store requests, retries and layer downloads into the metrics (give it to ``Storage``)."""

    def request(self, kind: RequestKind, payload_bytes: int) -> None:
        S3_REQUESTS.labels(kind=kind).inc()

    def retry(self, kind: RequestKind, operation: str) -> None:
        S3_RETRIES.labels(operation=kind).inc()

    def download(self, seconds: float, size: int) -> None:
        # The bytes are counted once, from the job's statistics (add_bytes), cached or not.
        LAYER_DOWNLOAD.observe(max(0.0, seconds))


class CommitMetrics(CommitObserver):
    """Lost manifest races and commit conflicts into the metrics (give it to ``Storage``)."""

    def race_lost(self, tenant: str, timeline: str, number: int) -> None:
        COMMIT_RACES_LOST.inc()

    def conflict(self, tenant: str, timeline: str, reason: str) -> None:
        COMMIT_CONFLICTS.inc()


# --- prefork pools ----------------------------------------------------------------------------------

_multiprocess_dir: Path | None = None
_owns_multiprocess_dir = False


def export_pool_processes() -> Path:
    """Switch this process, and every process it forks from now on, to prometheus_client's
    multiprocess mode, in a fresh directory of its own; :func:`serve` then exports the sum over
    them. Call it in a worker's parent before the pool forks.

    Jobs run in the pool's children, while only the parent serves ``/metrics``: without this,
    everything a job counts would stay in a child. The directory is named after this process
    and emptied first, so counts of an earlier worker that had the same pid never come back.
    """
    global _owns_multiprocess_dir
    if _multiprocess_dir is not None:
        return _multiprocess_dir
    directory = Path(tempfile.gettempdir()) / f"compactor-metrics-{os.getpid()}"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(mode=0o700)
    # prometheus_client reads the directory from the environment, in this process and its
    # children, and decides how values are stored when a metric is built: hence the rebuild.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    join_pool_processes(directory)
    _owns_multiprocess_dir = True
    log.info("metrics of pool processes collected in %s", directory)
    return directory


def join_pool_processes(directory: Path) -> None:
    """Count this process's metrics, and its pool's, into another process's directory of
    :func:`export_pool_processes`: the light-queue worker of a node, whose gc worker serves the
    node's metrics (finalize, and so every meta-job counter, runs in the light worker)."""
    global _multiprocess_dir
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    _define(registry=None)
    _multiprocess_dir = directory


def pool_process_exited(pid: int) -> None:
    """Drop the live gauges of a pool process that ended (its counters stay in the sum)."""
    if _multiprocess_dir is not None:
        multiprocess.mark_process_dead(pid, str(_multiprocess_dir))  # type: ignore[no-untyped-call]


def stop_exporting_pool_processes() -> None:
    """Remove the directory of :func:`export_pool_processes` when the worker shuts down."""
    if _multiprocess_dir is not None and _owns_multiprocess_dir:
        shutil.rmtree(_multiprocess_dir, ignore_errors=True)


class _Exported(Collector):
    """What ``/metrics`` shows: this process's registry, or, once the worker collects its pool
    processes, their merged files (which hold this process's own metrics too)."""

    def collect(self) -> Iterable[Metric]:
        if _multiprocess_dir is None:
            return REGISTRY.collect()
        collector = multiprocess.MultiProcessCollector(None, str(_multiprocess_dir))  # type: ignore[no-untyped-call]
        merged: Iterable[Metric] = collector.collect()  # type: ignore[no-untyped-call]
        return merged


_exported = CollectorRegistry(auto_describe=False)
_exported.register(_Exported())


# --- the exporter ----------------------------------------------------------------------------------

_serve_lock = threading.Lock()
_served: tuple[int, int, int] | None = None  # (pid, requested port, bound port)


def serve(port: int | None, addr: str = "0.0.0.0") -> None:
    """Start the HTTP exporter (``/metrics``) on ``port`` once per process; ``None`` does nothing.

    Calling it again with the same port is a no-op, with another port a ``ValueError``. Port 0 binds
    a free port (see :func:`served_port`). In a forked child the parent's server is not inherited
    and the port is taken, so the child logs a warning and exports nothing of its own.
    """
    global _served
    if port is None:
        return
    if not 0 <= port <= 65535:
        raise ValueError(f"metrics port {port} is out of range")
    with _serve_lock:
        if _served is not None:
            pid, requested, _bound = _served
            if pid != os.getpid():
                log.warning("metrics are served by the parent process %d; this child exports nothing", pid)
                return
            if requested != port:
                raise ValueError(f"metrics are already served on port {requested}, not {port}")
            return
        server, _thread = start_http_server(port, addr=addr, registry=_exported)
        _served = (os.getpid(), port, int(server.server_port))
        log.info("serving metrics", extra={"port": _served[2], "addr": addr})


def served_port() -> int | None:
    """The port this process exports metrics on, or ``None`` when :func:`serve` was not called."""
    with _serve_lock:
        if _served is None or _served[0] != os.getpid():
            return None
        return _served[2]
