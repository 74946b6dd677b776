"""One gc-compaction job, end to end, as the seed's ``compact_with_gc_inner``.

The functional core: a plan (``worker.plan``) and a ``LayerIO`` in, a ``CommitProposal`` and
statistics out. Versions stream from the selected layers through one k-merge, key by key, into
``generate_key_retention`` and on to the split writers; memory holds one key's history plus the
writers' buffers. Nothing here knows about Celery, Redis or manifests being committed.
"""

import heapq
import logging
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from storage.errors import CompactorError
from storage.keys import KeyRange, format_key
from storage.layer_file import LayerFileInfo, LayerWriter
from storage.layer_map import check_valid_layermap
from storage.layer_name import LayerName
from storage.manifest import LayerEntry, Manifest
from storage.read_path import live_filter
from storage.values import ValueKind, Version, image
from worker.jobs import CommitProposal
from worker.plan import JobPlan
from worker.retention import DELTA_THRESHOLD, generate_key_retention, place
from worker.split_writers import Discarded, Produced, SplitDeltaWriter, SplitImageWriter, WriterResult
from worker.statistics import CompactionStatistics, PhaseTimer

log = logging.getLogger(__name__)

MAX_KEY_HISTORY_BYTES = 512 * 1024 * 1024
MAX_ESTIMATED_MEMORY_MB = 1024.0


class CompactionFailed(CompactorError):
    """The job cannot complete; nothing it did is visible."""


class LayerIO(Protocol):
    """What the engine needs from storage."""

    def needs_download(self, entry: LayerEntry) -> bool: ...

    def fetch(self, entry: LayerEntry) -> None:
        """Make the layer readable locally (download and verify it)."""
        ...

    def versions(self, entry: LayerEntry, key_range: KeyRange) -> Iterator[Version]: ...

    def read_below(
        self, manifest: Manifest, key_range: KeyRange, lsn: int, exclude: set[str]
    ) -> Iterator[tuple[bytes, bytes]]:
        """``(key, value)`` at ``lsn`` of every key in the range, read without ``exclude``; keys
        that cannot be read there (no base image, failed redo) are left out, and the engine then
        treats them as having nothing below (the seed fails the whole job instead)."""
        ...

    def upload(self, manifest: Manifest, name: LayerName, file: LayerFileInfo) -> LayerEntry: ...

    def delete_uploads(self, entries: list[LayerEntry]) -> None: ...


@dataclass
class Progress:
    keys: int = 0
    versions_in: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass
class Hooks:
    """Called from the main loop: report progress (and heartbeat), stop when cancelled."""

    on_progress: Callable[[Progress], None] = lambda progress: None
    check_cancelled: Callable[[], None] = lambda: None
    every_versions: int = 20_000


@dataclass
class EngineSettings:
    target_layer_bytes: int = 128 * 1024 * 1024
    workdir: Path = Path("/tmp/compactor-work")
    delta_threshold: int = DELTA_THRESHOLD


@dataclass
class Result:
    proposal: CommitProposal
    stats: CompactionStatistics
    produced: list[LayerEntry] = field(default_factory=list)


def check_guards(plan: JobPlan, io: LayerIO, settings: EngineSettings) -> None:
    """The seed's pre-flight checks: disk space, memory estimate, too many rewrites."""
    settings.workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(settings.workdir).free
    to_download = sum(e.size for e in plan.selected if io.needs_download(e))
    needed = plan.selected_bytes + to_download
    # Outputs are at most as large as the inputs; keep a fifth of the disk for everything else.
    if needed > free * 0.8:
        raise CompactionFailed(
            f"not enough disk for compaction: free={free} bytes, need about {needed} "
            f"(selection {plan.selected_bytes}, to download {to_download})"
        )
    estimate_mb = 0.0
    for entry in plan.selected:
        # The seed's estimate per 256 MiB of layer: 3 MB of buffers for deltas, 5 for images.
        estimate_mb += (3.0 if entry.layer.is_delta else 5.0) * (entry.size // (256 * 1024 * 1024))
    if estimate_mb > MAX_ESTIMATED_MEMORY_MB:
        raise CompactionFailed(f"estimated memory usage is too high: {estimate_mb} MB for {len(plan.selected)} layers")
    if _too_many_rewrites(len(plan.selected), len(plan.rewrite)):
        raise CompactionFailed(f"too many layers to rewrite: {len(plan.rewrite)} / {len(plan.selected)}")


def _too_many_rewrites(selected: int, rewrite: int) -> bool:
    return selected > 100 and rewrite >= selected * 0.7


def run(plan: JobPlan, io: LayerIO, settings: EngineSettings, hooks: Hooks | None = None) -> Result:
    """Compact, upload the outputs, and return what a commit would change. On any failure,
    every object this call uploaded is deleted again before the error propagates."""
    hooks = hooks or Hooks()
    stats = CompactionStatistics()
    job = plan.job
    manifest = plan.manifest
    verification = manifest.settings.gc_compaction_verification
    with PhaseTimer(stats, "time_total_secs") as total:
        check_guards(plan, io, settings)
        for entry in plan.selected:
            (stats.visit_delta_layer if entry.layer.is_delta else stats.visit_image_layer)(entry.size)
        total.mark("time_analyze_secs")

        with PhaseTimer(stats, "time_download_layer_secs"):
            for entry in plan.selected:
                hooks.check_cancelled()
                io.fetch(entry)
        hooks.on_progress(Progress())

        workdir = settings.workdir
        workdir.mkdir(parents=True, exist_ok=True)
        images = (
            None
            if plan.has_data_below
            else SplitImageWriter(workdir, plan.key_range.start, plan.lowest_retain_lsn, settings.target_layer_bytes)
        )
        deltas = SplitDeltaWriter(workdir, plan.delta_lsn_range, settings.target_layer_bytes)
        try:
            with PhaseTimer(stats, "time_main_loop_secs") as main_loop:
                keys = _main_loop(plan, io, settings, hooks, stats, images, deltas, verification, main_loop)
            if not keys:
                # The seed fails here ("no keys produced"); a range with no live keys simply has
                # nothing to compact, and rewriting around it would only churn layers.
                log.info("gc-compaction found no live keys tenant=%s timeline=%s keys=%s",
                         job.tenant_id, job.timeline_id, plan.key_range)  # fmt: skip
                if images:
                    images.abort()
                deltas.abort()
                stats.finalize()
                return Result(CommitProposal(job=job, read_set=plan.read_set()), stats, [])
            with PhaseTimer(stats, "time_final_phase_secs"):
                rewritten = _rewrite_straddling(plan, io, settings)
                existing = set(manifest.layers)

                def discard(name: LayerName) -> bool:
                    if job.dry_run:
                        return True
                    if name.is_l0:
                        raise CompactionFailed(f"output {name} would be an L0 layer; gc-compaction never writes L0")
                    return str(name) in existing

                results = (images.finish(plan.key_range.end, discard) if images else []) + deltas.finish(discard)
        except BaseException:
            if images:
                images.abort()
            deltas.abort()
            raise
        proposal, produced = _propose(plan, io, stats, results, rewritten)
    stats.finalize()
    log.info(
        "gc-compaction done tenant=%s timeline=%s keys=%s selected=%d removed=%d added=%d kept=%d dry_run=%s",
        job.tenant_id, job.timeline_id, plan.key_range, len(plan.selected),
        len(proposal.removed), len(proposal.added), len(proposal.kept), job.dry_run,
    )  # fmt: skip
    return Result(proposal, stats, produced)


def _merged(plan: JobPlan, io: LayerIO) -> Iterator[Version]:
    streams = [io.versions(entry, plan.key_range) for entry in plan.selected]
    merged = streams[0] if len(streams) == 1 else heapq.merge(*streams)
    return live_filter(merged, plan.manifest.live_ranges())


def _base_images(plan: JobPlan, io: LayerIO) -> Iterator[tuple[bytes, bytes]]:
    """Values at the lowest retain LSN from below the job (ancestor, or layers under its LSN
    range), read in bulk as one stream aligned with the keys of the main loop."""
    if not plan.has_data_below:
        return iter(())
    exclude = {entry.name for entry in plan.selected}
    return io.read_below(plan.manifest, plan.key_range, plan.lowest_retain_lsn, exclude)


def _main_loop(
    plan: JobPlan,
    io: LayerIO,
    settings: EngineSettings,
    hooks: Hooks,
    stats: CompactionStatistics,
    images: SplitImageWriter | None,
    deltas: SplitDeltaWriter,
    verification: bool,
    timer: PhaseTimer,
) -> int:
    """Feed every key's history through retention into the writers; returns the keys seen."""
    horizon, retain, lowest = plan.horizon, plan.retain_lsns, plan.lowest_retain_lsn
    delta_floor = plan.delta_lsn_range[0]
    base_stream = _base_images(plan, io)
    next_base: tuple[bytes, bytes] | None = next(base_stream, None)
    dry_run = plan.job.dry_run
    progress = Progress()
    threshold = settings.delta_threshold
    image_kind = int(ValueKind.IMAGE)

    history: list[Version] = []
    history_bytes = 0

    def flush_key() -> None:
        nonlocal next_base
        key = history[0].key
        stats.on_unique_key_visited()
        base: Version | None = None
        while next_base is not None and next_base[0] < key:
            next_base = next(base_stream, None)
        if next_base is not None and next_base[0] == key:
            base = image(key, lowest, next_base[1])
        retention = generate_key_retention(key, history, horizon, retain, threshold, base, verification)
        first_image, rest = place(key, retention, has_image_layer=images is not None)
        if first_image is not None:
            stats.produce_image_key(first_image.payload)
            if not dry_run and images is not None:
                images.put(key, first_image.payload)
        for version in rest:
            if version.lsn < delta_floor:
                raise CompactionFailed(
                    f"key {format_key(key)} has no base image at or below LSN {version.lsn} "
                    f"(incomplete history below the lowest retain LSN {delta_floor}); cannot compact it"
                )
            stats.produce_key(version)
            if not dry_run:
                deltas.put(version)

    for version in _merged(plan, io):
        if not progress.versions_in:
            timer.mark("time_to_first_kv_pair_secs")
        progress.versions_in += 1
        size = len(version.payload)
        progress.bytes_in += size
        if version.kind == image_kind:
            stats.visit_image_key(version)
        else:
            stats.visit_wal_key(version)
        if history and version.key != history[0].key:
            flush_key()
            progress.keys += 1
            history.clear()
            history_bytes = 0
        history.append(version)
        history_bytes += size
        if history_bytes >= MAX_KEY_HISTORY_BYTES:
            raise CompactionFailed(
                f"too many values for a single key: {history_bytes} bytes for key {format_key(version.key)}, "
                f"{len(history)} versions"
            )
        if progress.versions_in % hooks.every_versions == 0:
            hooks.check_cancelled()
            hooks.on_progress(progress)
    if history:
        flush_key()
        progress.keys += 1
    hooks.on_progress(progress)
    return progress.keys


def _rewrite_straddling(plan: JobPlan, io: LayerIO, settings: EngineSettings) -> list[Produced]:
    """Cut selected deltas that reach outside the job's key range into the pieces before and
    after it, keeping the original LSN range (the seed's ``delta_layer_rewriters``): the piece
    before covers ``[layer start, job start)``, the piece after ``[job end, layer end)``."""
    if plan.job.dry_run:
        return []
    out: list[Produced] = []
    live = plan.manifest.live_ranges()
    start, end = plan.key_range
    for number, entry in enumerate(plan.rewrite):
        layer = entry.layer
        for side, (lo, hi) in enumerate(((layer.key_range.start, start), (end, layer.key_range.end))):
            if lo >= hi:
                continue
            name = LayerName.delta(lo, hi, layer.lsn_start, layer.lsn_end)
            with LayerWriter(settings.workdir / f"rewrite-{number}-{side}.parquet") as writer:
                for version in live_filter(io.versions(entry, KeyRange(lo, hi)), live):
                    writer.add(*version)
                if not writer.num_rows:
                    writer.abort()
                    continue
                out.append(Produced(name, writer.finish(name)))
    return out


def _propose(
    plan: JobPlan,
    io: LayerIO,
    stats: CompactionStatistics,
    results: list[WriterResult],
    rewritten: list[Produced],
) -> tuple[CommitProposal, list[LayerEntry]]:
    selected_sizes = {entry.name: entry.size for entry in plan.selected}
    keep: set[str] = set()
    produced: list[Produced] = []
    for result in results:
        name = str(result.name)
        if isinstance(result, Discarded):
            size = selected_sizes.get(name, 0)
            (stats.discard_delta_layer if result.name.is_delta else stats.discard_image_layer)(size)
            keep.add(name)
        else:
            (stats.produce_delta_layer if result.name.is_delta else stats.produce_image_layer)(result.file.size)
            produced.append(result)
    for piece in rewritten:
        stats.produce_delta_layer(piece.file.size)
    produced.extend(rewritten)
    # Image layers reaching outside the key range hold keys this job never processed: keep them.
    for entry in plan.selected:
        if not entry.layer.is_delta and not plan.key_range.covers(entry.layer.key_range):
            keep.add(entry.name)
    removed = [entry.name for entry in plan.selected if entry.name not in keep]
    kept = sorted(keep & set(selected_sizes))

    if plan.job.dry_run:
        return CommitProposal(job=plan.job, read_set=plan.read_set(), removed=removed, added=[], kept=kept), []

    final = set(plan.manifest.layers) - set(removed) | {str(p.name) for p in produced}
    problem = check_valid_layermap(LayerName.parse(n) for n in final)
    if problem:
        for piece in produced:
            piece.file.path.unlink(missing_ok=True)
        raise CompactionFailed(f"layer map check failed after compaction ({problem}); result not applied")

    uploaded: list[LayerEntry] = []
    try:
        for piece in produced:
            uploaded.append(io.upload(plan.manifest, piece.name, piece.file))
            piece.file.path.unlink(missing_ok=True)
    except BaseException:
        io.delete_uploads(uploaded)
        for piece in produced:
            piece.file.path.unlink(missing_ok=True)
        raise
    proposal = CommitProposal(job=plan.job, read_set=plan.read_set(), removed=removed, added=uploaded, kept=kept)
    return proposal, uploaded
