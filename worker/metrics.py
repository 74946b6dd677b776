"""Prometheus metrics of workers and the coordinator.

Every process (a worker running the solo or threads pool, the coordinator) exports its own metrics
on ``COMPACTOR_METRICS_PORT`` through :func:`serve`; Prometheus sums them. The metrics live in
``prometheus_client``'s default registry, so the process and platform collectors come for free.
Multiprocess mode is deliberately not used: prefork children would need a shared directory and
``PROMETHEUS_MULTIPROC_DIR``; run workers with ``--pool solo`` or ``--pool threads`` instead.

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
``compactor_s3_retries_total{operation}``   counter    object-store calls retried, by operation
``compactor_layer_download_seconds``        histogram  time to fetch one layer file
==========================================  =========  ===============================================
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Mapping

from prometheus_client import Counter, Gauge, Histogram, start_http_server

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

JOBS = Counter(
    "compactor_jobs_total",
    "Jobs that ended, by kind (e.g. meta, sub) and final state (e.g. succeeded, failed, aborted).",
    ["kind", "state"],
)
JOBS_IN_STATE = Gauge(
    "compactor_jobs_in_state",
    "Job records currently in each state, as counted by the coordinator from the job records.",
    ["state"],
)
BYTES_READ = Counter("compactor_bytes_read_total", "Bytes of input layers read by compactions.")
BYTES_WRITTEN = Counter("compactor_bytes_written_total", "Bytes of output layers written by compactions.")
JOB_DURATION = Histogram(
    "compactor_job_duration_seconds",
    "Wall-clock duration of a job from start to its final state, by kind.",
    ["kind"],
    buckets=JOB_DURATION_BUCKETS,
)
LOCK_WAIT = Histogram(
    "compactor_lock_wait_seconds",
    "Seconds spent waiting to acquire the node lock (0 when it was free).",
    buckets=LOCK_WAIT_BUCKETS,
)
LOCK_CONTENDED = Counter(
    "compactor_lock_contended_total", "Node-lock acquisitions that found the lock held and had to wait."
)
COMMIT_CONFLICTS = Counter(
    "compactor_commit_conflicts_total",
    "Commits abandoned because the newest manifest invalidated the job's read set (a real conflict).",
)
COMMIT_RACES_LOST = Counter(
    "compactor_commit_races_lost_total",
    "Create-only manifest writes that lost to a concurrent writer and were re-validated.",
)
REPLANS = Counter("compactor_replans_total", "Jobs sent back to the coordinator to be planned again.")
S3_RETRIES = Counter(
    "compactor_s3_retries_total",
    "Object-store calls retried after a transient error, by operation (get, put, list, delete, head).",
    ["operation"],
)
LAYER_DOWNLOAD = Histogram(
    "compactor_layer_download_seconds",
    "Seconds to download one layer file from the object store (cache misses only).",
    buckets=DOWNLOAD_BUCKETS,
)

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


def commit_conflict() -> None:
    COMMIT_CONFLICTS.inc()


def commit_race_lost() -> None:
    COMMIT_RACES_LOST.inc()


def replanned() -> None:
    REPLANS.inc()


def s3_retry(operation: str) -> None:
    """Count one retried object-store call; ``operation`` is a verb such as get, put or list."""
    S3_RETRIES.labels(operation=_label("operation", operation)).inc()


def observe_layer_download(seconds: float, size_bytes: int | None = None) -> None:
    """Record one layer download; with ``size_bytes`` it also counts as bytes read."""
    LAYER_DOWNLOAD.observe(max(0.0, seconds))
    if size_bytes:
        add_bytes(read=size_bytes)


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
        server, _thread = start_http_server(port, addr=addr)
        _served = (os.getpid(), port, int(server.server_port))
        log.info("serving metrics", extra={"port": _served[2], "addr": addr})


def served_port() -> int | None:
    """The port this process exports metrics on, or ``None`` when :func:`serve` was not called."""
    with _serve_lock:
        if _served is None or _served[0] != os.getpid():
            return None
        return _served[2]
