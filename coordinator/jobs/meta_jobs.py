"""Meta jobs: planning into sub-jobs, what happens when a sub-job ends, the one commit, and
cancel (the seed's ``GcCompactionQueue``, with the queue in Redis records and Celery messages).

Data flow of one meta job (docs/design/commit.md):

1. ``create_meta_job`` stores the record (and the timeline's in-flight marker);
2. ``plan`` reads the newest manifest, plans the compaction once over the meta job's key range
   (``compactor.worker.engine.plan``), cuts that range into sub-jobs by bytes
   (``compactor.coordinator.jobs.split``), stores the
   sub-job records and enqueues every sub-job on the ``gc`` queue at once: they run in parallel;
3. each sub-job uploads its outputs and records its part of the proposal; when one ends, whatever
   its outcome, ``sub_job_ended`` adds it to the meta job's finished set and, once every sub-job
   has ended, claims the finalize (``SET NX``) and enqueues ``finalize_meta_job``: exactly once,
   never early;
4. ``finalize`` commits once: if every sub-job succeeded, the combined proposal (and the L2 LSN)
   in one new manifest; on a real conflict the uploads are deleted and the meta job is planned
   again (bounded by ``max_replans``); a failed or cancelled meta job commits nothing and deletes
   every upload. Then it writes the statistics next to the manifests and ends the meta job.

Every step is idempotent: a duplicated message, or a step repeated by the scheduler's repair
after a crash, changes nothing that was done already.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from compactor.coordinator.jobs.split import RowGroups, compact_below_lsn, or_whole_layer, slices
from compactor.storage import layout
from compactor.storage.errors import CompactorError, InvalidInput, ManifestConflict, one_line
from compactor.storage.keys import format_key
from compactor.storage.manifest import GcCompactionState, Manifest
from compactor.storage.object_store import RequestCounter
from compactor.storage.settings import Settings
from compactor.storage.timeline import Checkpoint, Storage
from compactor.worker.engine.commit import CommitRefused
from compactor.worker.engine.jobs import CommitProposal, SubJobSpec
from compactor.worker.engine.kinds import is_pending, plan_any
from compactor.worker.engine.run import EngineSettings
from compactor.worker.engine.statistics import CompactionStatistics, add_requests
from compactor.worker.runtime import attempts, metrics
from compactor.worker.runtime.dispatch import Publisher, enqueue_sub, maybe_finalize, queue_of
from compactor.worker.runtime.payloads import CompactRequest, new_job_id, sub_job_id
from compactor.worker.runtime.records import (
    JobProgress,
    JobRecords,
    JobState,
    MetaJobRecord,
    MetaStatistics,
    SubJobRecord,
    most_at_once,
    now,
)
from compactor.worker.runtime.runner import commit_meta, compact

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- creating


def create_meta_job(records: JobRecords, request: CompactRequest, *, auto: bool = False) -> tuple[MetaJobRecord, bool]:
    """Store a new meta job for ``request``; returns it and whether it is new.

    A request carrying the id of an existing job returns that job if it asks for the same
    compaction (a resent request) and fails otherwise.
    """
    job_id = request.job_id or new_job_id()
    request = request.model_copy(update={"job_id": job_id})
    meta = MetaJobRecord(
        id=job_id, tenant_id=request.tenant_id, timeline_id=request.timeline_id, request=request, auto=auto
    )
    if records.create_meta(meta):
        # Manual jobs run even while another meta job holds the marker; the marker only keeps
        # the auto-trigger away, and the commit protocol keeps concurrent jobs safe.
        records.set_inflight(meta.tenant_id, meta.timeline_id, queue_of(request.kind), job_id)
        log.info(
            "meta job created job=%s tenant=%s timeline=%s auto=%s", job_id, meta.tenant_id, meta.timeline_id, auto
        )
        return meta, True
    existing = records.get_meta(job_id)
    if existing is None or existing.request is None or not existing.request.same_job(request):
        raise InvalidInput(f"job id {job_id} is already used by a different request")
    return existing, False


def reject_payload(records: JobRecords, payload: dict[str, Any], error: str) -> MetaJobRecord:
    """Record an invalid ``compact_timeline`` payload as a failed meta job, so that the client
    finds the reason under the job id it chose (or a new one)."""
    raw_id = payload.get("job_id")
    job_id = (
        raw_id
        if isinstance(raw_id, str) and len(raw_id) == 32 and all(c in "0123456789abcdef" for c in raw_id)
        else new_job_id()
    )

    def text(name: str) -> str:
        value = payload.get(name)
        return value[:64] if isinstance(value, str) else ""

    at = now()
    meta = MetaJobRecord(
        id=job_id,
        tenant_id=text("tenant_id"),
        timeline_id=text("timeline_id"),
        state=JobState.FAILED,
        error=error,
        created_at=at,
        planned_at=at,
        ended_at=at,
    )
    if not records.create_meta(meta, active=False):
        existing = records.get_meta(job_id)
        if existing is not None:
            return existing
    log.warning("compact request rejected job=%s error=%r", job_id, error)
    return meta


# ----------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class MetaPlan:
    """A meta job planned on one manifest: its sub-jobs, or why there is nothing to do."""

    specs: list[SubJobSpec]
    manifest_number: int
    below_lsn: int  # statistics count the layers starting at or below this LSN (inclusive)
    before_size: int
    max_job_bytes: int
    l2_lsn: int | None  # gc_compaction.last_completed_lsn its commit writes
    skipped: str | None
    pending: bool = False  # l0: more L0s are left for another job once this one commits


def layer_size_below(manifest: Manifest, lsn: int) -> int:
    """Bytes of the layers starting at or below ``lsn`` (the seed's collect_layer_below_lsn)."""
    return sum(entry.size for entry in manifest.layers.values() if entry.layer.lsn_start <= lsn)


def plan_meta_job(
    manifest: Manifest, request: CompactRequest, default_max_job_bytes: int, row_groups: RowGroups
) -> MetaPlan:
    """Plan ``request`` once on ``manifest`` and cut it into sub-jobs (pure but for
    ``row_groups``, which reads layer footers). Raises PlanningError on an invalid layer map."""
    job = request.to_job()
    max_bytes = request.max_job_bytes or default_max_job_bytes
    below = compact_below_lsn(manifest, job)
    before = layer_size_below(manifest, below)
    plan = plan_any(manifest, job)
    if isinstance(plan, str):
        # A gc job over everything with nothing below its horizon has still completed up to it.
        l2 = below if job.kind == "gc" and job.full_range and below and not job.dry_run else None
        return MetaPlan([], manifest.number, below, before, max_bytes, l2, plan)
    keys = slices(plan, row_groups, max_bytes) if request.sub_compaction else [plan.key_range]
    specs = [
        SubJobSpec(job=job, manifest_number=manifest.number, key_start=format_key(k.start), key_end=format_key(k.end))
        for k in keys
    ]
    return MetaPlan(specs, manifest.number, below, before, max_bytes, plan.l2_lsn, None, is_pending(plan))


def sub_job_records(meta_id: str, planned: MetaPlan, first_index: int = 0) -> list[SubJobRecord]:
    return [
        SubJobRecord(id=sub_job_id(meta_id, first_index + i), meta_id=meta_id, index=first_index + i, spec=spec)
        for i, spec in enumerate(planned.specs)
    ]


def _planned(
    meta: MetaJobRecord, planned: MetaPlan, subs: list[SubJobRecord], at: float, requests: Mapping[str, tuple[int, int]]
) -> MetaJobRecord:
    """``meta`` with the fields a (re-)plan sets; ``requests`` are the object-store requests the
    meta job made since it was last recorded."""
    meta.state = JobState.RUNNING if subs else meta.state
    meta.planned_at = meta.planned_at or at
    meta.sub_jobs = [sub.id for sub in subs]
    meta.planned_on = planned.manifest_number
    meta.below_lsn = planned.below_lsn
    meta.max_job_bytes = planned.max_job_bytes
    meta.l2_lsn = planned.l2_lsn
    meta.skipped = planned.skipped
    meta.pending = planned.pending
    meta.statistics = MetaStatistics(
        meta_job_id=meta.id,
        total_sub_compaction_jobs=len(subs),
        before_compaction_layer_size=planned.before_size,
        below_lsn=planned.below_lsn,
        start_time=(meta.statistics.start_time if meta.statistics else None) or datetime.fromtimestamp(at, UTC),
        s3_requests=meta.statistics.s3_requests if meta.statistics else {},
    )
    add_requests(meta.statistics.s3_requests, requests)
    return meta


def _plan_on_newest(storage: Storage, meta: MetaJobRecord, settings: Settings) -> MetaPlan:
    assert meta.request is not None  # only rejected payloads lack one, and they end at once
    manifest = storage.manifest(meta.tenant_id, meta.timeline_id)
    return plan_meta_job(manifest, meta.request, settings.max_job_bytes, or_whole_layer(storage.row_groups))


def plan(storage: Storage, records: JobRecords, publisher: Publisher, job_id: str, settings: Settings) -> MetaJobRecord:
    """Plan a queued meta job and enqueue all its sub-jobs. A meta job planned already is
    returned as is; one that cannot be planned ends failed with a one-line error."""
    meta = records.require_meta(job_id)
    if meta.state != JobState.QUEUED or meta.planned_at is not None:
        return meta
    try:
        counter = RequestCounter()
        planned = _plan_on_newest(storage.observed_by(counter), meta, settings)
    except (CompactorError, ValidationError, OSError) as err:
        error = f"planning failed: {one_line(err)}"
        log.warning("meta job planning failed job=%s error=%r", job_id, error)
        records.update_meta(job_id, lambda m: _planning_ended(m, error=error))
        return _end_without_sub_jobs(storage, records, publisher, job_id, settings)

    subs = sub_job_records(job_id, planned)
    at = now()
    stored = records.store_plan(job_id, lambda m: _planned(m, planned, subs, at, counter.counts()), subs)
    if stored is None:  # planned meanwhile by a duplicate message, or cancelled
        current = records.require_meta(job_id)
        if current.cancel_requested and current.planned_at is not None and not current.sub_jobs:
            return _end_without_sub_jobs(storage, records, publisher, job_id, settings)
        return current
    log.info(
        "meta job planned job=%s tenant=%s timeline=%s sub_jobs=%d manifest=%d below_lsn=%d max_job_bytes=%d",
        job_id, stored.tenant_id, stored.timeline_id, len(subs), planned.manifest_number, planned.below_lsn,
        planned.max_job_bytes,
    )  # fmt: skip
    if not subs:
        return _end_without_sub_jobs(storage, records, publisher, job_id, settings)
    for sub in subs:
        enqueue_sub(records, publisher, sub)
    return stored


def _replan(
    storage: Storage,
    records: JobRecords,
    publisher: Publisher,
    meta: MetaJobRecord,
    settings: Settings,
    reason: str,
    counter: RequestCounter,
) -> MetaJobRecord | None:
    """Plan a meta job again after its commit met a conflict: a new set of sub-jobs on the newest
    manifest, enqueued at once. None when there is nothing left to do or it cannot be planned."""
    try:
        planned = _plan_on_newest(storage, meta, settings)
    except (CompactorError, ValidationError, OSError) as err:
        log.warning("meta job re-planning failed job=%s error=%r", meta.id, one_line(err))
        return None
    if not planned.specs:
        return None
    subs = sub_job_records(
        meta.id, planned, first_index=max((s.index for s in records.get_subs(meta.sub_jobs)), default=-1) + 1
    )

    def apply(m: MetaJobRecord) -> MetaJobRecord:
        m.replans += 1
        m.conflicts.append(reason)
        return _planned(m, planned, subs, now(), counter.counts())

    stored = records.store_plan(meta.id, apply, subs, replan=True)
    if stored is None:
        return None
    metrics.replanned()
    log.warning(
        "meta job re-planned after a conflict job=%s sub_jobs=%d manifest=%d replans=%d reason=%r",
        meta.id, len(subs), planned.manifest_number, stored.replans, reason,
    )  # fmt: skip
    for sub in subs:
        enqueue_sub(records, publisher, sub)
    return stored


def _planning_ended(
    meta: MetaJobRecord, *, error: str | None = None, skipped: str | None = None
) -> MetaJobRecord | None:
    if meta.planned_at is not None or meta.state != JobState.QUEUED:
        return None
    meta.planned_at = now()
    meta.error = error
    meta.skipped = skipped
    return meta


def _end_without_sub_jobs(
    storage: Storage, records: JobRecords, publisher: Publisher, job_id: str, settings: Settings
) -> MetaJobRecord:
    if records.claim_finalize(job_id):
        return finalize(storage, records, publisher, job_id, settings)
    return records.require_meta(job_id)


# ----------------------------------------------------------------------------- finalize


def summarize(
    meta: MetaJobRecord, subs: list[SubJobRecord]
) -> tuple[JobState, str | None, MetaStatistics, CompactionStatistics]:
    """Final state, error, meta statistics (without the after-size) and merged counters."""
    stats = (meta.statistics or MetaStatistics(meta_job_id=meta.id)).model_copy(deep=True)
    stats.total_sub_compaction_jobs = len(subs)
    stats.succeeded_sub_compaction_jobs = sum(s.state == JobState.SUCCEEDED for s in subs)
    stats.failed_sub_compaction_jobs = sum(s.state == JobState.FAILED for s in subs)
    stats.cancelled_sub_compaction_jobs = sum(s.state == JobState.CANCELLED for s in subs)
    merged = CompactionStatistics()
    for sub in subs:
        if sub.stats is not None:
            merged.merge(sub.stats)
    merged.finalize()

    failed = [s for s in subs if s.state == JobState.FAILED]
    error = meta.error
    if meta.error is not None:
        state = JobState.FAILED
    elif meta.cancel_requested and (stats.cancelled_sub_compaction_jobs or not subs):
        state = JobState.CANCELLED
    elif failed:
        state = JobState.FAILED
        error = f"{len(failed)} of {len(subs)} sub-jobs failed; first: sub-job {failed[0].index}: {failed[0].error}"
    elif stats.cancelled_sub_compaction_jobs:
        state = JobState.CANCELLED
    else:
        state = JobState.SUCCEEDED
    return state, error, stats, merged


def commit_l2_lsn(storage: Storage, meta: MetaJobRecord) -> None:
    """The L2 LSN alone, for a meta job that had nothing to compact below its horizon."""
    target = meta.l2_lsn
    if target is None:
        return

    def update(current: Manifest) -> Manifest | None:
        if current.gc_compaction.last_completed_lsn >= target:
            return None
        return current.successor(
            gc_compaction=GcCompactionState(last_completed_lsn=target), written_by=f"meta job {meta.id}"
        )

    committed = storage.manifests.commit(meta.tenant_id, meta.timeline_id, update)
    if committed is not None:
        log.info("l2 lsn advanced job=%s lsn=%d manifest=%d", meta.id, target, committed.number)


def _commit(
    storage: Storage,
    records: JobRecords,
    publisher: Publisher,
    meta: MetaJobRecord,
    proposal: CommitProposal | None,
    settings: Settings,
    reached: Checkpoint | None,
    counter: RequestCounter,
) -> tuple[MetaJobRecord | None, int | None, str | None]:
    """The meta job's one commit of its sub-jobs' combined ``proposal`` (``storage`` counts its
    requests in ``counter``). Returns ``(re-planned meta job or None, manifest number written,
    error)``."""
    if proposal is None:
        commit_l2_lsn(storage, meta)
        return None, None, None
    try:
        number = commit_meta(storage, proposal, written_by=f"meta job {meta.id}", l2_lsn=meta.l2_lsn, reached=reached)
    except ManifestConflict as err:
        reason = one_line(err)
        if meta.replans < settings.max_replans and not meta.cancel_requested:
            replanned = _replan(storage, records, publisher, meta, settings, reason, counter)
            if replanned is not None:
                return replanned, None, None
        return None, None, f"commit conflict after {meta.replans} re-plans: {reason}"
    except CommitRefused as err:
        return None, None, one_line(err)
    return None, number, None


def finalize(
    storage: Storage,
    records: JobRecords,
    publisher: Publisher,
    job_id: str,
    settings: Settings,
    *,
    reached: Checkpoint | None = None,
) -> MetaJobRecord:
    """Commit and end a meta job whose sub-jobs have all ended (or plan it again after a
    conflict). Repeatable: a meta job that has ended is returned unchanged, and a commit that
    landed already is found again instead of being written twice."""
    meta = records.require_meta(job_id)
    if meta.state.ended:
        return meta
    counter = RequestCounter()
    storage = storage.observed_by(counter)
    subs = records.get_subs(meta.sub_jobs)
    waiting = [s.id for s in subs if not s.state.ended]
    if meta.planned_at is None or waiting or len(subs) != len(meta.sub_jobs):
        # Cannot happen through the finished set; refuse rather than end a job early.
        log.error("finalize refused: not every sub-job has ended job=%s waiting=%s", job_id, waiting[:5])
        return meta
    state, error, stats, merged = summarize(meta, subs)
    parts = [sub.proposal for sub in subs if sub.proposal is not None]
    proposal = CommitProposal.combine(parts) if parts else None
    final = meta.model_copy(deep=True)
    final.state, final.error = state, error
    final.compaction_statistics = merged

    manifest: Manifest | None = None
    try:
        if state == JobState.SUCCEEDED:
            replanned, final.manifest_number, commit_error = _commit(
                storage, records, publisher, meta, proposal, settings, reached, counter
            )
            if replanned is not None:
                return replanned
            if commit_error is not None:
                final.state, final.error = JobState.FAILED, commit_error
        else:
            # Nothing was committed and nothing will be: the uploads are garbage now.
            storage.delete_uploads(proposal.added if proposal is not None else [])
        if meta.planned_at is not None and meta.error is None:
            manifest = storage.manifest(meta.tenant_id, meta.timeline_id)
    except (CompactorError, OSError) as err:
        # The outcome of a commit that failed this way is unknown (its manifest may have
        # landed): the uploads stay for the orphan cleanup, which spares whatever is referenced.
        final.state = JobState.FAILED
        final.error = final.error or f"finalize failed: {one_line(err)}"
        log.warning("meta job finalize failed job=%s error=%r", job_id, one_line(err))
    if final.state != JobState.SUCCEEDED:
        final.l2_lsn = None
    if manifest is not None and stats.below_lsn:
        committed = proposal if final.state == JobState.SUCCEEDED else None
        stats.after_compaction_layer_size = after_compaction_size(manifest, meta, committed, merged)
    stats.finalize()
    add_requests(stats.s3_requests, counter.counts())
    final.statistics = stats
    if manifest is not None:  # not for a timeline that does not exist
        final.stats_object = _write_stats(storage, final)
    final.ended_at = now()

    ended_here = [False]

    def end(m: MetaJobRecord) -> MetaJobRecord | None:
        ended_here[0] = False
        if m.state.ended:
            return None
        # Keep fields written since we read the record (cancel_requested).
        final.cancel_requested = m.cancel_requested
        ended_here[0] = True
        return final

    stored = records.update_meta(job_id, end) or final
    if ended_here[0]:
        metrics.observe_job("meta", stored.state.value, stats.duration_secs)
        kind = meta.request.kind if meta.request is not None else "gc"
        records.clear_inflight(meta.tenant_id, meta.timeline_id, queue_of(kind), job_id)
        records.record_outcome(
            stored, failures_to_open=settings.breaker_failures, cooldown_s=settings.breaker_cooldown_s
        )
        records.deactivate(job_id)
        records.expire_job(stored)
        log_ended = log.info if stored.state == JobState.SUCCEEDED else log.warning
        log_ended(
            "meta job ended job=%s state=%s sub_jobs=%d succeeded=%d failed=%d cancelled=%d manifest=%s "
            "before=%d after=%d retention=%.3f l2_lsn=%s error=%r",
            job_id, stored.state, stats.total_sub_compaction_jobs, stats.succeeded_sub_compaction_jobs,
            stats.failed_sub_compaction_jobs, stats.cancelled_sub_compaction_jobs, stored.manifest_number,
            stats.before_compaction_layer_size, stats.after_compaction_layer_size, stats.retention_ratio,
            stored.l2_lsn, stored.error,
        )  # fmt: skip
    return stored


def after_compaction_size(
    manifest: Manifest, meta: MetaJobRecord, proposal: CommitProposal | None, merged: CompactionStatistics | None
) -> int:
    """Layer bytes below the meta job's ``below_lsn`` once it has ended. A dry run changes no
    layer, so for it this is a projection: the layers its proposal removes go, and what the
    engine would have written comes in. The engine counts that in key-value bytes, uncompressed
    (it writes no file in a dry run), so data that compresses well projects high."""
    size = layer_size_below(manifest, meta.below_lsn)
    if meta.request is None or not meta.request.dry_run or proposal is None or merged is None:
        return size
    removed = sum(manifest.layers[name].size for name in proposal.removed if name in manifest.layers)
    return size - removed + merged.image_produced.size + merged.wal_produced.size


def _write_stats(storage: Storage, meta: MetaJobRecord) -> str | None:
    key = layout.meta_stats_key(meta.tenant_id, meta.timeline_id, meta.id)
    body = {
        "job_id": meta.id,
        "state": meta.state.value,
        "error": meta.error,
        "manifest_number": meta.manifest_number,
        "statistics": None if meta.statistics is None else meta.statistics.model_dump(mode="json"),
        "compaction_statistics": None
        if meta.compaction_statistics is None
        else meta.compaction_statistics.model_dump(mode="json"),
        "l2_lsn": meta.l2_lsn,
    }
    try:
        storage.objects.put_bytes(key, json.dumps(body, indent=1).encode())
    except CompactorError as err:
        log.warning("meta statistics not written job=%s key=%s error=%r", meta.id, key, one_line(err))
        return None
    return key


# ----------------------------------------------------------------------------- cancel


def cancel(records: JobRecords, publisher: Publisher, job_id: str) -> tuple[MetaJobRecord, int]:
    """Request cancellation: waiting sub-jobs end cancelled now, running ones stop at their
    next check and commit nothing. Returns the meta record and how many sub-jobs were
    cancelled here."""
    meta = records.require_meta(job_id)
    if meta.state.ended:
        raise InvalidInput(f"job {job_id} has already ended ({meta.state.value})")

    def request(m: MetaJobRecord) -> MetaJobRecord | None:
        if m.state.ended:
            return None
        m.cancel_requested = True
        if m.planned_at is None:
            m.planned_at = now()
            m.skipped = "cancelled before planning"
        return m

    updated = records.update_meta(job_id, request)
    if updated is None or updated.state.ended:
        raise InvalidInput(f"job {job_id} has already ended")
    cancelled = 0
    for sub in records.get_subs(updated.sub_jobs):
        if attempts.cancel_waiting(records, sub.id) is not None:
            cancelled += 1
            records.mark_finished(job_id, sub.id)
    log.info("meta job cancel requested job=%s waiting_cancelled=%d", job_id, cancelled)
    maybe_finalize(records, publisher, job_id)
    return updated, cancelled


# ----------------------------------------------------------------------------- the tasks' flow


@dataclass
class MetaJobs:
    """The meta-job flow behind the light-queue tasks (``compactor.worker.runtime.tasks.MetaJobFlow``),
    installed by the ``compactor worker`` command."""

    storage: Storage
    records: JobRecords
    publisher: Publisher
    settings: Settings

    def submit(self, payload: dict[str, Any]) -> MetaJobRecord:
        try:
            request = CompactRequest.model_validate(payload)
        except ValidationError as err:
            return reject_payload(self.records, payload, one_line(err))
        meta, _ = create_meta_job(self.records, request)
        return plan(self.storage, self.records, self.publisher, meta.id, self.settings)

    def plan(self, job_id: str) -> MetaJobRecord:
        return plan(self.storage, self.records, self.publisher, job_id, self.settings)

    def finalize(self, job_id: str, storage: Storage, reached: Checkpoint | None) -> MetaJobRecord:
        return finalize(storage, self.records, self.publisher, job_id, self.settings, reached=reached)


# ----------------------------------------------------------------------------- status


def status(records: JobRecords, meta: MetaJobRecord) -> dict[str, Any]:
    """The JSON status of a meta job and its sub-jobs (``job show``, ``compact --wait``)."""
    subs = records.get_subs(meta.sub_jobs)
    return status_of(meta, subs)


def status_of(meta: MetaJobRecord, subs: list[SubJobRecord]) -> dict[str, Any]:
    dumped = meta.model_dump(mode="json")
    out = {"job_id": dumped.pop("id"), **dumped}
    out["sub_jobs"] = [sub.model_dump(mode="json") for sub in subs]
    counts: dict[str, int] = {}
    for sub in subs:
        counts[sub.state.value] = counts.get(sub.state.value, 0) + 1
    out["sub_job_states"] = counts
    out["most_sub_jobs_at_once"] = most_at_once(subs)
    out["progress"] = JobProgress(
        phase=meta.state.value,
        keys=sum(s.progress.keys for s in subs),
        versions_in=sum(s.progress.versions_in for s in subs),
        bytes_in=sum(s.progress.bytes_in for s in subs),
        bytes_out=sum(s.progress.bytes_out for s in subs),
    ).model_dump()
    return out


# ----------------------------------------------------------------------------- inline


def run_inline(storage: Storage, request: CompactRequest, settings: Settings) -> dict[str, Any]:
    """Run a meta job in this process, its sub-jobs one after another, without Redis or Celery
    (``compactor compact --inline``, for debugging): the same plan, cuts, engine and one commit
    as the distributed path (``compactor.worker.runtime.runner.compact``). Returns the final JSON status."""
    job_id = request.job_id or new_job_id()
    request = request.model_copy(update={"job_id": job_id})
    meta = MetaJobRecord(id=job_id, tenant_id=request.tenant_id, timeline_id=request.timeline_id, request=request)
    start = now()
    manifest = storage.manifest(request.tenant_id, request.timeline_id)
    job = request.to_job()
    max_bytes = request.max_job_bytes or settings.max_job_bytes
    below = compact_below_lsn(manifest, job)
    stats = MetaStatistics(
        meta_job_id=job_id,
        before_compaction_layer_size=layer_size_below(manifest, below),
        below_lsn=below,
        start_time=datetime.fromtimestamp(start, UTC),
    )
    meta.planned_at, meta.below_lsn, meta.max_job_bytes = start, below, max_bytes
    with tempfile.TemporaryDirectory(dir=_workroot(settings)) as workdir:
        engine = EngineSettings(target_layer_bytes=settings.target_layer_bytes, workdir=Path(workdir))
        try:
            outcome = compact(
                storage,
                job,
                engine,
                cut=(lambda plan: slices(plan, or_whole_layer(storage.row_groups), max_bytes))
                if request.sub_compaction
                else None,
                max_replans=settings.max_replans,
                written_by=f"inline {job_id}",
            )
        except (CompactorError, OSError) as err:
            meta.state, meta.error = JobState.FAILED, one_line(err)
        else:
            meta.state, meta.skipped = JobState.SUCCEEDED, outcome.skipped
            meta.compaction_statistics, meta.manifest_number = outcome.stats, outcome.manifest_number
            meta.replans, meta.pending = outcome.replans, outcome.pending
            stats.total_sub_compaction_jobs = stats.succeeded_sub_compaction_jobs = outcome.sub_jobs
    after = storage.manifest(request.tenant_id, request.timeline_id)
    meta.l2_lsn = after.gc_compaction.last_completed_lsn if meta.state == JobState.SUCCEEDED else None
    if below:
        proposal = outcome.proposal if meta.state == JobState.SUCCEEDED else None
        stats.after_compaction_layer_size = after_compaction_size(after, meta, proposal, meta.compaction_statistics)
    stats.finalize()
    meta.statistics = stats
    meta.stats_object = _write_stats(storage, meta)
    meta.ended_at = now()
    return status_of(meta, [])


def _workroot(settings: Settings) -> Path:
    root = settings.cache_dir / "work"
    root.mkdir(parents=True, exist_ok=True)
    return root
