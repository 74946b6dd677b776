"""One scale-out run in a fresh process, started by ``bench.run``::

    python -m bench.scale KIND WORKERS TENANT TIMELINE MAX_JOB_BYTES CPUS DIRECTORY S3_PID

Starts the embedded stack (``compactor.coordinator.local.embedded``: real Redis, ``WORKERS``
nodes, each a ``compactor worker --queues gc,l0,light``) against the store named by the
``COMPACTOR_S3_*`` variables, caps each node's processes at ``CPUS`` CPUs (``bench.cgroups``; 0
caps nothing), runs one meta job of ``KIND`` (``gc`` or ``l0``) over the timeline through the
Celery path and prints one JSON object: wall time from publishing the plan task to the meta job's
end, its phases, the sub-jobs, each node's CPU-seconds, throttling and downloaded bytes, and the
CPU-seconds of the services the nodes share: the S3 server (process ``S3_PID``, the benchmark's,
not capped) and Redis. (A fresh process per run: the Celery app is configured once per process.)
"""

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, cast, get_args

from bench.cgroups import CpuCaps, cpu_seconds
from compactor.coordinator.jobs.meta_jobs import create_meta_job
from compactor.coordinator.local.embedded import EmbeddedStack
from compactor.worker.engine.jobs import JobKind
from compactor.worker.runtime.dispatch import TASK_PLAN
from compactor.worker.runtime.payloads import CompactRequest
from compactor.worker.runtime.records import JobRecords, SubJobRecord, most_at_once
from compactor.worker.runtime.redis_client import connect


def _sub_job(sub: SubJobRecord) -> dict[str, Any]:
    """What balances a sub-job: the key-value bytes it merged (its slice's share of the work),
    how long it ran, how much of that it waited for downloads, and its phases."""
    stats = sub.stats
    return {
        "index": sub.index,
        "key_start": sub.spec.key_start,
        "key_end": sub.spec.key_end,
        "node": sub.attempts[-1].node if sub.attempts else None,
        "attempts": len(sub.attempts),
        "started_at": sub.started_at,
        "ended_at": sub.ended_at,
        "seconds": (sub.ended_at or 0) - (sub.started_at or 0),
        "kv_bytes": stats.wal_keys_visited.size + stats.image_keys_visited.size if stats else 0,
        "layer_bytes": stats.delta_layer_visited.size + stats.image_layer_visited.size if stats else 0,
        "download_wait_s": stats.time_download_layer_secs if stats else 0.0,
        "main_loop_s": stats.time_main_loop_secs if stats else 0.0,
        # Before the main loop (the node lock, loading the plan and the layers' footers) and after
        # it (the last output parts and the uploads' completion), where the store is waited on too.
        "acquire_lock_s": stats.time_acquire_lock_secs if stats else 0.0,
        "analyze_s": stats.time_analyze_secs if stats else 0.0,
        "final_phase_s": stats.time_final_phase_secs if stats else 0.0,
        "total_s": stats.time_total_secs if stats else 0.0,
    }


def _idle_tail(subs: list[SubJobRecord]) -> float:
    """Node-seconds left idle at the end: for each node, from its last sub-job's end to the last
    sub-job's end overall (the stragglers' cost; 0 when every node finishes together)."""
    ends: dict[str, float] = {}
    for sub in subs:
        if sub.attempts and sub.ended_at is not None:
            node = sub.attempts[-1].node
            ends[node] = max(ends.get(node, 0.0), sub.ended_at)
    last = max(ends.values(), default=0.0)
    return sum(last - end for end in ends.values())


def run(
    kind: JobKind,
    workers: int,
    tenant: str,
    timeline: str,
    max_job_bytes: int,
    cpus: float,
    directory: Path,
    s3_pid: int,
) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k.startswith("COMPACTOR_")}
    with (
        EmbeddedStack(directory, workers=workers, concurrency=1, coordinator=False, env=env) as stack,
        CpuCaps(cpus) as caps,
    ):
        from compactor.worker.runtime.app import CeleryPublisher  # configured for the stack by its start

        for node, proc in stack.workers.items():
            caps.cap(node, proc.pid)
        assert stack.redis.pid is not None
        # The services every node shares: with the node CPU flat, their CPU is what grows.
        services = {"s3": s3_pid, "redis": stack.redis.pid}
        cpu_before = {node: cpu_seconds(proc.pid) for node, proc in stack.workers.items()}
        services_before = {name: cpu_seconds(pid) for name, pid in services.items()}
        records = JobRecords(connect(stack.settings))
        request = CompactRequest(tenant_id=tenant, timeline_id=timeline, max_job_bytes=max_job_bytes, kind=kind)
        meta, _ = create_meta_job(records, request)
        published = time.time()
        start = time.perf_counter()
        CeleryPublisher().publish(TASK_PLAN, {"job_id": meta.id})
        while not (meta := records.require_meta(meta.id)).state.ended:
            time.sleep(0.05)
        wall = time.perf_counter() - start
        cpu = {node: cpu_seconds(proc.pid) - cpu_before[node] for node, proc in stack.workers.items()}
        services_cpu = {name: cpu_seconds(pid) - services_before[name] for name, pid in services.items()}
        throttling = caps.throttling()
        # Each node's layer cache (the stack gives node N the cache directory cache-N) holds what
        # it downloaded: whole layers, sparse slice files holding only a slice's row groups
        # (counted by the bytes on disk) and the tails of layers read for their footers.
        downloaded = {
            node: sum(f.stat().st_blocks * 512 for f in (directory / f"cache-{node}" / "layers").glob("*.*"))
            for node in stack.workers
        }
        subs = records.get_subs(meta.sub_jobs)
    last_sub_end = max((s.ended_at or 0 for s in subs), default=published)
    return {
        "kind": kind,
        "workers": workers,
        "state": meta.state.value,
        "error": meta.error or meta.skipped,
        "wall_s": wall,
        "cpus_per_worker": cpus,
        "cpu_cap": caps.applied,
        "cpu_cap_unavailable": caps.unavailable,
        "sub_jobs": len(subs),
        "most_at_once": most_at_once(subs),
        "input_bytes": meta.statistics.before_compaction_layer_size if meta.statistics else 0,
        # From publishing the plan task to the plan recorded, to the first sub-job starting, and
        # from the last sub-job's end to the commit.
        "plan_s": (meta.planned_at or published) - published,
        "first_start_s": min((s.started_at or published for s in subs), default=published) - published,
        "finalize_s": (meta.ended_at or last_sub_end) - last_sub_end,
        "node_cpu_s": cpu,
        "s3_cpu_s": services_cpu["s3"],
        "redis_cpu_s": services_cpu["redis"],
        "idle_tail_s": _idle_tail(subs),
        "node_throttling": throttling,
        "node_downloaded_bytes": downloaded,
        "subs": [_sub_job(s) for s in sorted(subs, key=lambda s: s.index)],
    }


def main(argv: list[str]) -> None:
    kind, workers, tenant, timeline, max_job_bytes, cpus, directory, s3_pid = argv
    if kind not in get_args(JobKind):
        raise SystemExit(f"unknown kind {kind!r}")
    result = run(
        cast(JobKind, kind),
        int(workers),
        tenant,
        timeline,
        int(max_job_bytes),
        float(cpus),
        Path(directory),
        int(s3_pid),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
