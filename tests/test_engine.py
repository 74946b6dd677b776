"""The gc-compaction engine over random timelines: reads that must survive do, the layer map
stays valid, and compacting twice changes nothing."""

import itertools
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compactor.storage.keys import KEY_MAX, KEY_MIN, KeyRange, format_key, key_from_int, key_to_int
from compactor.storage.layer_file import LayerFileInfo
from compactor.storage.layer_map import check_valid_layermap
from compactor.storage.layer_name import LayerName
from compactor.storage.lsn import LSN_MAX
from compactor.storage.manifest import GcInfo, LayerEntry, Manifest
from compactor.storage.values import Version
from compactor.worker.engine.commit import apply, validate
from compactor.worker.engine.jobs import CommitProposal, CompactionJob
from compactor.worker.engine.plan import plan_job
from compactor.worker.engine.run import EngineSettings, run
from tests.engine_memory import MemoryIO
from tests.timelines import CHILD, PARENT, TENANT, Layer, Timeline, Value, record, timelines

N_KEYS = 9


def reads(io: MemoryIO, manifest: Manifest, lsn: int) -> dict[int, bytes | type]:
    return io.read_keys(manifest, lsn, N_KEYS)


def must_survive(manifest: Manifest, horizon: int, top: int) -> list[int]:
    retained = manifest.gc.retained_below(horizon)
    return sorted({*retained, *range(horizon, top + 2)})


@st.composite
def gc_setup(draw: st.DrawFn, tl: Timeline) -> GcInfo:
    top = tl.top_lsn
    cutoff = draw(st.integers(1, top + 3))
    extra = draw(st.lists(st.integers(0, top + 3), max_size=3))
    leases = draw(st.lists(st.integers(0, top + 3), max_size=2))
    return GcInfo(cutoff=cutoff, retain_lsns=sorted({*tl.retain_lsns, *extra}), leases=leases)


@st.composite
def jobs(draw: st.DrawFn, timeline_id: str, top: int) -> CompactionJob:
    if draw(st.booleans()):
        start, end = KEY_MIN, KEY_MAX
    else:
        a = draw(st.integers(0, N_KEYS))
        b = draw(st.integers(a + 1, N_KEYS + 1))
        start, end = key_from_int(a), key_from_int(b)
    lsn_start = 0 if draw(st.integers(0, 3)) else draw(st.integers(1, top))
    lsn_end = LSN_MAX if draw(st.booleans()) else draw(st.integers(lsn_start + 1, top + 3))
    return CompactionJob(
        tenant_id=TENANT, timeline_id=timeline_id, key_start=format_key(start), key_end=format_key(end),
        lsn_start=lsn_start, lsn_end=lsn_end,
    )  # fmt: skip


def compact_once(io: MemoryIO, job: CompactionJob, workdir: Path, target: int) -> tuple[Manifest, bool]:
    manifest = io.manifests[job.timeline_id]
    plan = plan_job(manifest, job)
    if isinstance(plan, str):
        return manifest, False
    result = run(plan, io, EngineSettings(target_layer_bytes=target, workdir=workdir))
    validate(result.proposal, manifest)
    changed = not result.proposal.changes_nothing
    new = apply(result.proposal, manifest, "test") if changed else manifest
    io.manifests[job.timeline_id] = new
    return new, changed


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(tls=timelines(), data=st.data())
def test_compaction_keeps_reads_and_is_idempotent(
    tls: dict[str, Timeline], data: st.DataObject, tmp_path: Path
) -> None:
    io = MemoryIO()
    io.load(tls)
    target_id = data.draw(st.sampled_from(sorted(tls)))
    manifest = io.manifests[target_id]
    manifest = manifest.successor(gc=data.draw(gc_setup(tls[target_id])))
    io.manifests[target_id] = manifest
    top = tls[target_id].top_lsn
    job = data.draw(jobs(target_id, top))
    horizon = min(manifest.gc.cutoff, job.lsn_end)

    lsns = must_survive(manifest, horizon, top)
    before = {tl: {lsn: reads(io, io.manifests[tl], lsn) for lsn in lsns} for tl in tls}
    if CHILD in tls and target_id == PARENT:
        child_lsns = range(tls[CHILD].ancestor[1], tls[CHILD].top_lsn + 2)  # type: ignore[index]
        before_child = {lsn: reads(io, io.manifests[CHILD], lsn) for lsn in child_lsns}

    target = data.draw(st.sampled_from([300, 2000, 1 << 30]))
    new, _ = compact_once(io, job, tmp_path, target)

    assert check_valid_layermap(new.layer_names()) is None
    for lsn in lsns:
        assert reads(io, new, lsn) == before[target_id][lsn], f"read at LSN {lsn} changed"
    if CHILD in tls and target_id == PARENT:
        for lsn, expected in before_child.items():
            assert reads(io, io.manifests[CHILD], lsn) == expected, f"child read at LSN {lsn} changed"

    again, _ = compact_once(io, job, tmp_path, target)
    for lsn in lsns:
        assert reads(io, again, lsn) == before[target_id][lsn], f"read at LSN {lsn} changed on the second run"
    # An image layer reaching outside the job's key range is kept whole (as in the seed), and a
    # second run copies its in-range versions into the outputs again: only without such layers
    # is a second run guaranteed to change nothing. Sub-jobs are never cut through image layers.
    straddling = [n for n in new.layer_names() if not n.is_delta and n.key_range.overlaps(job.key_range)
                  and not job.key_range.covers(n.key_range)]  # fmt: skip
    # The second run may still store other versions: the seed counts every version of a cut
    # towards the delta threshold, images included (the TODO in its generate_key_retention), so
    # an image the first run built at a cut counts as one more version on the second run instead
    # of restarting the count, and a later cut can reach the threshold then. Layers are cut by
    # the bytes of their rows, so other versions may be cut at other keys too. Reads stay exact
    # either way (checked above); the same versions must give the same layers.
    if not straddling and stored(io, again) == stored(io, new):
        assert set(again.layers) == set(new.layers), "a second identical compaction changed the layer map"


def stored(io: MemoryIO, manifest: Manifest) -> list[Version]:
    """Every version the timeline's layers hold, sorted (once for each layer holding it)."""
    return sorted(v for entry in manifest.layers.values() for v in io.objects[entry.object_key])


def compact_cut(io: MemoryIO, job: CompactionJob, cuts: list[int], workdir: Path, target: int) -> Manifest:
    """The meta job ``job`` planned once, run as one sub-job per slice between ``cuts`` (key
    numbers inside its range), the parts combined into one commit."""
    manifest = io.manifests[job.timeline_id]
    plan = plan_job(manifest, job)
    if isinstance(plan, str):
        return manifest
    bounds = [plan.key_range.start, *(key_from_int(c) for c in cuts), plan.key_range.end]
    engine = EngineSettings(target_layer_bytes=target, workdir=workdir)
    parts = [run(plan.restrict(KeyRange(a, b)), io, engine).proposal for a, b in itertools.pairwise(bounds)]
    proposal = CommitProposal.combine(parts)
    if not proposal.changes_nothing:
        validate(proposal, manifest)
    new = apply(proposal, manifest, "test") or manifest
    io.manifests[job.timeline_id] = new
    return new


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(tls=timelines(l0=True), data=st.data())
def test_sub_jobs_cut_anywhere_keep_reads_and_commit_once(
    tls: dict[str, Timeline], data: st.DataObject, tmp_path: Path
) -> None:
    """A meta job cut at random keys into sub-jobs that each read the one plan's selection,
    restricted to their keys, and commit together: reads identical to before (as the uncut job
    keeps them), a valid layer map, and no change when the same job runs again."""
    io = MemoryIO()
    io.load(tls)
    target_id = data.draw(st.sampled_from(sorted(tls)))
    manifest = io.manifests[target_id].successor(gc=data.draw(gc_setup(tls[target_id])))
    io.manifests[target_id] = manifest
    top = tls[target_id].top_lsn
    job = data.draw(jobs(target_id, top))
    lo, hi = key_to_int(job.key_range.start), key_to_int(job.key_range.end)
    inner = range(lo + 1, min(hi, N_KEYS + 2))
    cuts = sorted(set(data.draw(st.lists(st.sampled_from(inner), max_size=4)))) if inner else []
    horizon = min(manifest.gc.cutoff, job.lsn_end)
    lsns = must_survive(manifest, horizon, top)
    before = {lsn: reads(io, manifest, lsn) for lsn in lsns}
    target = data.draw(st.sampled_from([300, 2000, 1 << 30]))

    new = compact_cut(io, job, cuts, tmp_path, target)
    assert check_valid_layermap(new.layer_names()) is None
    assert not any(n.is_l0 for n in set(new.layer_names()) - set(manifest.layer_names())), "an L0 was written"
    for lsn in lsns:
        assert reads(io, new, lsn) == before[lsn], f"read at LSN {lsn} changed (cuts {cuts})"

    again = compact_cut(io, job, cuts, tmp_path, target)
    for lsn in lsns:
        assert reads(io, again, lsn) == before[lsn], f"read at LSN {lsn} changed on the second run"
    straddling = [n for n in new.layer_names() if not n.is_delta and n.key_range.overlaps(job.key_range)
                  and not job.key_range.covers(n.key_range)]  # fmt: skip
    if not straddling:  # as in the uncut test above
        assert set(again.layers) == set(new.layers), "a second identical compaction changed the layer map"


def test_seed_doc_example_end_to_end(tmp_path: Path) -> None:
    """A@0x10 +B..+F, retain 0x20 and 0x40, horizon 0x50: the image goes to an image layer at
    the lowest retain LSN, the rest to deltas, and every retained read is unchanged."""
    from tests.timelines import Layer, Value, record

    key = 1
    appends = zip(range(0x20, 0x70, 0x10), [b"B", b"C", b"D", b"E", b"F"], strict=True)
    values = [Value(0x10, image=b"A")] + [Value(lsn, record=record(c)) for lsn, c in appends]
    tl = Timeline(PARENT, [Layer("delta", (0, 4), (0x10, 0x70), {key: values})], cutoff=0x50, retain_lsns=[0x20, 0x40])
    io = MemoryIO()
    io.load({PARENT: tl})
    job = CompactionJob(tenant_id=TENANT, timeline_id=PARENT)
    new, changed = compact_once(io, job, tmp_path, 1 << 20)
    assert changed
    kinds = sorted((n.is_delta, n.lsn_start) for n in new.layer_names())
    assert kinds == [(False, 0x20), (True, 0x20)]
    assert reads(io, new, 0x20) == {1: b"AB"}
    assert reads(io, new, 0x40) == {1: b"ABCD"}
    assert reads(io, new, 0x50) == {1: b"ABCDE"}
    assert reads(io, new, 0x60) == {1: b"ABCDEF"}


def test_the_image_and_delta_layers_cut_at_the_end_complete_together(tmp_path: Path) -> None:
    """Both writers close when the main loop ends; a store completes an upload in time that grows
    with its size, so the job must not complete the two one after the other. Each completion
    here waits until the other has started: one after the other, the first waits out the
    barrier and the job fails."""
    both_completing = threading.Barrier(2, timeout=10)

    class SlowToComplete(MemoryIO):
        def upload(self, manifest: Manifest, name: LayerName, file: LayerFileInfo) -> LayerEntry:
            both_completing.wait()
            return super().upload(manifest, name, file)

    values = [Value(0x10, image=b"A")] + [Value(lsn, record=record(b"B")) for lsn in (0x20, 0x30, 0x40)]
    layer = Layer("delta", (0, 4), (0x10, 0x50), {1: values})
    io = SlowToComplete()
    io.load({PARENT: Timeline(PARENT, [layer], cutoff=0x40, retain_lsns=[0x20])})
    new, changed = compact_once(io, CompactionJob(tenant_id=TENANT, timeline_id=PARENT), tmp_path, 1 << 20)
    assert changed and sorted(n.is_delta for n in new.layer_names()) == [False, True]
    assert [reads(io, new, lsn) for lsn in (0x20, 0x30, 0x40)] == [{1: b"AB"}, {1: b"ABB"}, {1: b"ABBB"}]


@pytest.mark.parametrize("cutoff", [0])
def test_cutoff_zero_skips(cutoff: int, tmp_path: Path) -> None:
    from tests.timelines import Layer, Value

    tl = Timeline(PARENT, [Layer("delta", (0, 4), (10, 20), {1: [Value(12, image=b"x")]})], cutoff=cutoff)
    io = MemoryIO()
    io.load({PARENT: tl})
    assert plan_job(io.manifests[PARENT], CompactionJob(tenant_id=TENANT, timeline_id=PARENT)) == (
        "gc cutoff not set yet (0): nothing is compacted"
    )


def test_an_output_named_like_a_kept_layer_is_dropped_only_if_its_versions_survive_whole(tmp_path: Path) -> None:
    """Found by the property above: a delta holds a will_init record at (key 4, LSN 7) and an
    image layer the image at the same point, which wins reads. A job selecting both writes the
    delta again with the image in it; the output has the delta's name, and the image was taken
    to survive in the delta because a version at (4, 7) is there, so the image layer went and
    the read at LSN 7 changed. Versions are now compared whole."""

    tl = Timeline(
        timeline_id=PARENT,
        layers=[
            Layer(
                kind="delta",
                keys=(0, 3),
                lsns=(0, 8),
                values={
                    0: [Value(lsn=0, image=b"Ik0@0;"), Value(lsn=1, image=b"Ik0@1;")],
                    2: [
                        Value(lsn=0, image=b"Ik2@0;"),
                        Value(lsn=1, image=b"Ik2@1;"),
                        Value(lsn=2, record=record(b"Nk2@2;", clear=True, will_init=True)),
                    ],
                },
            ),
            Layer(
                kind="delta",
                keys=(3, 5),
                lsns=(0, 8),
                values={
                    3: [Value(lsn=0, image=b"Ik3@0;")],
                    4: [
                        Value(lsn=0, image=b"Ik4@0;"),
                        Value(lsn=7, record=record(b"Nk4@7;", clear=True, will_init=True)),
                    ],
                },
            ),
            Layer(kind="image", keys=(0, 5), lsns=(7, 8), values={4: [Value(lsn=7, image=b"Sk4@7;")]}),
        ],
    )
    io = MemoryIO()
    io.load({PARENT: tl})
    manifest = io.manifests[PARENT].successor(gc=GcInfo(cutoff=1, retain_lsns=[], leases=[0]))
    io.manifests[PARENT] = manifest
    before = {lsn: reads(io, manifest, lsn) for lsn in range(10)}
    assert before[7][4] == b"Sk4@7;"
    job = CompactionJob(
        tenant_id=TENANT, timeline_id=PARENT, key_start=format_key(KEY_MIN), key_end=format_key(KEY_MAX),
        lsn_start=1, lsn_end=2,
    )  # fmt: skip
    new, _ = compact_once(io, job, tmp_path, 300)
    assert {lsn: reads(io, new, lsn) for lsn in range(10)} == before
