"""Sub-job splitting, chaining and the auto-trigger, on hand-built manifests."""

import hashlib
import itertools

from coordinator.split import chain, split_job
from coordinator.trigger import should_trigger
from storage.keys import KEY_MAX, format_key, key_from_int
from storage.layer_name import LayerName
from storage.manifest import GcCompactionState, GcInfo, LayerEntry, Manifest, TimelineSettings
from tests.timelines import CHILD, PARENT, TENANT
from worker.jobs import CompactionJob

MiB = 1024 * 1024


def entry(name: LayerName, size: int) -> LayerEntry:
    key = f"x/{name}"
    return LayerEntry(name=str(name), object_key=key, size=size, sha256=hashlib.sha256(key.encode()).hexdigest())


def manifest(layers: list[tuple[LayerName, int]], cutoff: int = 100, **extra: object) -> Manifest:
    return Manifest(
        tenant_id=TENANT, timeline_id=PARENT, number=0, gc=GcInfo(cutoff=cutoff),
        layers={str(n): entry(n, s) for n, s in layers}, **extra,  # type: ignore[arg-type]
    )  # fmt: skip


def d(k0: int, k1: int, l0: int, l1: int) -> LayerName:
    return LayerName.delta(key_from_int(k0), key_from_int(k1), l0, l1)


def ranges(jobs: list[CompactionJob]) -> list[tuple[int, int]]:
    return [(int(j.key_start, 16), int(j.key_end, 16)) for j in jobs]


def test_small_request_is_one_job_covering_exactly_the_request() -> None:
    m = manifest([(d(0, 100, 10, 20), MiB), (d(0, 100, 20, 30), MiB)])
    job = CompactionJob(tenant_id=TENANT, timeline_id=PARENT, key_start=format_key(key_from_int(10)),
                        key_end=format_key(key_from_int(50)))  # fmt: skip
    assert ranges(split_job(m, job)) == [(10, 50)]
    assert split_job(m, job)[0].lsn_end == 100  # the cutoff, fixed at split time


def test_split_cuts_at_layer_boundaries_by_size() -> None:
    layers = [(d(i * 10, i * 10 + 10, 10, 20), 3 * MiB) for i in range(8)]
    m = manifest(layers)
    jobs = split_job(m, CompactionJob(tenant_id=TENANT, timeline_id=PARENT), max_job_bytes=5 * MiB)
    got = ranges(jobs)
    assert len(got) >= 4
    assert got[0][0] == 0 and got[-1][1] == int(format_key(KEY_MAX), 16)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(got)), "sub-jobs must tile the range"
    assert all(start % 10 == 0 for start, _ in got[1:]), "cuts fall on layer boundaries"


def test_empty_ranges_fold_into_the_previous_job() -> None:
    m = manifest([(d(0, 10, 10, 20), 6 * MiB), (d(50, 60, 10, 20), 6 * MiB)])
    jobs = split_job(m, CompactionJob(tenant_id=TENANT, timeline_id=PARENT), max_job_bytes=5 * MiB)
    got = ranges(jobs)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(got))
    assert len(got) == 2


def test_no_jobs_without_cutoff() -> None:
    m = manifest([(d(0, 10, 10, 20), MiB)], cutoff=0)
    assert split_job(m, CompactionJob(tenant_id=TENANT, timeline_id=PARENT)) == []


def test_straddling_rewrites_are_chained() -> None:
    # [0,30) straddles both sub-jobs' ranges: whichever runs first rewrites it.
    layers = [(d(0, 30, 10, 20), MiB), (d(30, 40, 10, 20), MiB), (d(40, 50, 10, 20), MiB)]
    m = manifest(layers)

    def mk(a, b):
        return CompactionJob(
            tenant_id=TENANT,
            timeline_id=PARENT,
            key_start=format_key(key_from_int(a)),
            key_end=format_key(key_from_int(b)),
        )

    jobs = [mk(0, 15), mk(15, 40), mk(40, 60)]
    assert chain(m, jobs) == [[0, 1], [2]]


def test_trigger_rules() -> None:
    big = 6 * 1024**3
    m = manifest([(d(0, 10, 10, 20), big)], cutoff=30)
    assert should_trigger(m, job_in_flight=False).trigger  # initial threshold 5 GiB
    assert not should_trigger(m, job_in_flight=True).trigger
    assert not should_trigger(manifest([(d(0, 10, 10, 20), MiB)], cutoff=30), job_in_flight=False).trigger
    off = manifest([(d(0, 10, 10, 20), big)], cutoff=30, settings=TimelineSettings(gc_compaction_enabled=False))
    assert not should_trigger(off, job_in_flight=False).trigger
    assert not should_trigger(manifest([(d(0, 10, 10, 20), big)], cutoff=0), job_in_flight=False).trigger
    # ratio: L2 below last completed LSN, L1 above it
    l2 = manifest([(d(0, 10, 10, 20), 10 * MiB), (d(0, 10, 20, 30), 9 * MiB)], cutoff=40,
                  gc_compaction=GcCompactionState(last_completed_lsn=15))  # fmt: skip
    assert not should_trigger(l2, job_in_flight=False).trigger
    l2b = manifest([(d(0, 10, 10, 20), 10 * MiB), (d(0, 10, 20, 30), 10 * MiB)], cutoff=40,
                   gc_compaction=GcCompactionState(last_completed_lsn=15))  # fmt: skip
    assert should_trigger(l2b, job_in_flight=False).trigger
    huge = manifest([(d(0, 10, 10, 20), 151 * 1024**3)], cutoff=30)
    assert not should_trigger(huge, job_in_flight=False).trigger
    from storage.manifest import Ancestor

    child = manifest([(d(0, 10, 10, 20), big)], cutoff=30, ancestor=Ancestor(timeline_id=CHILD, lsn=5))
    assert not should_trigger(child, job_in_flight=False).trigger


def test_cuts_never_fall_inside_an_image_layer() -> None:
    layers = [(d(i * 10, i * 10 + 10, 10, 20), 3 * MiB) for i in range(8)]
    images = [
        (LayerName.image(key_from_int(0), key_from_int(35), 5), 3 * MiB),
        (LayerName.image(key_from_int(35), key_from_int(80), 5), 3 * MiB),
    ]
    m = manifest(layers + images)
    got = ranges(split_job(m, CompactionJob(tenant_id=TENANT, timeline_id=PARENT), max_job_bytes=5 * MiB))
    cuts = [start for start, _ in got[1:]]
    assert cuts and all(not (0 < c < 35 or 35 < c < 80) for c in cuts), cuts
