"""Splitting a meta job into key-range sub-jobs (the seed's ``gc_compaction_split_jobs``), and
ordering them so sub-jobs that would rewrite a layer another one reads never run at once."""

from storage.keys import KeyRange, format_key
from storage.lsn import LSN_MAX
from storage.manifest import Manifest
from worker.jobs import CompactionJob
from worker.plan import JobPlan, plan_job

DEFAULT_MAX_JOB_BYTES = 4 * 1024**3


def compact_below_lsn(manifest: Manifest, job: CompactionJob) -> int:
    return job.lsn_end if job.lsn_end != LSN_MAX else manifest.gc.cutoff


def split_job(
    manifest: Manifest, job: CompactionJob, max_job_bytes: int = DEFAULT_MAX_JOB_BYTES
) -> list[CompactionJob]:
    """Cut ``job`` into sub-jobs of about ``max_job_bytes`` of overlapping layers each.

    Candidate cut points are the layer key boundaries inside the requested range. A sub-job grows
    until its layers pass the limit, then extends to the end of its first layer so it holds at
    least one whole layer; ranges with no layers are folded into the previous sub-job. Every
    sub-job ends inside the requested range, so a request under the limit is one sub-job covering
    exactly that range (where the seed could extend it past the requested end).
    """
    below = compact_below_lsn(manifest, job)
    if below == 0:
        return []
    request = job.key_range
    layers = [e for e in manifest.layers.values() if e.layer.lsn_start <= below]
    # Cutting through an image layer would leave it only partly covered by each sub-job, and the
    # seed keeps such layers whole: they would survive the meta job as garbage. Cut only where no
    # image layer is cut (deltas cut in two are rewritten into pieces, which is safe).
    images = [e.layer.key_range for e in layers if not e.layer.is_delta]
    bounds = sorted(
        {
            k
            for e in layers
            for k in e.layer.key_range
            if request.start < k < request.end and not any(r.start < k < r.end for r in images)
        }
        | {request.end}
    )
    jobs: list[CompactionJob] = []
    start = request.start
    for index, end in enumerate(bounds):
        if start >= end:
            continue
        overlapping = [e for e in layers if e.layer.key_range.overlaps(KeyRange(start, end))]
        total = sum(e.size for e in overlapping)
        last = index == len(bounds) - 1
        if total <= max_job_bytes and not last:
            continue
        cut = end if last else min(max(min(e.layer.key_range.end for e in overlapping), end), request.end)
        if total == 0 and jobs:
            jobs[-1] = jobs[-1].model_copy(update={"key_end": format_key(cut)})
        else:
            jobs.append(
                job.model_copy(update={"key_start": format_key(start), "key_end": format_key(cut), "lsn_end": below})
            )
        start = cut
    return jobs


def chain(manifest: Manifest, jobs: list[CompactionJob]) -> list[list[int]]:
    """Group sub-jobs (by index) into chains that must run one after another.

    Two sub-jobs conflict when one rewrites a delta layer (it straddles its key range) that the
    other also reads. Conflicting sub-jobs share a chain, run in key order; chains run in parallel.
    """
    parent = list(range(len(jobs)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    plans: list[JobPlan | None] = [p if isinstance(p := plan_job(manifest, j), JobPlan) else None for j in jobs]
    readers: dict[str, list[int]] = {}
    for i, plan in enumerate(plans):
        for entry in plan.selected if plan else []:
            readers.setdefault(entry.name, []).append(i)
    for i, plan in enumerate(plans):
        for entry in plan.rewrite if plan else []:
            for j in readers.get(entry.name, []):
                parent[find(j)] = find(i)
    groups: dict[int, list[int]] = {}
    for i in range(len(jobs)):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values())
