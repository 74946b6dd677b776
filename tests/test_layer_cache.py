"""The layer cache against a real S3 endpoint: a sub-job's slice of a layer fetches only the row
groups that hold its keys, reads exactly what the whole layer holds there, and damage in what it
fetched is caught."""

from __future__ import annotations

import hashlib
import random
import threading
from pathlib import Path

import pytest

from compactor.storage.errors import CorruptLayer
from compactor.storage.keys import KEY_MAX, KEY_MIN, KeyRange, key_from_int
from compactor.storage.layer_cache import DownloadAbandoned, LayerCache
from compactor.storage.layer_file import READ_BATCH_BYTES, LayerWriter
from compactor.storage.layer_name import LayerName
from compactor.storage.manifest import LayerEntry
from compactor.storage.object_store import ObjectStore, RequestKind, StoreObserver
from compactor.storage.values import ValueKind

N_KEYS = 400


class Bytes(StoreObserver):
    def __init__(self) -> None:
        self.moved = 0
        self.requests = 0
        self._lock = threading.Lock()

    def request(self, kind: RequestKind, payload_bytes: int) -> None:
        with self._lock:
            self.moved += payload_bytes
            self.requests += 1


def layer(tmp_path: Path, store: ObjectStore, damage_key: int | None = None, n_keys: int = N_KEYS) -> LayerEntry:
    """A delta over keys [0, n_keys) in row groups of about 40 keys each, uploaded; with
    ``damage_key``, bytes in the middle of that key's row group are flipped after the upload's
    checksum was taken (damage at rest)."""
    name = LayerName.delta(KEY_MIN, KEY_MAX, 10, 20)
    path = tmp_path / "layer.parquet"
    with LayerWriter(path, row_group_bytes=40 * 2100) as writer:
        for k in range(n_keys):
            writer.add(key_from_int(k), 11, ValueKind.IMAGE, random.Random(k).randbytes(2048))  # incompressible
        info = writer.finish(name)
    if damage_key is not None:
        data = bytearray(path.read_bytes())
        offset = int(len(data) * (damage_key + 0.5) / n_keys)
        data[offset : offset + 64] = bytes(b ^ 0xFF for b in data[offset : offset + 64])
        path.write_bytes(bytes(data))
    key = f"tenants/t/timelines/l/layers/{name}-{'d' if damage_key is not None else 'x'}"
    store.upload_file(path, key)
    return LayerEntry(name=str(name), object_key=key, size=info.size, xxh3_128=info.xxh3_128)


@pytest.fixture
def store(object_store: ObjectStore) -> ObjectStore:
    object_store.observer = Bytes()
    return object_store


def keys(a: int, b: int) -> KeyRange:
    return KeyRange(key_from_int(a), key_from_int(b))


def test_a_slice_fetches_only_its_row_groups_and_reads_the_same_rows(store: ObjectStore, tmp_path: Path) -> None:
    entry = layer(tmp_path, store)
    moved = store.observer
    assert isinstance(moved, Bytes)
    moved.moved = 0
    slices = LayerCache(store, tmp_path / "slices")
    part = slices.fetch(entry, keys(100, 140))
    assert part != slices.path_for(entry) and part.stat().st_size == entry.size
    # Two row groups of ten (a tenth of the layer each) and one 64 KiB read of the footer.
    assert 0 < moved.moved < entry.size * 0.35, f"fetched {moved.moved} of {entry.size} bytes"
    got = [b for batch in slices.batches(entry, keys(100, 140)) for b in batch.column(0).to_pylist()]

    whole = LayerCache(store, tmp_path / "whole")
    expected = [b for batch in whole.batches(entry, keys(100, 140)) for b in batch.column(0).to_pylist()]
    assert got == expected == [key_from_int(k) for k in range(100, 140)]
    # Another range than the slice's reads the whole (verified) layer, never the holes.
    rest = [b for batch in slices.batches(entry, keys(0, 400)) for b in batch.column(0).to_pylist()]
    assert len(rest) == N_KEYS and slices.path_for(entry).exists()


def test_the_footer_is_fetched_once_per_node(store: ObjectStore, tmp_path: Path) -> None:
    """Sub-jobs of other slices on the same node (the same cache directory) read the kept tail."""
    entry = layer(tmp_path, store)
    moved = store.observer
    assert isinstance(moved, Bytes)
    first = LayerCache(store, tmp_path / "node")
    first.fetch(entry, keys(100, 140))
    moved.requests = 0
    again = LayerCache(store, tmp_path / "node")  # another worker process of the node
    assert again.footer(entry).index == first.footer(entry).index and moved.requests == 0
    again.fetch(entry, keys(200, 240))
    assert moved.requests == 1  # its row groups alone
    got = [b for batch in again.batches(entry, keys(200, 240)) for b in batch.column(0).to_pylist()]
    assert got == [key_from_int(k) for k in range(200, 240)]


def test_a_large_slice_downloads_the_whole_layer(store: ObjectStore, tmp_path: Path) -> None:
    entry = layer(tmp_path, store)
    cache = LayerCache(store, tmp_path / "cache")
    assert cache.fetch(entry, keys(0, 300)) == cache.path_for(entry)


def test_damage_in_a_fetched_row_group_is_caught(store: ObjectStore, tmp_path: Path) -> None:
    entry = layer(tmp_path, store, damage_key=120)
    cache = LayerCache(store, tmp_path / "cache")
    with pytest.raises(CorruptLayer, match="corrupt layer"):
        list(cache.batches(entry, keys(100, 140)))


def test_a_slice_between_two_row_groups_reads_nothing(store: ObjectStore, tmp_path: Path) -> None:
    """Keys of the layer's range that no row group holds: a slice file with no row group."""
    name = LayerName.delta(KEY_MIN, KEY_MAX, 10, 20)
    path = tmp_path / "gap.parquet"
    with LayerWriter(path, row_group_bytes=10 * 2100) as writer:
        for k in [*range(0, 100), *range(300, 400)]:
            writer.add(key_from_int(k), 11, ValueKind.IMAGE, random.Random(k).randbytes(2048))
        info = writer.finish(name)
    store.upload_file(path, "tenants/t/timelines/l/layers/gap")
    entry = LayerEntry(
        name=str(name), object_key="tenants/t/timelines/l/layers/gap", size=info.size, xxh3_128=info.xxh3_128
    )
    cache = LayerCache(store, tmp_path / "cache")
    assert list(cache.batches(entry, keys(150, 250))) == []
    assert not cache.path_for(entry).exists()


# --- downloads read while they land ---------------------------------------------------------------


def _rows(batches: object) -> list[bytes]:
    return [key for batch in batches for key in batch.column(0).to_pylist()]  # type: ignore[attr-defined]


def test_a_download_is_read_while_its_row_groups_land_and_ends_as_the_verified_whole_file(
    store: ObjectStore, tmp_path: Path
) -> None:
    entry = layer(tmp_path, store)
    cache = LayerCache(store, tmp_path / "cache")
    download = cache.download(entry)
    assert download.whole and download.next_key == key_from_int(0)
    assert download.fetch_next(max_bytes=1)  # the first row group alone; the rest is not here
    groups = len(cache.footer(entry).index)
    assert groups >= 8
    assert download.wait_for(0, 0) and not download.wait_for(groups - 1, 0)
    waited: list[int] = []
    read = download.batches(keys(0, N_KEYS), waited.append, READ_BATCH_BYTES)
    first = next(read)  # read before the rest of the layer is here
    assert first.column(0)[0].as_py() == key_from_int(0)
    assert not cache.path_for(entry).exists()
    while download.fetch_next(max_bytes=1):
        pass
    rows = _rows([first, *read])
    assert rows == [key_from_int(k) for k in range(N_KEYS)]
    assert waited == list(range(groups))  # each group was waited for before it was read
    # The file landed whole: it is the cached copy, its checksum checked, no partial file left.
    assert cache.fetch(entry) == cache.path_for(entry)
    assert [p.name for p in (tmp_path / "cache").iterdir() if "partial" in p.name] == []


def test_a_download_in_gets_bigger_than_a_write_lands_byte_for_byte(store: ObjectStore, tmp_path: Path) -> None:
    """A ranged GET of the whole 2.6 MiB layer goes to the file in pieces: every byte where it
    belongs (the checksum is taken of the bytes received, not of the file)."""
    entry = layer(tmp_path, store, n_keys=1300)
    assert entry.size > 2.5 * (1 << 20)
    cache = LayerCache(store, tmp_path / "cache")
    download = cache.download(entry)
    while download.fetch_next(max_bytes=entry.size):
        pass
    assert cache.path_for(entry).read_bytes() == store.get_bytes(entry.object_key)


def legacy(entry: LayerEntry, store: ObjectStore) -> LayerEntry:
    """``entry`` as a manifest of format 1 has it: checked by the object's SHA-256."""
    digest = hashlib.sha256(store.get_bytes(entry.object_key)).hexdigest()
    return LayerEntry(name=entry.name, object_key=entry.object_key, size=entry.size, sha256=digest)


def test_a_layer_written_before_xxh3_checksums_downloads_checked_by_its_sha256(
    store: ObjectStore, tmp_path: Path
) -> None:
    entry = legacy(layer(tmp_path, store), store)
    cache = LayerCache(store, tmp_path / "cache")
    download = cache.download(entry)
    while download.fetch_next(max_bytes=1):
        pass
    assert cache.fetch(entry) == cache.path_for(entry)  # landed whole, checked
    assert cache.path_for(entry).read_bytes() == store.get_bytes(entry.object_key)


@pytest.mark.parametrize("algorithm", ["xxh3_128", "sha256"])
def test_a_download_whose_object_is_not_the_manifests_fails_its_readers_and_caches_nothing(
    store: ObjectStore, tmp_path: Path, algorithm: str
) -> None:
    entry = layer(tmp_path, store)
    if algorithm == "sha256":
        entry = legacy(entry, store)
    digits = len(getattr(entry, algorithm))
    entry = entry.model_copy(update={algorithm: "0" * digits})
    cache = LayerCache(store, tmp_path / "cache")
    download = cache.download(entry)
    failure: list[BaseException] = []

    def read_last() -> None:
        try:
            while not download.wait_for(len(cache.footer(entry).index) - 1, 1.0):
                pass
        except CorruptLayer as err:
            failure.append(err)

    reader = threading.Thread(target=read_last)
    reader.start()
    expected = f"{algorithm} [0-9a-f]{{{digits}}}, expected {algorithm} 0{{{digits}}}"
    with pytest.raises(CorruptLayer, match=expected):
        while download.fetch_next(max_bytes=1):
            pass
    reader.join(timeout=30)
    assert failure and algorithm in str(failure[0])  # the waiting reader was woken with the error
    assert list((tmp_path / "cache").glob("*.parquet*")) == []


def test_an_abandoned_download_wakes_its_readers_and_leaves_no_file(store: ObjectStore, tmp_path: Path) -> None:
    entry = layer(tmp_path, store)
    cache = LayerCache(store, tmp_path / "cache")
    download = cache.download(entry)
    download.fetch_next(max_bytes=1)
    woken = threading.Event()

    def wait_last() -> None:
        with pytest.raises(DownloadAbandoned):
            while not download.wait_for(1, 1.0):
                pass
        woken.set()

    waiter = threading.Thread(target=wait_last)
    waiter.start()
    download.abandon()
    waiter.join(timeout=30)
    assert woken.is_set()
    assert list((tmp_path / "cache").glob("*.parquet*")) == []
