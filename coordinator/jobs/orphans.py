"""Orphan cleanup: layer objects no manifest will ever reference again, and old manifests.

A layer object is deleted only when it is unreferenced by the newest manifest, older than a grace
period, and older than every in-flight job on its timeline (whose uploads are not committed yet).
Multipart uploads of layers still in progress by the same rules are aborted: workers stream
their outputs, and one killed while writing leaves its upload open (a failing job aborts its
own), where its parts would be stored, and billed, forever.
Old manifests are pruned through the deletion boundary (``ManifestStore.prune``), so a number is
never reused, and never below the manifest an in-flight meta job was planned on (its sub-jobs
load it). Referenced objects are never touched: the newest manifest is read again right
before deleting, and anything it references is spared.
"""

import logging
import time
from dataclasses import dataclass, field

from compactor.storage.errors import CompactorError, one_line
from compactor.storage.layout import layers_prefix
from compactor.storage.manifest_store import ManifestStore
from compactor.storage.object_store import ObjectStore
from compactor.worker.runtime.records import JobRecords

log = logging.getLogger(__name__)

# Object timestamps come from the store's clock, job times from ours, and listings round to the
# second: an in-flight job protects everything from a while before it started.
CLOCK_SKEW_MARGIN_S = 300.0


@dataclass(frozen=True)
class Inflight:
    """What the meta jobs in flight need kept, per ``(tenant, timeline)``."""

    started: dict[tuple[str, str], float] = field(default_factory=dict)  # the oldest's creation time
    planned_on: dict[tuple[str, str], int] = field(default_factory=dict)  # the lowest manifest planned on

    def since(self, tenant: str, timeline: str) -> float | None:
        """Epoch seconds at which the oldest in-flight meta job on the timeline started."""
        return self.started.get((tenant, timeline))

    def pinned(self, tenant: str, timeline: str) -> int | None:
        """The lowest manifest number an in-flight meta job on the timeline was planned on."""
        return self.planned_on.get((tenant, timeline))


@dataclass
class OrphanReport:
    timelines: int = 0
    orphans: list[str] = field(default_factory=list)  # deleted (or, in a dry run, to delete)
    young: int = 0  # unreferenced but inside the grace period or newer than an in-flight job
    uploads: list[str] = field(default_factory=list)  # keys of multipart uploads aborted (or to abort)
    young_uploads: int = 0  # in progress, inside the grace period or newer than an in-flight job
    manifests_pruned: int = 0
    errors: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        return {
            "timelines": self.timelines,
            "orphans": len(self.orphans),
            "young_unreferenced": self.young,
            "multipart_uploads_aborted": len(self.uploads),
            "young_multipart_uploads": self.young_uploads,
            "manifests_pruned": self.manifests_pruned,
            "errors": self.errors,
        }


def collect_orphans(
    objects: ObjectStore,
    manifests: ManifestStore,
    *,
    grace_s: float,
    inflight: Inflight | None = None,
    keep_manifests: int = 10,
    dry_run: bool = False,
    now: float | None = None,
) -> OrphanReport:
    report = OrphanReport()
    now = time.time() if now is None else now
    inflight = inflight or Inflight()
    for tenant, timeline in manifests.list_timelines():
        report.timelines += 1
        try:
            _collect_timeline(
                objects, manifests, tenant, timeline, report, grace_s, inflight, keep_manifests, dry_run, now
            )
        except CompactorError as err:
            # Found by the bad-input tests: one timeline with a damaged manifest stopped the
            # cleanup of every timeline listed after it, on every run. Report it and go on.
            report.errors.append(f"{tenant}/{timeline}: {one_line(err)}")
            log.warning("orphan cleanup skipped tenant=%s timeline=%s error=%r", tenant, timeline, one_line(err))
    return report


def _collect_timeline(
    objects: ObjectStore,
    manifests: ManifestStore,
    tenant: str,
    timeline: str,
    report: OrphanReport,
    grace_s: float,
    inflight: Inflight,
    keep_manifests: int,
    dry_run: bool,
    now: float,
) -> None:
    newest = manifests.latest(tenant, timeline)
    if newest is None:
        return  # an import that never committed: its objects are left for an operator
    cutoff = now - grace_s
    oldest_job = inflight.since(tenant, timeline)
    if oldest_job is not None:
        cutoff = min(cutoff, oldest_job - CLOCK_SKEW_MARGIN_S)
    referenced = {entry.object_key for entry in newest.layers.values()}
    candidates = []
    for info in objects.list_keys(layers_prefix(tenant, timeline)):
        if info.key in referenced:
            continue
        if info.last_modified is None or info.last_modified.timestamp() >= cutoff:
            report.young += 1
            continue
        candidates.append(info.key)
    if candidates:
        # A commit may have landed since we listed: never delete what the newest references.
        fresh = manifests.latest(tenant, timeline)
        still = {e.object_key for e in fresh.layers.values()} if fresh else referenced
        candidates = [key for key in candidates if key not in still]
    report.orphans += candidates
    _abort_old_uploads(objects, layers_prefix(tenant, timeline), cutoff, report, dry_run)
    if dry_run:
        return
    if candidates:
        failed = objects.delete_many(candidates)
        report.errors += [f"{key}: {why}" for key, why in failed.items()]
        log.info("orphans deleted tenant=%s timeline=%s count=%d", tenant, timeline, len(candidates) - len(failed))
    pinned = inflight.pinned(tenant, timeline)
    keep = keep_manifests if pinned is None else max(keep_manifests, newest.number - pinned + 1)
    report.manifests_pruned += len(manifests.prune(tenant, timeline, keep=keep))


def _abort_old_uploads(objects: ObjectStore, prefix: str, cutoff: float, report: OrphanReport, dry_run: bool) -> None:
    """Abort the multipart uploads under ``prefix`` initiated before ``cutoff``. One that is
    younger may belong to a job still writing, whose later parts would then fail it."""
    for upload in objects.list_uploads(prefix):
        if upload.initiated is None or upload.initiated.timestamp() >= cutoff:
            report.young_uploads += 1
            continue
        report.uploads.append(upload.key)
        if dry_run:
            continue
        try:
            objects.abort_upload(upload.key, upload.upload_id)
        except CompactorError as err:
            report.errors.append(f"{upload.key} (multipart upload): {one_line(err)}")
    if report.uploads and not dry_run:
        log.info("multipart uploads aborted prefix=%s count=%d", prefix, len(report.uploads))


def inflight_from_records(records: JobRecords) -> Inflight:
    """``Inflight`` over the job records: per timeline, the creation time of the oldest meta job
    that has not ended (its sub-jobs upload only after it was created), and the lowest manifest
    number one of them was planned on."""
    inflight = Inflight()
    for job_id in records.active_meta_ids():
        meta = records.get_meta(job_id)
        if meta is None or meta.state.ended:
            continue
        key = (meta.tenant_id, meta.timeline_id)
        inflight.started[key] = min(inflight.started.get(key, meta.created_at), meta.created_at)
        if meta.planned_on is not None:
            inflight.planned_on[key] = min(inflight.planned_on.get(key, meta.planned_on), meta.planned_on)
    return inflight
