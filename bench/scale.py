"""One scale-out run in a fresh process, started by ``bench.run``::

    python -m bench.scale WORKERS TENANT TIMELINE MAX_JOB_BYTES DIRECTORY

Starts the embedded stack (``compactor.coordinator.local.embedded``: real Redis, ``WORKERS`` Celery worker
processes, one node each) against the store named by the ``COMPACTOR_S3_*`` variables, runs one
meta job over the timeline through the Celery path and prints one JSON object: wall time from
publishing the plan task to the meta job's end, and the sub-jobs. (A fresh process per run:
the Celery app is configured once per process.)
"""

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from compactor.coordinator.jobs.meta_jobs import create_meta_job
from compactor.coordinator.local.embedded import EmbeddedStack
from compactor.worker.runtime.dispatch import TASK_PLAN
from compactor.worker.runtime.records import CompactRequest, JobRecords, connect


def run(workers: int, tenant: str, timeline: str, max_job_bytes: int, directory: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k.startswith("COMPACTOR_")}
    with EmbeddedStack(directory, workers=workers, concurrency=1, coordinator=False, env=env) as stack:
        from compactor.worker.runtime.app import CeleryPublisher  # configured for the stack by its start

        records = JobRecords(connect(stack.settings))
        request = CompactRequest(tenant_id=tenant, timeline_id=timeline, max_job_bytes=max_job_bytes)
        meta, _ = create_meta_job(records, request)
        start = time.perf_counter()
        CeleryPublisher().publish(TASK_PLAN, {"job_id": meta.id})
        while not (meta := records.require_meta(meta.id)).state.ended:
            time.sleep(0.05)
        wall = time.perf_counter() - start
        subs = records.get_subs(meta.sub_jobs)
    return {
        "workers": workers,
        "state": meta.state.value,
        "error": meta.error or meta.skipped,
        "wall_s": wall,
        "sub_jobs": len(subs),
        "chains": len(meta.chains),
        "input_bytes": sum(
            s.stats.delta_layer_visited.size + s.stats.image_layer_visited.size for s in subs if s.stats is not None
        ),
        "sub_job_seconds": [(s.ended_at or 0) - (s.started_at or 0) for s in subs],
    }


def main(argv: list[str]) -> None:
    workers, tenant, timeline, max_job_bytes, directory = argv
    print(json.dumps(run(int(workers), tenant, timeline, int(max_job_bytes), Path(directory))))


if __name__ == "__main__":
    main(sys.argv[1:])
