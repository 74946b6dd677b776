"""``generate_key_retention`` for many keys at once, column by column.

Most keys of a real timeline have the simplest possible history: it starts with an image, and
every record after it only appends bytes to the page (a ``test`` record with no clear, no init
and no ``only_if``). For such keys the seed's retention reduces to counting, and redo to
concatenation: the value at an LSN is the newest image at or below it followed by the appended
bytes of the records after it, which are one contiguous run of rows in a key-sorted table. This
module decides which keys qualify (``simple_keys``) and computes their retention for a whole
merged chunk in NumPy and Arrow (``retain_chunk``), with no Python work per version. Every other
key goes through ``compactor.worker.engine.retention`` one by one; both give the same layers.

The rule, per key, for the cuts (the retain LSNs below the horizon, then the horizon): a cut
holds the versions in ``(previous cut, cut]``. From the first non-empty cut on, a counter adds
the versions of each cut; the first cut always becomes an image, a later one once the counter
reaches the delta threshold (and the counter restarts); other cuts keep their versions. Above
the horizon everything is kept. With verification on, a read of the output at every cut at or
above the key's first LSN, and of its newest state, must replay exactly the input rows the same
read of the input replays (``_verify``): the points ``KeyHistoryRetention.verify`` checks, by
rows instead of by rebuilt values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from compactor.storage.errors import RedoError
from compactor.storage.keys import format_key
from compactor.storage.layer_file import SCHEMA, one_array, payload_lengths, value_offsets
from compactor.storage.values import ValueKind

# A plain append record: op name ``test``, NUL, flags 0, the append's length (u32 LE), the append.
_PLAIN_PREFIX = b"test\x00\x00"
_HEADER = 10
_IMAGE = int(ValueKind.IMAGE)
_RECORD = int(ValueKind.RECORD)


def _plain_append(values: pa.Array, lengths: np.ndarray) -> np.ndarray:
    """Rows whose payload is a well-formed plain append record: the first ten bytes of every
    payload are read straight from the array's data buffer."""
    n = len(values)
    data_buffer = values.buffers()[2]
    if data_buffer is None:
        return np.zeros(n, dtype=bool)
    offsets = value_offsets(values)
    data = np.frombuffer(data_buffer, dtype=np.uint8)
    long_enough = lengths >= _HEADER
    if not long_enough.any():
        return long_enough
    # Short payloads read from offset 0 instead (any bytes do: they are rejected anyway).
    at = np.where(long_enough, offsets[:-1], 0).astype(np.int64)
    plain: np.ndarray = long_enough.copy()
    for i, byte in enumerate(_PLAIN_PREFIX):
        plain &= data[at + i] == byte
    declared = np.zeros(n, dtype=np.int64)
    for i in range(4):
        declared |= data[at + 6 + i].astype(np.int64) << (8 * i)
    plain &= declared == lengths - _HEADER
    return plain


def simple_keys(table: pa.Table, starts: np.ndarray, limit: int) -> np.ndarray:
    """Per key of ``table`` (sorted, grouped by ``starts``): whether ``retain_chunk`` can take it.
    A key qualifies when its history starts with an image, holds only images and plain append
    records, has one version per LSN and stays below ``limit`` bytes."""
    if table.num_rows == 0:
        return np.zeros(0, dtype=bool)
    kinds = table.column("kind").to_numpy()
    lsns = table.column("lsn").to_numpy()
    values = one_array(table.column("value"))
    lengths = payload_lengths(values)
    ok = (kinds == _IMAGE) | ((kinds == _RECORD) & _plain_append(values, lengths))
    # Two versions at one LSN (an image materialising a record) take the general path.
    repeated = np.zeros(len(lsns), dtype=bool)
    repeated[1:] = lsns[1:] == lsns[:-1]
    repeated[starts[:-1]] = False
    ok &= ~repeated
    firsts = starts[:-1]
    simple: np.ndarray = (
        np.logical_and.reduceat(ok, firsts) & (kinds[firsts] == _IMAGE) & (np.add.reduceat(lengths, firsts) < limit)
    )
    return simple


@dataclass
class ChunkRetention:
    """What ``retain_chunk`` keeps of a chunk's keys."""

    image_keys: pa.Array  # first-cut images for the image layer, in key order
    image_values: pa.Array
    deltas: pa.Table  # every other retained version, layer schema, sorted
    image_rows_in: int
    image_bytes_in: int
    wal_rows_in: int
    wal_bytes_in: int


class _Rows:
    """Rows sorted by key number and LSN, each key starting with an image: reads of values at
    ``(key, lsn)`` points as runs of rows, the base image first."""

    def __init__(self, key_ids: np.ndarray, buckets: np.ndarray, is_image: np.ndarray, width: int) -> None:
        self.key_ids = key_ids
        self.width = width
        # Rows are sorted by key number and LSN, so also by key number and bucket: one array of
        # both answers "last row at or below a cut" by binary search.
        self.packed = key_ids * width + buckets
        # Newest image at or before each row.
        self.base = np.maximum.accumulate(np.where(is_image, np.arange(len(key_ids)), -1))

    def runs(self, key_ids: np.ndarray, cuts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For each point (a key number and a cut number; the number of cuts stands for "after
        everything"): whether its key has a base image there, and the run of rows that replays
        to its value (base image first, last row at or below the cut)."""
        last = np.searchsorted(self.packed, key_ids * self.width + cuts, side="right").astype(np.int64) - 1
        found = last >= 0
        found[found] = self.key_ids[last[found]] == key_ids[found]
        first = np.where(found, self.base[np.maximum(last, 0)], -1)
        found &= first >= 0
        found[found] = self.key_ids[first[found]] == key_ids[found]
        return found, first, last


def _gather(values: pa.Array, rows: np.ndarray, skip: np.ndarray) -> pa.Array:
    """``values[rows[i]][skip[i]:]`` for each ``i``, as one binary array. The values are
    described as a binary view array over the data buffer of ``values`` (16 bytes per value,
    built in NumPy) and copied once, by Arrow's cast to binary, instead of once per ``take``,
    slice and join. ``skip`` is at most each value's length."""
    offsets = value_offsets(values)
    starts = offsets[rows] + skip
    lengths = offsets[rows + 1] - starts
    data = values.buffers()[2]
    if data is None:
        data = pa.py_buffer(b"")
    # A view holds its value inline up to 12 bytes, else the first 4 bytes, the buffer's number
    # and the offset in it: the first 12 bytes of every value are read, the rest stays put.
    window = np.arange(12)
    inline = np.zeros((len(rows), 12), dtype=np.uint8)
    raw = np.frombuffer(data, dtype=np.uint8)
    if not len(rows) or not raw.size:
        pass  # nothing to read: every value is empty
    elif raw.size < 12:  # too short for a window: byte by byte
        inline[:] = raw[np.minimum(starts[:, None] + window, raw.size - 1)]
    else:
        # Twelve bytes from each start as one row copy from a sliding view; a start within
        # twelve bytes of the end reads byte by byte instead.
        inline[:] = np.lib.stride_tricks.sliding_window_view(raw, 12)[np.minimum(starts, raw.size - 12)]
        near_end = np.flatnonzero(starts > raw.size - 12)
        inline[near_end] = raw[np.minimum(starts[near_end, None] + window, raw.size - 1)]
    inline *= window < lengths[:, None]  # zero the bytes past a value's end
    words = inline.view(np.int32)
    views = np.empty((len(rows), 4), dtype=np.int32)
    views[:, 0] = lengths
    views[:, 1] = words[:, 0]
    long = lengths > 12
    views[:, 2] = np.where(long, 0, words[:, 1])
    views[:, 3] = np.where(long, starts, words[:, 2])
    out = pa.Array.from_buffers(pa.binary_view(), len(rows), [None, pa.py_buffer(views), data])
    return out.cast(pa.binary())


def _replay_runs(values: pa.Array, first: np.ndarray, last: np.ndarray) -> pa.Array:
    """Redo of each run of rows: the image at ``first`` followed by the appended bytes of the
    plain append records after it, up to ``last``. The pieces are gathered in order into one
    buffer; each run is then a contiguous range of it."""
    count = last - first + 1
    ends = np.cumsum(count)
    rows = np.arange(int(ends[-1]) if len(ends) else 0) + np.repeat(first - (ends - count), count)
    skip = np.full(len(rows), _HEADER, dtype=np.int64)
    skip[ends - count] = 0  # the image, whole
    pieces = _gather(values, rows, skip)
    offsets = np.frombuffer(pieces.buffers()[1], dtype=np.int32, count=len(pieces) + 1)
    bounds = offsets[np.concatenate(([0], ends))]
    return pa.Array.from_buffers(pa.binary(), len(first), [None, pa.py_buffer(bounds), pieces.buffers()[2]])


def _interleave(kept: np.ndarray, built: np.ndarray) -> np.ndarray:
    """The order (indices into ``kept`` followed by ``built``) that sorts kept rows and images
    built at cuts together by key and LSN, given each as ``key number * (cuts + 1) + bucket``,
    both sorted. A cut that gets an image keeps no row of its bucket, so no kept row shares a
    point with a built image, and a stable sort of the two sorted runs (NumPy's timsort merges
    them) places every row: a lexsort over key, LSN and kind cost about 1 ms per 10,000 rows,
    binary searches each way a tenth of that, this a tenth again."""
    order: np.ndarray = np.argsort(np.concatenate((kept, built)), kind="stable")
    return order


def _kept_rows(buckets: np.ndarray, wants: np.ndarray, key_ids: np.ndarray) -> np.ndarray:
    """Rows kept as they are: above the horizon, or in a cut that gets no image."""
    ncuts = wants.shape[1]
    kept: np.ndarray = (buckets == ncuts) | ~wants[key_ids, np.minimum(buckets, ncuts - 1)]
    return kept


def retain_chunk(
    table: pa.Table,
    starts: np.ndarray,
    cuts: list[int],
    delta_threshold: int,
    image_layer: bool,
    verification: bool,
) -> ChunkRetention:
    """The retention of every key of ``table`` (all of them ``simple_keys``), grouped by
    ``starts``; ``cuts`` are the retain LSNs below the horizon, then the horizon. Images of the
    first cut go to ``image_keys``/``image_values`` when the job writes an image layer (and lead
    their key's deltas otherwise). Raises ``RedoError`` if verification finds a difference."""
    nkeys = len(starts) - 1
    keys = one_array(table.column("key"))
    lsns = table.column("lsn").to_numpy()
    kinds = table.column("kind").to_numpy()
    values = one_array(table.column("value"))
    key_ids = np.repeat(np.arange(nkeys, dtype=np.int64), np.diff(starts))
    cut_lsns = np.array(cuts, dtype=np.uint64)
    ncuts = len(cuts)
    buckets = np.searchsorted(cut_lsns, lsns, side="left")  # == ncuts: above the horizon
    counts = np.bincount(key_ids * (ncuts + 1) + buckets, minlength=nkeys * (ncuts + 1)).reshape(nkeys, ncuts + 1)

    wants = np.zeros((nkeys, ncuts), dtype=bool)
    exists = np.zeros(nkeys, dtype=bool)
    pending = np.zeros(nkeys, dtype=np.int64)  # versions since the last image
    for i in range(ncuts):
        exists |= counts[:, i] > 0
        pending += counts[:, i]
        wants[:, i] = exists if i == 0 else exists & (pending > 0) & (pending >= delta_threshold)
        pending[wants[:, i]] = 0

    lengths = payload_lengths(values)
    is_image = kinds == _IMAGE
    rows = _Rows(key_ids, buckets, is_image, ncuts + 1)
    want_keys, want_cuts = np.nonzero(wants)
    found, first, last = rows.runs(want_keys, want_cuts)
    if not found.all():  # cannot happen for simple keys: each starts with an image
        raise RedoError(f"no base image for key {_key_text(keys, starts, want_keys[~found][0])}")

    kept_index = np.flatnonzero(_kept_rows(buckets, wants, key_ids))
    to_image_layer = (want_cuts == 0) & image_layer
    in_deltas = ~to_image_layer
    image_keys = keys.take(pa.array(starts[want_keys[to_image_layer]]))
    image_values = _replay_runs(values, first[to_image_layer], last[to_image_layer])

    in_delta_index = np.flatnonzero(in_deltas)
    delta_keys = np.concatenate((key_ids[kept_index], want_keys[in_delta_index]))
    delta_lsns = np.concatenate((lsns[kept_index], cut_lsns[want_cuts[in_delta_index]]))
    delta_kinds = np.concatenate((kinds[kept_index], np.full(len(in_delta_index), _IMAGE, dtype=kinds.dtype)))
    # Kept rows are runs of one row: every delta value, kept or built, is replayed from the input
    # in one gather, and no built image is copied twice.
    delta_first = np.concatenate((kept_index, first[in_delta_index]))
    delta_last = np.concatenate((kept_index, last[in_delta_index]))
    width = ncuts + 1
    kept_points = key_ids[kept_index] * width + buckets[kept_index]
    want_points = want_keys * width + want_cuts
    order = _interleave(kept_points, want_points[in_delta_index])
    deltas = pa.Table.from_arrays(
        [
            keys.take(pa.array(starts[delta_keys[order]])),
            pa.array(delta_lsns[order], pa.uint64()),
            pa.array(delta_kinds[order], pa.uint8()),
            _replay_runs(values, delta_first[order], delta_last[order]),
        ],
        schema=SCHEMA,
    )

    if verification:
        # Every image built, wherever it is placed, with the rows it replays.
        order = _interleave(kept_points, want_points)
        output = _Output(
            key_ids=np.concatenate((key_ids[kept_index], want_keys))[order],
            buckets=np.concatenate((buckets[kept_index], want_cuts))[order],
            is_image=np.concatenate((is_image[kept_index], np.ones(len(want_keys), dtype=bool)))[order],
            first=np.concatenate((kept_index, first))[order],
            last=np.concatenate((kept_index, last))[order],
        )
        _verify(keys, starts, rows, cut_lsns, counts, output)
    image_bytes = int(lengths[is_image].sum())
    return ChunkRetention(
        image_keys=image_keys,
        image_values=image_values,
        deltas=deltas,
        image_rows_in=int(is_image.sum()),
        image_bytes_in=image_bytes,
        wal_rows_in=int(len(lsns) - is_image.sum()),
        wal_bytes_in=int(lengths.sum()) - image_bytes,
    )


@dataclass
class _Output:
    """The retained versions of a chunk, in key and LSN order, as rows of the input: a kept
    version is its own input row, an image built at a cut is the run of input rows its redo
    replayed."""

    key_ids: np.ndarray
    buckets: np.ndarray
    is_image: np.ndarray
    first: np.ndarray
    last: np.ndarray


def _verify(
    keys: pa.Array, starts: np.ndarray, original: _Rows, cut_lsns: np.ndarray, counts: np.ndarray, output: _Output
) -> None:
    """Check every key at each cut from its first LSN on, and its newest state: a read of the
    output there must replay exactly the input rows a read of the input replays (the same base
    image, then the same records in order). Redo being a function of those rows, the values are
    then the same, without rebuilding and comparing them byte by byte."""
    nkeys = len(starts) - 1
    exists = np.cumsum(counts[:, :-1], axis=1) > 0
    point_keys, point_cuts = np.nonzero(exists)
    point_keys = np.concatenate((point_keys, np.arange(nkeys)))
    # The newest state: the output may end at a cut above the input's newest LSN (an image
    # moved up to its cut), so both are read after everything.
    ncuts = len(cut_lsns)
    point_cuts = np.concatenate((point_cuts, np.full(nkeys, ncuts)))
    _, want_first, want_last = original.runs(point_keys, point_cuts)

    out = _Rows(output.key_ids, output.buckets, output.is_image, ncuts + 1)
    first, last = output.first, output.last
    found, base_row, last_row = out.runs(point_keys, point_cuts)
    base_row, last_row = np.maximum(base_row, 0), np.maximum(last_row, 0)
    # Rows after a base replay input rows that follow each other without a gap.
    gaps = np.zeros(len(first), dtype=np.int64)
    gaps[1:] = first[1:] != last[:-1] + 1
    gaps = np.cumsum(gaps)
    same = found & (first[base_row] == want_first) & (last[last_row] == want_last) & (gaps[last_row] == gaps[base_row])
    if not same.all():
        bad = int(np.flatnonzero(~same)[0])
        at = "its newest LSN" if point_cuts[bad] == ncuts else f"LSN {int(cut_lsns[point_cuts[bad]])}"
        where = f"key {_key_text(keys, starts, point_keys[bad])} at {at}"
        reason = "the retained history does not replay the original"
        if not found[bad]:
            reason = "the retained history lost its base image"
        raise RedoError(f"verification failed: {where}: {reason}")


def _key_text(keys: pa.Array, starts: np.ndarray, key_id: int) -> str:
    return format_key(keys[int(starts[key_id])].as_py())
