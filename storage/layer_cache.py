"""A local cache of layer objects, keyed by object key.

A whole file appears under its final name only after its size and sha256 matched the manifest,
so presence means verified. Downloads go to a unique temporary name and are renamed into place
(``ObjectStore.download_file``), which keeps several worker processes on one node safe sharing
the directory.

A sub-job reads one slice of its layers' keys: when the row groups holding that slice are a
small part of a layer, only they are fetched (ranged GETs, after the footer), into a sparse file
of the layer's size with the bytes at their own offsets. Such a *slice file* holds the footer and
those row groups only; it is read for that key range alone, and the pages it holds are verified
by their checksums (the whole file's sha256 cannot be, without the rest of it).

The tail of a layer read for its footer is kept too (``*.tail``): every sub-job of a meta job that
runs on a node reads the footers of the same layers, and a layer never changes, so only the first
one asks the store for them.
"""

import hashlib
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from compactor.storage.errors import CorruptLayer, NotFound, StoreError
from compactor.storage.keys import KeyRange
from compactor.storage.layer_file import Footer, LayerReader, footer_from_tail, footer_length
from compactor.storage.manifest import LayerEntry
from compactor.storage.object_store import ObjectStore
from compactor.storage.values import Version

log = logging.getLogger(__name__)

# One read holds the footer of any layer up to a few GiB (the index has a line per 8 MiB group).
FOOTER_READ_BYTES = 64 * 1024
# A slice needing more than this share of a layer's bytes downloads (and caches) the whole layer.
SLICE_MAX_FRACTION = 0.5
_PARQUET_MAGIC = b"PAR1"


class LayerCache:
    def __init__(self, store: ObjectStore, root: Path, max_bytes: int | None = None) -> None:
        self.store = store
        self.root = root
        self.max_bytes = max_bytes
        self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, entry: LayerEntry) -> Path:
        # Object keys outgrow file-name limits; their digest names the cached copy uniquely.
        return self.root / f"{hashlib.sha256(entry.object_key.encode()).hexdigest()[:40]}.parquet"

    def _slice_path(self, entry: LayerEntry, key_range: KeyRange) -> Path:
        keys = hashlib.sha256(key_range.start + key_range.end).hexdigest()[:16]
        return self.path_for(entry).with_suffix(f".{keys}.slice.parquet")

    def _tail_path(self, entry: LayerEntry) -> Path:
        return self.path_for(entry).with_suffix(".tail")

    def _cached(self, path: Path, entry: LayerEntry) -> bool:
        if path.exists():
            if path.stat().st_size == entry.size:
                path.touch()  # recently used: evicted last
                return True
            path.unlink(missing_ok=True)
        return False

    def footer(self, entry: LayerEntry) -> Footer:
        """The layer's footer: from the cached copy when there is one, else from ranged reads of
        the object's tail, so that planning and slices never download whole layers for it."""
        return footer_from_tail(self._tail(entry), f"{entry.name} (object {entry.object_key})")

    def _tail(self, entry: LayerEntry) -> bytes:
        """The layer file's last bytes, holding at least its whole footer when it is intact."""
        size = entry.size
        path = self.path_for(entry)
        if self._cached(path, entry):
            with open(path, "rb") as f:
                f.seek(max(0, size - FOOTER_READ_BYTES))
                return f.read()
        kept = self._tail_path(entry)
        try:
            tail = kept.read_bytes()
            os.utime(kept)  # recently used: evicted last (utime, unlike touch, never creates it again)
            return tail
        except FileNotFoundError:
            pass  # not kept yet, or trimmed meanwhile
        tail = self.store.get_range(entry.object_key, max(0, size - FOOTER_READ_BYTES), min(size, FOOTER_READ_BYTES))
        needed = footer_length(tail)
        if needed is not None and len(tail) < needed <= size:
            tail = self.store.get_range(entry.object_key, size - needed, needed)
        partial = kept.with_name(f"{kept.name}.{uuid.uuid4().hex}.partial")
        partial.write_bytes(tail)
        os.replace(partial, kept)  # whole or absent for the node's other processes
        return tail

    def fetch(self, entry: LayerEntry, key_range: KeyRange | None = None) -> Path:
        """The local path of a copy of the layer that holds the keys of ``key_range`` (all of
        them when None): the verified whole file, or a slice file (module docstring)."""
        path = self.path_for(entry)
        if self._cached(path, entry):
            return path
        if key_range is not None and not key_range.covers(entry.layer.key_range):
            sliced = self._fetch_slice(entry, key_range)
            if sliced is not None:
                return sliced
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

    def _fetch_slice(self, entry: LayerEntry, key_range: KeyRange) -> Path | None:
        """The slice file of ``key_range``, fetched if needed; None when its row groups are too
        large a part of the layer to be worth it."""
        path = self._slice_path(entry, key_range)
        if self._cached(path, entry):
            return path
        tail = self._tail(entry)
        footer = footer_from_tail(tail, f"{entry.name} (object {entry.object_key})")
        wanted = [
            span
            for group, span in zip(footer.index, footer.byte_ranges, strict=True)
            if group.first_key < key_range.end and group.last_key >= key_range.start
        ]
        if sum(end - start for start, end in wanted) + footer.length > entry.size * SLICE_MAX_FRACTION:
            return None
        size = entry.size
        partial = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
        try:
            with open(partial, "wb") as f:
                f.truncate(size)  # sparse: the row groups of other keys are never written
                # The leading magic is a constant and the tail was read for the footer already;
                # the row groups of a slice lie next to each other: one read covers them.
                f.write(_PARQUET_MAGIC)
                f.seek(size - len(tail))
                f.write(tail)
                start, end = (wanted[0][0], wanted[-1][1]) if wanted else (0, 0)  # none: no row to read
                if end > start:
                    data = self.store.get_range(entry.object_key, start, end - start)
                    if len(data) != end - start:
                        raise StoreError(f"short read of layer {entry.name}: {len(data)} of {end - start} bytes")
                    f.seek(start)
                    f.write(data)
            os.replace(partial, path)
        except NotFound:
            raise CorruptLayer(f"missing layer {entry.name} (object {entry.object_key}): not in the bucket") from None
        finally:
            partial.unlink(missing_ok=True)
        log.debug("layer slice cached name=%s keys=%s bytes=%d of %d", entry.name, key_range,
                  end - start + len(tail), size)  # fmt: skip
        if self.max_bytes is not None:
            self._trim(self.max_bytes, spare=path)
        return path

    def _trim(self, max_bytes: int, spare: Path) -> None:
        """Delete least recently used files until the cache fits ``max_bytes``. A reader that has
        a file open keeps reading it; one that has not opened it yet downloads it again."""
        files = []
        for path in [*self.root.glob("*.parquet"), *self.root.glob("*.tail")]:
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
        """The rows of ``key_range``, from a slice file of exactly that range when one is
        cached (``fetch(entry, key_range)``), else from the whole layer."""
        return self.reader(entry, key_range).iter_batches(key_range)

    def reader(self, entry: LayerEntry, key_range: KeyRange | None = None) -> LayerReader:
        """A reader for the keys of ``key_range`` only (all when None)."""
        return LayerReader(self.fetch(entry, key_range), name=entry.layer, object_key=entry.object_key)
