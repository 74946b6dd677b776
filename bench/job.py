"""One measured run in a fresh worker process, started by ``bench.run``::

    python -m bench.job {compact|copy} TENANT TIMELINE WORKDIR [KIND]

Configuration comes from ``COMPACTOR_*`` variables, as for a worker. The local layer cache is
``WORKDIR/cache`` and starts empty (a cold cache). Prints one JSON object on stdout.

``compact`` runs one inline sub-job over the whole timeline (``compactor.worker.runtime.runner.compact``: plan,
download, compact, upload, commit), of the job kind KIND (``gc``, ``l0`` or ``image``; default
``gc``). ``copy`` is the copy-through limit of the same selection:
each selected layer is downloaded, decoded in full (``LayerReader.iter_batches``), encoded again
(``LayerWriter.add_batch``, the same format and settings) and uploaded, with no merge; the copies
are deleted afterwards, outside the timing.
"""

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from compactor.storage.layer_file import LayerWriter
from compactor.storage.object_store import RequestCounter
from compactor.storage.settings import Settings
from compactor.storage.timeline import Storage
from compactor.worker.engine.jobs import CompactionJob
from compactor.worker.engine.kinds import plan_any
from compactor.worker.engine.run import EngineSettings
from compactor.worker.runtime.allocator import keep_freed_memory
from compactor.worker.runtime.runner import compact

MIB = 1 << 20


def proc_status(field: str) -> int:
    """A ``/proc/self/status`` memory field (e.g. VmHWM, VmRSS) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class _Usage:
    """The process's CPU time and minor page faults since it was made (every thread)."""

    def __init__(self) -> None:
        self._start = resource.getrusage(resource.RUSAGE_SELF)

    def since(self) -> dict[str, float]:
        now, start = resource.getrusage(resource.RUSAGE_SELF), self._start
        user, system = now.ru_utime - start.ru_utime, now.ru_stime - start.ru_stime
        # Faults are where a worker's system CPU goes besides its sockets (docs/benchmarks.md).
        return {"cpu_s": user + system, "cpu_user_s": user, "cpu_system_s": system,
                "minor_faults": now.ru_minflt - start.ru_minflt}  # fmt: skip


def run_compact(storage: Storage, job: CompactionJob, workdir: Path) -> dict[str, Any]:
    settings = EngineSettings(target_layer_bytes=storage.settings.target_layer_bytes, workdir=workdir / "work")
    requests = RequestCounter()  # the whole meta job's: planning, sub-job, commit
    usage = _Usage()
    start = time.perf_counter()
    outcome = compact(storage.observed_by(requests), job, settings, written_by="bench")
    wall = time.perf_counter() - start
    used = usage.since()
    stats = outcome.stats
    if stats is None:
        raise SystemExit(f"nothing compacted: {outcome.skipped}")
    phases = {
        "analyze": stats.time_analyze_secs,
        # Downloads run on their own thread while the main loop reads: this is the time the main
        # loop waited for them (part of main_loop).
        "download": stats.time_download_layer_secs,
        "main_loop": stats.time_main_loop_secs,
        "final": stats.time_final_phase_secs,
    }
    # Uploads run on their own thread as outputs are cut; what is left of the wall time is
    # planning, the wait for the last uploads and the commit.
    phases["upload_commit"] = wall - phases["analyze"] - phases["main_loop"] - phases["final"]
    return {
        "wall_s": wall,
        **used,
        "input_bytes": stats.delta_layer_visited.size + stats.image_layer_visited.size,
        "input_layers": stats.delta_layer_visited.num + stats.image_layer_visited.num,
        "output_bytes": stats.delta_layer_produced.size + stats.image_layer_produced.size,
        "output_layers": stats.delta_layer_produced.num + stats.image_layer_produced.num,
        "versions_in": stats.wal_keys_visited.num + stats.image_keys_visited.num,
        "keys": stats.num_unique_keys_visited,
        "phases_s": phases,
        "manifest_number": outcome.manifest_number,
        "s3_requests": {kind: n for kind, (n, _) in requests.counts().items()},
        "stats": stats.model_dump(),
    }


def run_copy(storage: Storage, job: CompactionJob, workdir: Path) -> dict[str, Any]:
    plan = plan_any(storage.manifest(job.tenant_id, job.timeline_id), job)
    if isinstance(plan, str):
        raise SystemExit(f"nothing selected: {plan}")
    out = workdir / "copy"
    out.mkdir(parents=True, exist_ok=True)
    phases = {"download": 0.0, "decode_encode": 0.0, "upload": 0.0}
    uploaded = []
    usage = _Usage()
    start = time.perf_counter()
    for entry in plan.selected:
        t0 = time.perf_counter()
        storage.cache.fetch(entry)
        t1 = time.perf_counter()
        with storage.cache.reader(entry) as reader, LayerWriter(out / "layer.parquet") as writer:
            for batch in reader.iter_batches():
                writer.add_batch(batch)
            info = writer.finish(entry.layer)
        t2 = time.perf_counter()
        uploaded.append(storage.upload_layer(job.tenant_id, job.timeline_id, entry.layer, info))
        info.remove_file()
        t3 = time.perf_counter()
        phases["download"] += t1 - t0
        phases["decode_encode"] += t2 - t1
        phases["upload"] += t3 - t2
    wall = time.perf_counter() - start
    used = usage.since()
    storage.delete_uploads(uploaded)
    return {
        "wall_s": wall,
        **used,
        "input_bytes": sum(entry.size for entry in plan.selected),
        "input_layers": len(plan.selected),
        "output_bytes": sum(entry.size for entry in uploaded),
        "phases_s": phases,
    }


def main(argv: list[str]) -> None:
    mode, tenant, timeline, workdir_arg, *kind = argv
    keep_freed_memory()  # as a worker process does (compactor.worker.runtime.app)
    workdir = Path(workdir_arg)
    settings = Settings(cache_dir=workdir / "cache")
    storage = Storage(settings)
    job = CompactionJob(tenant_id=tenant, timeline_id=timeline, kind=kind[0] if kind else "gc")
    rss_start = proc_status("VmRSS")
    result = run_compact(storage, job, workdir) if mode == "compact" else run_copy(storage, job, workdir)
    result.update(mode=mode, pid=os.getpid(), vmhwm_bytes=proc_status("VmHWM"), rss_start_bytes=rss_start)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
