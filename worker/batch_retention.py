"""``generate_key_retention`` for many keys at once, column by column.

Most keys of a real timeline have the simplest possible history: it starts with an image, and
every record after it only appends bytes to the page (a ``test`` record with no clear, no init
and no ``only_if``). For such keys the seed's retention reduces to counting, and redo to
concatenation: the value at an LSN is the newest image at or below it followed by the appended
bytes of the records after it, which are one contiguous run of rows in a key-sorted table. This
module decides which keys qualify (``simple_keys``) and computes their retention for a whole
merged chunk in NumPy and Arrow (``retain_chunk``), with no Python work per version. Every other
key goes through ``worker.retention`` one by one; both give the same layers.

The rule, per key, for the cuts (the retain LSNs below the horizon, then the horizon): a cut
holds the versions in ``(previous cut, cut]``. From the first non-empty cut on, a counter adds
the versions of each cut; the first cut always becomes an image, a later one once the counter
reaches the delta threshold (and the counter restarts); other cuts keep their versions. Above
the horizon everything is kept. With verification on, the value at every cut at or above the
key's first LSN and its newest state are read back from the output rows and compared with the
same read of the input, as ``KeyHistoryRetention.verify`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage.errors import RedoError
from storage.keys import format_key
from storage.layer_file import SCHEMA
from storage.values import ValueKind

# A plain append record: op name ``test``, NUL, flags 0, the append's length (u32 LE), the append.
_PLAIN_PREFIX = pa.scalar(b"test\x00\x00", pa.binary())
_HEADER = 10
# binary_slice without a stop fails on values shorter than the start (pyarrow 26).
_NO_STOP = 2**31 - 1
_IMAGE = int(ValueKind.IMAGE)
_RECORD = int(ValueKind.RECORD)


def key_starts(keys: np.ndarray) -> np.ndarray:
    """Row index where each key begins, and the row count at the end."""
    changes = np.flatnonzero(keys[1:] != keys[:-1]) + 1
    starts: np.ndarray = np.concatenate(([0], changes, [len(keys)])).astype(np.int64)
    return starts


def _lengths(values: pa.Array) -> np.ndarray:
    lengths: np.ndarray = pc.binary_length(values).to_numpy(zero_copy_only=False).astype(np.int64)
    return lengths


def _plain_append(values: pa.Array, lengths: np.ndarray) -> np.ndarray:
    """Rows whose payload is a well-formed plain append record."""
    prefix = pc.equal(pc.binary_slice(values, 0, 6), _PLAIN_PREFIX).to_numpy(zero_copy_only=False)
    long_enough = lengths >= _HEADER
    field = pc.if_else(pa.array(long_enough), pc.binary_slice(values, 6, _HEADER), pa.scalar(b"\0\0\0\0"))
    fixed = field.cast(pa.binary(4))
    declared = np.frombuffer(fixed.buffers()[1], dtype="<u4", count=len(fixed) + fixed.offset)[fixed.offset :]
    plain: np.ndarray = prefix & long_enough & (declared.astype(np.int64) == lengths - _HEADER)
    return plain


def simple_keys(table: pa.Table, starts: np.ndarray, limit: int) -> np.ndarray:
    """Per key of ``table`` (sorted, grouped by ``starts``): whether ``retain_chunk`` can take it.
    A key qualifies when its history starts with an image, holds only images and plain append
    records, has one version per LSN and stays below ``limit`` bytes."""
    if table.num_rows == 0:
        return np.zeros(0, dtype=bool)
    kinds = table.column("kind").to_numpy()
    lsns = table.column("lsn").to_numpy()
    values = table.column("value").combine_chunks()
    lengths = _lengths(values)
    ok = (kinds == _IMAGE) | ((kinds == _RECORD) & _plain_append(values, lengths))
    # Two versions at one LSN (an image materialising a record) take the general path.
    repeated = np.zeros(len(lsns), dtype=bool)
    repeated[1:] = lsns[1:] == lsns[:-1]
    repeated[starts[:-1]] = False
    ok &= ~repeated
    firsts = starts[:-1]
    simple: np.ndarray = (
        np.logical_and.reduceat(ok, firsts)
        & (kinds[firsts] == _IMAGE)
        & (np.add.reduceat(lengths, firsts) < limit)
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
    """A key-sorted table as the columns the reads need: per row its key's number, LSN, whether
    it is an image, and its *piece* (an image's payload, a record's appended bytes)."""

    def __init__(self, key_ids: np.ndarray, lsns: np.ndarray, kinds: np.ndarray, values: pa.Array) -> None:
        self.key_ids = key_ids
        self.lsns = lsns
        is_image = kinds == _IMAGE
        self.pieces = pc.if_else(pa.array(is_image), values, pc.binary_slice(values, _HEADER, _NO_STOP))
        # Newest image at or before each row (rows of a key start with an image, see simple_keys).
        self.base = np.maximum.accumulate(np.where(is_image, np.arange(len(lsns)), -1))

    def read(self, key_ids: np.ndarray, lsns: np.ndarray) -> tuple[np.ndarray, pa.Array]:
        """The value of each ``(key, lsn)`` point: whether it has a base image, and the value
        (empty where it has none)."""
        last = _last_at_or_below(self.key_ids, self.lsns, key_ids, lsns)
        found = last >= 0
        found[found] = self.key_ids[last[found]] == key_ids[found]
        first = np.where(found, self.base[np.maximum(last, 0)], 0)
        found &= first >= 0
        found[found] = self.key_ids[first[found]] == key_ids[found]
        first = np.where(found, first, 0)
        last = np.where(found, last, -1)  # an empty run: no rows, an empty value
        return found, _join_runs(self.pieces, first, last)


def _last_at_or_below(row_keys: np.ndarray, row_lsns: np.ndarray, keys: np.ndarray, lsns: np.ndarray) -> np.ndarray:
    """For each point, the last row with the same key number and an LSN at or below its LSN
    (or the row before the key's first one, or -1): rows are sorted by (key number, LSN)."""
    # LSNs use all 64 bits, so they are ranked before being packed beside the key number.
    ranks = np.unique(np.concatenate((row_lsns, lsns)), return_inverse=True)[1].astype(np.int64)
    rows = (row_keys.astype(np.int64) << 32) | ranks[: len(row_lsns)]
    points = (keys.astype(np.int64) << 32) | ranks[len(row_lsns) :]
    return np.searchsorted(rows, points, side="right").astype(np.int64) - 1


def _join_runs(pieces: pa.Array, first: np.ndarray, last: np.ndarray) -> pa.Array:
    """``pieces[first[i]] + ... + pieces[last[i]]`` for each run, as one binary array."""
    lengths = np.maximum(last - first + 1, 0)
    ends = np.cumsum(lengths)
    index = np.arange(int(ends[-1]) if len(ends) else 0) + np.repeat(first - (ends - lengths), lengths)
    offsets = np.concatenate(([0], ends)).astype(np.int32)
    runs = pa.ListArray.from_arrays(pa.array(offsets), pieces.take(pa.array(index, pa.int64())))
    return pc.binary_join(runs, pa.scalar(b"", pa.binary()))


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
    keys = table.column("key").combine_chunks()
    lsns = table.column("lsn").to_numpy()
    kinds = table.column("kind").to_numpy()
    values = table.column("value").combine_chunks()
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

    lengths = _lengths(values)
    is_image = kinds == _IMAGE
    rows = _Rows(key_ids, lsns, kinds, values)
    want_keys, want_cuts = np.nonzero(wants)
    built_found, built = rows.read(want_keys, cut_lsns[want_cuts])
    if not built_found.all():  # cannot happen for simple keys: each starts with an image
        raise RedoError(f"no base image for key {_key_text(keys, starts, want_keys[~built_found][0])}")

    kept = buckets == ncuts
    kept |= ~wants[key_ids, np.minimum(buckets, ncuts - 1)]
    to_image_layer = (want_cuts == 0) & image_layer
    in_deltas = ~to_image_layer
    first_keys = want_keys[to_image_layer]
    image_keys = keys.take(pa.array(starts[first_keys]))
    image_values = built.filter(pa.array(to_image_layer))

    kept_index = np.flatnonzero(kept)
    delta_keys = np.concatenate((key_ids[kept_index], want_keys[in_deltas]))
    delta_lsns = np.concatenate((lsns[kept_index], cut_lsns[want_cuts[in_deltas]]))
    delta_kinds = np.concatenate((kinds[kept_index], np.full(int(in_deltas.sum()), _IMAGE, dtype=kinds.dtype)))
    delta_values = pa.concat_arrays([values.take(pa.array(kept_index)), built.filter(pa.array(in_deltas))])
    order = np.lexsort((delta_kinds, delta_lsns, delta_keys))
    deltas = pa.Table.from_arrays(
        [
            keys.take(pa.array(starts[delta_keys[order]])),
            pa.array(delta_lsns[order], pa.uint64()),
            pa.array(delta_kinds[order], pa.uint8()),
            delta_values.take(pa.array(order)),
        ],
        schema=SCHEMA,
    )

    if verification:
        first_images = (first_keys, image_values)
        _verify(keys, starts, rows, lsns, cut_lsns, counts, first_images, deltas, delta_keys[order])
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


def _verify(
    keys: pa.Array,
    starts: np.ndarray,
    original: _Rows,
    lsns: np.ndarray,
    cut_lsns: np.ndarray,
    counts: np.ndarray,
    first_images: tuple[np.ndarray, pa.Array],
    deltas: pa.Table,
    delta_keys: np.ndarray,
) -> None:
    """Read every key at each cut from its first LSN on and its newest state, once from the
    input and once from the output (the image layer's images at the first cut, then the
    deltas), and fail on the first point where they differ."""
    first_keys, image_values = first_images
    nkeys = len(starts) - 1
    exists = np.cumsum(counts[:, :-1], axis=1) > 0
    point_keys, point_cuts = np.nonzero(exists)
    # The newest state: the output may end at a cut above the input's newest LSN (an image
    # moved up to its cut), so both are read past everything.
    newest = np.full(nkeys, np.iinfo(np.uint64).max, dtype=np.uint64)
    point_keys = np.concatenate((point_keys, np.arange(nkeys)))
    point_lsns = np.concatenate((cut_lsns[point_cuts], newest))

    out_keys = np.concatenate((first_keys, delta_keys))
    out_lsns = np.concatenate((np.full(len(first_keys), cut_lsns[0], dtype=np.uint64), deltas.column("lsn").to_numpy()))
    out_kinds = np.concatenate(
        (np.full(len(first_keys), _IMAGE, dtype=np.uint8), deltas.column("kind").to_numpy())
    )
    out_values = pa.concat_arrays([image_values, deltas.column("value").combine_chunks()])
    order = np.lexsort((out_kinds, out_lsns, out_keys))
    output = _Rows(out_keys[order], out_lsns[order], out_kinds[order], out_values.take(pa.array(order)))

    _, expected = original.read(point_keys, point_lsns)
    found, actual = output.read(point_keys, point_lsns)
    same = pc.equal(expected, actual).to_numpy(zero_copy_only=False) & found
    if not same.all():
        bad = int(np.flatnonzero(~same)[0])
        where = f"key {_key_text(keys, starts, point_keys[bad])} at LSN {int(point_lsns[bad])}"
        reason = "the retained value differs from the original"
        if not found[bad]:
            reason = "the retained history lost its base image"
        raise RedoError(f"verification failed: {where}: {reason}")


def _key_text(keys: pa.Array, starts: np.ndarray, key_id: int) -> str:
    return format_key(keys[int(starts[key_id])].as_py())
