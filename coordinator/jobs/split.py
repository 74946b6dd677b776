"""Cutting a meta job into sub-jobs: slices of its key range holding about ``max_job_bytes`` of
input each, cut anywhere between keys (docs/design/commit.md). Every sub-job works on the same
plan, so slices need not follow layer boundaries: a layer spanning a cut is read by both sides.

Where the bytes lie along the keys comes from the row-group index in each selected layer's footer
(first and last key and size of every group of about 8 MiB), spread evenly over each group's key
span, as SlateDB samples block anchors. A cut moves to a nearby key that no selected layer spans
when one lies within a quarter of a slice's bytes, so a meta job run again on its own output
usually cuts at the same keys, writes the same layers, and changes nothing. An image-creation
job's slices end only between the image layers it plans, each of which one sub-job writes whole.
"""

import logging
from collections.abc import Callable
from itertools import pairwise
from math import ceil

from compactor.storage.errors import CompactorError
from compactor.storage.keys import KeyRange, key_from_int, key_to_int
from compactor.storage.layer_file import RowGroup
from compactor.storage.lsn import LSN_MAX
from compactor.storage.manifest import LayerEntry, Manifest
from compactor.worker.engine.coverage import cumulative, interpolate
from compactor.worker.engine.image import ImagePlan
from compactor.worker.engine.jobs import CompactionJob
from compactor.worker.engine.kinds import Plan

# How far (in a slice's bytes) a cut may move to reach a key no selected layer spans.
SNAP_FRACTION = 0.25

RowGroups = Callable[[LayerEntry], list[RowGroup]]
"""The row-group index of a layer (``compactor.storage.timeline.Storage.row_groups``)."""

log = logging.getLogger(__name__)


def or_whole_layer(row_groups: RowGroups) -> RowGroups:
    """``row_groups``, or one group over the whole layer when its footer cannot be read now.
    The index only balances the slices: a flaky store or a damaged object must not fail the
    plan (a damaged layer fails its sub-jobs, with the reason, when they read it)."""

    def index(entry: LayerEntry) -> list[RowGroup]:
        try:
            return row_groups(entry)
        except CompactorError as err:
            log.warning("layer footer not read, its bytes spread evenly layer=%s error=%r", entry.name, str(err))
            keys = entry.layer.key_range
            return [RowGroup(keys.start, key_from_int(key_to_int(keys.end) - 1), 1, entry.size)]

    return index


def compact_below_lsn(manifest: Manifest, job: CompactionJob) -> int:
    """The LSN below which the meta job's statistics count layer bytes: the horizon for
    gc-compaction, the whole timeline for the other kinds."""
    if job.kind != "gc":
        return manifest.top_lsn
    return job.lsn_end if job.lsn_end != LSN_MAX else manifest.gc.cutoff


def _spans(plan: Plan, row_groups: RowGroups) -> list[tuple[int, int, float]]:
    """``(start, end, bytes)`` along the keys as integers, ``[start, end)`` clipped to the meta
    job's keys: each selected layer's file bytes, shared out over its row groups by their raw
    size."""
    lo, hi = key_to_int(plan.key_range.start), key_to_int(plan.key_range.end)
    spans = []
    for entry in plan.selected:
        groups = row_groups(entry)
        raw = sum(group.raw_bytes for group in groups) or 1
        for group in groups:
            start, end = key_to_int(group.first_key), key_to_int(group.last_key) + 1
            clipped = (max(start, lo), min(end, hi))
            if clipped[0] < clipped[1]:
                share = entry.size * group.raw_bytes / raw
                spans.append((*clipped, share * (clipped[1] - clipped[0]) / (end - start)))
    return spans


def slices(plan: Plan, row_groups: RowGroups, max_job_bytes: int) -> list[KeyRange]:
    """The key slices ``[start, end)`` of a meta job's sub-jobs: in order, together exactly the
    meta job's key range, each holding about the same bytes and at most about ``max_job_bytes``."""
    spans = _spans(plan, row_groups)
    total = sum(size for _, _, size in spans)
    # The shares are floats: a total that is a whole multiple of the limit must not round up.
    count = ceil(total / max_job_bytes * (1 - 1e-9)) if total else 1
    if count <= 1:
        return [plan.key_range]
    lo, hi = key_to_int(plan.key_range.start), key_to_int(plan.key_range.end)
    bounds = [(key_to_int(e.layer.key_range.start), key_to_int(e.layer.key_range.end)) for e in plan.selected]
    edges = {b for bound in bounds for b in bound if lo < b < hi}
    clean = {b for b in edges if not any(start < b < end for start, end in bounds)}
    allowed = {key_to_int(k) for k in plan.cut_points} if isinstance(plan, ImagePlan) else None
    snaps = clean if allowed is None else allowed
    points = sorted({lo, hi} | {b for start, end, _ in spans for b in (start, end)} | clean | (allowed or set()))
    below = cumulative(points, spans)
    step = total / count
    cuts = [lo]
    for i in range(1, count):
        target = step * i
        cut = interpolate(points, below, target)
        near = [(abs(below[j] - target), p) for j, p in enumerate(points) if p in snaps]
        if near and (allowed is not None or min(near)[0] <= step * SNAP_FRACTION):
            cut = min(near)[1]
        elif allowed is not None:
            continue
        if cuts[-1] < cut < hi:
            cuts.append(cut)
    cuts.append(hi)
    return [KeyRange(key_from_int(a), key_from_int(b)) for a, b in pairwise(cuts)]
