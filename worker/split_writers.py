"""Writers that cut their output into layers of about a target size (the seed's
``SplitDeltaLayerWriter`` and ``SplitImageLayerWriter``).

Each piece is a local layer file; names are decided when a piece is cut, and at ``finish`` every
piece is either kept as a produced layer or discarded (deleted) when ``discard(name)`` says so,
e.g. because an identical layer already exists.
"""

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage.keys import KEY_MAX, KEY_SIZE, key_next
from storage.layer_file import SCHEMA, LayerFileInfo, LayerWriter
from storage.layer_name import LayerName
from storage.values import ValueKind, Version
from worker.merge import key_array, key_at

# The seed's per-value estimate for deltas: key, LSN and about 80 bytes of value.
_DELTA_ROW_ESTIMATE = KEY_SIZE + 8 + 80


def _slices(table: pa.Table, starts: np.ndarray, target_bytes: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` row ranges of ``table`` that begin at ``starts`` (the rows a piece may
    begin with) and hold about 1/32 of the target size each: a table goes to a writer slice by
    slice, so a piece is cut close to its target without a check per row."""
    step = max(4096, min(1 << 20, target_bytes // 32))
    sizes = np.cumsum(pc.binary_length(table.column("value")).to_numpy(zero_copy_only=False).astype(np.int64))
    sizes += np.arange(1, table.num_rows + 1) * (KEY_SIZE + 9)
    start = 0
    while start < table.num_rows:
        before = sizes[start - 1] if start else 0
        # The first allowed start past one step's worth of bytes, but at least one further on.
        at = int(np.searchsorted(sizes, before + step, side="left")) + 1
        index = int(np.searchsorted(starts, max(at, start + 1), side="left"))
        end = int(starts[index]) if index < len(starts) else table.num_rows
        yield start, end
        start = end


@dataclass(frozen=True)
class Produced:
    name: LayerName
    file: LayerFileInfo


@dataclass(frozen=True)
class Discarded:
    name: LayerName


WriterResult = Produced | Discarded
Discard = Callable[[LayerName], bool]
OnCut = Callable[[LayerName, LayerFileInfo], WriterResult]
"""Decides about a piece as soon as it is cut, instead of at ``finish``; a kept piece's file then
belongs to the callee (the engine uploads it while the writers go on)."""


class _Pieces:
    """Pieces written so far. Each is finished as soon as it is cut, so memory holds one open
    writer at a time. Whether a piece is kept is decided for all of them at the end, as the
    seed's batch writer does, or for each one as it is cut when ``on_cut`` is given."""

    def __init__(self, workdir: Path, on_cut: OnCut | None = None) -> None:
        self.workdir = workdir
        self.on_cut = on_cut
        self.decided: list[WriterResult] = []
        self.done: list[LayerFileInfo] = []  # undecided
        self.names: list[LayerName] = []
        self._count = 0

    def new_writer(self) -> LayerWriter:
        self._count += 1
        return LayerWriter(self.workdir / f"piece-{id(self):x}-{self._count}.parquet")

    def add(self, name: LayerName, writer: LayerWriter) -> None:
        file = writer.finish(name)
        if self.on_cut is not None:
            self.decided.append(self.on_cut(name, file))
        else:
            self.done.append(file)
            self.names.append(name)

    def finish(self, discard: Discard) -> list[WriterResult]:
        results = self.decided
        for name, file in zip(self.names, self.done, strict=True):
            if discard(name):
                file.path.unlink(missing_ok=True)
                results.append(Discarded(name))
            else:
                results.append(Produced(name, file))
        self.decided, self.done, self.names = [], [], []
        return results

    def abort(self) -> None:
        """Delete the undecided pieces (decided ones were deleted or handed on when cut)."""
        for file in self.done:
            file.path.unlink(missing_ok=True)
        self.decided, self.done, self.names = [], [], []


class SplitDeltaWriter:
    """Deltas over one LSN range, cut only between keys: all versions of a key stay in one layer.

    A piece covers ``[its first key, the next piece's first key)``; the last one ends right after
    its last key, as the seed infers delta key ranges.
    """

    def __init__(
        self, workdir: Path, lsn_range: tuple[int, int], target_bytes: int, on_cut: OnCut | None = None
    ) -> None:
        self.lsn_range = lsn_range
        self.target_bytes = target_bytes
        self._pieces = _Pieces(workdir, on_cut)
        self._writer: LayerWriter | None = None
        self._start_key = b""
        self._last_key: bytes | None = None

    def _writer_for(self, key: bytes) -> LayerWriter:
        """The writer that takes ``key`` next: a new piece begins once the current one is full
        and ``key`` is a new key."""
        writer = self._writer
        if writer is None:
            writer = self._writer = self._pieces.new_writer()
            self._start_key = key
        elif (
            key != self._last_key
            and writer.num_rows >= 1
            and writer.size_reaches(self.target_bytes - _DELTA_ROW_ESTIMATE)
        ):
            self._pieces.add(LayerName.delta(self._start_key, key, *self.lsn_range), writer)
            writer = self._writer = self._pieces.new_writer()
            self._start_key = key
        self._last_key = key
        return writer

    def put(self, version: Version) -> None:
        self._writer_for(version.key).add(*version)

    def put_table(self, table: pa.Table) -> None:
        """Every row of ``table`` (layer schema, sorted, whole keys), cut only between keys."""
        if not table.num_rows:
            return
        keys = key_array(table.column("key"))
        starts = np.concatenate(([0], np.flatnonzero(keys[1:] != keys[:-1]) + 1))
        for start, end in _slices(table, starts, self.target_bytes):
            writer = self._writer_for(key_at(keys, start))
            for batch in table.slice(start, end - start).to_batches():
                writer.add_batch(batch)
            self._last_key = key_at(keys, end - 1)

    def put_key(self, versions: Sequence[Version]) -> None:
        """``put`` each of ``versions``, which all belong to one key, in order."""
        if not versions:
            return
        self.put(versions[0])
        if len(versions) > 1:
            assert self._writer is not None
            self._writer.add_rows(versions[1:])

    def finish(self, discard: Discard) -> list[WriterResult]:
        if self._writer is not None and self._last_key is not None:
            end = key_next(self._last_key) if self._last_key != KEY_MAX else KEY_MAX
            self._pieces.add(LayerName.delta(self._start_key, end, *self.lsn_range), self._writer)
            self._writer = None
        return self._pieces.finish(discard)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
        self._pieces.abort()


class SplitImageWriter:
    """Images at one LSN; the pieces together cover exactly ``[start_key, end_key)`` of the job."""

    def __init__(
        self, workdir: Path, start_key: bytes, lsn: int, target_bytes: int, on_cut: OnCut | None = None
    ) -> None:
        self.lsn = lsn
        self.target_bytes = target_bytes
        self._pieces = _Pieces(workdir, on_cut)
        self._writer: LayerWriter | None = None
        self._start_key = start_key

    def _writer_for(self, key: bytes, size: int) -> LayerWriter:
        """The writer that takes ``key`` with ``size`` bytes of images next."""
        writer = self._writer
        if writer is None:
            writer = self._writer = self._pieces.new_writer()
        elif writer.num_rows >= 1 and writer.size_reaches(self.target_bytes - KEY_SIZE - size):
            self._pieces.add(LayerName.image(self._start_key, key, self.lsn), writer)
            writer = self._writer = self._pieces.new_writer()
            self._start_key = key
        return writer

    def put(self, key: bytes, page: bytes) -> None:
        self._writer_for(key, len(page)).add(key, self.lsn, ValueKind.IMAGE, page)

    def put_batch(self, keys: pa.Array, pages: pa.Array) -> None:
        """``put`` of each key (in order) and its page."""
        n = len(keys)
        if not n:
            return
        lsns = pa.array(np.full(n, self.lsn, dtype=np.uint64))
        kinds = pa.array(np.full(n, int(ValueKind.IMAGE), dtype=np.uint8))
        table = pa.Table.from_arrays([keys, lsns, kinds, pages], schema=SCHEMA)
        key_bytes = key_array(keys)
        for start, end in _slices(table, np.arange(n), self.target_bytes):
            writer = self._writer_for(key_at(key_bytes, start), 0)
            for batch in table.slice(start, end - start).to_batches():
                writer.add_batch(batch)

    def finish(self, end_key: bytes, discard: Discard) -> list[WriterResult]:
        if self._writer is not None and self._writer.num_rows:
            self._pieces.add(LayerName.image(self._start_key, end_key, self.lsn), self._writer)
            self._writer = None
        return self._pieces.finish(discard)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
        self._pieces.abort()
