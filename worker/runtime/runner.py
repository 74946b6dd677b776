"""Compaction in one process: one sub-job (the meta job's plan restricted to its slice, no
commit), the meta job's one commit, and a whole meta job end to end.

The Celery tasks call ``run_sub_job`` and ``commit_meta`` with the job records, the node lock and
heartbeats around them; ``compact`` runs a whole meta job here, sub-jobs one after another
(``compactor compact --inline``, tests), through the same two steps.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass

from compactor.storage.errors import ManifestConflict, one_line
from compactor.storage.keys import KeyRange
from compactor.storage.timeline import Checkpoint, Storage
from compactor.worker.engine.commit import CommitRefused, commit
from compactor.worker.engine.jobs import CommitProposal, CompactionJob, SubJobSpec
from compactor.worker.engine.kinds import Plan, is_pending, plan_any, run_any
from compactor.worker.engine.run import EngineSettings, Hooks
from compactor.worker.engine.statistics import CompactionStatistics

log = logging.getLogger(__name__)


@dataclass
class SubJobOutcome:
    skipped: str | None  # why nothing was done, if so
    stats: CompactionStatistics | None
    proposal: CommitProposal | None  # this sub-job's part of the meta job's commit


def run_sub_job(
    storage: Storage, spec: SubJobSpec, settings: EngineSettings, hooks: Hooks | None = None
) -> SubJobOutcome:
    """Compact the sub-job's keys on the manifest its meta job was planned on and upload the
    outputs; commit nothing."""
    job = spec.job
    manifest = storage.manifests.load(job.tenant_id, job.timeline_id, spec.manifest_number)
    plan = plan_any(manifest, job)
    if isinstance(plan, str):
        return SubJobOutcome(plan, None, None)
    result = run_any(plan.restrict(spec.key_range), storage, settings, hooks)
    return SubJobOutcome(None, result.stats, result.proposal)


def commit_meta(
    storage: Storage,
    proposal: CommitProposal,
    *,
    written_by: str,
    l2_lsn: int | None = None,
    reached: Checkpoint | None = None,
) -> int | None:
    """Commit a meta job's combined proposal; returns the number of the manifest that holds it
    (None when it changes nothing).

    When the proposal no longer applies (``ManifestConflict``) or would break the layer map
    (``CommitRefused``), its uploads are deleted and the error propagates, unless the commit had
    landed after all (a repeated finalize, or a PUT whose answer was lost): then that manifest's
    number is returned. Any other failure may come after the manifest was written, so the
    uploads are kept: orphan cleanup deletes them if no manifest references them. ``reached``
    is told of ``before_commit`` and, once the manifest is written, ``in_commit``.
    """
    uploads = proposal.added
    try:
        if reached is not None:
            reached("before_commit")
    except BaseException:
        storage.delete_uploads(uploads)  # nothing was written: the uploads are ours alone
        raise
    try:
        committed = commit(storage.manifests, proposal, written_by, l2_lsn=l2_lsn)
        if reached is not None and committed is not None:
            reached("in_commit")
    except (ManifestConflict, CommitRefused):
        number = _landed_manifest(storage, proposal)
        if number is not None:
            log.info("commit had landed already job=%s manifest=%d", written_by, number)
            return number
        storage.delete_uploads(uploads)
        raise
    except BaseException as err:
        number = _landed_manifest(storage, proposal)
        if number is None:
            log.warning(
                "commit outcome unknown, uploads kept for orphan cleanup tenant=%s timeline=%s uploads=%d error=%r",
                proposal.job.tenant_id, proposal.job.timeline_id, len(uploads), one_line(err),
            )  # fmt: skip
            raise
        log.warning(
            "commit reported an error but landed tenant=%s timeline=%s manifest=%d error=%r",
            proposal.job.tenant_id, proposal.job.timeline_id, number, one_line(err),
        )  # fmt: skip
        return number
    return committed.number if committed is not None else None


def _landed_manifest(storage: Storage, proposal: CommitProposal) -> int | None:
    """The number of the newest manifest if it references any upload of ``proposal`` (the
    commit landed), else None (not landed, or the store cannot tell us now)."""
    if not proposal.added:
        return None
    job = proposal.job
    try:
        newest = storage.manifest(job.tenant_id, job.timeline_id)
    except Exception as err:
        log.warning("cannot check whether a commit landed error=%r", one_line(err))
        return None
    ours = {entry.object_key for entry in proposal.added}
    if any(entry.object_key in ours for entry in newest.layers.values()):
        return newest.number
    return None


@dataclass
class JobOutcome:
    skipped: str | None  # why nothing was done, if so
    stats: CompactionStatistics | None  # every sub-job's counters, merged
    proposal: CommitProposal | None
    manifest_number: int | None  # the manifest the commit wrote, if any
    replans: int = 0
    sub_jobs: int = 0
    pending: bool = False  # work of the kind is left for another job (the seed's Pending)


Cutter = Callable[[Plan], list[KeyRange]]
"""Cuts a meta job's plan into the key slices of its sub-jobs."""


def compact(
    storage: Storage,
    job: CompactionJob,
    settings: EngineSettings,
    hooks: Hooks | None = None,
    *,
    cut: Cutter | None = None,
    max_replans: int = 3,
    written_by: str = "inline",
) -> JobOutcome:
    """Run the meta job ``job`` in this process: plan on the newest manifest, run its sub-jobs
    (the slices ``cut`` gives, or one over the whole range) one after another, commit once, and
    plan again up to ``max_replans`` times when a concurrent commit got in the way."""
    for attempt in range(max_replans + 1):
        manifest = storage.manifest(job.tenant_id, job.timeline_id)
        plan = plan_any(manifest, job)
        if isinstance(plan, str):
            log.info("compaction skipped kind=%s tenant=%s timeline=%s reason=%r",
                     job.kind, job.tenant_id, job.timeline_id, plan)  # fmt: skip
            return JobOutcome(plan, None, None, None, attempt)
        slices = cut(plan) if cut is not None else [plan.key_range]
        parts: list[CommitProposal] = []
        stats = CompactionStatistics()
        try:
            for keys in slices:
                result = run_any(plan.restrict(keys), storage, settings, hooks)
                parts.append(result.proposal)
                stats.merge(result.stats)
        except BaseException:
            storage.delete_uploads([entry for part in parts for entry in part.added])
            raise
        stats.finalize()
        proposal = CommitProposal.combine(parts)
        try:
            number = commit_meta(storage, proposal, written_by=written_by, l2_lsn=plan.l2_lsn)
        except ManifestConflict as err:
            if attempt == max_replans:
                raise ManifestConflict(f"gave up after {attempt + 1} attempts: {err}") from None
            log.warning(
                "compaction conflict, re-planning tenant=%s timeline=%s attempt=%d reason=%r",
                job.tenant_id, job.timeline_id, attempt + 1, str(err),
            )  # fmt: skip
            continue
        return JobOutcome(None, stats, proposal, number, attempt, len(slices), is_pending(plan))
    raise AssertionError("unreachable")
