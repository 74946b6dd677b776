"""L0 compaction and image-layer creation on in-memory layers: the seed's rules one by one, and
random orders of l0, image and gc jobs cut into random sub-jobs, with reads checked after each."""

import itertools
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from compactor.storage.keys import KEY_MAX, KEY_MIN, KeyRange, key_from_int, key_to_int
from compactor.storage.layer_file import READ_BATCH_BYTES
from compactor.storage.layer_map import check_valid_layermap
from compactor.storage.manifest import Manifest
from compactor.worker.engine.commit import apply, validate
from compactor.worker.engine.image import ImagePlan
from compactor.worker.engine.jobs import CommitProposal, CompactionJob, JobKind
from compactor.worker.engine.kinds import plan_any, run_any
from compactor.worker.engine.l0 import L0Plan
from compactor.worker.engine.merge import READ_AHEAD_BYTES
from compactor.worker.engine.run import CompactionFailed, EngineSettings
from tests.engine_memory import MemoryIO
from tests.test_engine import gc_setup, must_survive
from tests.timelines import CHILD, PARENT, TENANT, Layer, Timeline, Value, record, timelines

L0_KEYS = (0, key_to_int(KEY_MAX))
N_KEYS = 9


def job(kind: JobKind, force: bool = False, timeline_id: str = PARENT) -> CompactionJob:
    return CompactionJob(tenant_id=TENANT, timeline_id=timeline_id, kind=kind, force=force)


def load(tls: dict[str, Timeline], **settings: int) -> MemoryIO:
    io = MemoryIO()
    io.load(tls)
    for tl_id, manifest in io.manifests.items():
        io.manifests[tl_id] = manifest.model_copy(update={"settings": manifest.settings.model_copy(update=settings)})
    return io


def every_read(io: MemoryIO, manifest: Manifest, top: int, n_keys: int = N_KEYS) -> dict[int, dict[int, bytes | type]]:
    return {lsn: io.read_keys(manifest, lsn, n_keys) for lsn in range(top + 2)}


def compact(
    io: MemoryIO, job: CompactionJob, workdir: Path, cuts: list[int] | None = None
) -> tuple[Manifest, L0Plan | ImagePlan | object]:
    """Plan ``job`` once, run one sub-job per slice between ``cuts`` (key numbers), commit once
    in memory. Returns the new manifest and the plan (or the reason it was skipped)."""
    manifest = io.manifests[job.timeline_id]
    plan = plan_any(manifest, job)
    if isinstance(plan, str):
        return manifest, plan
    points = [key_from_int(c) for c in cuts or []]
    if isinstance(plan, ImagePlan):
        points = [p for p in points if p in plan.cut_points]
    bounds = [plan.key_range.start, *points, plan.key_range.end]
    engine = EngineSettings(target_layer_bytes=1 << 20, workdir=workdir)
    parts = [
        run_any(plan.restrict(KeyRange(a, b)), io, engine).proposal for a, b in itertools.pairwise(bounds) if a < b
    ]
    proposal = CommitProposal.combine(parts)
    if not proposal.changes_nothing:
        validate(proposal, manifest)
    new = apply(proposal, manifest, "test") or manifest
    assert check_valid_layermap(new.layer_names()) is None
    io.manifests[job.timeline_id] = new
    return new, plan


def l0(lsns: tuple[int, int], values: dict[int, list[Value]]) -> Layer:
    return Layer("delta", L0_KEYS, lsns, values)


def appends(key: int, lsns: range, size: int = 1) -> list[Value]:
    return [Value(lsns[0], image=b"base")] + [Value(lsn, record=record(bytes([65 + key]) * size)) for lsn in lsns[1:]]


def stack(count: int, start: int = 10, width: int = 10) -> list[Layer]:
    """``count`` contiguous L0s, each touching keys 1 and 5 (key 1 starts with an image)."""
    layers = []
    for i in range(count):
        lo = start + i * width
        values = {5: [Value(lo + 1, image=f"v{i}".encode())]}
        values[1] = [Value(lo + 2, image=b"x")] if i == 0 else [Value(lo + 2, record=record(b"+"))]
        layers.append(l0((lo, lo + width), values))
    return layers


# ----------------------------------------------------------------------------- L0 rules


def test_a_merge_of_many_layers_reads_small_batches_and_of_few_large_ones(tmp_path: Path) -> None:
    """The merge holds a batch or two of every input: what it reads ahead stays about
    ``READ_AHEAD_BYTES`` however many L0s there are, and few inputs get batches of 4 MiB."""
    many = load({PARENT: Timeline(PARENT, stack(30))}, compaction_threshold=2)
    compact(many, job("l0"), tmp_path)
    assert len(many.batch_bytes) == 30 and set(many.batch_bytes.values()) == {READ_BATCH_BYTES}
    few = load({PARENT: Timeline(PARENT, stack(3))}, compaction_threshold=2)
    compact(few, job("l0"), tmp_path)
    assert len(few.batch_bytes) == 3 and set(few.batch_bytes.values()) == {4 * READ_BATCH_BYTES}
    eight = load({PARENT: Timeline(PARENT, stack(8))}, compaction_threshold=2)
    compact(eight, job("l0"), tmp_path)
    assert set(eight.batch_bytes.values()) == {READ_AHEAD_BYTES // 8}


def test_below_threshold_nothing_unless_forced(tmp_path: Path) -> None:
    io = load({PARENT: Timeline(PARENT, stack(3))}, compaction_threshold=4)
    before = io.manifests[PARENT]
    new, plan = compact(io, job("l0"), tmp_path)
    assert plan == "3 L0 deltas, below compaction_threshold 4" and new == before
    reads = every_read(io, before, 50)
    new, plan = compact(io, job("l0", force=True), tmp_path)
    assert isinstance(plan, L0Plan) and not plan.pending
    assert not [n for n in new.layer_names() if n.is_l0]
    assert every_read(io, new, 50) == reads


def test_no_l0_cannot_be_forced(tmp_path: Path) -> None:
    io = load({PARENT: Timeline(PARENT, [Layer("delta", (0, 4), (10, 20), {1: [Value(11, image=b"a")]})])})
    assert compact(io, job("l0", force=True), tmp_path)[1] == "no L0 deltas: nothing to compact"


def test_gap_ends_the_run(tmp_path: Path) -> None:
    layers = stack(2) + stack(2, start=50)
    io = load({PARENT: Timeline(PARENT, layers)}, compaction_threshold=2)
    reads = every_read(io, io.manifests[PARENT], 70)
    new, plan = compact(io, job("l0"), tmp_path)
    assert isinstance(plan, L0Plan) and plan.lsn_range == (10, 30) and not plan.pending
    assert sorted(n.lsn_range for n in new.layer_names() if n.is_l0) == [(50, 60), (60, 70)]
    assert {n.lsn_range for n in new.layer_names() if not n.is_l0} == {(10, 30)}
    assert every_read(io, new, 70) == reads


def test_byte_bound_leaves_the_rest_pending(tmp_path: Path) -> None:
    io = load({PARENT: Timeline(PARENT, stack(5))}, compaction_threshold=2, compaction_upper_limit=2)
    manifest = io.manifests[PARENT]
    # 2 x max(checkpoint_distance, 256 MiB) = 512 MiB; the first layer is not counted (the seed).
    big = {n: e.model_copy(update={"size": 300 * 1024**2}) for n, e in manifest.layers.items()}
    io.manifests[PARENT] = manifest = manifest.model_copy(update={"layers": big})
    reads = every_read(io, manifest, 60)
    new, plan = compact(io, job("l0"), tmp_path)
    assert isinstance(plan, L0Plan) and plan.pending and len(plan.selected) == 3 and plan.lsn_range == (10, 40)
    assert len([n for n in new.layer_names() if n.is_l0]) == 2
    assert every_read(io, new, 60) == reads
    # The rest is a later job, which applies the threshold again.
    new, plan = compact(io, job("l0"), tmp_path)
    assert isinstance(plan, L0Plan) and plan.lsn_range == (40, 60) and not plan.pending
    assert every_read(io, new, 60) == reads


def test_l1s_cut_between_keys_at_about_checkpoint_distance(tmp_path: Path) -> None:
    values = {k: appends(k, range(11, 15), size=100) for k in range(8)}
    io = load({PARENT: Timeline(PARENT, [l0((10, 20), values), *stack(1, start=20)])}, checkpoint_distance=1000)
    reads = every_read(io, io.manifests[PARENT], 30)
    new, _ = compact(io, job("l0", force=True), tmp_path)
    l1s = sorted(n for n in new.layer_names() if n.is_delta)
    assert len(l1s) > 2 and all(n.lsn_range == (10, 30) for n in l1s)
    # Each covers its first key to its last key + 1, and no two share a key.
    assert all(a.key_range.end <= b.key_range.start for a, b in itertools.pairwise(l1s))
    assert every_read(io, new, 30) == reads


def test_one_key_long_history_splits_by_lsn(tmp_path: Path) -> None:
    hot = appends(3, range(12, 40), size=200)
    values = {1: appends(1, range(11, 13)), 3: hot, 7: appends(7, range(15, 17))}
    io = load({PARENT: Timeline(PARENT, [l0((10, 50), values), *stack(1, start=50)])}, checkpoint_distance=1000)
    reads = every_read(io, io.manifests[PARENT], 60)
    new, _ = compact(io, job("l0", force=True), tmp_path)
    single = sorted(n.lsn_range for n in new.layer_names() if n.key_range == KeyRange(key_from_int(3), key_from_int(4)))
    assert len(single) > 2
    assert single[0][0] == 12, "the first piece starts at the key's first version"
    assert single[-1][1] == 60, "the last piece ends with the run"
    assert all(a[1] == b[0] for a, b in itertools.pairwise(single))
    others = [n for n in new.layer_names() if n.is_delta and n.key_range.start != key_from_int(3)]
    assert all(n.lsn_range == (10, 60) for n in others)
    assert every_read(io, new, 60) == reads


def test_holes_are_skipped(tmp_path: Path) -> None:
    images = [Layer("image", (a, b), (5, 6), {a: [Value(5, image=b"i")]}) for a, b in [(0, 30), (30, 60), (60, 200)]]
    values = {k: [Value(12, image=b"v")] for k in (0, 1, 100, 101)}
    layers = [*images, l0((10, 20), values), *stack(1, start=20)]
    # target / 8192 = 4 keys: the gap 2..100 is a hole, spanning three image layers.
    io = load({PARENT: Timeline(PARENT, layers)}, checkpoint_distance=4 * 8192)
    reads = every_read(io, io.manifests[PARENT], 30, 102)
    new, _ = compact(io, job("l0", force=True), tmp_path)
    ranges = sorted(
        (key_to_int(n.key_range.start), key_to_int(n.key_range.end)) for n in new.layer_names() if n.is_delta
    )
    assert ranges == [(0, 6), (100, 102)]
    assert every_read(io, new, 30, 102) == reads


def test_sub_jobs_each_write_their_keys_and_remove_the_run_once(tmp_path: Path) -> None:
    values = {k: appends(k, range(11, 14), size=50) for k in range(8)}
    io = load({PARENT: Timeline(PARENT, [l0((10, 20), values), *stack(2, start=20)])}, checkpoint_distance=10**6)
    reads = every_read(io, io.manifests[PARENT], 40)
    new, _ = compact(io, job("l0", force=True), tmp_path, cuts=[3, 6])
    ranges = sorted((key_to_int(n.key_range.start), key_to_int(n.key_range.end)) for n in new.layer_names())
    assert ranges == [(0, 3), (3, 6), (6, 8)]
    assert every_read(io, new, 40) == reads


# ----------------------------------------------------------------------------- image creation


def deltas_over(key_count: int, bands: int, start: int = 10) -> list[Layer]:
    return [
        Layer("delta", (0, key_count), (start + 10 * i, start + 10 * i + 10),
              {k: [Value(start + 10 * i + 1, image=f"k{k}b{i}".encode())] for k in range(key_count)})
        for i in range(bands)
    ]  # fmt: skip


def test_image_threshold_met_or_not_and_forced(tmp_path: Path) -> None:
    io = load({PARENT: Timeline(PARENT, deltas_over(4, 2))}, image_creation_threshold=3)
    new, plan = compact(io, job("image"), tmp_path)
    assert isinstance(plan, str) and "3 or more delta layers" in plan
    new, plan = compact(io, job("image", force=True), tmp_path)
    assert isinstance(plan, ImagePlan) and plan.lsn == 29
    assert [(n.key_range, n.image_lsn) for n in new.layer_names() if not n.is_delta] == [
        (KeyRange(KEY_MIN, KEY_MAX), 29)
    ]

    io = load({PARENT: Timeline(PARENT, deltas_over(4, 3))}, image_creation_threshold=3)
    reads = every_read(io, io.manifests[PARENT], 40)
    new, plan = compact(io, job("image"), tmp_path)
    assert isinstance(plan, ImagePlan)
    assert every_read(io, new, 40) == reads
    # Done: the deltas now sit below an image, so nothing is due.
    assert isinstance(compact(io, job("image"), tmp_path)[1], str)


def test_image_creation_counts_the_layers_it_reads_from(tmp_path: Path) -> None:
    io = load({PARENT: Timeline(PARENT, deltas_over(4, 3))}, image_creation_threshold=3)
    plan = plan_any(io.manifests[PARENT], job("image"))
    assert isinstance(plan, ImagePlan)
    stats = run_any(plan, io, EngineSettings(target_layer_bytes=1 << 20, workdir=tmp_path)).stats
    sizes = sorted(e.size for e in io.manifests[PARENT].layers.values())
    assert stats.delta_layer_visited.num == 3 and stats.delta_layer_visited.size == sum(sizes)
    assert stats.image_layer_produced.num == 1


def test_image_partitions_align_and_leave_no_gaps(tmp_path: Path) -> None:
    layers = [
        Layer("image", (a, b), (5, 6), {k: [Value(5, image=b"i")] for k in range(a, b)})
        for a, b in [(0, 3), (3, 6), (6, 9)]
    ]
    layers += deltas_over(9, 3)
    # Each image layer above weighs 300 bytes (MemoryIO: 100 per version), each band 900.
    io = load({PARENT: Timeline(PARENT, layers)}, compaction_target_size=1200)
    reads = every_read(io, io.manifests[PARENT], 40)
    new, plan = compact(io, job("image", force=True), tmp_path, cuts=[3, 6])
    assert isinstance(plan, ImagePlan)
    made = sorted(n.key_range for n in new.layer_names() if not n.is_delta and n.image_lsn == plan.lsn)
    assert made[0].start == KEY_MIN and made[-1].end == KEY_MAX
    assert all(a.end == b.start for a, b in itertools.pairwise(made)), made
    assert {key_to_int(r.end) for r in made[:-1]} <= {3, 6}, "cuts at the existing image layers' bounds"
    assert every_read(io, new, 40) == reads


def test_image_on_a_branch_reads_through_the_ancestor(tmp_path: Path) -> None:
    parent = Timeline(PARENT, deltas_over(4, 2), retain_lsns=[25])
    child = Timeline(
        CHILD, [Layer("delta", (0, 4), (25, 40), {1: [Value(30, record=record(b"+c"))]})], ancestor=(PARENT, 25)
    )
    io = load({PARENT: parent, CHILD: child})
    reads = every_read(io, io.manifests[CHILD], 45)
    new, plan = compact(io, job("image", force=True, timeline_id=CHILD), tmp_path)
    assert isinstance(plan, ImagePlan) and plan.lsn == 39
    assert reads[39] == {0: b"k0b1", 1: b"k1b1+c", 2: b"k2b1", 3: b"k3b1"}
    assert every_read(io, new, 45) == reads


def test_an_empty_range_taken_over_again_finds_its_layer_made(tmp_path: Path) -> None:
    """Key 0 has no value at the image LSN, so the first image range is empty and the next one
    takes it over (Neon's rule), making ``[0, 2)``. A forced job at the same LSN cuts ``[0, 1)``
    and ``[1, 2)`` and takes over the same way: that layer exists already and is not made twice
    (found by the random-orders test: the commit refused a second layer of the same name)."""
    layers = [
        Layer("delta", (1, 4), (0, 2), {2: [Value(0, image=b"a")], 3: [Value(0, image=b"b"), Value(1, image=b"c")]}),
        Layer("image", (0, 4), (2, 3), {3: [Value(2, image=b"d")]}),
        l0((5, 7), {1: [Value(5, image=b"e")]}),
    ]
    io = load({PARENT: Timeline(PARENT, layers)}, compaction_target_size=200, image_creation_threshold=1)
    before = every_read(io, io.manifests[PARENT], 7)
    first, _ = compact(io, job("image"), tmp_path)
    taken_over = "000000000000000000000000000000000000-000000000000000000000000000000000002__0000000000000006"
    assert taken_over in first.layers
    second, plan = compact(io, job("image", force=True), tmp_path)
    assert isinstance(plan, ImagePlan) and KeyRange(key_from_int(0), key_from_int(1)) in plan.images
    added = set(second.layers) - set(first.layers)
    assert added and taken_over not in added and second.layers[taken_over] == first.layers[taken_over]
    assert every_read(io, second, 7) == before


def test_redo_failure_fails_and_changes_nothing(tmp_path: Path) -> None:
    bad = record(b"!", only_if=b"never")
    layers = [Layer("delta", (0, 4), (10, 20), {1: [Value(11, image=b"a"), Value(12, record=bad)]})]
    io = load({PARENT: Timeline(PARENT, layers)})
    before, objects = io.manifests[PARENT], dict(io.objects)
    with pytest.raises(CompactionFailed, match=r"only_if|redo"):
        compact(io, job("image", force=True), tmp_path)
    assert io.manifests[PARENT] == before and io.objects == objects


# ----------------------------------------------------------------------------- random orders


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(tls=timelines(l0=True), data=st.data())
def test_kinds_in_random_orders_keep_reads(tls: dict[str, Timeline], data: st.DataObject, tmp_path: Path) -> None:
    io = load(
        tls,
        compaction_threshold=data.draw(st.integers(1, 3)),
        checkpoint_distance=data.draw(st.sampled_from([100, 400, 1 << 20])),
        compaction_target_size=data.draw(st.sampled_from([200, 1000, 1 << 20])),
        image_creation_threshold=data.draw(st.integers(1, 3)),
    )
    target_id = data.draw(st.sampled_from(sorted(tls)))
    io.manifests[target_id] = io.manifests[target_id].successor(gc=data.draw(gc_setup(tls[target_id])))
    top = tls[target_id].top_lsn
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["l0", "image", "gc"]))
        manifest = io.manifests[target_id]
        lsns = must_survive(manifest, manifest.gc.cutoff, top) if kind == "gc" else list(range(top + 2))
        before = {lsn: io.read_keys(manifest, lsn, N_KEYS) for lsn in lsns}
        cuts = sorted(set(data.draw(st.lists(st.integers(1, N_KEYS), max_size=3))))
        force = kind != "gc" and data.draw(st.booleans())
        try:
            new, plan = compact(io, job(kind, force, target_id), tmp_path, cuts)
            event(f"{kind}: {'skipped' if isinstance(plan, str) else 'ran'}")
        except CompactionFailed as err:
            # Some random histories lack their base (a branch's records over garbage-collected
            # ancestor history): an image there cannot be built, and the job changes nothing.
            assert kind == "image" and "cannot read key" in str(err)
            assert io.manifests[target_id] == manifest
            continue
        for lsn in lsns:
            assert io.read_keys(new, lsn, N_KEYS) == before[lsn], f"{kind}: read at LSN {lsn} changed (cuts {cuts})"
