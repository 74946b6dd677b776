"""A local cache of layer objects, keyed by object key.

A whole file appears under its final name only after its size and checksum matched the manifest,
so presence means verified. Downloads go to a unique temporary name and are renamed into place
(``ObjectStore.download_file``), which keeps several worker processes on one node safe sharing
the directory.

A sub-job reads one slice of its layers' keys: when the row groups holding that slice are a
small part of a layer, only they are fetched (ranged GETs, after the footer), into a sparse file
of the layer's size with the bytes at their own offsets. Such a *slice file* holds the footer and
those row groups only; it is read for that key range alone, and the pages it holds are verified
by their checksums (the whole file's checksum cannot be, without the rest of it).

A compaction does not wait for its layers to download before it merges them: it fetches them
as a ``LayerDownload``, row group by row group (ranged GETs, in the order the merge needs them),
into a sparse file that readers read while later groups are still on their way, each group once
it has landed. A download that wanted every row group is the whole file: its checksum (hashed as
the groups land, in file order) is checked before it is renamed into place, so a whole file in
the cache still means a verified one.

The tail of a layer read for its footer is kept too (``*.tail``): every sub-job of a meta job that
runs on a node reads the footers of the same layers, and a layer never changes, so only the first
one asks the store for them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pyarrow as pa

from compactor.storage.checksum import Checksum, Hasher, file_checksum, hasher
from compactor.storage.errors import CompactorError, CorruptLayer, NotFound
from compactor.storage.keys import KeyRange
from compactor.storage.layer_file import Footer, LayerReader, RowGroup, footer_from_tail, footer_length
from compactor.storage.manifest import LayerEntry
from compactor.storage.object_store import WRITE_PIECE_BYTES, ObjectStore
from compactor.storage.values import Version

log = logging.getLogger(__name__)

# One read holds the footer of any layer up to a few GiB (the index has a line per 8 MiB group).
FOOTER_READ_BYTES = 64 * 1024
# A slice needing more than this share of a layer's bytes downloads (and caches) the whole layer.
SLICE_MAX_FRACTION = 0.5
_PARQUET_MAGIC = b"PAR1"


T = TypeVar("T")


def missing_layer(entry: LayerEntry) -> CorruptLayer:
    return CorruptLayer(f"missing layer {entry.name} (object {entry.object_key}): not in the bucket")


def after_first(items: Iterator[T], then: Callable[[], None]) -> Iterator[T]:
    """``items``, calling ``then`` once the first was taken (never if there is none)."""
    for item in items:
        yield item
        break
    else:
        return
    then()
    yield from items


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

    def _footer(self, entry: LayerEntry) -> tuple[Footer, bytes]:
        """The layer's footer and the tail it was read from, for a download; a layer not in the
        bucket is a CorruptLayer naming it."""
        try:
            tail = self._tail(entry)
        except NotFound:
            raise missing_layer(entry) from None
        return footer_from_tail(tail, f"{entry.name} (object {entry.object_key})"), tail

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
            self.store.download_file(entry.object_key, path, expected_size=entry.size, expected=entry.checksum)
        except NotFound:
            raise missing_layer(entry) from None
        except CorruptLayer as err:
            raise CorruptLayer(f"corrupt layer {entry.name}: {err}") from None
        log.debug("layer cached name=%s object=%s size=%d", entry.name, entry.object_key, entry.size)
        if self.max_bytes is not None:
            self._trim(self.max_bytes, spare=path)
        return path

    def _fetch_slice(self, entry: LayerEntry, key_range: KeyRange) -> Path | None:
        """The slice file of ``key_range``, fetched if needed; None when its row groups are too
        large a part of the layer to be worth it."""
        download = self._slice(entry, key_range)
        if download is None:
            return None
        while download.fetch_next(max_bytes=entry.size):
            pass
        return download.path

    def download(
        self, entry: LayerEntry, key_range: KeyRange | None = None, first_read: Callable[[], None] | None = None
    ) -> LayerDownload:
        """The layer's rows of ``key_range`` (all when None) on their way here: a slice file
        when its row groups are at most ``SLICE_MAX_FRACTION`` of the layer, else the whole file.
        Reads the footer from the object's tail first (unless cached); nothing more is fetched
        until ``LayerDownload.fetch_next``."""
        path = self.path_for(entry)
        if self._cached(path, entry):
            return LayerDownload(self, entry, path, first_read=first_read)
        if key_range is not None and not key_range.covers(entry.layer.key_range):
            download = self._slice(entry, key_range, first_read)
            if download is not None:
                return download
        footer, tail = self._footer(entry)
        return LayerDownload(self, entry, path, (footer, tail, list(range(len(footer.index)))), first_read)

    def _slice(
        self, entry: LayerEntry, key_range: KeyRange, first_read: Callable[[], None] | None = None
    ) -> LayerDownload | None:
        sliced = self._slice_path(entry, key_range)
        if self._cached(sliced, entry):
            return LayerDownload(self, entry, sliced, first_read=first_read)
        footer, tail = self._footer(entry)
        wanted = [
            i
            for i, group in enumerate(footer.index)
            if group.first_key < key_range.end and group.last_key >= key_range.start
        ]
        slice_bytes = sum(footer.byte_ranges[i][1] - footer.byte_ranges[i][0] for i in wanted)
        if slice_bytes + footer.length > entry.size * SLICE_MAX_FRACTION:
            return None
        return LayerDownload(self, entry, sliced, (footer, tail, wanted), first_read)

    def _published(self, path: Path) -> None:
        log.debug("layer cached path=%s", path)
        if self.max_bytes is not None:
            self._trim(self.max_bytes, spare=path)

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


def _write_at(fd: int, data: bytes, offset: int) -> None:
    """``data`` written at ``offset`` of ``fd``, in pieces of at most ``WRITE_PIECE_BYTES`` (a
    write may take less than it was given)."""
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done : done + WRITE_PIECE_BYTES], offset + done)


class DownloadAbandoned(CompactorError):
    """A layer download stopped before every row group landed (its job ended or failed)."""


class LayerDownload:
    """A layer fetched row group by row group into a local file that readers read as the groups
    land (module docstring). One thread calls ``fetch_next`` until it returns False; any thread
    reads through ``reader``, whose row groups wait until they are here. A failure, or
    ``abandon``, wakes every waiting reader with the error and deletes the partial file."""

    def __init__(
        self,
        cache: LayerCache,
        entry: LayerEntry,
        final: Path,
        fetch: tuple[Footer, bytes, list[int]] | None = None,
        first_read: Callable[[], None] | None = None,
    ) -> None:
        """A download into ``final`` of the row groups ``fetch`` names (with the footer and
        the tail it was read from); with no ``fetch``, ``final`` is already cached.
        ``first_read`` is called once the first batch was read through ``batches``."""
        self.entry = entry
        self._first_read = first_read
        self.path = final
        self._cache = cache
        self._final = final
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._fd: int | None = None
        self._fetched = 0  # wanted groups written (by the fetching thread)
        self._landed = 0  # wanted groups readers may read
        self._seconds = 0.0  # spent fetching, and the bytes fetched
        self._bytes = 0
        self._groups: list[RowGroup] = []
        self._spans: list[tuple[int, int]] = []
        self._position: dict[int, int] = {}
        self._hash: Hasher | None = None
        self._footer = b""
        if fetch is None:
            self.whole = final == cache.path_for(entry)
            return
        footer, tail, wanted = fetch
        self.whole = len(wanted) == len(footer.index)
        self._groups = [footer.index[i] for i in wanted]
        self._spans = [footer.byte_ranges[i] for i in wanted]
        self._position = {group: position for position, group in enumerate(wanted)}
        size = entry.size
        # Hashing as the groups land needs them to tile the file between its magic and footer,
        # as every layer written here does; otherwise the file is hashed once it is complete.
        starts = [4, *(end for _, end in self._spans)]
        ends = [*(start for start, _ in self._spans), size - footer.length]
        if self.whole and starts == ends:
            self._hash = hasher(entry.checksum.algorithm)
            self._hash.update(_PARQUET_MAGIC)
        self._footer = tail[len(tail) - footer.length :]
        self.path = final.with_name(f"{final.name}.{uuid.uuid4().hex}.partial")
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.ftruncate(self._fd, size)  # sparse until the groups land
            os.pwrite(self._fd, _PARQUET_MAGIC, 0)
            os.pwrite(self._fd, tail, size - len(tail))
            if not self._spans:
                self._verify()
                self._publish()
        except BaseException:
            self._close(unlink=True)
            raise

    @property
    def next_key(self) -> bytes | None:
        """The first key of the next row group to fetch; None once every wanted group landed."""
        return self._groups[self._fetched].first_key if self._fetched < len(self._spans) else None

    def fetch_next(self, max_bytes: int) -> bool:
        """Fetch the next wanted row group, with those right after it in the file up to about
        ``max_bytes`` in all (one ranged GET); False once nothing is left to fetch."""
        if self._fetched >= len(self._spans):
            return False
        try:
            first = last = self._fetched
            spans = self._spans
            while (
                last + 1 < len(spans)
                and spans[last + 1][0] == spans[last][1]
                and spans[last + 1][1] - spans[first][0] <= max_bytes
            ):
                last += 1
            start, end = spans[first][0], spans[last][1]
            started = time.perf_counter()
            try:
                data = self._cache.store.get_range(self.entry.object_key, start, end - start)
            except NotFound:
                raise missing_layer(self.entry) from None
            self._seconds += time.perf_counter() - started
            self._bytes += len(data)
            if len(data) != end - start:
                raise CorruptLayer(
                    f"short read of layer {self.entry.name}: {len(data)} of {end - start} bytes at {start}"
                )
            assert self._fd is not None
            _write_at(self._fd, data, start)
            if self._hash is not None:
                self._hash.update(data)
            self._fetched = last + 1
            if self._fetched == len(spans):
                self._verify()
        except BaseException as err:
            self.abandon(err)
            raise
        with self._cond:
            self._landed = self._fetched
            self._cond.notify_all()
        if self._fetched < len(spans):
            return True
        # Readers go on while the file is made durable and renamed; their open files stay valid.
        try:
            self._publish()
        except BaseException as err:
            self.abandon(err)
            raise
        return False

    def _verify(self) -> None:
        """Every wanted group is here: a whole file must have the manifest's checksum."""
        if not self.whole:
            return
        expected = self.entry.checksum
        if self._hash is not None:
            self._hash.update(self._footer)
            actual = Checksum(expected.algorithm, self._hash.hexdigest())
        else:
            actual = file_checksum(self.path, expected.algorithm)
        if actual != expected:
            raise CorruptLayer(
                f"corrupt layer {self.entry.name} (object {self.entry.object_key}): {actual}, expected {expected}"
            )

    def _publish(self) -> None:
        assert self._fd is not None
        if self.whole:
            os.fsync(self._fd)  # a whole file in the cache is trusted by its size after a crash
        with self._cond:
            # Under the lock: a reader opens the file by the name it has at that moment.
            os.replace(self.path, self._final)
            self.path = self._final
        self._close(unlink=False)
        # Fetching time only: the groups of other layers fetched in between are theirs.
        self._cache.store.observer.download(self._seconds, self._bytes)
        self._cache._published(self._final)

    def abandon(self, error: BaseException | None = None) -> None:
        """Stop: wake every waiting reader with ``error`` (or DownloadAbandoned) and delete the
        partial file. Does nothing once the download is complete."""
        with self._cond:
            if self._fd is None or self._error is not None:
                return
            self._error = error or DownloadAbandoned(f"download of layer {self.entry.name} was abandoned")
            self._cond.notify_all()
        self._close(unlink=True)

    def _close(self, *, unlink: bool) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if unlink:
            self.path.unlink(missing_ok=True)

    def wait_for(self, group: int, timeout: float) -> bool:
        """Whether row group ``group`` of the file has landed, waiting up to ``timeout`` seconds
        for it; raises the download's error if it failed."""
        position = self._position.get(group)
        with self._cond:
            if position is None or position < self._landed:
                return True
            if self._error is None:
                self._cond.wait(timeout)
            if self._error is not None:
                raise self._error
            return position < self._landed

    def batches(self, key_range: KeyRange, wait: Callable[[int], None], batch_bytes: int) -> Iterator[pa.RecordBatch]:
        """The rows of ``key_range`` in batches of about ``batch_bytes``, each row group read once
        ``wait(group)`` returned (after ``wait_for`` said it landed)."""
        with self._cond:
            if self._error is not None:
                raise self._error
            # Under the lock: the file is opened by the name it has at that moment.
            reader = LayerReader(self.path, name=self.entry.layer, object_key=self.entry.object_key, before_group=wait)
        batches = reader.iter_batches(key_range, batch_bytes)
        return batches if self._first_read is None else after_first(batches, self._first_read)
