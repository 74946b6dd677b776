"""Run one gc-compaction job to the end: plan on the newest manifest, compact, commit, and
re-plan a bounded number of times when a concurrent commit invalidates the result.

Used inline by ``compactor compact --inline`` and by the Celery task, which adds the job record,
the node lock and heartbeats around it.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass

from storage.errors import ManifestConflict
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
            committed = commit(storage.manifests, result.proposal, written_by)
        except ManifestConflict as err:
            storage.delete_uploads(result.produced)
            if attempt == max_replans:
                raise ManifestConflict(f"gave up after {attempt + 1} attempts: {err}") from None
            log.warning(
                "gc-compaction conflict, re-planning tenant=%s timeline=%s attempt=%d reason=%r",
                job.tenant_id, job.timeline_id, attempt + 1, str(err),
            )  # fmt: skip
            continue
        except BaseException:
            storage.delete_uploads(result.produced)
            raise
        return JobOutcome(None, result.stats, result.proposal, committed.number if committed else None, attempt)
    raise AssertionError("unreachable")
