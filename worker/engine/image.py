"""Image-layer creation (``kind="image"``), as Neon's ``create_image_layers`` in its L0-L1
boundary mode (CONTRACTS §5).

Planning (pure, on one manifest, so every sub-job derives the same plan):

- the image LSN is the highest LSN complete in the layer map: the maximum over delta layers of
  ``lsn_end - 1`` and over image layers of their LSN (L0s included);
- the live keyspace is cut into partitions of about ``compaction_target_size`` bytes. Where the
  bytes lie comes from the manifest alone: each non-L0 layer's size spread evenly over its keys
  (an L0 spans every key and says nothing about where its bytes are). A cut within a quarter of
  a partition's bytes of an existing image layer's bound moves there, so new image layers line up
  with the old ones;
- a partition is due when some key of it has ``image_creation_threshold`` or more delta layers
  stacked above its newest image (every partition when forced);
- each due partition's image layer runs from the end of the previous partition, made or skipped
  (the first from ``MIN``), to the end of its own: the seed's ``start`` rule, which leaves no key
  gap between consecutive image layers.

Running (one sub-job, the image ranges inside its slice): values at the image LSN come from the
read path in bulk (on a branch, through the ancestor); a redo failure fails the job. A range with
no key at the image LSN is not written, and the next range of the sub-job, if it starts where
that one ends, starts where that one started (Neon's rule for an empty partition), unless an
earlier job at the same LSN made that layer already. Nothing is removed: reads below the image
LSN never see the new layers, and reads at or above it get the value the older layers give.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from math import ceil

from compactor.storage.errors import RedoError
from compactor.storage.keys import KEY_MIN, KeyRange, key_to_int
from compactor.storage.layer_file import LayerWriter
from compactor.storage.layer_name import LayerName
from compactor.storage.manifest import LayerEntry, Manifest
from compactor.storage.values import ValueKind
from compactor.worker.engine.coverage import cumulative, deepest_delta_stack, interpolate, key_range_of, spread_bytes
from compactor.worker.engine.jobs import CommitProposal, CompactionJob, ReadSet
from compactor.worker.engine.plan import PlanningError, keeping_read_set
from compactor.worker.engine.run import CompactionFailed, EngineSettings, Hooks, LayerIO, Progress, Result, _Uploads
from compactor.worker.engine.split_writers import Produced
from compactor.worker.engine.statistics import CompactionStatistics, PhaseTimer

log = logging.getLogger(__name__)

SNAP_FRACTION = 0.25  # how far (in a partition's bytes) a cut moves to an image layer's bound


@dataclass(frozen=True)
class Partition:
    """Live key ranges of about the target size, in order; the partition ends where its last
    range ends."""

    ranges: list[KeyRange]

    @property
    def end(self) -> bytes:
        return self.ranges[-1].end


@dataclass(frozen=True)
class ImagePlan:
    job: CompactionJob
    manifest: Manifest
    key_range: KeyRange
    lsn: int  # the image LSN
    partitions: list[Partition]
    images: list[KeyRange]  # the image layers to make, by the start rule
    selected: list[LayerEntry]  # what the images are read from: layers starting at or below lsn
    slice: KeyRange | None = None

    l2_lsn = None

    @property
    def keys(self) -> KeyRange:
        return self.slice or self.key_range

    @property
    def cut_points(self) -> list[bytes]:
        """Keys where a sub-job slice may end: between image layers, never inside one."""
        return sorted({bound for image in self.images for bound in image})

    def restrict(self, keys: KeyRange) -> ImagePlan:
        inside = [image for image in self.images if keys.covers(image) or not image.overlaps(keys)]
        if keys.start >= keys.end or len(inside) != len(self.images):
            raise PlanningError(f"sub-job keys {keys} cut through an image layer of the plan")
        return replace(self, slice=keys)

    def read_set(self) -> ReadSet:
        return keeping_read_set(
            self.manifest, self.key_range, sorted(entry.name for entry in self.selected), self.lsn + 1
        )


def image_lsn(layers: list[LayerName]) -> int:
    return max(name.lsn_end - 1 if name.is_delta else name.image_lsn for name in layers)


def partition(manifest: Manifest, key_range: KeyRange, lsn: int, target: int) -> list[Partition]:
    """The live keys of ``key_range`` in partitions of about ``target`` bytes (module doc)."""
    live = sorted(manifest.live_ranges() or [key_range])
    live = [KeyRange(max(r.start, key_range.start), min(r.end, key_range.end)) for r in live]
    live = [r for r in live if r.start < r.end]
    if not live:
        return []
    layers = [e for e in manifest.layers.values() if not e.layer.is_l0 and e.layer.lsn_start <= lsn]
    whole = KeyRange(live[0].start, live[-1].end)
    spans = [span for r in live for span in spread_bytes(((e.layer.key_range, e.size) for e in layers), r)]
    lo, hi = key_to_int(whole.start), key_to_int(whole.end)
    image_bounds = {
        key_to_int(b) for e in layers if not e.layer.is_delta for b in e.layer.key_range if lo < key_to_int(b) < hi
    }
    points = sorted({lo, hi} | {b for s, e, _ in spans for b in (s, e)} | image_bounds)
    below = cumulative(points, spans)
    total = below[-1]
    cuts: list[int] = []
    for i in range(1, ceil(total / target)):
        at = target * i
        cut = interpolate(points, below, at)
        near = [(abs(below[j] - at), p) for j, p in enumerate(points) if p in image_bounds]
        if near and min(near)[0] <= target * SNAP_FRACTION:
            cut = min(near)[1]
        if (cuts[-1] if cuts else lo) < cut < hi:
            cuts.append(cut)
    out: list[Partition] = []
    for a, b in zip([lo, *cuts], [*cuts, hi], strict=True):
        ranges = [
            key_range_of(max(a, key_to_int(r.start)), min(b, key_to_int(r.end)))
            for r in live
            if key_to_int(r.start) < b and a < key_to_int(r.end)
        ]
        if ranges:
            out.append(Partition(ranges))
    return out


def plan_image(manifest: Manifest, job: CompactionJob) -> ImagePlan | str:
    """The image layers to make, or a one-line reason why none is."""
    names = manifest.layer_names()
    if not names:
        return "no layers: nothing to make images of"
    lsn = image_lsn(names)
    settings = manifest.settings
    partitions = partition(manifest, job.key_range, lsn, settings.compaction_target_size)
    threshold = settings.image_creation_threshold
    images: list[KeyRange] = []
    start = KEY_MIN
    for part in partitions:
        due = job.force or any(deepest_delta_stack(names, r, lsn) >= threshold for r in part.ranges)
        if due and str(LayerName.image(start, part.end, lsn)) not in manifest.layers:
            images.append(KeyRange(start, part.end))
        start = part.end
    if not images:
        return f"no partition has {threshold} or more delta layers above its newest image at LSN {lsn}"
    selected = [e for e in manifest.layers.values() if e.layer.lsn_start <= lsn]
    return ImagePlan(job, manifest, job.key_range, lsn, partitions, images, selected)


def run_image(plan: ImagePlan, io: LayerIO, settings: EngineSettings, hooks: Hooks | None = None) -> Result:
    """Make the image layers inside ``plan.keys`` and upload them; nothing is removed. On
    failure every upload of this call is deleted again."""
    hooks = hooks or Hooks()
    stats = CompactionStatistics()
    job, manifest = plan.job, plan.manifest
    keys = plan.keys
    settings.workdir.mkdir(parents=True, exist_ok=True)
    uploads = _Uploads(io, manifest)
    produced: list[Produced] = []
    progress = Progress()
    # Counted as visited: the layers at or below the LSN over these keys, which the reads may
    # open (the read path stops at each key's newest image, so some are never opened).
    for entry in plan.selected:
        if entry.layer.key_range.overlaps(keys):
            (stats.visit_delta_layer if entry.layer.is_delta else stats.visit_image_layer)(entry.size)
    with PhaseTimer(stats, "time_total_secs"):
        try:
            carried: KeyRange | None = None  # an empty range the next adjacent one takes over
            for number, image in enumerate(r for r in plan.images if keys.covers(r)):
                if carried is not None and carried.end == image.start:
                    image = KeyRange(carried.start, image.end)
                name = LayerName.image(image.start, image.end, plan.lsn)
                if str(name) in manifest.layers:
                    # Only a range that took over an empty one can be there (the plan leaves out
                    # those that are): an earlier job made it, with these keys at this LSN, and
                    # the commit refuses a second layer of the same name.
                    carried = None
                    continue
                with LayerWriter(settings.workdir / f"image-{id(plan):x}-{number}.parquet") as writer:
                    try:
                        for key, value in io.read(manifest, plan.lsn, image):
                            writer.add(key, plan.lsn, ValueKind.IMAGE, value)
                            stats.produce_image_key(value)
                            progress.keys += 1
                            progress.bytes_in += len(value)
                    except RedoError as err:
                        raise CompactionFailed(f"image at LSN {plan.lsn}: {err}") from err
                    if not writer.num_rows:
                        writer.abort()
                        carried = image
                        continue
                    carried = None
                    piece = Produced(name, writer.finish(name))
                stats.produce_image_layer(piece.file.size)
                uploads.submit(piece)
                produced.append(piece)
                hooks.check_cancelled()
                hooks.on_progress(progress)
            added = uploads.entries(produced)
        except BaseException:
            uploads.abort()
            raise
    stats.num_unique_keys_visited = progress.keys
    stats.finalize()
    proposal = CommitProposal(job=job, read_set=plan.read_set(), added=added)
    log.info(
        "image creation done tenant=%s timeline=%s keys=%s lsn=%d images=%d",
        job.tenant_id, job.timeline_id, keys, plan.lsn, len(added),
    )  # fmt: skip
    return Result(proposal, stats, added)
