"""L0 compaction (``kind="l0"``), as the seed's ``compact_level0_phase1``.

Planning (pure, on one manifest): below ``compaction_threshold`` L0 deltas nothing is done unless
forced; the run is the contiguous sequence of L0s from the oldest (a gap in LSNs ends it), bounded
by ``max(compaction_upper_limit, compaction_threshold) * max(checkpoint_distance, 256 MiB)`` bytes
(the first layer not counted, as in the seed); what the bound leaves over makes the outcome
``pending``.

Running (one sub-job, one slice of keys): the run's rows of the slice's keys go through the Arrow
k-merge and are cut into L1 deltas over the run's LSN range, between keys, at about
``checkpoint_distance`` raw bytes (key, LSN, kind and value of each row). Each L1 covers
``[its first key, its last key + 1)``. A key whose history is too large for one layer (the seed:
its versions, coalesced into groups of about the target, make more than one group) gets
single-key layers cut on the LSN dimension: the first from the key's first LSN, the last up to
the run's end. The seed's holes (the widest key gaps by image coverage) force a cut. Every
version is kept, so reads at every LSN are unchanged. Each sub-job removes the whole run in its
part of the proposal; the one commit removes it once.

Where several sub-jobs share a run, each picks holes among its own slice's keys (as many as the
run has layers); with one sub-job (the usual case: a run is at most a few GiB) that is the seed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from compactor.storage.keys import FULL_KEY_RANGE, KEY_SIZE, KeyRange, key_next, key_to_int
from compactor.storage.layer_file import LayerWriter
from compactor.storage.layer_name import LayerName
from compactor.storage.manifest import LayerEntry, Manifest
from compactor.worker.engine.coverage import image_coverage
from compactor.worker.engine.jobs import CommitProposal, CompactionJob, ReadSet
from compactor.worker.engine.merge import KEY_DTYPE, key_array, key_at, key_starts, merged_chunks
from compactor.worker.engine.plan import PlanningError, keeping_read_set
from compactor.worker.engine.run import (
    MAX_KEY_HISTORY_BYTES,
    CompactionFailed,
    EngineSettings,
    Hooks,
    LayerIO,
    Progress,
    Result,
    _chain_streams,
    _Downloads,
    _too_much_history,
    _Uploads,
)
from compactor.worker.engine.split_writers import Produced, raw_sizes
from compactor.worker.engine.statistics import CompactionStatistics, PhaseTimer

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINT_DISTANCE = 256 * 1024**2  # the floor of the seed's byte bound
PAGE_SIZE = 8192  # the seed's minimum hole is checkpoint_distance / PAGE_SZ keys wide
MIN_HOLE_COVERAGE = 3  # image-coverage pieces a hole must span to count


@dataclass(frozen=True)
class L0Plan:
    """An L0 compaction planned on one manifest (the same for every sub-job)."""

    job: CompactionJob
    manifest: Manifest
    selected: list[LayerEntry]  # the run, oldest first
    pending: bool  # the byte bound left L0s of the contiguous run for a later job
    target_bytes: int  # checkpoint_distance: the size of an L1
    l0_count: int
    slice: KeyRange | None = None

    key_range = FULL_KEY_RANGE
    l2_lsn = None

    @property
    def keys(self) -> KeyRange:
        """The keys this run compacts, ``[start, end)``: its slice, or every key."""
        return self.slice or self.key_range

    @property
    def lsn_range(self) -> tuple[int, int]:
        """The run's LSNs ``[start, end)``: the LSN range of the L1s."""
        return self.selected[0].layer.lsn_start, self.selected[-1].layer.lsn_end

    def restrict(self, keys: KeyRange) -> L0Plan:
        if keys.start >= keys.end:
            raise PlanningError(f"sub-job keys {keys} are empty")
        return replace(self, slice=keys)

    def read_set(self) -> ReadSet:
        return keeping_read_set(
            self.manifest, self.key_range, [entry.name for entry in self.selected], self.lsn_range[1]
        )


def size_limit(manifest: Manifest) -> int:
    """The seed's bound on the bytes of one run."""
    s = manifest.settings
    return max(s.compaction_upper_limit, s.compaction_threshold) * max(
        s.checkpoint_distance, DEFAULT_CHECKPOINT_DISTANCE
    )


def l0_deltas(manifest: Manifest) -> list[LayerEntry]:
    """The L0 deltas, oldest first."""
    return sorted((e for e in manifest.layers.values() if e.layer.is_l0), key=lambda e: e.layer.lsn_range)


def plan_l0(manifest: Manifest, job: CompactionJob) -> L0Plan | str:
    """The run to compact, or a one-line reason why nothing is done."""
    l0s = l0_deltas(manifest)
    threshold = manifest.settings.compaction_threshold
    if not l0s:
        return "no L0 deltas: nothing to compact"
    if len(l0s) < threshold and not job.force:
        return f"{len(l0s)} L0 deltas, below compaction_threshold {threshold}"
    limit = size_limit(manifest)
    run = [l0s[0]]
    run_bytes = 0
    pending = False
    for entry in l0s[1:]:
        if entry.layer.lsn_start != run[-1].layer.lsn_end:
            break
        run.append(entry)
        run_bytes += entry.size
        if run_bytes >= limit:
            pending = True
            break
    return L0Plan(
        job=job,
        manifest=manifest,
        selected=run,
        pending=pending,
        target_bytes=manifest.settings.checkpoint_distance,
        l0_count=len(l0s),
    )


def run_l0(plan: L0Plan, io: LayerIO, settings: EngineSettings, hooks: Hooks | None = None) -> Result:
    """Write the L1s of ``plan.keys`` and upload them; this sub-job's part of the proposal
    removes the whole run. On failure every upload of this call is deleted again."""
    hooks = hooks or Hooks()
    stats = CompactionStatistics()
    job, manifest = plan.job, plan.manifest
    with PhaseTimer(stats, "time_total_secs") as total:
        for entry in plan.selected:
            stats.visit_delta_layer(entry.size)
        total.mark("time_analyze_secs")
        settings.workdir.mkdir(parents=True, exist_ok=True)
        downloads = _Downloads(io, plan.selected, plan.keys, hooks)
        uploads = _Uploads(io, manifest)
        writer = L1Writer(settings.workdir, plan.lsn_range, plan.target_bytes, [], uploads.submit)
        try:
            try:
                writer.holes = _holes(plan, downloads)
                with PhaseTimer(stats, "time_main_loop_secs"):
                    _merge_into(plan, hooks, stats, writer, downloads, settings.chunk_bytes)
            finally:
                downloads.close()
                stats.time_download_layer_secs += downloads.waited
            with PhaseTimer(stats, "time_final_phase_secs"):
                produced = writer.finish()
                for piece in produced:
                    stats.produce_delta_layer(piece.file.size)
                added = uploads.entries(produced)
        except BaseException:
            writer.abort()
            uploads.abort()
            raise
    stats.finalize()
    proposal = CommitProposal(
        job=job, read_set=plan.read_set(), removed=[entry.name for entry in plan.selected], added=added
    )
    log.info(
        "L0 compaction done tenant=%s timeline=%s keys=%s run=%d lsns=%s l1s=%d pending=%s",
        job.tenant_id, job.timeline_id, plan.keys, len(plan.selected), plan.lsn_range, len(added), plan.pending,
    )  # fmt: skip
    return Result(proposal, stats, added)


def _streams(plan: L0Plan, downloads: _Downloads) -> list[Iterator[pa.RecordBatch]]:
    # Every L0 covers every key, so each one is a chain of its own.
    return _chain_streams([[entry] for entry in plan.selected], downloads)


def _merge_into(
    plan: L0Plan,
    hooks: Hooks,
    stats: CompactionStatistics,
    writer: L1Writer,
    downloads: _Downloads,
    chunk_bytes: int,
) -> None:
    progress = Progress()
    for table in merged_chunks(_streams(plan, downloads), MAX_KEY_HISTORY_BYTES, _too_much_history, chunk_bytes):
        writer.put_table(table)
        value_bytes = pc.sum(pc.binary_length(table.column("value"))).as_py() or 0
        stats.wal_keys_visited.num += table.num_rows
        stats.wal_keys_visited.size += value_bytes + KEY_SIZE * table.num_rows
        progress.keys += len(key_starts(key_array(table.column("key")))) - 1
        progress.versions_in += table.num_rows
        progress.bytes_in += value_bytes
        # After every merged chunk (32 MiB at most), as the gc engine does.
        hooks.check_cancelled()
        hooks.on_progress(progress)
    stats.num_unique_keys_visited += progress.keys


def _holes(plan: L0Plan, downloads: _Downloads) -> list[KeyRange]:
    """The seed's holes among the slice's keys, by key start: gaps between neighbouring keys at
    least ``target / 8192`` keys wide that span ``MIN_HOLE_COVERAGE`` or more image-coverage
    pieces at the top of the layer map; the widest by coverage, at most one per layer of the run
    (ties: the lower keys)."""
    top = plan.manifest.top_lsn
    images = [name for name in plan.manifest.layer_names() if not name.is_delta]
    if len(image_coverage(images, plan.keys, top)) < MIN_HOLE_COVERAGE:
        return []  # no gap inside the slice can span enough pieces: skip reading the keys
    keys = np.unique(
        np.concatenate(
            [key_array(batch.column(0)) for stream in _streams(plan, downloads) for batch in stream]
            or [np.empty(0, dtype=KEY_DTYPE)]
        )
    )
    min_width = plan.target_bytes // PAGE_SIZE
    found: list[tuple[int, KeyRange]] = []
    previous: int | None = None
    for i in range(len(keys)):
        key = key_at(keys, i)
        value = key_to_int(key)
        if previous is not None and value - previous >= min_width:
            hole = KeyRange(key_next(key_at(keys, i - 1)), key)
            coverage = len(image_coverage(images, hole, top))
            if coverage >= MIN_HOLE_COVERAGE:
                found.append((coverage, hole))
        previous = value + 1
    widest = sorted(found, key=lambda item: (-item[0], item[1]))[: len(plan.selected)]
    return sorted(hole for _, hole in widest)


@dataclass
class _Piece:
    writer: LayerWriter
    first: bytes
    last: bytes
    written: int  # raw bytes


class L1Writer:
    """Cuts the k-merge's tables of whole keys into L1 deltas as the seed does (module doc);
    each piece goes to ``submit`` as soon as it is cut (the engine uploads it meanwhile)."""

    def __init__(
        self,
        workdir: Path,
        lsn_range: tuple[int, int],
        target_bytes: int,
        holes: list[KeyRange],
        submit: Callable[[Produced], None],
    ) -> None:
        self.workdir = workdir
        self.lsn_range = lsn_range
        self.target = target_bytes
        self.holes = holes
        self._submit = submit
        self._piece: _Piece | None = None
        self._produced: list[Produced] = []
        self._count = 0

    def _new_writer(self) -> LayerWriter:
        self._count += 1
        return LayerWriter(self.workdir / f"l1-{id(self):x}-{self._count}.parquet")

    def _cut(self) -> None:
        piece, self._piece = self._piece, None
        if piece is not None:
            self._emit(LayerName.delta(piece.first, key_next(piece.last), *self.lsn_range), piece.writer)

    def _emit(self, name: LayerName, writer: LayerWriter) -> None:
        if name.is_l0:
            writer.abort()
            raise CompactionFailed(f"output {name} would be an L0 layer; L0 compaction writes L1s only")
        produced = Produced(name, writer.finish(name))
        self._produced.append(produced)
        self._submit(produced)

    def put_table(self, table: pa.Table) -> None:
        """Every row of ``table`` (layer schema, sorted by key and LSN, whole keys)."""
        if not table.num_rows:
            return
        keys = key_array(table.column("key"))
        starts = key_starts(keys)
        firsts = keys[starts[:-1]]
        before = raw_sizes(table)
        sizes = np.diff(before)
        key_sizes = before[starts[1:]] - before[starts[:-1]]
        # The seed coalesces a key's versions into groups that grow until they reach the target:
        # a second group exists when the versions before the last one reach it already.
        split = (key_sizes - sizes[starts[1:] - 1]) >= self.target
        # Holes lie between neighbouring keys, so each ends at a key of the slice.
        hole_end = np.isin(firsts, np.array([hole.end for hole in self.holes], dtype=KEY_DTYPE))
        forced = np.flatnonzero(split | hole_end).tolist()
        for a, b in pairwise([0, *forced, len(firsts)]):
            if a == b:
                continue
            if self._piece is not None and (split[a] or hole_end[a]):
                self._cut()
            if split[a] and self._split_key(table, keys, before, int(starts[a]), int(starts[a + 1])):
                a += 1
            self._fill(table, keys, starts, key_sizes, a, b)

    def _fill(
        self, table: pa.Table, keys: np.ndarray, starts: np.ndarray, key_sizes: np.ndarray, a: int, b: int
    ) -> None:
        """Add keys ``[a, b)`` in order, cutting the current piece before a key that would take
        it past the target (a new piece takes its first key whatever its size)."""
        cumulative = np.concatenate(([0], np.cumsum(key_sizes[a:b])))
        j, n = 0, b - a
        while j < n:
            if self._piece is None:
                self._piece = _Piece(self._new_writer(), key_at(keys, int(starts[a + j])), b"", 0)
                take = 1
            else:
                room = self.target - self._piece.written
                take = int(np.searchsorted(cumulative, cumulative[j] + room, side="right")) - 1 - j
                if take <= 0:
                    self._cut()
                    continue
            take = min(take, n - j)
            lo, hi = int(starts[a + j]), int(starts[a + j + take])
            for batch in table.slice(lo, hi - lo).to_batches():
                self._piece.writer.add_batch(batch)
            self._piece.written += int(cumulative[j + take] - cumulative[j])
            self._piece.last = key_at(keys, int(starts[a + j + take - 1]))
            j += take

    def _split_key(self, table: pa.Table, keys: np.ndarray, before: np.ndarray, lo: int, hi: int) -> bool:
        """Write one key's rows ``[lo, hi)`` as single-key layers cut on the LSN dimension at the
        first LSN of each group; False when every group starts at the key's first LSN (then it
        is written like any other key)."""
        lsns = table.column("lsn").to_numpy()[lo:hi]
        group_starts = []
        pos = lo
        while pos < hi:
            group_starts.append(pos)
            # A group grows until it reaches the target (the seed's coalesce).
            pos = min(int(np.searchsorted(before, before[pos] + self.target, side="left")), hi)
        bounds = sorted({int(lsns[g - lo]) for g in group_starts[1:]} - {int(lsns[0])})
        if not bounds:
            return False
        key = key_at(keys, lo)
        lsn_edges = [int(lsns[0]), *bounds, self.lsn_range[1]]
        row_edges = [lo, *(np.searchsorted(lsns, bounds, side="left") + lo).tolist(), hi]
        for (first_row, end_row), (start, end) in zip(pairwise(row_edges), pairwise(lsn_edges), strict=True):
            writer = self._new_writer()
            for batch in table.slice(first_row, end_row - first_row).to_batches():
                writer.add_batch(batch)
            self._emit(LayerName.delta(key, key_next(key), start, end), writer)
        return True

    def finish(self) -> list[Produced]:
        self._cut()
        produced, self._produced = self._produced, []
        return produced

    def abort(self) -> None:
        if self._piece is not None:
            self._piece.writer.abort()
            self._piece = None
        for piece in self._produced:
            piece.file.remove_file()
