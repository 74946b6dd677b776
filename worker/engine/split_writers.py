"""Writers that cut their output into layers of about a target size (the seed's
``SplitDeltaLayerWriter`` and ``SplitImageLayerWriter``).

Each piece is a local layer file, streamed to a ``LayerSink`` (an upload) as it is written when
the writer is given ``open_sink``; names are decided when a piece is cut, and at ``finish`` every
piece is either kept as a produced layer or discarded (deleted, its upload aborted) when
``discard(name)`` says so, e.g. because an identical layer already exists.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from compactor.storage.keys import KEY_MAX, KEY_SIZE, key_next
from compactor.storage.layer_file import SCHEMA, LayerFileInfo, LayerSink, LayerWriter, one_array, payload_lengths
from compactor.storage.layer_name import LayerName
from compactor.storage.values import ValueKind, Version
from compactor.worker.engine.merge import key_array, key_at, key_starts

# The seed's per-value estimate for deltas: key, LSN and about 80 bytes of value.
_DELTA_ROW_ESTIMATE = KEY_SIZE + 8 + 80
# Room kept for the next image when deciding to cut: a key and a page.
_IMAGE_ROW_ESTIMATE = KEY_SIZE + 8192
# A row's raw size besides its payload (key, LSN, kind, offset), as the size checks count it.
_ROW_RAW = KEY_SIZE + 13


def raw_sizes(table: pa.Table) -> np.ndarray:
    """Cumulative raw size before each row of ``table``, and after the last."""
    sizes = payload_lengths(one_array(table.column("value"))) + _ROW_RAW
    before: np.ndarray = np.concatenate(([0], np.cumsum(sizes)))
    return before


class _SizeChecks:
    """When a writer asks whether its piece is full. Asking costs a look at the writer, so it is
    asked at the first key that begins after each further 1/32 of the target in raw bytes. That
    is a function of the rows alone: rows given one by one or as tables of any size are cut at
    the same keys, so compacting the same versions again gives the same layers."""

    def __init__(self, target_bytes: int) -> None:
        self.step = max(1, min(1 << 20, target_bytes // 32))
        self.raw = 0  # raw bytes in the current piece
        self.due_at = self.step

    @property
    def due(self) -> bool:
        return self.raw >= self.due_at

    def asked(self) -> None:
        self.due_at = (self.raw // self.step + 1) * self.step

    def new_piece(self) -> None:
        self.raw = 0
        self.due_at = self.step

    def next_due(self, before: np.ndarray, starts: np.ndarray, pos: int) -> int:
        """The first row of ``starts`` after ``pos`` where a check is due, given the cumulative
        raw sizes ``before`` of a table whose row ``pos`` is next; the table's end if none."""
        needed = self.due_at - self.raw + before[pos]
        index = int(np.searchsorted(starts, pos, side="right"))
        candidates = starts[index:]
        due = int(np.searchsorted(before[candidates], needed, side="left"))
        return int(candidates[due]) if due < len(candidates) else len(before) - 1


def _feed(
    table: pa.Table,
    keys: np.ndarray,
    starts: np.ndarray,
    checks: _SizeChecks,
    writer_for: Callable[[bytes], LayerWriter],
) -> None:
    """Hand ``table`` to the writers in slices that end where the next size check is due;
    ``starts`` are the rows a piece may begin with (key starts)."""
    before = raw_sizes(table)
    pos = 0
    while pos < table.num_rows:
        writer = writer_for(key_at(keys, pos))
        end = checks.next_due(before, starts, pos)
        for batch in table.slice(pos, end - pos).to_batches():
            writer.add_batch(batch)
        checks.raw += int(before[end] - before[pos])
        pos = end


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
belongs to the callee (the engine completes its upload while the writers go on)."""
OpenSink = Callable[[], LayerSink]
"""Where each new piece streams its bytes while it is written."""


def drop_piece(file: LayerFileInfo) -> None:
    """Delete a piece that is not kept: its local file and what was streamed of it."""
    file.remove_file()
    if file.sink is not None:
        file.sink.abort()


class _Pieces:
    """Pieces written so far. Each is finished as soon as it is cut, so memory holds one open
    writer at a time. Whether a piece is kept is decided for all of them at the end, as the
    seed's batch writer does, or for each one as it is cut when ``on_cut`` is given."""

    def __init__(self, workdir: Path, on_cut: OnCut | None = None, open_sink: OpenSink | None = None) -> None:
        self.workdir = workdir
        self.on_cut = on_cut
        self.open_sink = open_sink
        self.decided: list[WriterResult] = []
        self.done: list[LayerFileInfo] = []  # undecided
        self.names: list[LayerName] = []
        self._count = 0

    def new_writer(self) -> LayerWriter:
        self._count += 1
        if self.open_sink is not None:
            return LayerWriter(None, sink=self.open_sink())
        return LayerWriter(self.workdir / f"piece-{id(self):x}-{self._count}.parquet")

    def add(self, name: LayerName, writer: LayerWriter) -> None:
        file = writer.finish(name)
        if self.on_cut is not None:
            try:
                self.decided.append(self.on_cut(name, file))
            except BaseException:
                drop_piece(file)
                raise
        else:
            self.done.append(file)
            self.names.append(name)

    def finish(self, discard: Discard) -> list[WriterResult]:
        results = self.decided
        for name, file in zip(self.names, self.done, strict=True):
            if discard(name):
                drop_piece(file)
                results.append(Discarded(name))
            else:
                results.append(Produced(name, file))
        self.decided, self.done, self.names = [], [], []
        return results

    def abort(self) -> None:
        """Delete the undecided pieces (decided ones were deleted or handed on when cut)."""
        for file in self.done:
            drop_piece(file)
        self.decided, self.done, self.names = [], [], []


class SplitDeltaWriter:
    """Deltas over one LSN range, cut only between keys: all versions of a key stay in one layer.

    A piece covers ``[its first key, the next piece's first key)``; the last one ends right after
    its last key, as the seed infers delta key ranges.
    """

    def __init__(
        self,
        workdir: Path,
        lsn_range: tuple[int, int],
        target_bytes: int,
        on_cut: OnCut | None = None,
        open_sink: OpenSink | None = None,
    ) -> None:
        self.lsn_range = lsn_range
        self.target_bytes = target_bytes
        self._pieces = _Pieces(workdir, on_cut, open_sink)
        self._checks = _SizeChecks(target_bytes)
        self._writer: LayerWriter | None = None
        self._start_key = b""
        self._last_key: bytes | None = None

    def _writer_for(self, key: bytes) -> LayerWriter:
        """The writer that takes ``key`` next: a new piece begins at a new key once the current
        one is full."""
        writer = self._writer
        checks = self._checks
        if writer is None:
            writer = self._writer = self._pieces.new_writer()
            self._start_key = key
            checks.new_piece()
        elif key != self._last_key and checks.due:
            if writer.num_rows and writer.size_reaches(self.target_bytes - _DELTA_ROW_ESTIMATE):
                self._pieces.add(LayerName.delta(self._start_key, key, *self.lsn_range), writer)
                writer = self._writer = self._pieces.new_writer()
                self._start_key = key
                checks.new_piece()
            else:
                checks.asked()
        self._last_key = key
        return writer

    def put(self, version: Version) -> None:
        self._writer_for(version.key).add(*version)
        self._checks.raw += _ROW_RAW + len(version.payload)

    def put_key(self, versions: Sequence[Version]) -> None:
        """``put`` each of ``versions``, which all belong to one key, in order."""
        if not versions:
            return
        self.put(versions[0])
        if len(versions) > 1:
            assert self._writer is not None
            self._writer.add_rows(versions[1:])
            self._checks.raw += sum([_ROW_RAW + len(v.payload) for v in versions[1:]])

    def put_table(self, table: pa.Table) -> None:
        """Every row of ``table`` (layer schema, sorted, whole keys), as ``put`` would."""
        if not table.num_rows:
            return
        keys = key_array(table.column("key"))
        _feed(table, keys, key_starts(keys)[:-1], self._checks, self._writer_for)
        self._last_key = key_at(keys, len(keys) - 1)

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
        self,
        workdir: Path,
        start_key: bytes,
        lsn: int,
        target_bytes: int,
        on_cut: OnCut | None = None,
        open_sink: OpenSink | None = None,
    ) -> None:
        self.lsn = lsn
        self.target_bytes = target_bytes
        self._pieces = _Pieces(workdir, on_cut, open_sink)
        self._checks = _SizeChecks(target_bytes)
        self._writer: LayerWriter | None = None
        self._start_key = start_key

    def _writer_for(self, key: bytes) -> LayerWriter:
        """The writer that takes ``key`` next."""
        writer = self._writer
        checks = self._checks
        if writer is None:
            writer = self._writer = self._pieces.new_writer()
        elif checks.due:
            if writer.num_rows and writer.size_reaches(self.target_bytes - _IMAGE_ROW_ESTIMATE):
                self._pieces.add(LayerName.image(self._start_key, key, self.lsn), writer)
                writer = self._writer = self._pieces.new_writer()
                self._start_key = key
                checks.new_piece()
            else:
                checks.asked()
        return writer

    def put(self, key: bytes, page: bytes) -> None:
        self._writer_for(key).add(key, self.lsn, ValueKind.IMAGE, page)
        self._checks.raw += _ROW_RAW + len(page)

    def put_batch(self, keys: pa.Array, pages: pa.Array) -> None:
        """``put`` of each key (in order) and its page."""
        n = len(keys)
        if not n:
            return
        lsns = pa.array(np.full(n, self.lsn, dtype=np.uint64))
        kinds = pa.array(np.full(n, int(ValueKind.IMAGE), dtype=np.uint8))
        table = pa.Table.from_arrays([keys, lsns, kinds, pages], schema=SCHEMA)
        _feed(table, key_array(keys), np.arange(n), self._checks, self._writer_for)

    def finish(self, end_key: bytes, discard: Discard) -> list[WriterResult]:
        if self._writer is not None and self._writer.num_rows:
            self._pieces.add(LayerName.image(self._start_key, end_key, self.lsn), self._writer)
            self._writer = None
        return self._pieces.finish(discard)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
        self._pieces.abort()
