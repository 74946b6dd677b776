"""Output layers stream to S3 while they are written: ``ObjectStore.open_upload`` on its own, and
the engine's outputs uploaded while the merge still runs, with nothing left behind on failure."""

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import xxhash

from compactor.coordinator.local.workload import generate, preset
from compactor.storage import layout
from compactor.storage.errors import StoreError
from compactor.storage.keys import KeyRange
from compactor.storage.layer_cache import LayerDownload
from compactor.storage.manifest import LayerEntry
from compactor.storage.object_store import ObjectStore, RequestKind, StoreObserver
from compactor.storage.settings import Settings
from compactor.storage.timeline import Storage
from compactor.worker.engine.jobs import CompactionJob
from compactor.worker.engine.run import EngineSettings
from compactor.worker.runtime.runner import compact

MIB = 1 << 20
TENANT = "3aa8fcc61f6d357410b7de754b1d9001"
TIMELINE = "11223344556677889900aabbccddeeff"


class Events(StoreObserver):
    """Requests as they are sent, and input batches as the merge takes them, in one order."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.log: list[tuple[str, int]] = []

    def request(self, kind: RequestKind, payload_bytes: int) -> None:
        self.add(kind, payload_bytes)

    def add(self, what: str, size: int) -> None:
        with self.lock:
            self.log.append((what, size))

    def count(self, what: str) -> int:
        with self.lock:
            return sum(1 for kind, _ in self.log if kind == what)


def uploads_in_progress(store: ObjectStore) -> list[str]:
    return [upload.key for upload in store.list_uploads("")]


@pytest.mark.parametrize("piece", [700_000, 11 * MIB], ids=["pieces straddling parts", "pieces of several parts"])
def test_stream_becomes_a_multipart_upload_part_by_part(object_store: ObjectStore, piece: int) -> None:
    events = Events()
    object_store.observer = events
    data = os.urandom(12 * MIB)
    upload = object_store.open_upload("streamed/big")
    for start in range(0, len(data), piece):
        upload.write(data[start : start + piece])
    # The upload started with the first full part; parts go on their own threads.
    assert events.count("multipart") == 1
    assert uploads_in_progress(object_store) == ["streamed/big"]
    upload.complete()
    sent = sorted(request for request in events.log if request[0] != "list")
    assert sent == [("multipart", 0), ("multipart", 0), ("part", 2 * MIB), *[("part", 5 * MIB)] * 2]
    assert object_store.get_bytes("streamed/big") == data
    assert uploads_in_progress(object_store) == []


def test_stream_shorter_than_a_part_is_one_put(object_store: ObjectStore) -> None:
    events = Events()
    object_store.observer = events
    upload = object_store.open_upload("streamed/small")
    upload.write(b"x" * 1000)
    upload.write(b"y" * 1000)
    upload.complete()
    assert events.log == [("put", 2000)]
    assert object_store.get_bytes("streamed/small") == b"x" * 1000 + b"y" * 1000


def test_aborted_stream_leaves_nothing(object_store: ObjectStore) -> None:
    upload = object_store.open_upload("streamed/aborted")
    upload.write(os.urandom(6 * MIB))
    assert uploads_in_progress(object_store) == ["streamed/aborted"]
    upload.abort()
    upload.abort()
    assert uploads_in_progress(object_store) == []
    assert object_store.head("streamed/aborted") is None


def test_failed_part_fails_complete_and_aborts(object_store: ObjectStore, monkeypatch: pytest.MonkeyPatch) -> None:
    send = object_store._upload_part

    def flaky(key: str, upload_id: str, number: int, data: bytes) -> object:
        if number == 2:
            raise StoreError("s3 upload-part failed: injected")
        return send(key, upload_id, number, data)

    monkeypatch.setattr(object_store, "_upload_part", flaky)
    upload = object_store.open_upload("streamed/failed")
    for _ in range(3):
        upload.write(os.urandom(5 * MIB))  # never raises: a Parquet thread would bury the error
    with pytest.raises(StoreError, match="injected"):
        upload.complete()
    assert uploads_in_progress(object_store) == []
    assert object_store.head("streamed/failed") is None


def test_parts_in_flight_are_capped_per_store(s3_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ObjectStore(s3_settings.model_copy(update={"multipart_concurrency": 2}))
    store.ensure_bucket()
    send = store._upload_part
    lock, in_flight, most = threading.Lock(), [0], [0]

    def counted(key: str, upload_id: str, number: int, data: bytes) -> object:
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        try:
            return send(key, upload_id, number, data)
        finally:
            with lock:
                in_flight[0] -= 1

    monkeypatch.setattr(store, "_upload_part", counted)
    part = os.urandom(5 * MIB)
    uploads = [store.observed_by(StoreObserver()).open_upload(f"streamed/{i}") for i in range(3)]
    for _ in range(3):
        for upload in uploads:
            upload.write(part)
    for upload in uploads:
        upload.complete()
    assert most[0] <= 2
    assert all(store.head(f"streamed/{i}") is not None for i in range(3))


def test_layer_keys_do_not_depend_on_the_name() -> None:
    key = layout.new_layer_key(TENANT, TIMELINE)
    prefix = layout.layers_prefix(TENANT, TIMELINE)
    assert key.startswith(prefix) and len(key) == len(prefix) + 32
    assert layout.is_layer_key(TENANT, TIMELINE, key)
    name = "000000067F00004005000060F30000000000-000000067F00004005000060F30000000100__00000000016B5A4C8"
    legacy = f"{prefix}{name}-0123abcd"
    assert layout.is_layer_key(TENANT, TIMELINE, legacy)
    for bad in ("", "../x", "a/b", ".hidden", "x y"):
        assert not layout.is_layer_key(TENANT, TIMELINE, prefix + bad), bad
    assert not layout.is_layer_key(TENANT, TIMELINE, layout.layers_prefix(TENANT, "f" * 32) + "abc")


# --- the engine ----------------------------------------------------------------------------------


class _Observed(Storage):
    """Storage that logs, beside its requests, each input batch the merge takes and each time a
    layer file was found in ``workdir`` then (and can fail the job at one)."""

    def __init__(
        self, settings: Settings, events: Events, fail_after_upload_started: bool = False, workdir: Path | None = None
    ) -> None:
        super().__init__(settings, store_observer=events)
        self.events = events
        self.fail = fail_after_upload_started
        self.workdir = workdir

    def download(self, entry: LayerEntry, key_range: KeyRange) -> Any:
        return _ObservedDownload(super().download(entry, key_range), self)


class _ObservedDownload:
    def __init__(self, download: LayerDownload, storage: _Observed) -> None:
        self.download = download
        self.storage = storage

    def __getattr__(self, name: str) -> Any:
        return getattr(self.download, name)

    def batches(self, key_range: KeyRange, wait: Callable[[int], None], batch_bytes: int) -> Iterator[pa.RecordBatch]:
        events = self.storage.events
        for batch in self.download.batches(key_range, wait, batch_bytes):
            if self.storage.fail and events.count("multipart"):
                raise RuntimeError("injected failure in the merge")
            events.add("batch", batch.num_rows)
            workdir = self.storage.workdir
            if workdir is not None and any(workdir.rglob("*")):
                events.add("local file", 0)
            yield batch


@pytest.fixture
def timeline(s3_settings: Settings, tmp_path: Path) -> Settings:
    """A ``pages`` timeline of about 32 MiB in one band, of pages that do not compress, so that
    a target of 6 MiB gives two image layers out, the first one above the multipart threshold."""
    settings = s3_settings.model_copy(update={"multipart_concurrency": 2})
    spec = preset("pages", 32 * MIB, bands=1, layer_bytes=8 * MIB, retain=[], leases=[], compressible=0)
    generate(Storage(settings), TENANT, TIMELINE, spec, workdir=tmp_path / "gen")
    return settings


def layer_objects(storage: Storage) -> set[str]:
    return {info.key for info in storage.objects.list_keys(layout.layers_prefix(TENANT, TIMELINE))}


def engine_settings(tmp_path: Path) -> EngineSettings:
    # Chunks of a MiB, not the default 32: the merge would read the whole timeline first.
    return EngineSettings(target_layer_bytes=6 * MIB, workdir=tmp_path / "work", chunk_bytes=MIB)


def test_outputs_upload_while_the_merge_runs(timeline: Settings, tmp_path: Path) -> None:
    events = Events()
    storage = _Observed(timeline, events, workdir=tmp_path / "work")
    engine = engine_settings(tmp_path)
    outcome = compact(storage, CompactionJob(tenant_id=TENANT, timeline_id=TIMELINE), engine)
    assert outcome.stats is not None and outcome.stats.image_layer_produced.num >= 2
    kinds = [kind for kind, _ in events.log]
    # Outputs go to the store alone: nothing was ever written to the work directory.
    assert "local file" not in kinds
    last_batch = len(kinds) - 1 - kinds[::-1].index("batch")
    # The first output's multipart upload started before the merge took its last input batch
    # (the writer's thread starts it, and the piece is cut, before the main loop goes on).
    assert kinds.index("multipart") < last_batch
    for entry in storage.manifest(TENANT, TIMELINE).layers.values():
        data = storage.objects.get_bytes(entry.object_key)
        assert len(data) == entry.size and xxhash.xxh3_128(data).hexdigest() == entry.xxh3_128
    assert uploads_in_progress(storage.objects) == []


def test_failed_sub_job_leaves_no_multipart_upload(timeline: Settings, tmp_path: Path) -> None:
    events = Events()
    storage = _Observed(timeline, events, fail_after_upload_started=True)
    before = layer_objects(storage)
    engine = engine_settings(tmp_path)
    with pytest.raises(RuntimeError, match="injected"):
        compact(storage, CompactionJob(tenant_id=TENANT, timeline_id=TIMELINE), engine)
    assert events.count("multipart") >= 2, "no upload was in progress when the job failed"
    assert uploads_in_progress(storage.objects) == []
    assert layer_objects(storage) == before
