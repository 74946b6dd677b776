"""The auto-trigger of one timeline: the seed's ``trigger_auto_compaction`` for gc-compaction,
and L0 first (``decide``): L0 compaction when the L0 deltas reach ``compaction_threshold``, then
image creation when a partition is due, and gc-compaction only when no L0 compaction is due (the
seed's ``YieldForL0``)."""

from collections.abc import Collection
from dataclasses import dataclass

from compactor.storage.manifest import Manifest
from compactor.worker.engine.image import plan_image
from compactor.worker.engine.jobs import CompactionJob, JobKind
from compactor.worker.engine.l0 import l0_deltas
from compactor.worker.runtime.dispatch import QUEUE_GC, QUEUE_L0

AUTO_TRIGGER_LIMIT = 150 * 1024**3  # the seed does not auto-trigger timelines this large


@dataclass(frozen=True)
class TriggerDecision:
    trigger: bool
    reason: str
    l1_bytes: int = 0
    l2_bytes: int = 0
    kind: JobKind = "gc"


def layer_sizes(manifest: Manifest) -> tuple[int, int]:
    """``(l1, l2)``: bytes of layers starting at or below the last completed gc-compaction LSN
    (L2), and of layers above it that start at or below the gc cutoff (L1)."""
    l2_lsn = manifest.gc_compaction.last_completed_lsn
    cutoff = manifest.gc.cutoff
    l1 = l2 = 0
    for entry in manifest.layers.values():
        start = entry.layer.lsn_start
        if start <= l2_lsn:
            l2 += entry.size
        elif start <= cutoff:
            l1 += entry.size
    return l1, l2


def should_trigger(manifest: Manifest, *, job_in_flight: bool) -> TriggerDecision:
    settings = manifest.settings
    if not settings.gc_compaction_enabled:
        return TriggerDecision(False, "gc-compaction disabled for the timeline")
    if job_in_flight:
        return TriggerDecision(False, "a meta job is already in flight")
    if manifest.ancestor is not None:
        return TriggerDecision(False, "child timelines are not auto-compacted")
    if manifest.gc.cutoff == 0:
        return TriggerDecision(False, "gc cutoff not set")
    l1, l2 = layer_sizes(manifest)
    if l1 + l2 >= AUTO_TRIGGER_LIMIT:
        return TriggerDecision(False, "timeline too large for auto-trigger (>= 150 GiB)", l1, l2)
    if l2 == 0:
        threshold = settings.gc_compaction_initial_threshold_kb * 1024
        if l1 >= threshold:
            return TriggerDecision(True, f"initial: l1={l1} >= threshold={threshold}", l1, l2)
        return TriggerDecision(False, f"l1={l1} below initial threshold {threshold}", l1, l2)
    ratio = settings.gc_compaction_ratio_percent / 100.0
    if l1 / l2 >= ratio:
        return TriggerDecision(True, f"ratio: l1/l2={l1 / l2:.2f} >= {ratio:.2f}", l1, l2)
    return TriggerDecision(False, f"l1/l2={l1 / l2:.2f} below {ratio:.2f}", l1, l2)


def decide(manifest: Manifest, *, busy: Collection[str] = (), kinds: Collection[str] = ("gc",)) -> TriggerDecision:
    """Which meta job, if any, the auto-trigger starts on this timeline, among the enabled
    ``kinds``: L0 compaction first, then image creation, then gc-compaction, which yields while
    L0 compaction is due (it would only rewrite the L0s into pieces). A due L0 compaction holds
    the others back only where ``l0`` is enabled: with L0 compaction left to the operator, gc
    waiting for it could wait forever. gc-compaction's own guards (disabled, child timeline,
    no cutoff, size) are its alone: L0 compaction and image creation run on any timeline.

    One meta job per timeline and queue is in flight at a time: ``busy`` holds the queues
    (``gc``, ``l0``: ``dispatch.queue_of`` a kind) whose marker a job holds. L0 compaction and
    image creation so start beside a running gc-compaction, never behind it; the commit
    validation settles the rare overlap (docs/design/commit.md)."""
    l0_count, threshold = len(l0_deltas(manifest)), manifest.settings.compaction_threshold
    l0_due = "l0" in kinds and l0_count >= threshold
    if QUEUE_L0 not in busy:
        if l0_due:
            return TriggerDecision(True, f"{l0_count} L0 deltas >= compaction_threshold {threshold}", kind="l0")
        if "image" in kinds:
            job = CompactionJob(tenant_id=manifest.tenant_id, timeline_id=manifest.timeline_id, kind="image")
            image = plan_image(manifest, job)
            if not isinstance(image, str):
                return TriggerDecision(True, f"{len(image.images)} image layers due at LSN {image.lsn}", kind="image")
    if "gc" not in kinds:
        return TriggerDecision(False, "gc-compaction is not auto-triggered")
    if QUEUE_GC in busy:
        return TriggerDecision(False, "a gc-compaction is already in flight")
    if l0_due:
        return TriggerDecision(False, f"gc-compaction yields to the L0 compaction in flight ({l0_count} L0 deltas)")
    return should_trigger(manifest, job_in_flight=False)
