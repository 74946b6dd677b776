"""``compactor demo``: the whole system on one machine, in one command.

Starts the embedded stack (real Redis, a real S3 endpoint, worker processes), builds a realistic
timeline, compacts it through the workers with live progress, verifies every retained read,
prints a summary and writes before/after layer-map pictures.
"""

import hashlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from compactor.coordinator.cli.draw import Axes, layer_map_svg
from compactor.coordinator.cli.jobs import watch_job
from compactor.coordinator.jobs.meta_jobs import create_meta_job
from compactor.coordinator.local.embedded import EmbeddedStack
from compactor.coordinator.local.workload import child_timeline_id, generate, preset
from compactor.storage.errors import CompactorError
from compactor.storage.manifest import Manifest
from compactor.storage.timeline import Storage
from compactor.worker.runtime.dispatch import TASK_PLAN
from compactor.worker.runtime.payloads import CompactRequest
from compactor.worker.runtime.records import JobRecords, JobState, most_at_once
from compactor.worker.runtime.redis_client import connect

TENANT = "de0de0de0de0de0de0de0de0de0de0de"
TIMELINE = "0123456789abcdef0123456789abcdef"


@dataclass
class Snapshot:
    layers: int
    deltas: int
    images: int
    bytes: int

    @classmethod
    def of(cls, manifest: Manifest) -> "Snapshot":
        names = manifest.layer_names()
        deltas = sum(1 for n in names if n.is_delta)
        return cls(len(names), deltas, len(names) - deltas, sum(e.size for e in manifest.layers.values()))


def retained_lsns(manifest: Manifest) -> list[int]:
    """Every LSN whose reads must survive: retain LSNs and leases below the horizon, the horizon,
    and the top of the timeline (standing for every LSN above the horizon)."""
    horizon = manifest.gc.cutoff
    return sorted({*manifest.gc.retained_below(horizon), horizon, max(manifest.top_lsn - 1, horizon)})


def read_digest(storage: Storage, manifest: Manifest, lsn: int) -> tuple[int, str]:
    digest = hashlib.sha256()
    keys = 0
    for key, value in storage.read(manifest, lsn):
        digest.update(key)
        digest.update(len(value).to_bytes(4, "big"))
        digest.update(value)
        keys += 1
    return keys, digest.hexdigest()


def fresh_out_dir(parent: Path) -> Path:
    """``parent/compactor-demo``, or the first of ``compactor-demo-2``, ``-3``, ... not taken: a
    second demo never overwrites the pictures of the first."""
    candidate, n = parent / "compactor-demo", 1
    while candidate.exists():
        n += 1
        candidate = parent / f"compactor-demo-{n}"
    return candidate


def run_demo(
    size_bytes: int, workers: int, out_dir: Path, directory: Path | None, max_job_bytes: int, console: Console
) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="compactor-demo-") as tmp:
        root = directory or Path(tmp)
        console.print(f"[bold]starting[/] Redis, S3 endpoint and {workers} workers in {root}")
        with EmbeddedStack(root, workers=workers, coordinator=True) as stack:
            return _demo(stack, size_bytes, out_dir, max_job_bytes, console)


def _demo(stack: EmbeddedStack, size_bytes: int, out_dir: Path, max_job_bytes: int, console: Console) -> dict[str, Any]:
    settings = stack.settings
    storage = Storage(settings)
    layer_bytes = max(size_bytes // 16, 1024**2)  # a few layers per band, so the job splits
    spec = preset("pages", size_bytes, child=True, retain=[0.35], leases=[0.55], bands=4, layer_bytes=layer_bytes)
    started = time.monotonic()
    with console.status(f"building a {size_bytes / 1e6:.0f} MB timeline (8 KiB pages, WAL records, branch, lease)"):
        generate(storage, TENANT, TIMELINE, spec)
    console.print(f"timeline built in {time.monotonic() - started:.1f}s")
    before = storage.manifest(TENANT, TIMELINE)
    lsns = retained_lsns(before)
    child = child_timeline_id(TIMELINE)
    with console.status(f"reading every key at {len(lsns)} retained LSNs (and the child branch) for verification"):
        expected = {lsn: read_digest(storage, before, lsn) for lsn in lsns}
        child_manifest = storage.manifest(TENANT, child)
        expected_child = read_digest(storage, child_manifest, child_manifest.top_lsn)

    records = JobRecords(connect(settings))
    from compactor.worker.runtime.app import CeleryPublisher  # configured for the stack by EmbeddedStack.start

    request = CompactRequest(tenant_id=TENANT, timeline_id=TIMELINE, max_job_bytes=max_job_bytes)
    meta, _ = create_meta_job(records, request)
    t0 = time.monotonic()
    CeleryPublisher().publish(TASK_PLAN, {"job_id": meta.id})
    final = watch_job(records, meta.id, console)
    wall = time.monotonic() - t0
    if final.state != JobState.SUCCEEDED:
        raise CompactorError(f"demo job {final.id} ended {final.state.value}: {final.error or final.skipped}")

    after = storage.manifest(TENANT, TIMELINE)
    axes = Axes.spanning(before, after)  # the same key and LSN scale, so the two can be compared
    (out_dir / "before.svg").write_text(layer_map_svg(before, "before gc-compaction", axes))
    (out_dir / "after.svg").write_text(layer_map_svg(after, "after gc-compaction", axes))
    with console.status("verifying every retained read"):
        for lsn in lsns:
            got = read_digest(storage, after, lsn)
            if got != expected[lsn]:
                raise CompactorError(f"verification failed: reads at LSN {lsn} changed ({expected[lsn]} -> {got})")
        if read_digest(storage, storage.manifest(TENANT, child), child_manifest.top_lsn) != expected_child:
            raise CompactorError("verification failed: the child branch reads differently")
    b, a = Snapshot.of(before), Snapshot.of(after)
    summary = {
        "job_id": final.id,
        "sub_jobs": len(final.sub_jobs),
        "most_sub_jobs_at_once": most_at_once(records.get_subs(final.sub_jobs)),
        "workers": len(stack.workers),
        "layers_before": b.layers, "layers_after": a.layers,
        "deltas_before": b.deltas, "deltas_after": a.deltas,
        "images_before": b.images, "images_after": a.images,
        "bytes_before": b.bytes, "bytes_after": a.bytes,
        "retention_ratio": round(a.bytes / (b.bytes + 1), 3),
        "wall_seconds": round(wall, 2),
        "input_mb_per_s": round(b.bytes / 1e6 / wall, 1),
        "verified_lsns": lsns,
        "keys_verified": sum(keys for keys, _ in expected.values()) + expected_child[0],
    }  # fmt: skip
    console.print(_summary_table(summary))
    console.print(f"layer maps: {out_dir / 'before.svg'}  {out_dir / 'after.svg'}")
    return summary


def _summary_table(s: dict[str, Any]) -> Table:
    table = Table(title="gc-compaction summary")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("layers", str(s["layers_before"]), str(s["layers_after"]))
    table.add_row("delta layers", str(s["deltas_before"]), str(s["deltas_after"]))
    table.add_row("image layers", str(s["images_before"]), str(s["images_after"]))
    table.add_row("layer bytes", f"{s['bytes_before'] / 1e6:.1f} MB", f"{s['bytes_after'] / 1e6:.1f} MB")
    table.add_row("retention ratio", "", f"{s['retention_ratio']:.3f}")
    table.add_row("wall time", "", f"{s['wall_seconds']:.1f} s ({s['sub_jobs']} sub-jobs)")
    table.add_row("sub-jobs at once", "", f"at most {s['most_sub_jobs_at_once']}, on {s['workers']} workers")
    table.add_row("throughput", "", f"{s['input_mb_per_s']:.1f} MB/s of input layers")
    table.add_row("verified", "", f"{s['keys_verified']} key reads at {len(s['verified_lsns'])} retained LSNs + child")
    return table
