"""A local cache of layer objects, keyed by object key, holding only verified files.

A file appears under its final name only after its size and sha256 matched the manifest, so
presence means verified. Downloads go to a unique temporary name and are renamed into place
(``ObjectStore.download_file``), which keeps several worker processes on one node safe sharing
the directory.
"""

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from compactor.storage.errors import CorruptLayer, NotFound
from compactor.storage.keys import KeyRange
from compactor.storage.layer_file import LayerReader
from compactor.storage.manifest import LayerEntry
from compactor.storage.object_store import ObjectStore
from compactor.storage.values import Version

log = logging.getLogger(__name__)


class LayerCache:
    def __init__(self, store: ObjectStore, root: Path, max_bytes: int | None = None) -> None:
        self.store = store
        self.root = root
        self.max_bytes = max_bytes
        self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, entry: LayerEntry) -> Path:
        # Object keys outgrow file-name limits; their digest names the cached copy uniquely.
        return self.root / f"{hashlib.sha256(entry.object_key.encode()).hexdigest()[:40]}.parquet"

    def fetch(self, entry: LayerEntry) -> Path:
        """The local path of a verified copy of the layer, downloading it if needed."""
        path = self.path_for(entry)
        if path.exists():
            if path.stat().st_size == entry.size:
                path.touch()  # recently used: evicted last
                return path
            path.unlink(missing_ok=True)
        try:
            self.store.download_file(entry.object_key, path, expected_size=entry.size, expected_sha256=entry.sha256)
        except NotFound:
            raise CorruptLayer(f"missing layer {entry.name} (object {entry.object_key}): not in the bucket") from None
        except CorruptLayer as err:
            raise CorruptLayer(f"corrupt layer {entry.name}: {err}") from None
        log.debug("layer cached name=%s object=%s size=%d", entry.name, entry.object_key, entry.size)
        if self.max_bytes is not None:
            self._trim(self.max_bytes, spare=path)
        return path

    def _trim(self, max_bytes: int, spare: Path) -> None:
        """Delete least recently used files until the cache fits ``max_bytes``. A reader that has
        a file open keeps reading it; one that has not opened it yet downloads it again."""
        files = []
        for path in self.root.glob("*.parquet"):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue  # another process trimmed it
            files.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= max_bytes:
                break
            if path != spare:
                path.unlink(missing_ok=True)
                total -= size

    def versions(self, entry: LayerEntry, key_range: KeyRange) -> Iterator[Version]:
        return self.reader(entry).iter_versions(key_range)

    def batches(self, entry: LayerEntry, key_range: KeyRange) -> Iterator[pa.RecordBatch]:
        return self.reader(entry).iter_batches(key_range)

    def reader(self, entry: LayerEntry) -> LayerReader:
        return LayerReader(self.fetch(entry), name=entry.layer, object_key=entry.object_key)
