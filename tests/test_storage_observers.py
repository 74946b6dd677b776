"""The observer hooks of storage/: what the object store and the manifest store report (one
event per S3 request with its kind and payload bytes, retries, downloads, lost manifest races,
commit conflicts), which the worker turns into metrics."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from compactor.storage.errors import ManifestConflict
from compactor.storage.manifest import Manifest
from compactor.storage.manifest_store import CommitObserver, ManifestStore
from compactor.storage.object_store import ObjectStore, RequestCounter, RequestKind, StoreObserver
from tests.conftest import MIB
from tests.test_manifest_store import add_lease, start_timeline
from tests.test_object_store import Attempts, slow_down


class Recorder(StoreObserver, CommitObserver):
    def __init__(self) -> None:
        self.requests: list[tuple[RequestKind, int]] = []
        self.retries: list[tuple[RequestKind, str]] = []
        self.downloads: list[int] = []
        self.races: list[tuple[str, str, int]] = []
        self.conflicts: list[str] = []

    def request(self, kind: RequestKind, payload_bytes: int) -> None:
        self.requests.append((kind, payload_bytes))

    def retry(self, kind: RequestKind, operation: str) -> None:
        self.retries.append((kind, operation))

    def download(self, seconds: float, size: int) -> None:
        assert seconds > 0
        self.downloads.append(size)

    def race_lost(self, tenant: str, timeline: str, number: int) -> None:
        self.races.append((tenant, timeline, number))

    def conflict(self, tenant: str, timeline: str, reason: str) -> None:
        self.conflicts.append(reason)


@pytest.fixture
def recorder(object_store: ObjectStore) -> Recorder:
    recorder = Recorder()
    object_store.observer = recorder
    return recorder


def test_every_request_is_reported_with_its_kind_and_payload(
    object_store: ObjectStore, recorder: Recorder, tmp_path: Path
) -> None:
    object_store.put_bytes("a", b"12345")
    assert object_store.get_bytes("a") == b"12345"
    assert object_store.get_range("a", 1, 2) == b"23"
    assert object_store.head("a") is not None
    assert [info.key for info in object_store.list_keys("")] == ["a"]
    object_store.delete("a")
    object_store.delete_many(["b", "c"])
    assert recorder.requests == [
        ("put", 5),
        ("get", 5),
        ("get", 2),
        ("head", 0),
        ("list", 0),
        ("delete", 0),
        ("delete", 0),
    ]
    assert recorder.retries == [] and recorder.downloads == []

    recorder.requests.clear()
    big = tmp_path / "big"
    big.write_bytes(os.urandom(11 * MIB))
    object_store.upload_file(big, "big")
    assert sorted(recorder.requests) == [("multipart", 0), ("multipart", 0), ("part", MIB), *[("part", 5 * MIB)] * 2]


def test_retries_and_downloads_are_reported(object_store: ObjectStore, recorder: Recorder, tmp_path: Path) -> None:
    object_store.put_bytes("layer", b"x" * 1000)
    recorder.requests.clear()
    Attempts(object_store, "GetObject", [slow_down, slow_down])
    object_store.download_file("layer", tmp_path / "layer", expected_size=1000)
    # Each attempt is a request; only the one that succeeded moved the object's bytes.
    assert recorder.requests == [("get", 0), ("get", 0), ("get", 1000)]
    assert recorder.retries == [("get", "download")] * 2
    assert recorder.downloads == [1000]


def test_lost_races_and_conflicts_are_reported(object_store: ObjectStore) -> None:
    recorder = Recorder()
    ms = ManifestStore(object_store, race_backoff_s=0.005, observer=recorder)
    rival = ManifestStore(object_store)
    tenant, timeline = start_timeline(ms)

    def overtaken_once(current: Manifest) -> Manifest:
        if current.number == 0:
            rival.commit(tenant, timeline, add_lease(1, "rival"))
        return add_lease(2, "us")(current)

    ms.commit(tenant, timeline, overtaken_once)
    assert recorder.races == [(tenant, timeline, 1)] and recorder.conflicts == []

    def conflict(current: Manifest) -> Manifest:
        raise ManifestConflict("selected layer is gone")

    with pytest.raises(ManifestConflict):
        ms.commit(tenant, timeline, conflict)
    assert recorder.conflicts == ["selected layer is gone"]

    def always_overtaken(current: Manifest) -> Manifest:
        rival.commit(tenant, timeline, add_lease(current.number + 10, "rival"))
        return add_lease(999)(current)

    # Giving up after lost races is no conflict: the races are counted, each once.
    with pytest.raises(ManifestConflict, match="gave up after 2 lost races"):
        ms.commit(tenant, timeline, always_overtaken, attempts=2)
    assert len(recorder.races) == 3 and recorder.conflicts == ["selected layer is gone"]


def test_views_count_their_own_requests_from_any_thread(object_store: ObjectStore, recorder: Recorder) -> None:
    object_store.observer = recorder
    object_store.put_bytes("shared", b"s" * 100)
    jobs = {name: RequestCounter() for name in ("a", "b")}
    views = {name: object_store.observed_by(counter) for name, counter in jobs.items()}
    start = threading.Barrier(4)

    def work(name: str, puts: int) -> None:
        store = views[name]
        start.wait()
        for i in range(puts):
            store.put_bytes(f"{name}/{threading.get_ident()}/{i}", b"x" * 10)
            store.get_bytes("shared")

    threads = [
        threading.Thread(target=work, args=(name, puts)) for name, puts in (("a", 5), ("a", 5), ("b", 3), ("b", 3))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert jobs["a"].counts() == {"put": (10, 100), "get": (10, 1000)}
    assert jobs["b"].counts() == {"put": (6, 60), "get": (6, 600)}
    # The store's own observer still sees everything (the process's metrics).
    assert len(recorder.requests) == 1 + 32
