"""ManifestStore against a real S3 endpoint: the commit chain, cheap ``latest``, corruption,
pruning with the boundary, the ABA hazard, and a multi-process commit race."""

from __future__ import annotations

import json
import multiprocessing
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from compactor.storage import layout
from compactor.storage.checksum import Checksum
from compactor.storage.errors import InvalidInput, ManifestConflict, NotFound
from compactor.storage.manifest import LayerEntry, Manifest
from compactor.storage.manifest_store import CorruptManifest, ManifestRaceLost, ManifestStore
from compactor.storage.object_store import ObjectStore
from compactor.storage.settings import Settings
from tests.conftest import TEST_BACKOFF


def new_ids() -> tuple[str, str]:
    return uuid.uuid4().hex, uuid.uuid4().hex


def add_lease(marker: int, written_by: str = "") -> Callable[[Manifest], Manifest]:
    """An update that appends ``marker`` to gc.leases: commits accumulate, so a lost or doubled
    commit shows in the final list."""

    def update(current: Manifest) -> Manifest:
        gc = current.gc.model_dump()
        gc["leases"] = [*gc["leases"], marker]
        return current.successor(gc=gc, written_by=written_by)

    return update


def start_timeline(ms: ManifestStore, commits: int = 0) -> tuple[str, str]:
    tenant, timeline = new_ids()
    ms.initialize(Manifest(tenant_id=tenant, timeline_id=timeline, number=0))
    for i in range(commits):
        ms.commit(tenant, timeline, add_lease(i))
    return tenant, timeline


class ListCounter:
    """Counts ListObjectsV2 requests and the keys they returned."""

    def __init__(self, store: ObjectStore) -> None:
        self.calls = 0
        self.keys = 0
        store.client.meta.events.register("after-call.s3.ListObjectsV2", self._on_list)

    def _on_list(self, parsed: dict[str, Any], **_: Any) -> None:
        self.calls += 1
        self.keys += len(parsed.get("Contents", []))

    def reset(self) -> None:
        self.calls = self.keys = 0


def stored_numbers(store: ObjectStore, tenant: str, timeline: str) -> list[int]:
    keys = store.list_keys(layout.manifests_prefix(tenant, timeline))
    return [n for n in (layout.manifest_number(info.key) for info in keys) if n is not None]


# ---------------------------------------------------------------------------- chain


def test_initialize_and_commit_chain(manifest_store: ManifestStore) -> None:
    ms = manifest_store
    tenant, timeline = new_ids()
    assert ms.latest(tenant, timeline) is None
    ms.initialize(Manifest(tenant_id=tenant, timeline_id=timeline, number=0))
    for i in range(5):
        committed = ms.commit(tenant, timeline, add_lease(100 + i))
        assert committed is not None and committed.number == i + 1

    latest = ms.latest(tenant, timeline)
    assert latest is not None and latest.number == 5
    assert latest.gc.leases == [100, 101, 102, 103, 104]
    assert ms.load(tenant, timeline, 3).gc.leases == [100, 101, 102]
    assert stored_numbers(ms.store, tenant, timeline) == [0, 1, 2, 3, 4, 5]
    assert ms.races_lost == 0

    with pytest.raises(InvalidInput, match="already exists"):
        ms.initialize(Manifest(tenant_id=tenant, timeline_id=timeline, number=0))
    with pytest.raises(InvalidInput, match="starts at manifest 0"):
        ms.initialize(Manifest(tenant_id=tenant, timeline_id=timeline, number=1))
    with pytest.raises(NotFound, match="manifest 9 "):
        ms.load(tenant, timeline, 9)


def test_commit_give_up_conflict_and_bad_successor(manifest_store: ManifestStore) -> None:
    ms = manifest_store
    tenant, timeline = start_timeline(ms, commits=1)
    assert ms.commit(tenant, timeline, lambda current: None) is None

    def conflict(current: Manifest) -> Manifest:
        raise ManifestConflict("selected layer is gone")

    with pytest.raises(ManifestConflict, match="selected layer is gone"):
        ms.commit(tenant, timeline, conflict)
    with pytest.raises(InvalidInput, match=r"use Manifest\.successor"):
        ms.commit(tenant, timeline, lambda current: current)
    with pytest.raises(NotFound, match="has no manifest"):
        ms.commit(*new_ids(), add_lease(1))
    assert stored_numbers(ms.store, tenant, timeline) == [0, 1]


def test_commit_retries_a_lost_race(manifest_store: ManifestStore, object_store: ObjectStore) -> None:
    ms = manifest_store
    rival = ManifestStore(object_store)
    tenant, timeline = start_timeline(ms)
    seen: list[int] = []

    def update(current: Manifest) -> Manifest:
        seen.append(current.number)
        if len(seen) == 1:  # another writer commits between our read and our create
            rival.commit(tenant, timeline, add_lease(1, "rival"))
        return add_lease(2, "us")(current)

    committed = ms.commit(tenant, timeline, update)
    assert seen == [0, 1]
    assert committed is not None and committed.number == 2 and committed.gc.leases == [1, 2]
    assert ms.races_lost == 1


def test_commit_gives_up_after_attempts(manifest_store: ManifestStore, object_store: ObjectStore) -> None:
    ms = manifest_store
    rival = ManifestStore(object_store)
    tenant, timeline = start_timeline(ms)

    def always_overtaken(current: Manifest) -> Manifest:
        rival.commit(tenant, timeline, add_lease(current.number, "rival"))
        return add_lease(999)(current)

    with pytest.raises(ManifestConflict, match="gave up after 3 lost races"):
        ms.commit(tenant, timeline, always_overtaken, attempts=3)
    latest = ms.latest(tenant, timeline)
    assert latest is not None and latest.number == 3 and 999 not in latest.gc.leases


# ---------------------------------------------------------------------------- latest


def test_latest_is_cheap_after_many_commits(manifest_store: ManifestStore, object_store: ObjectStore) -> None:
    ms = manifest_store
    tenant, timeline = start_timeline(ms, commits=50)
    lists = ListCounter(object_store)

    latest = ms.latest(tenant, timeline)
    assert latest is not None and latest.number == 50 and len(latest.gc.leases) == 50
    assert (lists.calls, lists.keys) == (1, 0)  # the hint is current: nothing newer to list

    hint_key = layout.latest_hint_key(tenant, timeline)
    object_store.put_bytes(hint_key, b"40")  # stale hint
    lists.reset()
    assert ms.latest(tenant, timeline).number == 50  # type: ignore[union-attr]
    assert (lists.calls, lists.keys) == (1, 10)

    for bad_hint in (b"999", b"not a number"):  # ahead of the manifests; garbage
        object_store.put_bytes(hint_key, bad_hint)
        assert ms.latest(tenant, timeline).number == 50  # type: ignore[union-attr]

    assert ms.prune(tenant, timeline, keep=10) == list(range(41))
    object_store.delete(hint_key)  # missing hint: list from the boundary
    lists.reset()
    assert ms.latest(tenant, timeline).number == 50  # type: ignore[union-attr]
    assert (lists.calls, lists.keys) == (1, 10)


def test_corrupt_manifest_names_its_key(manifest_store: ManifestStore, object_store: ObjectStore) -> None:
    ms = manifest_store
    tenant, timeline = start_timeline(ms)
    key1 = layout.manifest_key(tenant, timeline, 1)
    object_store.put_bytes(key1, b'{"format_version": 1, "tenant_id": "nope"')
    with pytest.raises(CorruptManifest, match=f"manifest {key1} is corrupt") as info:
        ms.latest(tenant, timeline)
    assert "\n" not in str(info.value)
    with pytest.raises(CorruptManifest, match=key1):
        ms.load(tenant, timeline, 1)

    # valid JSON, but manifest 0 filed under number 1
    object_store.put_bytes(key1, object_store.get_bytes(layout.manifest_key(tenant, timeline, 0)))
    with pytest.raises(CorruptManifest, match=f"manifest {key1} holds number 0"):
        ms.latest(tenant, timeline)

    object_store.put_bytes(layout.boundary_key(tenant, timeline), b"{}")
    with pytest.raises(CorruptManifest, match="boundary"):
        ms.boundary(tenant, timeline)


_DELTA = "000000000000000000000000000000000000-FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF__0000000000000010-0000000000000020"
_IMAGE = "000000000000000000000000000000000000-FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF__0000000000000030"


def test_a_format_1_manifest_is_read_and_its_successor_is_format_2(
    manifest_store: ManifestStore, object_store: ObjectStore
) -> None:
    """Manifests written before XXH3-128 layer checksums: their layers keep their SHA-256, a
    commit writes the next manifest as format 2, and a reader of either sees the same layers."""
    ms = manifest_store
    tenant, timeline = new_ids()
    old_key, new_key = layout.new_layer_key(tenant, timeline), layout.new_layer_key(tenant, timeline)
    old_layer = {"name": _DELTA, "object_key": old_key, "size": 10, "sha256": "ab" * 32}
    stored = {"format_version": 1, "tenant_id": tenant, "timeline_id": timeline, "number": 0}
    object_store.put_bytes(
        layout.manifest_key(tenant, timeline, 0), json.dumps({**stored, "layers": {_DELTA: old_layer}}).encode()
    )
    old = ms.latest(tenant, timeline)
    assert old is not None and old.format_version == 1
    assert old.layers[_DELTA].checksum == Checksum("sha256", "ab" * 32)

    new_layer = LayerEntry(name=_IMAGE, object_key=new_key, size=20, xxh3_128="cd" * 16)
    ms.commit(tenant, timeline, lambda m: m.successor(layers={**m.layers, _IMAGE: new_layer}))
    written = json.loads(object_store.get_bytes(layout.manifest_key(tenant, timeline, 1)))
    assert written["format_version"] == 2
    assert written["layers"][_DELTA] == old_layer  # as it was read: no null checksum beside it
    assert written["layers"][_IMAGE] == {"name": _IMAGE, "object_key": new_key, "size": 20, "xxh3_128": "cd" * 16}
    latest = ms.latest(tenant, timeline)
    assert latest is not None and latest.layers == {_DELTA: old.layers[_DELTA], _IMAGE: new_layer}

    # A manifest of a format this version does not know, or an entry without exactly one
    # checksum, is refused in one line.
    object_store.put_bytes(
        layout.manifest_key(tenant, timeline, 2), json.dumps({**stored, "number": 2, "format_version": 3}).encode()
    )
    with pytest.raises(CorruptManifest, match="unsupported manifest format version 3") as info:
        ms.latest(tenant, timeline)
    assert "\n" not in str(info.value)
    for checksums in ({}, {"sha256": "ab" * 32, "xxh3_128": "cd" * 16}):
        with pytest.raises(ValueError, match="needs exactly one checksum"):
            LayerEntry(name=_IMAGE, object_key="k", size=1, **checksums)


# ---------------------------------------------------------------------------- prune and ABA


def test_prune_advances_boundary_first_and_never_lowers_it(
    manifest_store: ManifestStore, object_store: ObjectStore, s3_settings: Settings
) -> None:
    ms = manifest_store
    tenant, timeline = start_timeline(ms, commits=15)
    assert ms.prune(tenant, timeline, keep=20) == []
    assert ms.prune(tenant, timeline, keep=5) == list(range(11))
    assert ms.boundary(tenant, timeline) == 11
    assert stored_numbers(object_store, tenant, timeline) == list(range(11, 16))
    with pytest.raises(NotFound):
        ms.load(tenant, timeline, 3)
    assert ms.prune(tenant, timeline, keep=10) == []
    assert ms.boundary(tenant, timeline) == 11
    with pytest.raises(InvalidInput):
        ms.prune(tenant, timeline, keep=0)

    # A concurrent prune moves the boundary higher between our read and our write: our
    # compare-and-swap fails, and we must not lower it.
    boundary_key = layout.boundary_key(tenant, timeline)
    other = ObjectStore(s3_settings, **TEST_BACKOFF)
    sent: list[str] = []

    def concurrent_prune(request: Any, **_: Any) -> None:
        if request.url.endswith("manifest-boundary.json") and not sent:
            sent.append(request.url)
            other.put_bytes(boundary_key, json.dumps({"boundary": 14}).encode())

    object_store.client.meta.events.register("before-send.s3.PutObject", concurrent_prune)
    ms.prune(tenant, timeline, keep=3)  # wants 13
    assert sent and ms.boundary(tenant, timeline) == 14


def test_aba_stalled_writer_below_boundary_loses(manifest_store: ManifestStore, object_store: ObjectStore) -> None:
    ms = manifest_store
    tenant, timeline = start_timeline(ms, commits=4)
    stalled = ms.latest(tenant, timeline)
    assert stalled is not None and stalled.number == 4
    late = add_lease(777, "stalled")(stalled)  # manifest 5, built on 4

    for i in range(10):  # meanwhile: 5..14 committed, then 0..11 pruned (5 included)
        ms.commit(tenant, timeline, add_lease(i))
    ms.prune(tenant, timeline, keep=3)
    key5 = layout.manifest_key(tenant, timeline, 5)
    assert object_store.head(key5) is None

    with pytest.raises(ManifestRaceLost, match="below the prune boundary 12"):
        ms.create(late)  # the create-only PUT succeeds on the deleted number...
    assert object_store.head(key5) is None  # ...and is removed again
    latest = ms.latest(tenant, timeline)
    assert latest is not None and latest.number == 14 and 777 not in latest.gc.leases


def test_stalled_writer_on_existing_number_loses(manifest_store: ManifestStore, object_store: ObjectStore) -> None:
    ms = manifest_store
    tenant, timeline = start_timeline(ms, commits=1)
    stalled = ms.latest(tenant, timeline)
    assert stalled is not None
    late = add_lease(777, "stalled")(stalled)
    ms.commit(tenant, timeline, add_lease(5))
    key2 = layout.manifest_key(tenant, timeline, 2)
    before = object_store.get_bytes(key2)
    with pytest.raises(ManifestRaceLost, match="already exists"):
        ms.create(late)
    assert object_store.get_bytes(key2) == before


def test_list_timelines(manifest_store: ManifestStore) -> None:
    first = start_timeline(manifest_store)
    second = start_timeline(manifest_store)
    tenant = first[0]
    third = (tenant, uuid.uuid4().hex)
    manifest_store.initialize(Manifest(tenant_id=tenant, timeline_id=third[1], number=0))
    manifest_store.store.put_bytes("tenants/not-an-id/timelines/x/y", b"")
    assert sorted(manifest_store.list_timelines()) == sorted([first, second, third])


# ---------------------------------------------------------------------------- multi-process race

PROCESSES = 3
COMMITS_EACH = 6


def _race_worker(
    settings: Settings,
    tenant: str,
    timeline: str,
    index: int,
    barrier: Any,
    results: Any,
) -> None:
    ms = ManifestStore(ObjectStore(settings, **TEST_BACKOFF), race_backoff_s=0.002)
    calls = 0
    barrier.wait(timeout=60)
    for i in range(COMMITS_EACH):

        def update(current: Manifest, marker: int = index * 1000 + i) -> Manifest:
            nonlocal calls
            calls += 1
            return add_lease(marker, f"worker-{index}")(current)

        assert ms.commit(tenant, timeline, update, attempts=200) is not None
    results.put((index, ms.races_lost, calls))


def test_concurrent_commits_from_processes(manifest_store: ManifestStore, s3_settings: Settings) -> None:
    tenant, timeline = start_timeline(manifest_store)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_race_worker, args=(s3_settings, tenant, timeline, i, barrier, results))
        for i in range(PROCESSES)
    ]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0

    total = PROCESSES * COMMITS_EACH
    assert stored_numbers(manifest_store.store, tenant, timeline) == list(range(total + 1))
    latest = manifest_store.latest(tenant, timeline)
    assert latest is not None and latest.number == total
    markers = sorted(index * 1000 + i for index in range(PROCESSES) for i in range(COMMITS_EACH))
    assert sorted(latest.gc.leases) == markers  # every commit landed exactly once

    # Each manifest is its predecessor plus exactly one marker: no commit skipped a version.
    previous: list[int] = []
    for number in range(1, total + 1):
        leases = manifest_store.load(tenant, timeline, number).gc.leases
        assert leases[:-1] == previous
        previous = leases

    races_lost = sum(lost for _, lost, _ in outcomes)
    update_calls = sum(calls for _, _, calls in outcomes)
    print(
        f"\n{PROCESSES} processes x {COMMITS_EACH} commits: {races_lost} races lost and retried, "
        f"{update_calls} update calls for {total} commits"
    )
    assert races_lost > 0, "the processes never raced: the test proved nothing"
    assert update_calls == total + races_lost
