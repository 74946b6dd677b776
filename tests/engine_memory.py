"""An in-memory ``LayerIO`` for engine tests: layer files are real Parquet files written by the
engine's writers and read back on upload, but nothing touches the network."""

import itertools
import json
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import xxhash

from compactor.storage.errors import RedoError
from compactor.storage.keys import KeyRange, key_from_int
from compactor.storage.layer_file import LayerFileInfo, LayerReader, versions_to_batch
from compactor.storage.layer_name import LayerName
from compactor.storage.manifest import LayerEntry, Manifest
from compactor.storage.read_path import read_key, read_range
from compactor.storage.timeline_json import parse_timeline
from compactor.storage.values import Version
from tests.timelines import Timeline

_ids = itertools.count()


class MemorySink:
    """A streamed upload kept in memory: ``state`` is open, completed or aborted."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.data = bytearray()
        self.state = "open"

    def write(self, data: bytes) -> None:
        assert self.state == "open", self.state
        self.data += data

    def complete(self) -> None:
        assert self.state == "open", self.state
        self.state = "completed"

    def abort(self) -> None:
        if self.state == "open":
            self.state = "aborted"


class MemoryDownload:
    """A layer of ``MemoryIO``: here already, read in small batches, so that keys span batches
    as they do in real layer files."""

    next_key = None

    def __init__(self, io: "MemoryIO", entry: LayerEntry) -> None:
        self.io = io
        self.entry = entry

    def fetch_next(self, max_bytes: int) -> bool:
        return False

    def wait_for(self, group: int, timeout: float) -> bool:
        return True

    def abandon(self, error: BaseException | None = None) -> None:
        pass

    def batches(self, key_range: KeyRange, wait: Callable[[int], None], batch_bytes: int) -> Iterator[pa.RecordBatch]:
        self.io.batch_bytes[self.entry.name] = batch_bytes
        versions = list(self.io.versions(self.entry, key_range))
        for start in range(0, len(versions), 7):
            yield versions_to_batch(versions[start : start + 7])


class MemoryIO:
    def __init__(self) -> None:
        self.objects: dict[str, list[Version]] = {}
        self.manifests: dict[str, Manifest] = {}
        self.uploads = 0
        self.sinks: list[MemorySink] = []
        self.batch_bytes: dict[str, int] = {}  # the read batch the engine asked of each layer

    def load(self, tls: dict[str, Timeline]) -> None:
        for tl_id, tl in tls.items():
            parsed = parse_timeline(json.dumps(tl.to_json()))
            entries = {}
            for name, versions in parsed.layers:
                key = f"{tl_id}/{name}-{next(_ids)}"
                self.objects[key] = versions
                digest = xxhash.xxh3_128(key.encode()).hexdigest()
                entries[str(name)] = LayerEntry(
                    name=str(name), object_key=key, size=100 * len(versions), xxh3_128=digest
                )
            self.manifests[tl_id] = Manifest(
                tenant_id=parsed.tenant_id,
                timeline_id=tl_id,
                number=0,
                ancestor=parsed.ancestor,
                gc=parsed.gc,
                keyspace=parsed.keyspace,
                layers=entries,
            )

    def read_keys(self, manifest: Manifest, lsn: int, n_keys: int = 9) -> dict[int, bytes | type]:
        """Each small key's value at ``lsn`` (``RedoError`` where it cannot be read), key by key
        so that one unreadable key does not hide the others."""
        out: dict[int, bytes | type] = {}
        for k in range(n_keys):
            try:
                value = read_key(manifest, self, key_from_int(k), lsn, self.manifests.__getitem__)
            except RedoError:
                out[k] = RedoError
                continue
            if value is not None:
                out[k] = value
        return out

    # LayerIO
    def needs_download(self, entry: LayerEntry) -> bool:
        return False

    def download(self, entry: LayerEntry, key_range: KeyRange) -> "MemoryDownload":
        assert entry.object_key in self.objects, entry.object_key
        return MemoryDownload(self, entry)

    def versions(self, entry: LayerEntry, key_range: KeyRange) -> Iterator[Version]:
        return (v for v in self.objects[entry.object_key] if key_range.start <= v.key < key_range.end)

    def read_below(
        self, manifest: Manifest, key_range: KeyRange, lsn: int, exclude: set[str]
    ) -> Iterator[tuple[bytes, bytes]]:
        return read_range(manifest, self, key_range, lsn, self.manifests.__getitem__, exclude, skip_unreadable=True)

    def open_upload(self, manifest: Manifest) -> MemorySink:
        sink = MemorySink(f"{manifest.timeline_id}/{next(_ids)}")
        self.sinks.append(sink)
        return sink

    def read(self, manifest: Manifest, lsn: int, key_range: KeyRange) -> Iterator[tuple[bytes, bytes]]:
        return read_range(manifest, self, key_range, lsn, self.manifests.__getitem__)

    def upload(self, manifest: Manifest, name: LayerName, file: LayerFileInfo) -> LayerEntry:
        key = f"{manifest.timeline_id}/{name}-{next(_ids)}"
        if isinstance(file.sink, MemorySink):
            file.sink.complete()
            key = file.sink.key
            # What was streamed is the layer, byte for byte.
            assert (
                xxhash.xxh3_128(bytes(file.sink.data)).hexdigest() == file.xxh3_128 and len(file.sink.data) == file.size
            )
            with tempfile.NamedTemporaryFile() as streamed:
                streamed.write(file.sink.data)
                streamed.flush()
                self.objects[key] = list(LayerReader(Path(streamed.name), name=name).iter_versions())
        else:
            assert file.path is not None
            self.objects[key] = list(LayerReader(file.path, name=name).iter_versions())
        self.uploads += 1
        return LayerEntry(name=str(name), object_key=key, size=file.size, xxh3_128=file.xxh3_128)

    def delete_uploads(self, entries: list[LayerEntry]) -> None:
        for entry in entries:
            self.objects.pop(entry.object_key, None)
