"""Run one gc-compaction job to the end: plan on the newest manifest, compact, commit, and
re-plan a bounded number of times when a concurrent commit invalidates the result.

Used inline by ``compactor compact --inline`` and by the Celery task, which adds the job record,
the node lock and heartbeats around it.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass

from storage.errors import ManifestConflict
from storage.manifest import LayerEntry
from storage.timeline import Storage
from worker.commit import commit
from worker.engine import EngineSettings, Hooks, run
from worker.jobs import CommitProposal, CompactionJob
from worker.plan import plan_job
from worker.statistics import CompactionStatistics

log = logging.getLogger(__name__)


@dataclass
class JobOutcome:
    skipped: str | None  # why nothing was done, if so
    stats: CompactionStatistics | None
    proposal: CommitProposal | None
    manifest_number: int | None  # the manifest the commit wrote, if any
    replans: int = 0


def compact(
    storage: Storage,
    job: CompactionJob,
    settings: EngineSettings,
    hooks: Hooks | None = None,
    *,
    max_replans: int = 3,
    before_commit: Callable[[], None] | None = None,
    written_by: str = "inline",
) -> JobOutcome:
    for attempt in range(max_replans + 1):
        manifest = storage.manifest(job.tenant_id, job.timeline_id)
        plan = plan_job(manifest, job)
        if isinstance(plan, str):
            log.info("gc-compaction skipped tenant=%s timeline=%s reason=%r", job.tenant_id, job.timeline_id, plan)
            return JobOutcome(plan, None, None, None, attempt)
        result = run(plan, storage, settings, hooks)
        try:
            if before_commit is not None:
                before_commit()
        except BaseException:
            storage.delete_uploads(result.produced)  # nothing was written: the uploads are ours alone
            raise
        try:
            committed = commit(storage.manifests, result.proposal, written_by)
        except ManifestConflict as err:
            # Raised before our manifest was written (validation, lost races): nothing refers
            # to the uploads.
            storage.delete_uploads(result.produced)
            if attempt == max_replans:
                raise ManifestConflict(f"gave up after {attempt + 1} attempts: {err}") from None
            log.warning(
                "gc-compaction conflict, re-planning tenant=%s timeline=%s attempt=%d reason=%r",
                job.tenant_id, job.timeline_id, attempt + 1, str(err),
            )  # fmt: skip
            continue
        except BaseException as err:
            # Found by the fault suite: any other failure here may come after the manifest was
            # written (the PUT landed but its answer was lost and the retries failed, or the
            # boundary read after the PUT failed). Deleting the uploads then lost layers the
            # newest manifest references. Keep them: if the manifest landed, the commit stands;
            # if not (or if a PUT still in flight lands later), unreferenced uploads are left to
            # the orphan cleanup, which only deletes what no manifest references.
            number = _landed_manifest(storage, job, result.produced)
            if number is None:
                log.warning(
                    "gc-compaction commit outcome unknown, uploads kept for orphan cleanup tenant=%s timeline=%s "
                    "uploads=%d error=%r",
                    job.tenant_id, job.timeline_id, len(result.produced), f"{type(err).__name__}: {err}",
                )  # fmt: skip
                raise
            log.warning(
                "gc-compaction commit reported an error but landed tenant=%s timeline=%s manifest=%d error=%r",
                job.tenant_id, job.timeline_id, number, f"{type(err).__name__}: {err}",
            )  # fmt: skip
            return JobOutcome(None, result.stats, result.proposal, number, attempt)
        return JobOutcome(None, result.stats, result.proposal, committed.number if committed else None, attempt)
    raise AssertionError("unreachable")


def _landed_manifest(storage: Storage, job: CompactionJob, produced: list[LayerEntry]) -> int | None:
    """The number of the newest manifest if it references any of ``produced`` (our commit
    landed), else None (not landed, or the store cannot tell us now)."""
    if not produced:
        return None
    try:
        newest = storage.manifest(job.tenant_id, job.timeline_id)
    except Exception as err:
        log.warning("cannot check whether a commit landed error=%r", f"{type(err).__name__}: {err}")
        return None
    ours = {entry.object_key for entry in produced}
    if any(entry.object_key in ours for entry in newest.layers.values()):
        return newest.number
    return None
