"""Cutting meta jobs into sub-job slices, and the auto-trigger, on hand-built manifests."""

import itertools

import xxhash

from compactor.coordinator.jobs.split import RowGroups, slices
from compactor.coordinator.jobs.trigger import should_trigger
from compactor.storage.keys import KEY_MAX, KeyRange, format_key, key_from_int, key_to_int
from compactor.storage.layer_file import RowGroup
from compactor.storage.layer_name import LayerName
from compactor.storage.manifest import GcCompactionState, GcInfo, LayerEntry, Manifest, TimelineSettings
from compactor.worker.engine.jobs import CompactionJob
from compactor.worker.engine.plan import JobPlan, plan_job
from tests.timelines import CHILD, PARENT, TENANT

MiB = 1024 * 1024


def entry(name: LayerName, size: int) -> LayerEntry:
    key = f"x/{name}"
    return LayerEntry(name=str(name), object_key=key, size=size, xxh3_128=xxhash.xxh3_128(key.encode()).hexdigest())


def manifest(layers: list[tuple[LayerName, int]], cutoff: int = 100, **extra: object) -> Manifest:
    return Manifest(
        tenant_id=TENANT, timeline_id=PARENT, number=0, gc=GcInfo(cutoff=cutoff),
        layers={str(n): entry(n, s) for n, s in layers}, **extra,  # type: ignore[arg-type]
    )  # fmt: skip


def d(k0: int, k1: int, l0: int, l1: int) -> LayerName:
    return LayerName.delta(key_from_int(k0), key_from_int(k1), l0, l1)


def row_groups(groups_per_layer: int = 1) -> RowGroups:
    """A footer index for hand-built layers: ``groups_per_layer`` equal groups over its keys."""

    def index(e: LayerEntry) -> list[RowGroup]:
        lo, hi = key_to_int(e.layer.key_range.start), key_to_int(e.layer.key_range.end)
        step = max(1, (hi - lo) // groups_per_layer)
        starts = list(range(lo, hi, step))
        return [
            RowGroup(key_from_int(a), key_from_int(min(a + step, hi) - 1), 1, e.size // len(starts)) for a in starts
        ]

    return index


def plan_of(m: Manifest, a: int | None = None, b: int | None = None) -> JobPlan:
    keys = (
        {}
        if a is None or b is None
        else {"key_start": format_key(key_from_int(a)), "key_end": format_key(key_from_int(b))}
    )
    plan = plan_job(m, CompactionJob(tenant_id=TENANT, timeline_id=PARENT, **keys))
    assert isinstance(plan, JobPlan)
    return plan


def ranges(keys: list[KeyRange]) -> list[tuple[int, int]]:
    return [(key_to_int(k.start), key_to_int(k.end)) for k in keys]


def test_small_request_is_one_slice_covering_exactly_the_request() -> None:
    m = manifest([(d(0, 100, 10, 20), MiB), (d(0, 100, 20, 30), MiB)])
    assert ranges(slices(plan_of(m, 10, 50), row_groups(), max_job_bytes=4 * 1024**3)) == [(10, 50)]


def test_slices_tile_the_range_and_balance_bytes_across_independent_cuts() -> None:
    # Delta bands and an image layer each cut at their own keys: no key is a boundary of all.
    layers = [(d(i * 10, i * 10 + 10, 10, 20), 3 * MiB) for i in range(8)]
    layers += [(d(i * 13 + 3, i * 13 + 16, 20, 30), 2 * MiB) for i in range(6)]
    layers += [(LayerName.image(key_from_int(0), key_from_int(80), 5), 8 * MiB)]
    m = manifest(layers)
    got = ranges(slices(plan_of(m), row_groups(4), max_job_bytes=6 * MiB))
    total = 8 * 3 + 6 * 2 + 8
    assert len(got) == -(-total // 6)
    assert got[0][0] == 0 and got[-1][1] == key_to_int(KEY_MAX)
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in itertools.pairwise(got)), "slices must tile the range"


def test_cuts_fall_anywhere_between_keys_inside_a_big_layer() -> None:
    m = manifest([(d(0, 1000, 10, 20), 40 * MiB)])
    got = ranges(slices(plan_of(m), row_groups(10), max_job_bytes=10 * MiB))
    assert [start for start, _ in got[1:]] == [250, 500, 750]


def test_a_cut_moves_to_a_nearby_key_no_layer_spans() -> None:
    # Balanced cuts would fall at 500; 480 is a boundary of every layer there, 300 is too far.
    layers = [(d(0, 480, 10, 20), 48 * MiB), (d(480, 1000, 10, 20), 52 * MiB), (d(0, 300, 20, 30), 0)]
    m = manifest(layers)
    assert [s for s, _ in ranges(slices(plan_of(m), row_groups(10), max_job_bytes=50 * MiB))[1:]] == [480]
    far = manifest([(d(0, 300, 10, 20), 30 * MiB), (d(300, 1000, 10, 20), 70 * MiB)])
    assert [s for s, _ in ranges(slices(plan_of(far), row_groups(10), max_job_bytes=50 * MiB))[1:]] == [500]


def test_nothing_to_plan_without_cutoff() -> None:
    m = manifest([(d(0, 10, 10, 20), MiB)], cutoff=0)
    assert isinstance(plan_job(m, CompactionJob(tenant_id=TENANT, timeline_id=PARENT)), str)


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
    from compactor.storage.manifest import Ancestor

    child = manifest([(d(0, 10, 10, 20), big)], cutoff=30, ancestor=Ancestor(timeline_id=CHILD, lsn=5))
    assert not should_trigger(child, job_in_flight=False).trigger


def test_l0_first_then_images_then_gc() -> None:
    from compactor.coordinator.jobs.trigger import decide
    from compactor.storage.keys import KEY_MIN

    def l0(lo: int, hi: int) -> LayerName:
        return LayerName.delta(KEY_MIN, KEY_MAX, lo, hi)

    big = 6 * 1024**3
    all_kinds = ("l0", "image", "gc")
    gc_due = [(d(0, 10, 10, 20), big)]
    stack = [(l0(20 + 10 * i, 30 + 10 * i), MiB) for i in range(3)]
    settings = TimelineSettings(compaction_threshold=3)
    m = manifest(gc_due + stack, cutoff=30, settings=settings)
    decision = decide(m, kinds=all_kinds)
    assert decision.trigger and decision.kind == "l0", "L0 first: gc-compaction yields"
    assert not decide(m, busy={"l0"}, kinds=all_kinds).trigger, "gc-compaction yields to the L0 job in flight"
    decision = decide(m, busy={"gc"}, kinds=all_kinds)
    assert decision.kind == "l0", "L0 compaction starts beside a gc-compaction in flight, not behind it"
    assert not decide(m, busy={"gc", "l0"}, kinds=all_kinds).trigger
    assert decide(m).kind == "gc", "only gc enabled: gc as before"
    # Below the threshold: three deltas stacked with no image under them make an image due.
    m = manifest(gc_due + stack[:2], cutoff=30, settings=settings)
    decision = decide(m, kinds=all_kinds)
    assert decision.trigger and decision.kind == "image"
    image = LayerName.image(KEY_MIN, KEY_MAX, 39)
    m = manifest([*gc_due, *stack[:2], (image, MiB)], cutoff=30, settings=settings)
    decision = decide(m, kinds=all_kinds)
    assert decision.trigger and decision.kind == "gc"
    assert not decide(m, kinds=("l0", "image")).trigger


def test_l0_and_image_follow_their_own_rules_on_children_and_with_gc_disabled() -> None:
    """gc-compaction's guards (disabled, child timeline, no cutoff) are gc's alone: L0 compaction
    and image creation still run where they are due; whatever order the kinds are listed in."""
    from compactor.coordinator.jobs.trigger import decide
    from compactor.storage.keys import KEY_MIN
    from compactor.storage.manifest import Ancestor

    def l0(lo: int, hi: int) -> LayerName:
        return LayerName.delta(KEY_MIN, KEY_MAX, lo, hi)

    stack = [(l0(20 + 10 * i, 30 + 10 * i), MiB) for i in range(3)]
    settings = TimelineSettings(compaction_threshold=3, gc_compaction_enabled=False)
    child = Ancestor(timeline_id=CHILD, lsn=5)
    for kinds in (("l0", "image", "gc"), ("gc", "image", "l0")):
        for extra in ({"settings": settings}, {"ancestor": child, "settings": settings}):
            m = manifest(stack, cutoff=0, **extra)
            assert decide(m, kinds=kinds).kind == "l0"
            m = manifest([*stack[:2], (d(0, 10, 5, 15), MiB)], cutoff=0, **extra)
            decision = decide(m, kinds=kinds)
            assert decision.trigger and decision.kind == "image", decision.reason
            m = manifest([(d(0, 10, 5, 15), MiB)], cutoff=0, **extra)
            assert not decide(m, kinds=kinds).trigger


def test_gc_yields_only_to_l0_compaction_that_is_due_and_auto_triggered() -> None:
    """The seed's YieldForL0: gc-compaction waits while the L0 deltas reach the threshold and L0
    compaction is one of the auto-triggered kinds; below the threshold, or with L0 compaction
    left to the operator, it runs by its own trigger (yielding then would starve it)."""
    from compactor.coordinator.jobs.trigger import decide
    from compactor.storage.keys import KEY_MIN

    def l0(lo: int, hi: int) -> LayerName:
        return LayerName.delta(KEY_MIN, KEY_MAX, lo, hi)

    big = 6 * 1024**3
    settings = TimelineSettings(compaction_threshold=2, image_creation_threshold=10)
    gc_due = [(d(0, 10, 10, 20), big)]
    two = [(l0(20, 30), MiB), (l0(30, 40), MiB)]
    m = manifest(gc_due + two, cutoff=30, settings=settings)
    assert decide(m, kinds=("l0", "gc")).kind == "l0"
    assert decide(m, kinds=("image", "gc")).kind == "gc"
    m = manifest(gc_due + two[:1], cutoff=30, settings=settings)
    assert decide(m, kinds=("l0", "image", "gc")).kind == "gc"
    # A gap in the L0s' LSNs does not hide an L0 from the count (the seed counts every L0).
    gap = [(l0(20, 30), MiB), (l0(35, 40), MiB)]
    m = manifest(gc_due + gap, cutoff=30, settings=settings)
    assert decide(m, kinds=("l0", "image", "gc")).kind == "l0"
