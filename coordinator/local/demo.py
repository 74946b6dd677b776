"""``compactor demo``: the whole system on one machine, in one command.

Starts the embedded stack (real Redis, a real S3 endpoint, worker processes), builds a realistic
timeline, compacts it through the workers with live progress, verifies every retained read,
prints a summary and writes before/after layer-map pictures.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.table import Table

from compactor.coordinator.cli.draw import Axes, layer_map_svg
from compactor.coordinator.cli.jobs import watch_job
from compactor.coordinator.jobs.meta_jobs import create_meta_job
from compactor.coordinator.jobs.trigger import decide
from compactor.coordinator.local.embedded import EmbeddedStack
from compactor.coordinator.local.ingest import Ingest, IngestSpec
from compactor.coordinator.local.reads import read_digest, retained_lsns, verify_reads
from compactor.coordinator.local.workload import child_timeline_id, generate, preset
from compactor.storage.errors import CompactorError
from compactor.storage.manifest import Manifest, TimelineSettings
from compactor.storage.timeline import Storage
from compactor.worker.runtime.dispatch import SUB_JOB_QUEUES, TASK_PLAN
from compactor.worker.runtime.payloads import CompactRequest
from compactor.worker.runtime.records import JobRecords, JobState, MetaJobRecord, most_at_once
from compactor.worker.runtime.redis_client import connect

TENANT = "de0de0de0de0de0de0de0de0de0de0de"
TIMELINE = "0123456789abcdef0123456789abcdef"


@dataclass(frozen=True)
class Snapshot:
    """A timeline's layers by kind, and their bytes."""

    l0: int
    l1: int  # deltas that are not L0s
    images: int
    bytes: int

    @classmethod
    def of(cls, manifest: Manifest) -> Snapshot:
        names = manifest.layer_names()
        l0 = sum(1 for n in names if n.is_l0)
        images = sum(1 for n in names if not n.is_delta)
        return cls(l0, len(names) - l0 - images, images, sum(e.size for e in manifest.layers.values()))

    @property
    def deltas(self) -> int:
        return self.l0 + self.l1

    @property
    def layers(self) -> int:
        return self.deltas + self.images

    def __str__(self) -> str:
        return f"L0 {self.l0:>2}  L1 {self.l1:>3}  images {self.images:>3}  ({self.bytes / 1e6:5.1f} MB)"


def fresh_out_dir(parent: Path) -> Path:
    """``parent/compactor-demo``, or the first of ``compactor-demo-2``, ``-3``, ... not taken: a
    second demo never overwrites the pictures of the first."""
    candidate, n = parent / "compactor-demo", 1
    while candidate.exists():
        n += 1
        candidate = parent / f"compactor-demo-{n}"
    return candidate


def run_demo(
    size_bytes: int,
    workers: int,
    out_dir: Path,
    directory: Path | None,
    max_job_bytes: int,
    console: Console,
    ingest: IngestOptions | None = None,
) -> dict[str, Any]:
    """The gc-compaction demo, or with ``ingest`` the live pipeline (``--ingest``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # The live pipeline is the coordinator's to run: every kind, each meta job cut by the size
    # asked for (the auto-trigger's jobs take the planning worker's setting).
    settings = {"COMPACTOR_AUTO_TRIGGER_KINDS": ",".join(KINDS), "COMPACTOR_MAX_JOB_BYTES": str(max_job_bytes)}
    with tempfile.TemporaryDirectory(prefix="compactor-demo-") as tmp:
        root = directory or Path(tmp)
        console.print(f"[bold]starting[/] Redis, S3 endpoint and {workers} workers in {root}")
        if ingest is None:
            with EmbeddedStack(root, workers=workers, coordinator=True) as stack:
                return _demo(stack, size_bytes, out_dir, max_job_bytes, console)
        with EmbeddedStack(root, workers=workers, coordinator=True, settings=settings) as stack:
            return _ingest_demo(stack, size_bytes, ingest, out_dir, console)


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
        expected_child = {child_manifest.top_lsn: read_digest(storage, child_manifest, child_manifest.top_lsn)}

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
        keys_verified = verify_reads(storage, after, expected, "the timeline's")
        keys_verified += verify_reads(storage, storage.manifest(TENANT, child), expected_child, "the child branch's")
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
        "keys_verified": keys_verified,
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


# --- the live pipeline (``compactor demo --ingest``) ----------------------------------------------

KINDS = ("l0", "image", "gc")
CHILD = child_timeline_id(TIMELINE)


class IngestOptions(BaseModel):
    """What ``compactor demo --ingest`` runs: an ingest of ``l0s`` L0 deltas of ``l0_bytes``
    each, one every ``interval_s`` seconds, and the timeline settings that drive the pipeline
    (scaled down from Neon's defaults so that a minute shows every kind at work)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    l0s: int = Field(default=30, ge=2, description="L0 deltas the main timeline ingests")
    l0_bytes: int = Field(default=2 * 1024**2, ge=64 * 1024, description="raw bytes of each: checkpoint_distance")
    interval_s: float = Field(default=2.0, ge=0, description="seconds from one L0 flush to the next")
    compaction_threshold: int = Field(default=4, ge=1)
    image_creation_threshold: int = Field(default=6, ge=1)
    stall_l0s: int | None = Field(
        default=None, ge=1, description="flushes wait while this many L0s are left [default: 3 x compaction_threshold]"
    )
    pitr_l0s: int = Field(default=4, ge=1, description="the gc cutoff trails the newest LSN by this many L0s")
    settle_timeout_s: float = Field(default=300.0, gt=0, description="how long the pipeline may take to catch up")

    @property
    def stall(self) -> int:
        return self.stall_l0s or 3 * self.compaction_threshold

    def timeline_settings(self, base_bytes: int) -> TimelineSettings:
        return TimelineSettings(
            compaction_threshold=self.compaction_threshold,
            checkpoint_distance=self.l0_bytes,
            compaction_target_size=max(base_bytes // 4, self.l0_bytes),  # a few image partitions
            image_creation_threshold=self.image_creation_threshold,
            # gc-compaction once the history below the cutoff passes the starting timeline's size
            gc_compaction_initial_threshold_kb=max(base_bytes // 1024, 1),
        )


class _Pipeline:
    """What the demo watches: the timelines' layers and the coordinator's meta jobs."""

    def __init__(self, storage: Storage, records: JobRecords, console: Console) -> None:
        self.storage, self.records, self.console = storage, records, console
        self.timelines = {"main": TIMELINE}
        self.started = time.monotonic()
        self.most_l0 = 0

    def counts(self) -> dict[str, Snapshot]:
        out = {name: Snapshot.of(self.storage.manifest(TENANT, tl)) for name, tl in self.timelines.items()}
        self.most_l0 = max([self.most_l0, *(c.l0 for c in out.values())])
        return out

    def jobs(self) -> list[MetaJobRecord]:
        """Every meta job of the demo's tenant; raises CompactorError as soon as one did not
        succeed (the pipeline is meant to run clean)."""
        jobs = [meta for meta in self.records.list_meta(limit=10_000) if meta.tenant_id == TENANT]
        for meta in jobs:
            if meta.state.ended and meta.state != JobState.SUCCEEDED:
                kind = meta.request.kind if meta.request else "?"
                raise CompactorError(f"{kind} job {meta.id} ended {meta.state.value}: {meta.error}")
        return jobs

    def show(self, note: str = "") -> None:
        """One line on stderr: every timeline's layers and the jobs done and running."""
        counts, jobs = self.counts(), self.jobs()
        done = {kind: sum(1 for m in jobs if m.state.ended and _kind(m) == kind) for kind in KINDS}
        running = [f"{_kind(m)}@{self._name(m.timeline_id)}" for m in jobs if not m.state.ended]
        parts = [f"{time.monotonic() - self.started:5.1f}s"]
        parts += [f"{name}: {c}" for name, c in counts.items()]
        parts.append("jobs done: " + ", ".join(f"{kind} {n}" for kind, n in done.items()))
        parts.append("running: " + (", ".join(running) or "-"))
        line = "  ".join(parts) + (f"  {note}" if note else "")
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def _name(self, timeline_id: str) -> str:
        return next((name for name, tl in self.timelines.items() if tl == timeline_id), timeline_id[:8])

    def wait_for_l0s_below(self, stall: int, timeout_s: float) -> float:
        """A pageserver's L0 backpressure: hold the next flush while ``stall`` L0s wait on any
        timeline; returns the seconds held."""
        start = None
        while max(c.l0 for c in self.counts().values()) >= stall:
            if start is None:
                start = time.monotonic()
                self.show(f"flush held: {stall} L0s wait for L0 compaction")
            if time.monotonic() - start > timeout_s:
                raise CompactorError(f"L0 compaction did not catch up within {timeout_s:.0f}s: {stall} L0s wait")
            self.jobs()  # fails fast on a failed job
            time.sleep(0.2)
        return 0.0 if start is None else time.monotonic() - start

    def settled(self) -> bool:
        """Every meta job has ended and none is due on any timeline: the pipeline caught up."""
        if any(not meta.state.ended for meta in self.jobs()):
            return False
        for tl in self.timelines.values():
            if any(self.records.get_inflight(TENANT, tl, queue) is not None for queue in SUB_JOB_QUEUES):
                return False
            if decide(self.storage.manifest(TENANT, tl), kinds=KINDS).trigger:
                return False
        return True


def _kind(meta: MetaJobRecord) -> str:
    return meta.request.kind if meta.request else "?"


def _ingest_demo(
    stack: EmbeddedStack, size_bytes: int, options: IngestOptions, out_dir: Path, console: Console
) -> dict[str, Any]:
    storage = Storage(stack.settings)
    watch = _Pipeline(storage, JobRecords(connect(stack.settings)), console)
    spec = IngestSpec(keys=max(size_bytes // 8192, 16), l0_bytes=options.l0_bytes, pitr_l0s=options.pitr_l0s)
    settings = options.timeline_settings(size_bytes)
    main = Ingest.start(storage, TENANT, TIMELINE, spec, settings)
    base = storage.manifest(TENANT, TIMELINE)
    console.print(
        f"ingesting {options.l0s} L0s of {options.l0_bytes / 1e6:.1f} MB into a {size_bytes / 1e6:.0f} MB timeline, "
        f"one every {options.interval_s:g}s (a branch after a third of them, ingesting every other tick); the "
        f"coordinator runs {', '.join(KINDS)} on its own (compaction_threshold {settings.compaction_threshold}, "
        f"image_creation_threshold {settings.image_creation_threshold}, flushes held at {options.stall} L0s)",
        soft_wrap=True,
    )
    branch: Ingest | None = None
    held = 0.0
    for i in range(options.l0s):
        time.sleep(max(0.0, watch.started + held + i * options.interval_s - time.monotonic()))
        held += watch.wait_for_l0s_below(options.stall, options.settle_timeout_s)
        main.flush()
        if branch is not None and i % 2:
            branch.flush()
        if i == options.l0s // 3:
            branch = main.branch(CHILD)
            watch.timelines["branch"] = CHILD
        watch.show()
    deadline = time.monotonic() + options.settle_timeout_s
    while not watch.settled():
        if time.monotonic() > deadline:
            raise CompactorError(f"the pipeline did not catch up within {options.settle_timeout_s:.0f}s of the ingest")
        time.sleep(max(options.interval_s, 0.5))
        watch.show("ingest done, catching up")
    watch.show("caught up")
    assert branch is not None  # l0s >= 2

    after = storage.manifest(TENANT, TIMELINE)
    cutoff = after.gc.cutoff
    lsns = sorted({lsn for lsn in main.batch_lsns if lsn >= cutoff} | set(retained_lsns(after)))
    with console.status(f"verifying every read at {len(lsns)} LSNs, and {len(branch.batch_lsns)} of the branch"):
        keys_verified = verify_reads(storage, after, main.expected(lsns), "the timeline's")
        branch_manifest = storage.manifest(TENANT, CHILD)
        keys_verified += verify_reads(storage, branch_manifest, branch.expected(branch.batch_lsns), "the branch's")
    # "before": the layer map as the ingest left it, had nothing compacted it
    ingested = base.model_copy(update={"layers": {**base.layers, **{e.name: e for e in main.flushed}}, "gc": after.gc})
    axes = Axes.spanning(ingested, after)
    (out_dir / "before.svg").write_text(
        layer_map_svg(ingested, f"ingested: {len(main.flushed)} L0s, uncompacted", axes)
    )
    (out_dir / "after.svg").write_text(layer_map_svg(after, "after the pipeline (l0, image and gc jobs)", axes))

    jobs = watch.jobs()
    stats = [(m, m.compaction_statistics) for m in jobs if m.compaction_statistics is not None]
    summary = {
        "l0s_ingested": len(main.flushed) + len(branch.flushed),
        "ingested_bytes": sum(e.size for e in (*main.flushed, *branch.flushed)),
        "most_l0s": watch.most_l0,
        "stall_l0s": options.stall,
        "held_seconds": round(held, 1),
        "jobs": {kind: sum(1 for m in jobs if _kind(m) == kind) for kind in KINDS},
        "jobs_skipped": sum(1 for m in jobs if m.skipped),
        "l1_created": sum(s.delta_layer_produced.num for m, s in stats if _kind(m) == "l0"),
        "images_created": sum(s.image_layer_produced.num for _, s in stats),
        "main": asdict(Snapshot.of(after)),
        "branch": asdict(Snapshot.of(branch_manifest)),
        "gc_cutoff": cutoff,
        "verified_lsns": len(lsns) + len(branch.batch_lsns),
        "keys_verified": keys_verified,
        "wall_seconds": round(time.monotonic() - watch.started, 1),
    }  # fmt: skip
    console.print(_ingest_table(summary))
    console.print(f"layer maps: {out_dir / 'before.svg'}  {out_dir / 'after.svg'}", soft_wrap=True)
    return summary


def _ingest_table(s: dict[str, Any]) -> Table:
    table = Table(title="live pipeline summary", show_header=False)
    table.add_column("")
    table.add_column("", justify="right")
    table.add_row("L0s ingested", f"{s['l0s_ingested']} ({s['ingested_bytes'] / 1e6:.1f} MB)")
    table.add_row("most L0s at once", f"{s['most_l0s']} (flushes held at {s['stall_l0s']}, {s['held_seconds']} s)")
    table.add_row("jobs", ", ".join(f"{kind} {n}" for kind, n in s["jobs"].items()))
    table.add_row("layers made", f"{s['l1_created']} L1 deltas, {s['images_created']} image layers")
    for name in ("main", "branch"):
        c = s[name]
        table.add_row(
            f"{name} at the end", f"L0 {c['l0']}, L1 {c['l1']}, images {c['images']} ({c['bytes'] / 1e6:.1f} MB)"
        )
    table.add_row("verified", f"{s['keys_verified']} key reads at {s['verified_lsns']} LSNs")
    table.add_row("wall time", f"{s['wall_seconds']:.1f} s")
    return table
