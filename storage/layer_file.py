"""The layer file format: one local Parquet file per layer.

Schema (image and delta layers alike), rows sorted by ``(key, lsn, kind)`` with no duplicates::

    key   fixed_size_binary(18)   not null
    lsn   uint64                  not null
    kind  uint8                   not null   compactor.storage.values.ValueKind
    value binary                  not null   page image or encoded WAL record

Footer key-value metadata: ``compactor.format`` (``"1"``), ``compactor.layer`` (the layer name),
``compactor.rows`` and ``compactor.row_groups`` (JSON ``[[first key hex, last key hex, rows,
bytes], ...]``, one entry per row group; bytes = payloads plus 31 per row). Data pages are
zstd-compressed and carry CRC32 checksums, verified on every read. The footer has no checksum of
its own, so the reader cross-checks its row counts and index on open, and each decoded row group
against its index entry; a damaged file fails with CorruptLayer instead of yielding wrong
versions (every single-bit flip of a small file is tested). The checksum kept in the manifest
(``compactor.storage.checksum``) covers the whole file.

The writer buffers about ``row_group_bytes`` of versions before handing them to Parquet as one
row group. The reader skips row groups whose index entry misses the requested key range and
streams the others in batches of about ``READ_BATCH_BYTES`` (1 MiB, or what the caller asks), so
memory does not grow with the layer, and a k-way merge holding one open reader per input layer
costs a batch or two per layer.
"""

import bisect
import contextlib
import functools
import itertools
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Final, NamedTuple, Protocol, Self, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from compactor.storage.checksum import hasher
from compactor.storage.errors import CorruptLayer, InvalidInput, one_line
from compactor.storage.keys import KEY_SIZE, KeyRange, format_key
from compactor.storage.layer_name import LayerName
from compactor.storage.values import ValueKind, Version

FORMAT_VERSION: Final = "1"
META_FORMAT: Final = b"compactor.format"
META_LAYER: Final = b"compactor.layer"
META_ROWS: Final = b"compactor.rows"
# Our own per-row-group key index, rather than Parquet's column statistics: pyarrow aborts the
# process (an uncaught C++ exception) when it reads statistics from some damaged footers, and
# its ordering rules for FIXED_LEN_BYTE_ARRAY statistics are not ours to rely on.
META_INDEX: Final = b"compactor.row_groups"

SCHEMA: Final = pa.schema(
    [
        pa.field("key", pa.binary(KEY_SIZE), nullable=False),
        pa.field("lsn", pa.uint64(), nullable=False),
        pa.field("kind", pa.uint8(), nullable=False),
        pa.field("value", pa.binary(), nullable=False),
    ]
)

DEFAULT_ROW_GROUP_BYTES: Final = 8 << 20
DEFAULT_ZSTD_LEVEL: Final = 1
# Arrow's in-memory cost of a row besides its payload: key, lsn, kind and a binary offset.
_ROW_OVERHEAD: Final = KEY_SIZE + 8 + 1 + 4
_MAX_KIND: Final = max(ValueKind)
_MAX_GROUP_ROWS: Final = 1 << 20
# A row group is concatenated into one Arrow batch, whose binary column holds at most 2 GiB.
_MAX_GROUP_BYTES: Final = 1 << 30
_PARQUET_MAGIC: Final = b"PAR1"
READ_BATCH_BYTES: Final = 1 << 20
"""About how many bytes of versions each batch a reader yields holds, unless asked otherwise."""
_READ_BUFFER_BYTES: Final = 256 << 10
# Errors pyarrow raises for unreadable input: ArrowException covers ArrowInvalid (a ValueError)
# and ArrowIOError (an OSError); thrift and CRC failures surface as plain OSError.
_ARROW_ERRORS: Final = (OSError, pa.ArrowException, ValueError, EOFError)


class RowGroup(NamedTuple):
    first_key: bytes
    last_key: bytes  # inclusive
    num_rows: int
    raw_bytes: int  # payload bytes plus a fixed per-row overhead: the in-memory size


class LayerSink(Protocol):
    """Where a :class:`LayerWriter` streams the bytes of its file as it writes them (besides
    the local file, if it has one): an upload to ``key`` that its owner completes once the file is finished (and
    named) and aborts otherwise. ``write`` is called by one thread at a time, maybe not the
    caller's (Parquet writes row groups on the writer's thread)."""

    @property
    def key(self) -> str: ...

    def write(self, data: bytes) -> None: ...

    def complete(self) -> None: ...

    def abort(self) -> None: ...


@dataclass(frozen=True)
class LayerFileInfo:
    path: Path | None
    """The local file; None for a layer written only to its ``sink``."""
    size: int
    xxh3_128: str  # hex digest of the complete file (``compactor.storage.checksum``)
    sink: LayerSink | None = None
    """Where the file was streamed while written, if anywhere: its upload is not complete yet."""

    def remove_file(self) -> None:
        """Delete the local file, if there is one."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)


# --- conversions -------------------------------------------------------------------------------


def versions_to_batch(versions: Iterable[Version]) -> pa.RecordBatch:
    """A record batch in the layer schema (no order check: the writer does that)."""
    keys: list[bytes] = []
    lsns: list[int] = []
    kinds: list[int] = []
    values: list[bytes] = []
    for key, lsn, kind, payload in versions:
        keys.append(key)
        lsns.append(lsn)
        kinds.append(kind)
        values.append(payload)
    return _batch_from_lists(keys, lsns, kinds, values)


# ``Version`` from a 4-tuple without a Python-level call (``Version._make`` is one per row).
_new_version: Final = functools.partial(tuple.__new__, Version)


def batch_to_versions(batch: pa.RecordBatch) -> Iterator[Version]:
    # One conversion per column and batch: per-row pyarrow scalar access is ~50x slower. Keys
    # go through plain binary: fixed_size_binary's to_pylist is ~10x slower than binary's.
    keys = batch.column(0).cast(pa.binary()).to_pylist()
    columns = [keys, *(batch.column(i).to_pylist() for i in range(1, 4))]
    return map(_new_version, zip(*columns, strict=True))


def _batch_from_lists(keys: list[bytes], lsns: list[int], kinds: list[int], values: list[bytes]) -> pa.RecordBatch:
    try:
        arrays = [
            pa.array(keys, pa.binary(KEY_SIZE)),
            pa.array(lsns, pa.uint64()),
            pa.array(kinds, pa.uint8()),
            pa.array(values, pa.binary()),
        ]
    except (pa.ArrowException, TypeError, ValueError, OverflowError) as err:
        raise InvalidInput(f"invalid version for a layer file: {one_line(err)}") from None
    return _conform(pa.RecordBatch.from_arrays(arrays, schema=_NULLABLE_SCHEMA))


_NULLABLE_SCHEMA: Final = pa.schema([pa.field(f.name, f.type) for f in SCHEMA])


def _conform(batch: pa.RecordBatch) -> pa.RecordBatch:
    """``batch`` relabelled with ``SCHEMA``: same names and types, nullability aside, no nulls."""
    if batch.schema.names != SCHEMA.names or batch.schema.types != SCHEMA.types:
        raise InvalidInput(
            f"record batch schema {_schema_text(batch.schema)} is not the layer schema {_schema_text(SCHEMA)}"
        )
    for i in range(4):
        if batch.column(i).null_count:
            raise InvalidInput(f"record batch column {SCHEMA.names[i]!r} has nulls")
    if batch.schema.equals(SCHEMA):
        return batch
    return pa.RecordBatch.from_arrays(batch.columns, schema=SCHEMA)


def _row_bytes(batch: pa.RecordBatch) -> pa.Array:
    return pc.add(pc.binary_length(batch.column(3)).cast(pa.int64()), _ROW_OVERHEAD)


def _batch_bytes(batch: pa.RecordBatch | pa.Table) -> int:
    return payload_bytes(batch.column(3)) + _ROW_OVERHEAD * int(batch.num_rows)


def value_offsets(values: pa.Array) -> np.ndarray:
    """The ``len(values) + 1`` offsets of a binary array (the layer schema's payloads) into its
    data buffer: a view of the array's own buffer, nothing computed per value."""
    buffer = values.buffers()[1]
    if buffer is None or not len(values):
        return np.zeros(1, dtype=np.int32)
    return np.frombuffer(buffer, dtype=np.int32, count=len(values) + 1 + values.offset)[values.offset :]


def one_array(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """A column as one array: its only chunk as it is (``combine_chunks`` copies even that), or
    its chunks joined."""
    if isinstance(column, pa.Array):
        return column
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def payload_lengths(values: pa.Array) -> np.ndarray:
    """The length of each value of a binary array, as int64."""
    lengths: np.ndarray = np.diff(value_offsets(values)).astype(np.int64)
    return lengths


def payload_bytes(values: pa.Array | pa.ChunkedArray) -> int:
    """The bytes of all values of a binary column: the span of each chunk's offsets, constant
    time instead of a length per value."""
    chunks = values.chunks if isinstance(values, pa.ChunkedArray) else [values]
    total = 0
    for chunk in chunks:
        offsets = value_offsets(chunk)
        total += int(offsets[-1]) - int(offsets[0])
    return total


def _row(batch: pa.RecordBatch | pa.Table, i: int) -> tuple[bytes, int, int]:
    return (batch.column(0)[i].as_py(), batch.column(1)[i].as_py(), batch.column(2)[i].as_py())


def _fmt_row(row: tuple[bytes, int, int]) -> str:
    return f"(key {format_key(row[0])}, lsn {row[1]}, kind {row[2]})"


def _check_sorted(batch: pa.RecordBatch | pa.Table, previous: tuple[bytes, int, int] | None) -> None:
    """Raise InvalidInput unless ``batch`` is strictly increasing by (key, lsn, kind) and starts
    after ``previous``. Vectorised: adjacent rows are compared column by column."""
    n = batch.num_rows
    if n == 0:
        return
    if previous is not None and _row(batch, 0) <= previous:
        raise InvalidInput(f"layer rows out of order: {_fmt_row(_row(batch, 0))} does not follow {_fmt_row(previous)}")
    if n == 1:
        return
    k1, k0 = batch.column(0).slice(1), batch.column(0).slice(0, n - 1)
    l1, l0 = batch.column(1).slice(1), batch.column(1).slice(0, n - 1)
    t1, t0 = batch.column(2).slice(1), batch.column(2).slice(0, n - 1)
    same_lsn_later_kind = pc.and_(pc.equal(l1, l0), pc.greater(t1, t0))
    later_version = pc.or_(pc.greater(l1, l0), same_lsn_later_kind)
    ok = pc.or_(pc.greater(k1, k0), pc.and_(pc.equal(k1, k0), later_version))
    if not pc.all(ok).as_py():
        i = int(pc.index(ok, False).as_py())
        later, earlier = _fmt_row(_row(batch, i + 1)), _fmt_row(_row(batch, i))
        raise InvalidInput(f"layer rows out of order: {later} does not follow {earlier}")


def _schema_text(schema: pa.Schema) -> str:
    return "(" + ", ".join(f"{f.name}: {f.type}" for f in schema) + ")"


# --- writing -----------------------------------------------------------------------------------


class _HashingSink:
    """File object handed to Parquet: hashes and counts the bytes on their way to disk (and to
    ``stream``), so the checksum and size are known at close without reading the file back."""

    def __init__(self, file: BinaryIO | None, stream: LayerSink | None) -> None:
        self._file = file
        self._stream = stream
        self._hash = hasher("xxh3_128")
        self.size = 0
        self.closed = False

    def write(self, data: Any) -> int:
        self._hash.update(data)
        if self._file is not None:
            self._file.write(data)
        if self._stream is not None:
            self._stream.write(data)
        n = len(data)
        self.size += n
        return n

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        # The real file is closed by LayerWriter once the footer is out.
        self.closed = True

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class LayerWriter:
    """Writes one layer file in a single pass; the layer name is given only at ``finish``.

    ``add`` takes one version at a time, ``add_batch`` a record batch in ``SCHEMA`` (nullable
    fields accepted). Rows must arrive strictly increasing by ``(key, lsn, kind)`` across all
    calls; order is checked per flushed row group and violations raise ``InvalidInput``. Use as a
    context manager: an exception inside the block aborts and deletes the file.

    With a ``sink``, every byte of the file also goes there as it is written; ``abort`` aborts
    the sink, and ``finish`` hands it on in the file's info, for its owner to complete. With a
    sink and no ``path``, the layer is written to the sink alone: a layer that is uploaded as it
    is written need not cost a local file as well (writing 275 MB of layers to the page cache
    cost the writer's thread 0.27 CPU-s).
    """

    def __init__(
        self,
        path: Path | None,
        *,
        row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES,
        compression_level: int = DEFAULT_ZSTD_LEVEL,
        sink: LayerSink | None = None,
    ) -> None:
        if not 0 < row_group_bytes <= _MAX_GROUP_BYTES:
            raise ValueError(f"row_group_bytes must be in [1, {_MAX_GROUP_BYTES}]")
        self.path = Path(path) if path is not None else None
        if self.path is not None:
            self._label = f"file {self.path}"
        elif sink is not None:
            self._label = f"upload {sink.key}"
        else:
            raise ValueError("a layer writer needs a path or a sink")
        self.row_group_bytes = row_group_bytes
        self._stream = sink
        # Closed by finish/abort.
        self._file: BinaryIO | None = open(self.path, "wb") if self.path is not None else None  # noqa: SIM115
        self._sink = _HashingSink(self._file, sink)
        try:
            self._writer: Any = pq.ParquetWriter(
                self._sink,
                SCHEMA,
                compression="zstd",
                compression_level=compression_level,
                write_page_checksum=True,
                # Keys, LSNs and payloads are mostly distinct: dictionaries only cost time.
                use_dictionary=False,
                # Statistics serve generic Parquet tools only (this module reads its own index);
                # min/max of 8 KiB payloads would be computed for nothing.
                write_statistics=["key", "lsn", "kind"],
                sorting_columns=[pq.SortingColumn(0), pq.SortingColumn(1), pq.SortingColumn(2)],
                store_schema=False,
            )
        except BaseException:
            self._close_file()
            if sink is not None:
                sink.abort()
            raise
        self._open = True
        # Buffered rows: finished batches plus the rows of `add` calls not yet made a batch.
        self._batches: list[pa.RecordBatch] = []
        self._keys: list[bytes] = []
        self._lsns: list[int] = []
        self._kinds: list[int] = []
        self._values: list[bytes] = []
        self._list_bytes = 0
        self._buffered_bytes = 0
        self._buffered_rows = 0
        # Over rows handed to Parquet so far.
        self._last: tuple[bytes, int, int] | None = None
        self._first_key: bytes | None = None
        self._min_lsn: int | None = None
        self._max_lsn: int | None = None
        self._min_kind: int | None = None
        self._max_kind: int | None = None
        self._written_rows = 0
        self._flushed_raw_bytes = 0
        self._index: list[RowGroup] = []
        # The row group being written on the writer's thread: its future, and the file size
        # before it and its raw bytes.
        self._thread: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None
        self._in_flight = (0, 0)

    # -- adding --

    def add(self, key: bytes, lsn: int, kind: int, payload: bytes) -> None:
        self._check_open()
        self._keys.append(key)
        self._lsns.append(lsn)
        self._kinds.append(kind)
        self._values.append(payload)
        self._list_bytes += _ROW_OVERHEAD + len(payload)
        if self._buffered_bytes + self._list_bytes >= self.row_group_bytes:
            self._stage_lists()
            self._flush()

    def add_rows(self, rows: Sequence[Version]) -> None:
        """``add`` each row in order; one call for a run of rows costs much less per row."""
        self._check_open()
        if not rows:
            return
        size = _ROW_OVERHEAD * len(rows) + sum([len(row[3]) for row in rows])
        if self._buffered_bytes + self._list_bytes + size >= self.row_group_bytes:
            # A row group fills up within the run: row by row, so it is cut where add cuts it.
            for row in rows:
                self.add(*row)
            return
        keys, lsns, kinds, values = zip(*rows, strict=True)
        self._keys.extend(keys)
        self._lsns.extend(lsns)
        self._kinds.extend(kinds)
        self._values.extend(values)
        self._list_bytes += size

    def add_batch(self, batch: pa.RecordBatch) -> None:
        self._check_open()
        batch = _conform(batch)
        if batch.num_rows == 0:
            return
        self._stage_lists()
        total = _batch_bytes(batch)
        if self._buffered_bytes + total < self.row_group_bytes:
            self._batches.append(batch)
            self._buffered_bytes += total
            self._buffered_rows += batch.num_rows
            return
        # Cut the batch at row-group boundaries by cumulative row size (binary search over the
        # cumulative sums, so a huge batch costs one vectorised pass plus O(log n) per cut).
        cumulative = pc.cumulative_sum(_row_bytes(batch))
        sizes = _IntView(cumulative)
        start, consumed = 0, 0
        while start < batch.num_rows:
            room = self.row_group_bytes - self._buffered_bytes
            end = bisect.bisect_right(sizes, consumed + room, lo=start)
            end = max(end, start + 1)  # one oversized row still makes progress
            piece = batch.slice(start, end - start)
            piece_bytes = sizes[end - 1] - consumed
            self._batches.append(piece)
            self._buffered_bytes += piece_bytes
            self._buffered_rows += piece.num_rows
            consumed += piece_bytes
            start = end
            if self._buffered_bytes >= self.row_group_bytes:
                self._flush()

    def _stage_lists(self) -> None:
        if not self._keys:
            return
        batch = _batch_from_lists(self._keys, self._lsns, self._kinds, self._values)
        self._batches.append(batch)
        self._buffered_bytes += self._list_bytes
        self._buffered_rows += batch.num_rows
        self._keys, self._lsns, self._kinds, self._values = [], [], [], []
        self._list_bytes = 0

    def _flush(self) -> None:
        if not self._batches:
            return
        # The buffered batches stay chunks of one table: Parquet writes a row group from chunks
        # as well as from one array, and concatenating them would copy every payload once more.
        table = pa.Table.from_batches(self._batches, schema=SCHEMA)
        _check_sorted(table, self._last)
        self._last = _row(table, table.num_rows - 1)
        kinds = cast(dict[str, Any], pc.min_max(table.column(2)).as_py())
        if kinds["max"] > _MAX_KIND:
            raise InvalidInput(f"invalid value kind {kinds['max']} (known: 0 image, 1 record, 2 init record)")
        lsns = cast(dict[str, Any], pc.min_max(table.column(1)).as_py())
        # Parquet caps a row group's row count; cutting here keeps one index entry per group.
        pieces = []
        for start in range(0, table.num_rows, _MAX_GROUP_ROWS):
            piece = table.slice(start, _MAX_GROUP_ROWS)
            keys = piece.column(0)
            piece_bytes = self._buffered_bytes if piece.num_rows == table.num_rows else _batch_bytes(piece)
            self._index.append(RowGroup(keys[0].as_py(), keys[piece.num_rows - 1].as_py(), piece.num_rows, piece_bytes))
            pieces.append(piece)
        # Encoding and compressing run on the writer's thread (Parquet releases the GIL there)
        # while the caller goes on buffering the next row group; one row group at a time.
        self._wait()
        if self._thread is None:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer-writer")
        self._in_flight = (self._sink.size, self._buffered_bytes)
        self._pending = self._thread.submit(self._write, pieces)
        if self._first_key is None:
            self._first_key = self._index[0].first_key
        self._min_lsn = _opt_min(self._min_lsn, lsns["min"])
        self._max_lsn = _opt_max(self._max_lsn, lsns["max"])
        self._min_kind = _opt_min(self._min_kind, kinds["min"])
        self._max_kind = _opt_max(self._max_kind, kinds["max"])
        self._written_rows += table.num_rows
        self._flushed_raw_bytes += self._buffered_bytes
        self._batches = []
        self._buffered_bytes = 0
        self._buffered_rows = 0

    def _write(self, pieces: list[pa.Table]) -> None:
        for piece in pieces:
            try:
                self._writer.write_table(piece, row_group_size=piece.num_rows)
            except _ARROW_ERRORS as err:
                raise OSError(f"cannot write layer {self._label}: {one_line(err)}") from err

    def _wait(self) -> None:
        """Until the row group being written is out; re-raises its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    # -- progress --

    @property
    def num_rows(self) -> int:
        return self._written_rows + self._buffered_rows + len(self._keys)

    @property
    def estimated_size(self) -> int:
        """Approximate file size if finished now: bytes already written, plus the buffered rows
        at the compression ratio seen so far (uncompressed until the first row group is out)."""
        self._wait()
        pending = self._buffered_bytes + self._list_bytes
        if self._flushed_raw_bytes:
            pending = pending * self._sink.size // self._flushed_raw_bytes
        return self._sink.size + pending

    def size_reaches(self, limit: int) -> bool:
        """``estimated_size >= limit``, without waiting for the row group being written unless
        the answer depends on it: while one is in flight, an upper bound of the estimate (its
        compressed size at most its raw size, plus zstd's and Parquet's overhead) below
        ``limit`` settles it."""
        if self._pending is not None and not self._pending.done():
            before, raw = self._in_flight
            written = before + raw + raw // 64 + (1 << 20)
            pending = self._buffered_bytes + self._list_bytes
            if written + pending * written // self._flushed_raw_bytes < limit:
                return False
        return self.estimated_size >= limit

    @property
    def first_key(self) -> bytes | None:
        if self._first_key is not None:
            return self._first_key
        if self._batches:
            return cast(bytes, self._batches[0].column(0)[0].as_py())
        return self._keys[0] if self._keys else None

    @property
    def last_key(self) -> bytes | None:
        if self._keys:
            return self._keys[-1]
        if self._batches:
            last = self._batches[-1]
            return cast(bytes, last.column(0)[last.num_rows - 1].as_py())
        return self._last[0] if self._last is not None else None

    # -- ending --

    def finish(self, name: LayerName) -> LayerFileInfo:
        """Flush, check every row against ``name``, write the footer and close the file.

        Raises InvalidInput (and deletes the file) if a row lies outside the name's key or LSN
        range, or an image layer holds anything but images at its LSN.
        """
        self._check_open()
        try:
            self._stage_lists()
            self._flush()
            self._wait()
            self._stop_thread()
            self._check_name(name)
            self._writer.add_key_value_metadata(
                {
                    META_FORMAT: FORMAT_VERSION,
                    META_LAYER: str(name),
                    META_ROWS: str(self._written_rows),
                    META_INDEX: _encode_index(self._index),
                }
            )
            self._writer.close()
            self._open = False
            if self._file is not None:
                self._file.close()
        except BaseException:
            self.abort()
            raise
        info = LayerFileInfo(self.path, self._sink.size, self._sink.hexdigest(), self._stream)
        self._stream = None  # the info's holder completes or aborts it now
        return info

    def _check_name(self, name: LayerName) -> None:
        if self._written_rows == 0:
            return
        assert self._first_key is not None and self._last is not None
        assert self._min_lsn is not None and self._max_lsn is not None
        first, last = self._first_key, self._last[0]
        if not (name.key_range.contains(first) and name.key_range.contains(last)):
            raise InvalidInput(f"layer {name}: keys {format_key(first)}..{format_key(last)} are outside its key range")
        if not (name.lsn_start <= self._min_lsn and self._max_lsn < name.lsn_end):
            raise InvalidInput(
                f"layer {name}: LSNs {self._min_lsn}..{self._max_lsn} are outside its LSN range "
                f"[{name.lsn_start}, {name.lsn_end})"
            )
        if not name.is_delta and self._max_kind != ValueKind.IMAGE:
            raise InvalidInput(f"image layer {name} holds WAL records")

    def _stop_thread(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None

    def abort(self) -> None:
        """Close and delete the file; safe to call more than once."""
        with contextlib.suppress(Exception):
            self._wait()  # the writer's thread must be done with the file
        self._stop_thread()
        if self._open:
            self._open = False
            # The writer may be in a failed state; the file is deleted anyway.
            with contextlib.suppress(Exception):
                self._writer.close()
        self._close_file()
        if self._stream is not None:
            self._stream.abort()
        self._batches, self._keys, self._values = [], [], []

    def _close_file(self) -> None:
        """Close and delete the local file, if any."""
        if self._file is not None and not self._file.closed:
            self._file.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def _check_open(self) -> None:
        if not self._open:
            raise ValueError(f"layer writer for {self._label} is closed")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None or self._open:
            # An exception, or a block left without finish(): never keep a half-written file.
            self.abort()


class _IntView:
    """Sequence view of an int64 array for ``bisect`` (scalar access only O(log n) times)."""

    def __init__(self, array: pa.Array) -> None:
        self._array = array

    def __len__(self) -> int:
        return len(self._array)

    def __getitem__(self, i: int) -> int:
        return cast(int, self._array[i].as_py())


def _opt_min(a: int | None, b: int) -> int:
    return b if a is None else min(a, b)


def _opt_max(a: int | None, b: int) -> int:
    return b if a is None else max(a, b)


# --- reading -----------------------------------------------------------------------------------


class LayerReader:
    """Streams a layer file's versions, skipping row groups outside the requested key range.

    The footer is checked on open (format version, schema, row counts, the row-group index, and
    the layer name when ``name`` is given). Every failure to open, parse, decompress or checksum
    raises CorruptLayer naming the layer and ``object_key``. Closing is optional: the file handle
    is released when the reader is garbage-collected.
    """

    def __init__(
        self,
        path: Path,
        *,
        name: LayerName | None = None,
        object_key: str = "",
        before_group: Callable[[int], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.object_key = object_key
        # Called with a row group's number before it is read: a file still being downloaded
        # (``compactor.storage.layer_cache.LayerDownload``) holds it back until it has landed.
        self._before_group = before_group
        self._label = str(name) if name is not None else self.path.name
        self._file: Any = None
        self._check_footer_frame()
        try:
            # Unbuffered streams read a whole column chunk at once and pre-buffering keeps the
            # compressed row group cached; a bounded buffered stream keeps reads page-sized.
            self._file = pq.ParquetFile(
                self.path, page_checksum_verification=True, pre_buffer=False, buffer_size=_READ_BUFFER_BYTES
            )
            metadata = self._file.metadata
            kv: dict[bytes, bytes] = dict(metadata.metadata or {})
            file_schema = self._file.schema_arrow
            group_rows = [int(metadata.row_group(i).num_rows) for i in range(metadata.num_row_groups)]
            num_rows = int(metadata.num_rows)
        except _ARROW_ERRORS as err:
            self.close()
            raise self._corrupt(f"unreadable footer: {one_line(err)}") from None
        try:
            self.name = self._check_name(kv, name)
            self._label = str(self.name)
            self._index = self._check_metadata(kv, file_schema, num_rows, group_rows)
        except CorruptLayer:
            self.close()
            raise
        self.num_rows: int = num_rows
        self.num_row_groups: int = len(group_rows)
        self.row_groups_read = 0  # row groups decoded so far (skipped ones are not counted)

    def _corrupt(self, detail: str) -> CorruptLayer:
        where = f"object {self.object_key}" if self.object_key else f"file {self.path}"
        return CorruptLayer(f"corrupt layer {self._label} ({where}): {detail}")

    def _check_footer_frame(self) -> None:
        """Tell a missing or truncated file apart before Parquet reports it less plainly."""
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(4)
                if size >= 8:
                    f.seek(size - 8)
                tail = f.read(8)
        except FileNotFoundError:
            raise self._corrupt("missing") from None
        except OSError as err:
            raise self._corrupt(f"cannot open: {one_line(err)}") from None
        if size < 12 or head != _PARQUET_MAGIC or tail[4:] != _PARQUET_MAGIC:
            raise self._corrupt(f"truncated file: {size} bytes, no Parquet footer")
        footer_len = int.from_bytes(tail[:4], "little")
        if footer_len + 12 > size:
            raise self._corrupt(f"truncated file: {size} bytes, footer claims {footer_len}")

    def _check_name(self, kv: dict[bytes, bytes], name: LayerName | None) -> LayerName:
        version = kv.get(META_FORMAT)
        if version != FORMAT_VERSION.encode():
            raise self._corrupt(f"format version {version!r} in footer, expected {FORMAT_VERSION!r}")
        raw_name = kv.get(META_LAYER, b"").decode("utf-8", "replace")
        if name is not None:
            if raw_name != str(name):
                raise self._corrupt(f"footer names layer {raw_name[:120]!r}")
            return name
        try:
            return LayerName.parse(raw_name)
        except InvalidInput:
            raise self._corrupt(f"invalid layer name {raw_name[:120]!r} in footer") from None

    def _check_metadata(
        self, kv: dict[bytes, bytes], file_schema: pa.Schema, num_rows: int, group_rows: list[int]
    ) -> list[RowGroup]:
        """Cross-check the footer's independent row counts and the row-group index: a damaged
        footer (which has no checksum) then fails here instead of silently dropping rows."""
        if not file_schema.equals(SCHEMA):
            raise self._corrupt(f"unexpected schema {_schema_text(file_schema)}")
        rows = kv.get(META_ROWS)
        if rows != str(num_rows).encode() or sum(group_rows) != num_rows:
            raise self._corrupt(f"row counts disagree: footer {rows!r}, file {num_rows}, row groups {sum(group_rows)}")
        index = _decode_index(kv.get(META_INDEX))
        if index is None or len(index) != len(group_rows):
            raise self._corrupt("invalid row-group index in footer")
        previous = self.name.key_range.start
        for i, (first, last, count, _) in enumerate(index):
            if count != group_rows[i] or not previous <= first <= last < self.name.key_range.end:
                raise self._corrupt(f"row-group index entry {i} is inconsistent")
            previous = last
        return index

    @property
    def row_groups(self) -> list[RowGroup]:
        """The row-group index from the footer (key bounds, rows and size of each group)."""
        return list(self._index)

    # -- iteration --

    def iter_batches(
        self, key_range: KeyRange | None = None, batch_bytes: int = READ_BATCH_BYTES
    ) -> Iterator[pa.RecordBatch]:
        """Record batches in ``SCHEMA`` holding exactly the rows with keys in ``key_range``
        (all rows if None), in order, streamed in batches of about ``batch_bytes``."""
        if self._file is None:
            raise ValueError(f"layer reader for {self.path} is closed")
        if key_range is not None and not self.name.key_range.overlaps(key_range):
            return
        if key_range is not None and key_range.covers(self.name.key_range):
            key_range = None  # every row qualifies: no slicing needed
        for i, group in enumerate(self._index):
            if key_range is not None:
                if group.last_key < key_range.start:
                    continue
                if group.first_key >= key_range.end:
                    return  # rows are sorted: nothing later can match
            yield from self._iter_row_group(i, key_range, batch_bytes)

    def iter_versions(self, key_range: KeyRange | None = None) -> Iterator[Version]:
        # Chained in C: no Python frame per version.
        return itertools.chain.from_iterable(map(batch_to_versions, self.iter_batches(key_range)))

    def _iter_row_group(self, i: int, key_range: KeyRange | None, batch_bytes: int) -> Iterator[pa.RecordBatch]:
        """Stream row group ``i`` in batches of about ``batch_bytes``, checked against its
        index entry: the entry was written from these very rows, so a mismatch means damage the
        page checksums cannot see (in the footer, which has none)."""
        if self._before_group is not None:
            self._before_group(i)
        group = self._index[i]
        self.row_groups_read += 1
        batch_rows = max(16, group.num_rows * batch_bytes // max(group.raw_bytes, 1))
        seen = 0
        last_key: bytes | None = None
        try:
            # Column threads cost more than they save on ~1 MiB batches (measured: -30%).
            batches = iter(self._file.iter_batches(batch_size=batch_rows, row_groups=[i], use_threads=False))
        except _ARROW_ERRORS as err:
            raise self._corrupt(f"row group {i}: {one_line(err)}") from None
        while True:
            try:
                batch = next(batches, None)
            except _ARROW_ERRORS as err:
                raise self._corrupt(f"row group {i}: {one_line(err)}") from None
            if batch is None:
                break
            n = batch.num_rows
            if n == 0:
                continue
            keys = batch.column(0)
            first = keys[0].as_py()
            if seen == 0 and (first != group.first_key or not batch.schema.equals(SCHEMA)):
                raise self._corrupt(f"row group {i}: first key or schema does not match the row-group index")
            if last_key is not None and first < last_key:
                raise self._corrupt(f"row group {i}: keys out of order")
            seen += n
            last_key = keys[n - 1].as_py()
            if seen > group.num_rows or last_key > group.last_key:
                raise self._corrupt(f"row group {i}: more rows or keys than the row-group index says")
            if key_range is None:
                yield batch
                continue
            if first >= key_range.end:
                return  # the rest of the group lies beyond the range
            sliced = _slice_to_range(batch, key_range, first, last_key)
            if sliced.num_rows:
                yield sliced
        if seen != group.num_rows or last_key != group.last_key:
            raise self._corrupt(f"row group {i}: decoded {seen} rows, the row-group index says {group.num_rows}")

    # -- lifetime --

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def footer_length(tail: bytes) -> int | None:
    """Bytes at the end of a layer file that hold its whole footer, read from the file's last
    bytes ``tail`` (at least 8); None if ``tail`` is not the end of a Parquet file."""
    if len(tail) < 8 or tail[-4:] != _PARQUET_MAGIC:
        return None
    return int.from_bytes(tail[-8:-4], "little") + 8


@dataclass(frozen=True)
class Footer:
    """What a layer file's footer says, read without the rest of the file."""

    index: list[RowGroup]
    byte_ranges: list[tuple[int, int]]  # per row group, its column chunks' bytes [start, end)
    length: int  # bytes of the footer at the end of the file, magic included


def footer_from_tail(tail: bytes, label: str) -> Footer:
    """The footer of a layer from its file's last bytes (planning samples key anchors this way,
    SlateDB-style, and a sub-job finds the row groups of its slice). ``tail`` must hold the whole
    footer (``footer_length``). Raises CorruptLayer naming ``label`` when it is unreadable."""
    needed = footer_length(tail)
    if needed is None or needed > len(tail):
        raise CorruptLayer(f"corrupt layer {label}: no complete Parquet footer in its last {len(tail)} bytes")
    try:
        # Only the footer is parsed: the leading magic makes the buffer look like a file.
        metadata = pq.read_metadata(pa.BufferReader(_PARQUET_MAGIC + tail[-needed:]))
        kv: dict[bytes, bytes] = dict(metadata.metadata or {})
        ranges = []
        for i in range(metadata.num_row_groups):
            group = metadata.row_group(i)
            columns = [group.column(j) for j in range(group.num_columns)]
            start = min(min(c.data_page_offset, c.dictionary_page_offset or c.data_page_offset) for c in columns)
            ranges.append((start, start + sum(c.total_compressed_size for c in columns)))
    except _ARROW_ERRORS as err:
        raise CorruptLayer(f"corrupt layer {label}: unreadable footer: {one_line(err)}") from None
    index = _decode_index(kv.get(META_INDEX))
    if index is None or len(index) != len(ranges):
        raise CorruptLayer(f"corrupt layer {label}: invalid row-group index in footer")
    return Footer(index, ranges, needed)


def _encode_index(index: list[RowGroup]) -> str:
    return json.dumps(
        [[g.first_key.hex(), g.last_key.hex(), g.num_rows, g.raw_bytes] for g in index], separators=(",", ":")
    )


def _decode_index(raw: bytes | None) -> list[RowGroup] | None:
    """The row-group index, or None if it is missing or malformed."""
    if raw is None:
        return None
    try:
        entries = json.loads(raw)
        index = []
        for first, last, rows, size in entries:
            group = RowGroup(bytes.fromhex(first), bytes.fromhex(last), rows, size)
            if (
                len(group.first_key) != KEY_SIZE
                or len(group.last_key) != KEY_SIZE
                or type(rows) is not int
                or type(size) is not int
                or rows <= 0
                or size < 0
            ):
                return None
            index.append(group)
    except (ValueError, TypeError):
        return None
    return index


def _slice_to_range(batch: pa.RecordBatch, key_range: KeyRange, first: bytes, last: bytes) -> pa.RecordBatch:
    keys = batch.column(0)
    n = batch.num_rows
    if key_range.start <= first and last < key_range.end:
        return batch
    # Rows are sorted, so the count of keys below a bound is the index of the bound.
    lo = 0 if first >= key_range.start else _count_below(keys, key_range.start)
    hi = n if last < key_range.end else _count_below(keys, key_range.end)
    return batch.slice(lo, max(hi - lo, 0))


def _count_below(keys: pa.Array, bound: bytes) -> int:
    mask = pc.less(keys, pa.scalar(bound, pa.binary(KEY_SIZE)))
    return int(pc.sum(mask.cast(pa.int64())).as_py() or 0)
