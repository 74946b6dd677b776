"""One gc-compaction sub-job, end to end, as the seed's ``compact_with_gc_inner``.

The functional core: a plan (``compactor.worker.engine.plan``, restricted to the sub-job's slice of keys) and a
``LayerIO`` in, the sub-job's part of the ``CommitProposal`` and statistics out. Nothing is
committed here: the meta job combines the parts of all its sub-jobs into one commit
(``compactor.worker.engine.commit``). Versions stream from the selected layers through one k-merge, key by key, into
``generate_key_retention`` and on to the split writers; memory holds one key's history plus the
writers' buffers. Nothing here knows about Celery, Redis or manifests being committed.

Transfers overlap the compute: the selected layers download on a background thread row group by
row group, in the order the merge needs them (the main loop waits only for a row group it is
about to read, not for whole layers; that wait is ``time_download_layer_secs``), and each
output layer streams to its upload while it is written. The k-merge moves whole keys between
chains of key-disjoint layers (``compactor.worker.engine.merge``), so it is as wide as the
number of LSN bands and one layer per chain is open at a time.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from itertools import groupby, pairwise
from operator import itemgetter
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa

from compactor.storage.errors import CompactorError, RedoError
from compactor.storage.keys import KEY_MAX, KeyRange, format_key, key_next
from compactor.storage.layer_file import (
    LayerFileInfo,
    LayerSink,
    LayerWriter,
    batch_to_versions,
    one_array,
    payload_bytes,
    payload_lengths,
)
from compactor.storage.layer_name import LayerName
from compactor.storage.manifest import LayerEntry, Manifest
from compactor.storage.read_path import live_filter
from compactor.storage.values import ValueKind, Version, image
from compactor.worker.engine.batch_retention import retain_chunk, simple_keys
from compactor.worker.engine.jobs import CommitProposal
from compactor.worker.engine.merge import (
    CHUNK_BYTES,
    KEY_DTYPE,
    chain_batch_bytes,
    chains,
    key_array,
    key_starts,
    merged_chunks,
)
from compactor.worker.engine.plan import JobPlan
from compactor.worker.engine.retention import DELTA_THRESHOLD, generate_key_retention, place
from compactor.worker.engine.split_writers import (
    Discarded,
    Produced,
    SplitDeltaWriter,
    SplitImageWriter,
    WriterResult,
    drop_piece,
)
from compactor.worker.engine.statistics import CompactionStatistics, KeyValueCounters, PhaseTimer

log = logging.getLogger(__name__)

MAX_KEY_HISTORY_BYTES = 512 * 1024 * 1024
MAX_ESTIMATED_MEMORY_MB = 1024.0


class CompactionFailed(CompactorError):
    """The job cannot complete; nothing it did is visible."""


class Download(Protocol):
    """An input layer on its way here (``compactor.storage.layer_cache.LayerDownload``)."""

    @property
    def next_key(self) -> bytes | None:
        """The first key of the next row group to fetch; None when nothing is left."""
        ...

    def fetch_next(self, max_bytes: int) -> bool:
        """Fetch the next row groups (about ``max_bytes``); False once nothing is left."""
        ...

    def wait_for(self, group: int, timeout: float) -> bool:
        """Whether row group ``group`` has landed, waiting up to ``timeout`` seconds."""
        ...

    def abandon(self, error: BaseException | None = None) -> None: ...

    def batches(self, key_range: KeyRange, wait: Callable[[int], None], batch_bytes: int) -> Iterator[pa.RecordBatch]:
        """The layer's rows with keys in ``key_range`` as layer-schema batches of about
        ``batch_bytes``, in order, each row group read once ``wait(group)`` returned."""
        ...


class LayerIO(Protocol):
    """What the engine needs from storage."""

    def needs_download(self, entry: LayerEntry) -> bool: ...

    def download(self, entry: LayerEntry, key_range: KeyRange) -> Download:
        """Start bringing the layer's rows of ``key_range`` here; its row groups are fetched as
        ``Download.fetch_next`` is called."""
        ...

    def versions(self, entry: LayerEntry, key_range: KeyRange) -> Iterator[Version]: ...

    def read_below(
        self, manifest: Manifest, key_range: KeyRange, lsn: int, exclude: set[str]
    ) -> Iterator[tuple[bytes, bytes]]:
        """``(key, value)`` at ``lsn`` of every key in the range, read without ``exclude``; keys
        that cannot be read there (no base image, failed redo) are left out, and the engine then
        treats them as having nothing below (the seed fails the whole job instead)."""
        ...

    def read(self, manifest: Manifest, lsn: int, key_range: KeyRange) -> Iterator[tuple[bytes, bytes]]:
        """``(key, value)`` at ``lsn`` of every live key in the range that exists there (through
        the ancestor on a branch); raises ``RedoError`` for a key that cannot be read."""
        ...

    def open_upload(self, manifest: Manifest) -> LayerSink:
        """An upload of a layer of ``manifest``'s timeline that a ``LayerWriter`` streams its file
        to while writing it, under an object key that does not depend on the layer's name."""
        ...

    def upload(self, manifest: Manifest, name: LayerName, file: LayerFileInfo) -> LayerEntry:
        """Complete the upload of a finished layer file: the one it was streamed to
        (``file.sink``), or the whole file."""
        ...

    def delete_uploads(self, entries: list[LayerEntry]) -> None: ...


@dataclass
class Progress:
    keys: int = 0
    versions_in: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass
class Hooks:
    """Called from the main loop after every merged chunk (whole keys, 32 MiB of batches already
    decoded at most), so that progress is never staler than one chunk: report
    progress, stop when cancelled. Both must be cheap; throttling is the caller's."""

    on_progress: Callable[[Progress], None] = lambda progress: None
    check_cancelled: Callable[[], None] = lambda: None


@dataclass
class EngineSettings:
    target_layer_bytes: int = 128 * 1024 * 1024
    workdir: Path = Path("/tmp/compactor-work")
    delta_threshold: int = DELTA_THRESHOLD
    chunk_bytes: int = CHUNK_BYTES
    """What the merge buffers before it cuts a chunk (``compactor.worker.engine.merge``)."""


@dataclass
class Result:
    proposal: CommitProposal
    stats: CompactionStatistics
    produced: list[LayerEntry] = field(default_factory=list)


def check_guards(plan: JobPlan, io: LayerIO, settings: EngineSettings) -> None:
    """The seed's pre-flight checks: disk space, memory estimate, too many rewrites."""
    settings.workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(settings.workdir).free
    inputs = plan.inputs
    to_download = sum(e.size for e in inputs if io.needs_download(e))
    input_bytes = sum(e.size for e in inputs)
    needed = input_bytes + to_download
    # Outputs are at most as large as the inputs; keep a fifth of the disk for everything else.
    if needed > free * 0.8:
        raise CompactionFailed(
            f"not enough disk for compaction: free={free} bytes, need about {needed} "
            f"(inputs {input_bytes}, to download {to_download})"
        )
    estimate_mb = 0.0
    for entry in inputs:
        # The seed's estimate per 256 MiB of layer: 3 MB of buffers for deltas, 5 for images.
        estimate_mb += (3.0 if entry.layer.is_delta else 5.0) * (entry.size // (256 * 1024 * 1024))
    if estimate_mb > MAX_ESTIMATED_MEMORY_MB:
        raise CompactionFailed(f"estimated memory usage is too high: {estimate_mb} MB for {len(inputs)} layers")
    if _too_many_rewrites(len(plan.selected), len(plan.rewrite)):
        raise CompactionFailed(f"too many layers to rewrite: {len(plan.rewrite)} / {len(plan.selected)}")


def _too_many_rewrites(selected: int, rewrite: int) -> bool:
    return selected > 100 and rewrite >= selected * 0.7


def run(plan: JobPlan, io: LayerIO, settings: EngineSettings, hooks: Hooks | None = None) -> Result:
    """Compact the keys of ``plan.keys``, upload the outputs, and return this sub-job's part of
    what the meta job's commit will change. On any failure, every object this call uploaded is
    deleted again before the error propagates."""
    hooks = hooks or Hooks()
    stats = CompactionStatistics()
    job = plan.job
    manifest = plan.manifest
    verification = manifest.settings.gc_compaction_verification
    with PhaseTimer(stats, "time_total_secs") as total:
        check_guards(plan, io, settings)
        for entry in plan.inputs:
            (stats.visit_delta_layer if entry.layer.is_delta else stats.visit_image_layer)(entry.size)
        total.mark("time_analyze_secs")

        # Layers download in the background while the main loop reads those already here, and
        # each output layer uploads as soon as it is cut: transfers overlap the compute.
        downloads = _Downloads(io, plan.inputs, plan.keys, hooks)
        uploads = _Uploads(io, manifest, writers=2)

        def discard(name: LayerName, file: LayerFileInfo | None = None) -> bool:
            if job.dry_run:
                return True
            if name.is_l0:
                raise CompactionFailed(f"output {name} would be an L0 layer; gc-compaction never writes L0")
            # The seed drops any output named like an existing layer, assuming gc-compaction only
            # ever removes data from it. An output can also hold more (keys of an image layer
            # this job removes, say): it is dropped only when every version it holds survives
            # elsewhere (``on_cut``), otherwise it replaces the layer of that name.
            existing = manifest.layers.get(str(name))
            return existing is not None and file is not None and existing.xxh3_128 == file.xxh3_128

        def on_cut(name: LayerName, file: LayerFileInfo) -> WriterResult:
            if discard(name, file):
                drop_piece(file)
                return Discarded(name)
            piece = Produced(name, file)
            uploads.submit(piece)
            existing = manifest.layers.get(str(name))
            # Outputs are not kept locally, so the rare one named like a layer that stays is
            # read back from the store to compare.
            if existing is not None and _survives_without(uploads.entry(piece), existing, plan, io):
                uploads.drop(piece)
                return Discarded(name)
            return piece

        workdir = settings.workdir
        target = settings.target_layer_bytes
        images = (
            None
            if plan.has_data_below
            else SplitImageWriter(workdir, plan.keys.start, plan.lowest_retain_lsn, target, on_cut, uploads.open_sink)
        )
        deltas = SplitDeltaWriter(workdir, plan.delta_lsn_range, target, on_cut, uploads.open_sink)
        try:
            try:
                hooks.on_progress(Progress())
                workdir.mkdir(parents=True, exist_ok=True)
                with PhaseTimer(stats, "time_main_loop_secs") as timer:
                    writers = (images, deltas)
                    keys = _main_loop(plan, io, settings, hooks, stats, writers, verification, timer, downloads)
            finally:
                # Whatever happened: no download goes on behind the job's back.
                downloads.close()
                stats.time_download_layer_secs += downloads.waited
            if not keys and plan.keys == plan.key_range:
                # The seed fails here ("no keys produced"); a range with no live keys simply has
                # nothing to compact, and rewriting around it would only churn layers. One
                # sub-job's slice without keys goes on, though: its neighbours remove the layers
                # it shares with them, and the pieces of straddling deltas at its edge of the
                # meta job's range are its to write.
                log.info("gc-compaction found no live keys tenant=%s timeline=%s keys=%s",
                         job.tenant_id, job.timeline_id, plan.keys)  # fmt: skip
                if images:
                    images.abort()
                deltas.abort()
                uploads.abort()
                stats.finalize()
                return Result(CommitProposal(job=job, read_set=plan.read_set()), stats, [])
            with PhaseTimer(stats, "time_final_phase_secs"):
                rewritten = _rewrite_straddling(plan, io, settings, uploads.submit)
                results = (images.finish(plan.keys.end, discard) if images else []) + deltas.finish(discard)
        except BaseException:
            if images:
                images.abort()
            deltas.abort()
            uploads.abort()
            raise
        proposal, produced = _propose(plan, stats, results, rewritten, uploads)
    stats.finalize()
    log.info(
        "gc-compaction done tenant=%s timeline=%s keys=%s selected=%d removed=%d added=%d kept=%d dry_run=%s",
        job.tenant_id, job.timeline_id, plan.keys, len(plan.inputs),
        len(proposal.removed), len(proposal.added), len(proposal.kept), job.dry_run,
    )  # fmt: skip
    return Result(proposal, stats, produced)


def _chain_streams(chain_list: list[list[LayerEntry]], downloads: _Downloads) -> list[Iterator[pa.RecordBatch]]:
    """For each chain, the rows of its layers in the job's key range, one layer after the other,
    in batches sized for a merge of that many chains."""
    batch_bytes = chain_batch_bytes(len(chain_list))

    def stream(chain: list[LayerEntry]) -> Iterator[pa.RecordBatch]:
        for entry in chain:
            yield from downloads.batches(entry, batch_bytes)

    return [stream(chain) for chain in chain_list]


def _live_rows(table: pa.Table, live: list[KeyRange] | None) -> pa.Table:
    """The rows of ``table`` whose keys lie in the live keyspace (all when there is none)."""
    if live is None or not table.num_rows:
        return table
    keys = key_array(table.column("key"))
    mask = np.zeros(len(keys), dtype=bool)
    for r in live:
        mask |= (keys >= np.array(r.start, dtype=KEY_DTYPE)) & (keys < np.array(r.end, dtype=KEY_DTYPE))
    return table if mask.all() else table.filter(pa.array(mask))


def _runs(flags: np.ndarray) -> Iterator[tuple[int, int, bool]]:
    """``(start, end, flag)`` for each run of equal values in ``flags``."""
    edges = np.concatenate(([0], np.flatnonzero(flags[1:] != flags[:-1]) + 1, [len(flags)]))
    for lo, hi in pairwise(edges.tolist()):
        yield lo, hi, bool(flags[lo])


def _base_images(plan: JobPlan, io: LayerIO) -> Iterator[tuple[bytes, bytes]]:
    """Values at the lowest retain LSN from below the job (ancestor, or layers under its LSN
    range), read in bulk as one stream aligned with the keys of the main loop."""
    if not plan.has_data_below:
        return iter(())
    exclude = {entry.name for entry in plan.selected}
    return io.read_below(plan.manifest, plan.keys, plan.lowest_retain_lsn, exclude)


def _main_loop(
    plan: JobPlan,
    io: LayerIO,
    settings: EngineSettings,
    hooks: Hooks,
    stats: CompactionStatistics,
    writers: tuple[SplitImageWriter | None, SplitDeltaWriter],
    verification: bool,
    timer: PhaseTimer,
    downloads: _Downloads,
) -> int:
    """Feed every key's history through retention into the writers; returns the keys seen.

    The merge hands over chunks of whole keys as Arrow tables. Keys with the simplest histories
    (``compactor.worker.engine.batch_retention.simple_keys``) are compacted a chunk at a time in columns; every
    other key, and every key of a job that reads base images from below, goes through
    ``generate_key_retention`` one key at a time. Both keep the keys in order."""
    counts = KeyValueCounters()
    output = _KeyOutput(plan, settings, writers, verification, counts)
    decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer-decode")
    try:
        streams: list[Iterator[pa.RecordBatch]] = [
            _Prefetched(stream, decoder) for stream in _chain_streams(chains(plan.inputs), downloads)
        ]
        keys = _merge_loop(output, io, hooks, timer, streams)
    finally:
        decoder.shutdown(wait=True, cancel_futures=True)
    counts.add_to(stats)
    return keys


class _Prefetched:
    """``stream`` with its next batch decoded on ``decoder`` while the caller works on this one
    (Parquet decoding releases the GIL); a ``merge.Prefetched``."""

    def __init__(self, stream: Iterator[pa.RecordBatch], decoder: ThreadPoolExecutor) -> None:
        self._stream = stream
        self._decoder = decoder
        self._upcoming = decoder.submit(next, stream, None)

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        return self

    def __next__(self) -> pa.RecordBatch:
        batch = self._upcoming.result()
        if batch is None:
            raise StopIteration
        self._upcoming = self._decoder.submit(next, self._stream, None)
        return batch

    def ready(self) -> bool:
        return self._upcoming.done()


def _merge_loop(
    output: _KeyOutput, io: LayerIO, hooks: Hooks, timer: PhaseTimer, streams: list[Iterator[pa.RecordBatch]]
) -> int:
    limit = MAX_KEY_HISTORY_BYTES
    plan = output.plan
    live_ranges = plan.manifest.live_ranges()
    live = None if live_ranges is None else sorted(live_ranges)
    one_by_one = _KeyByKey(output, io)
    in_columns = _InColumns(output)
    progress = Progress()

    for chunk in merged_chunks(streams, limit, _too_much_history, output.settings.chunk_bytes):
        if not progress.versions_in:
            timer.mark("time_to_first_kv_pair_secs")
        table = _live_rows(chunk, live)
        if not table.num_rows:
            continue
        starts = key_starts(key_array(table.column("key")))
        simple = simple_keys(table, starts, limit) if not plan.has_data_below else np.zeros(len(starts) - 1, dtype=bool)
        for lo, hi, flag in _runs(simple):
            rows = table.slice(starts[lo], starts[hi] - starts[lo])
            if flag:
                in_columns.compact(rows, starts[lo : hi + 1] - starts[lo])
            else:
                for batch in rows.to_batches():
                    for _, history in groupby(batch_to_versions(batch), _KEY_OF):
                        one_by_one.compact(list(history))
        progress.keys += len(starts) - 1
        progress.versions_in += table.num_rows
        progress.bytes_in += payload_bytes(table.column("value"))
        hooks.check_cancelled()
        hooks.on_progress(progress)
    return progress.keys


_KEY_OF = itemgetter(0)


@dataclass
class _KeyOutput:
    """Where compacted keys go, and how: shared by both ways of compacting them."""

    plan: JobPlan
    settings: EngineSettings
    writers: tuple[SplitImageWriter | None, SplitDeltaWriter]
    verification: bool
    counts: KeyValueCounters
    delta_floor: int = field(init=False)  # the output deltas' lowest LSN (inclusive)

    def __post_init__(self) -> None:
        # Read once per job: the plan derives it from every selected layer's name.
        self.delta_floor = self.plan.delta_lsn_range[0]


class _KeyByKey:
    """``generate_key_retention`` and ``place`` for one key at a time, with the key's base image
    from below when the job has data below it."""

    def __init__(self, out: _KeyOutput, io: LayerIO) -> None:
        self.out = out
        plan = out.plan
        self._bases = _base_images(plan, io)
        self._next_base: tuple[bytes, bytes] | None = next(self._bases, None)

    def compact(self, history: list[Version]) -> None:
        out = self.out
        plan, counts = out.plan, out.counts
        images, deltas = out.writers
        key = history[0].key
        size = image_size = images_in = 0
        for version in history:
            n = len(version.payload)
            size += n
            if version.kind == _IMAGE_KIND:
                images_in += 1
                image_size += n
        if size >= MAX_KEY_HISTORY_BYTES:
            _too_much_history(key, size)
        counts.image_visited += images_in
        counts.image_visited_bytes += image_size
        counts.wal_visited += len(history) - images_in
        counts.wal_visited_bytes += size - image_size
        counts.unique_keys += 1

        base: Version | None = None
        while self._next_base is not None and self._next_base[0] < key:
            self._next_base = next(self._bases, None)
        if self._next_base is not None and self._next_base[0] == key:
            base = image(key, plan.lowest_retain_lsn, self._next_base[1])
        retention = generate_key_retention(
            key, history, plan.horizon, plan.retain_lsns, out.settings.delta_threshold, base, out.verification
        )
        first_image, rest = place(key, retention, has_image_layer=images is not None)
        if first_image is not None:
            counts.image_produced += 1
            counts.image_produced_bytes += len(first_image.payload)
            if not plan.job.dry_run and images is not None:
                images.put(key, first_image.payload)
        delta_floor = out.delta_floor
        for version in rest:
            if version.lsn < delta_floor:
                _no_base_below(key, version.lsn, delta_floor)
            if version.kind == _IMAGE_KIND:
                counts.image_produced += 1
                counts.image_produced_bytes += len(version.payload)
            else:
                counts.wal_produced += 1
                counts.wal_produced_bytes += len(version.payload)
        if not plan.job.dry_run:
            deltas.put_key(rest)


class _InColumns:
    """``compactor.worker.engine.batch_retention.retain_chunk`` for runs of simple keys, straight into the
    writers."""

    def __init__(self, out: _KeyOutput) -> None:
        self.out = out
        self.cuts = [*out.plan.retain_lsns, out.plan.horizon]

    def compact(self, rows: pa.Table, starts: np.ndarray) -> None:
        out = self.out
        plan, counts = out.plan, out.counts
        images, deltas = out.writers
        try:
            kept = retain_chunk(
                rows, starts, self.cuts, out.settings.delta_threshold, images is not None, out.verification
            )
        except RedoError as err:
            raise CompactionFailed(str(err)) from err
        delta_lsns = kept.deltas.column("lsn").to_numpy()
        delta_floor = out.delta_floor
        below = np.flatnonzero(delta_lsns < delta_floor) if delta_floor else np.zeros(0, dtype=np.int64)
        if len(below):
            i = int(below[0])
            _no_base_below(kept.deltas.column("key")[i].as_py(), int(delta_lsns[i]), delta_floor)
        counts.image_visited += kept.image_rows_in
        counts.image_visited_bytes += kept.image_bytes_in
        counts.wal_visited += kept.wal_rows_in
        counts.wal_visited_bytes += kept.wal_bytes_in
        counts.unique_keys += len(starts) - 1
        delta_images = kept.deltas.column("kind").to_numpy() == _IMAGE_KIND
        delta_sizes = payload_lengths(one_array(kept.deltas.column("value")))
        image_bytes = int(delta_sizes[delta_images].sum())
        new_images = int(delta_images.sum())
        counts.image_produced += len(kept.image_keys) + new_images
        counts.image_produced_bytes += payload_bytes(kept.image_values) + image_bytes
        counts.wal_produced += kept.deltas.num_rows - new_images
        counts.wal_produced_bytes += int(delta_sizes.sum()) - image_bytes
        if plan.job.dry_run:
            return
        if images is not None:
            images.put_batch(kept.image_keys, kept.image_values)
        deltas.put_table(kept.deltas)


_IMAGE_KIND = int(ValueKind.IMAGE)


def _no_base_below(key: bytes, lsn: int, floor: int) -> None:
    raise CompactionFailed(
        f"key {format_key(key)} has no base image at or below LSN {lsn} "
        f"(incomplete history below the lowest retain LSN {floor}); cannot compact it"
    )


def _too_much_history(key: bytes, size: int) -> None:
    """Fail the job on a key whose history passes the limit."""
    raise CompactionFailed(f"too many values for a single key: {size} bytes for key {format_key(key)}")


def _rewrite_straddling(
    plan: JobPlan, io: LayerIO, settings: EngineSettings, upload: Callable[[Produced], None]
) -> list[Produced]:
    """Cut selected deltas that reach outside the meta job's key range into the pieces before and
    after it, keeping the original LSN range (the seed's ``delta_layer_rewriters``): the piece
    before covers ``[layer start, job start)`` and is written by the sub-job at the job's start,
    the piece after ``[job end, layer end)`` by the sub-job at its end. Deltas spanning a cut
    between two sub-jobs stay whole: both read them, and the one commit removes them."""
    if plan.job.dry_run:
        return []
    out: list[Produced] = []
    live = plan.manifest.live_ranges()
    start, end = plan.key_range
    first, last = plan.keys.start == start, plan.keys.end == end
    for number, entry in enumerate(plan.rewrite):
        layer = entry.layer
        sides = (((layer.key_range.start, start), first), ((end, layer.key_range.end), last))
        for side, ((lo, hi), here) in enumerate(sides):
            if lo >= hi or not here:
                continue
            name = LayerName.delta(lo, hi, layer.lsn_start, layer.lsn_end)
            with LayerWriter(settings.workdir / f"rewrite-{number}-{side}.parquet") as writer:
                for version in live_filter(io.versions(entry, KeyRange(lo, hi)), live):
                    writer.add(*version)
                if not writer.num_rows:
                    writer.abort()
                    continue
                piece = Produced(name, writer.finish(name))
                upload(piece)
                out.append(piece)
    return out


def _survives_without(output: LayerEntry, existing: LayerEntry, plan: JobPlan, io: LayerIO) -> bool:
    """Whether every version in the uploaded ``output`` is also in ``existing`` (the layer of
    the same name, which stays) or in a layer this job does not remove. Versions are compared
    whole: a layer holding a record where the output holds an image at the same key and LSN (the
    image wins a read) does not keep that image."""
    missing = {_identity(v) for v in io.versions(output, output.layer.key_range)}
    missing -= {_identity(v) for v in io.versions(existing, existing.layer.key_range)}
    if not missing:
        return True
    selected = {entry.name for entry in plan.selected}
    last = max(key for key, *_ in missing)
    span = KeyRange(min(key for key, *_ in missing), key_next(last) if last != KEY_MAX else KEY_MAX)
    for entry in plan.manifest.layers.values():
        stays = entry.name not in selected or (
            not entry.layer.is_delta and not plan.key_range.covers(entry.layer.key_range)
        )
        if stays and entry.name != existing.name and entry.layer.key_range.overlaps(span):
            missing -= {_identity(v) for v in io.versions(entry, span)}
            if not missing:
                return True
    return False


def _identity(version: Version) -> tuple[bytes, int, int, bytes]:
    """A version as a set member: its payload by digest, so that a layer's worth stays small."""
    return version.key, version.lsn, int(version.kind), hashlib.blake2b(version.payload, digest_size=16).digest()


def _propose(
    plan: JobPlan,
    stats: CompactionStatistics,
    results: list[WriterResult],
    rewritten: list[Produced],
    uploads: _Uploads,
) -> tuple[CommitProposal, list[LayerEntry]]:
    selected_sizes = {entry.name: entry.size for entry in plan.inputs}
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
    # Image layers reaching outside the meta job's key range hold keys it never processed: keep
    # them. Those spanning a cut between sub-jobs go: each side compacted its own keys.
    for entry in plan.inputs:
        if not entry.layer.is_delta and not plan.key_range.covers(entry.layer.key_range):
            keep.add(entry.name)
    removed = [entry.name for entry in plan.inputs if entry.name not in keep]
    kept = sorted(keep & set(selected_sizes))
    replaced_outside = [
        str(p.name) for p in produced if str(p.name) in plan.manifest.layers and str(p.name) not in removed
    ]
    if replaced_outside:
        uploads.abort()
        raise CompactionFailed(f"output {replaced_outside[0]} would replace a layer this job did not read")

    if plan.job.dry_run:
        uploads.abort()
        return CommitProposal(job=plan.job, read_set=plan.read_set(), removed=removed, added=[], kept=kept), []
    # The layer map is checked on the whole meta job's result, at its commit.
    uploaded = uploads.entries(produced)
    proposal = CommitProposal(job=plan.job, read_set=plan.read_set(), removed=removed, added=uploaded, kept=kept)
    return proposal, uploaded


class _Downloads:
    """Fetches the selected layers on a background thread, row group by row group in the order
    the merge needs them (the group with the lowest first key next, across all layers), so that
    the merge starts once the first groups are here, not once whole layers are. ``batches``
    reads a layer as its groups land; ``waited`` sums the time it blocked, and it re-raises the
    error of a download that failed."""

    # One ranged GET: a row group and those after it in its layer, up to about this many bytes.
    FETCH_BYTES = 16 << 20

    def __init__(self, io: LayerIO, entries: list[LayerEntry], keys: KeyRange, hooks: Hooks) -> None:
        self._io = io
        self._keys = keys
        self._hooks = hooks
        self._stopping = threading.Event()
        order = sorted(entries, key=lambda entry: (entry.layer.key_range.start, entry.layer.lsn_start))
        self._started: dict[str, Future[Download]] = {entry.name: Future() for entry in order}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer-download")
        self._pool.submit(self._run, order)
        self.waited = 0.0

    def _run(self, order: list[LayerEntry]) -> None:
        started: list[Download] = []
        try:
            for entry in order:
                if self._stopping.is_set():
                    return
                # Only what holds this sub-job's keys: a layer spanning many slices is not
                # downloaded whole by every sub-job that reads it.
                download = self._io.download(entry, self._keys)
                started.append(download)
                self._started[entry.name].set_result(download)
            pending = [download for download in started if download.next_key is not None]
            while pending and not self._stopping.is_set():
                download = min(pending, key=_next_key)
                if not download.fetch_next(self.FETCH_BYTES):
                    pending.remove(download)
        except BaseException as err:
            log.warning("layer download failed keys=%s error=%s", self._keys, err)
            for future in self._started.values():
                if not future.done():
                    future.set_exception(err)
            for download in started:
                download.abandon(err)

    def batches(self, entry: LayerEntry, batch_bytes: int) -> Iterator[pa.RecordBatch]:
        future = self._started[entry.name]
        self._block(lambda: bool(futures_wait([future], timeout=1.0).done))
        download = future.result()
        yield from download.batches(self._keys, lambda group: self._wait(download, group), batch_bytes)

    def _wait(self, download: Download, group: int) -> None:
        if not download.wait_for(group, 0):
            self._block(lambda: download.wait_for(group, 1.0))

    def _block(self, ready: Callable[[], bool]) -> None:
        """Until ``ready()``, which waits a second at most, says so; cancellable meanwhile."""
        start = time.perf_counter()
        while not ready():
            self._hooks.check_cancelled()
        self.waited += time.perf_counter() - start

    def close(self) -> None:
        """Stop fetching (what is not fetched yet is not needed any more) and drop the partial
        files of unfinished downloads."""
        self._stopping.set()
        self._pool.shutdown(wait=True)
        for future in self._started.values():
            if future.done() and future.exception() is None:
                future.result().abandon()


def _next_key(download: Download) -> bytes:
    key = download.next_key
    assert key is not None
    return key


class _Uploads:
    """Output layers stream to uploads that ``open_sink`` starts while the writers write them;
    as each is cut, its upload is completed on a background thread (the part still buffered
    and the completion), or, for a piece written without one, the whole file is uploaded
    there. Each local file is deleted once its upload ends, whatever the outcome. ``entries``
    waits for the uploads and returns them in the order asked for; ``abort`` deletes every
    object uploaded and every file left, and aborts every upload not completed.

    ``writers`` is how many writers may cut at once, each with a completion thread of its
    own: a gc-compaction's image and delta writers both close when the main loop ends, and a
    store completes an upload in time that grows with its size (moto copies every part), so
    one thread made the job wait for both completions one after the other."""

    def __init__(self, io: LayerIO, manifest: Manifest, writers: int = 1) -> None:
        self._io = io
        self._manifest = manifest
        self._writers = writers
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[int, tuple[Produced, Future[LayerEntry]]] = {}

    def open_sink(self) -> LayerSink:
        return self._io.open_upload(self._manifest)

    def submit(self, piece: Produced) -> None:
        for _, future in self._pending.values():
            if future.done() and future.exception() is not None:
                future.result()  # an earlier upload failed: stop now rather than at the end
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self._writers, thread_name_prefix="layer-upload")
        self._pending[id(piece)] = (piece, self._pool.submit(self._upload, piece))

    def _upload(self, piece: Produced) -> LayerEntry:
        try:
            return self._io.upload(self._manifest, piece.name, piece.file)
        finally:
            piece.file.remove_file()

    def entry(self, piece: Produced) -> LayerEntry:
        """The upload of ``piece``, once it has ended."""
        return self._pending[id(piece)][1].result()

    def drop(self, piece: Produced) -> None:
        """Delete the uploaded ``piece`` and forget it."""
        self._io.delete_uploads([self.entry(piece)])
        del self._pending[id(piece)]

    def entries(self, pieces: list[Produced]) -> list[LayerEntry]:
        try:
            return [self.entry(piece) for piece in pieces]
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        for _, future in self._pending.values():
            future.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        uploaded = []
        for piece, future in self._pending.values():
            if future.done() and not future.cancelled() and future.exception() is None:
                uploaded.append(future.result())
            drop_piece(piece.file)
        self._pending = {}
        if uploaded:
            self._io.delete_uploads(uploaded)
