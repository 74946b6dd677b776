"""Planning one gc-compaction: horizon, retain LSNs and layer selection, exactly as the seed's
``compact_with_gc_inner`` step 0. Pure: a manifest and a job in, a plan (or a reason to skip) out.

A meta job is planned once, over its whole key range; each sub-job works on that same plan
restricted to its slice of keys (``JobPlan.restrict``), so every sub-job of a meta job agrees on
the horizon, the retain LSNs, the selection and the output LSN ranges (docs/design/commit.md).
"""

from dataclasses import dataclass, replace

from compactor.storage.errors import CompactorError
from compactor.storage.keys import KeyRange, fully_contains
from compactor.storage.layer_map import check_valid_layermap
from compactor.storage.lsn import LSN_MAX
from compactor.storage.manifest import LayerEntry, Manifest
from compactor.worker.engine.jobs import CompactionJob, ReadSet


class PlanningError(CompactorError):
    """The job cannot run safely on this layer map."""


@dataclass(frozen=True)
class JobPlan:
    job: CompactionJob
    manifest: Manifest
    key_range: KeyRange
    horizon: int
    retain_lsns: list[int]  # branch points and leases below the horizon, sorted, distinct
    selected: list[LayerEntry]
    rewrite: list[LayerEntry]  # selected deltas straddling the key range
    min_layer_lsn: int
    max_layer_lsn: int
    has_data_below: bool  # a branch, or an LSN range that starts above 0
    lowest_retain_lsn: int
    slice: KeyRange | None = None  # the keys one sub-job compacts, inside key_range; None: all of it

    @property
    def keys(self) -> KeyRange:
        """The keys this run compacts, ``[start, end)``: its slice, or the whole key range."""
        return self.slice or self.key_range

    @property
    def inputs(self) -> list[LayerEntry]:
        """The selected layers holding keys of ``keys``: a layer spanning a cut between two
        slices is an input of both, each reading only its own keys."""
        keys = self.keys
        return [entry for entry in self.selected if entry.layer.key_range.overlaps(keys)]

    def restrict(self, keys: KeyRange) -> "JobPlan":
        """This plan for the sub-job that compacts ``keys`` (a non-empty part of the key range)."""
        if keys.start >= keys.end or not self.key_range.covers(keys):
            raise PlanningError(f"sub-job keys {keys} are not a part of the meta job's keys {self.key_range}")
        return replace(self, slice=keys)

    @property
    def l2_lsn(self) -> int | None:
        """``gc_compaction.last_completed_lsn`` once this job commits (the seed's Notify): its
        horizon, for a job over every key and all history (what the seed's auto jobs are); None
        for a partial job, which says nothing about the timeline as a whole."""
        return self.horizon if self.job.full_range and not self.job.dry_run else None

    @property
    def end_lsn(self) -> int:
        """The highest LSN end among the selected layers (of the whole meta job)."""
        return max(entry.layer.lsn_end for entry in self.selected)

    @property
    def delta_lsn_range(self) -> tuple[int, int]:
        """LSN range of the output deltas. The seed uses ``[lowest retain LSN, end_lsn)``; when
        the horizon lies at or past every selected layer (a cutoff set beyond the data), images
        built at the horizon would fall outside that range, so the range is widened to hold them."""
        return (self.lowest_retain_lsn, max(self.end_lsn, self.horizon + 1))

    @property
    def selected_bytes(self) -> int:
        return sum(entry.size for entry in self.selected)

    def read_set(self) -> ReadSet:
        return ReadSet(
            manifest_number=self.manifest.number,
            selected=[entry.name for entry in self.selected],
            key_start=self.key_range.start.hex().upper(),
            key_end=self.key_range.end.hex().upper(),
            max_layer_lsn=self.max_layer_lsn,
            horizon=self.horizon,
            retain_lsns=self.retain_lsns,
            others=[
                name
                for name in conflicting_layers(self.manifest, self.key_range, self.max_layer_lsn)
                if name not in {entry.name for entry in self.selected}
            ],
        )


def conflicting_layers(manifest: Manifest, key_range: KeyRange, max_layer_lsn: int) -> list[str]:
    """Layers a commit must know about: they hold keys of the range below ``max_layer_lsn``."""
    return [
        name
        for name, entry in manifest.layers.items()
        if entry.layer.lsn_start < max_layer_lsn and entry.layer.key_range.overlaps(key_range)
    ]


def keeping_read_set(manifest: Manifest, key_range: KeyRange, selected: list[str], max_layer_lsn: int) -> ReadSet:
    """The read set of a job that keeps every read (L0 compaction, image creation): it depends
    on its selection and on no layer appearing below ``max_layer_lsn``, not on gc info (no
    horizon, no retain LSNs)."""
    names = set(selected)
    return ReadSet(
        manifest_number=manifest.number,
        selected=selected,
        key_start=key_range.start.hex().upper(),
        key_end=key_range.end.hex().upper(),
        max_layer_lsn=max_layer_lsn,
        horizon=0,
        retain_lsns=[],
        others=[name for name in conflicting_layers(manifest, key_range, max_layer_lsn) if name not in names],
    )


def effective_horizon(manifest: Manifest, job: CompactionJob) -> int:
    """The gc cutoff, or the requested LSN end capped by it; 0 means nothing may be compacted."""
    cutoff = manifest.gc.cutoff
    if job.lsn_end == LSN_MAX:
        return cutoff
    return min(job.lsn_end, cutoff)


def plan_job(manifest: Manifest, job: CompactionJob) -> JobPlan | str:
    """A plan for ``job`` on ``manifest``, or a one-line reason why there is nothing to do."""
    horizon = effective_horizon(manifest, job)
    if horizon == 0:
        return "gc cutoff not set yet (0): nothing is compacted"
    retain = sorted(set(manifest.gc.retained_below(horizon)))
    entries = [(entry.layer, entry) for entry in manifest.layers.values()]

    max_layer_lsn = max((name.lsn_end for name, _ in entries if name.lsn_start <= horizon), default=None)
    if max_layer_lsn is None:
        return f"no layers at or below the horizon {horizon}"
    # Layers strictly below min_layer_lsn are read through the read path, as if from a branch.
    min_layer_lsn = min(
        (name.lsn_start for name, _ in entries if job.lsn_start == 0 or name.lsn_end > job.lsn_start),
        default=None,
    )
    if min_layer_lsn is None:
        return f"no layers above the requested LSN start {job.lsn_start}"

    key_range = job.key_range
    selected: list[LayerEntry] = []
    rewrite: list[LayerEntry] = []
    for name, entry in sorted(entries, key=lambda item: (item[0].lsn_start, item[0].key_range)):
        if name.lsn_end <= max_layer_lsn and name.lsn_start >= min_layer_lsn and name.key_range.overlaps(key_range):
            selected.append(entry)
            if name.is_delta and not fully_contains(key_range, name.key_range):
                rewrite.append(entry)
    if not selected:
        return f"no layers within the key range {key_range}"

    if job.lsn_start != 0:
        has_data_below, lowest = True, min_layer_lsn
    elif manifest.ancestor is not None:
        has_data_below, lowest = True, manifest.ancestor.lsn
    else:
        has_data_below, lowest = False, (retain[0] if retain else horizon)

    problem = check_valid_layermap(entry.layer for entry in selected)
    if problem:
        raise PlanningError(f"layer map check failed on the selection ({problem}); not compacting: data could be lost")
    return JobPlan(
        job=job,
        manifest=manifest,
        key_range=key_range,
        horizon=horizon,
        retain_lsns=retain,
        selected=selected,
        rewrite=rewrite,
        min_layer_lsn=min_layer_lsn,
        max_layer_lsn=max_layer_lsn,
        has_data_below=has_data_below,
        lowest_retain_lsn=lowest,
    )
