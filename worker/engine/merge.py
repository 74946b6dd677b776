"""The k-merge of the selected layers, as Arrow tables of whole keys.

Each input is a *chain*: layers of one LSN range with disjoint key ranges, read one after the
other as one key-sorted stream of record batches. The merge buffers the batches already decoded
until the chains hold ``CHUNK_BYTES``, always of the chain whose buffered rows end first, then
takes from every chain the rows below a common boundary key (the smallest last key buffered by a
chain that has not ended), so each output chunk holds every version of its keys, and merges the
pieces into ``(key, lsn, kind)`` order in one vectorised step (a stable sort of the chains'
sorted runs). Memory holds ``CHUNK_BYTES`` and a read batch per chain (``chain_batch_bytes``:
1-4 MiB, about 20 MiB in all) at most, plus the versions of a single key when one key spans
batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final, Protocol, runtime_checkable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from compactor.storage.keys import KEY_SIZE, KeyRange
from compactor.storage.layer_file import READ_BATCH_BYTES, SCHEMA, one_array
from compactor.storage.manifest import LayerEntry

KEY_DTYPE = f"S{KEY_SIZE}"
"""Keys as a NumPy array: fixed-width bytes, which compare and sort as the keys do (every key has
the same width, so NumPy's NUL padding never changes an order)."""

_SORT = [("key", "ascending"), ("lsn", "ascending"), ("kind", "ascending")]


def chains(entries: list[LayerEntry]) -> list[list[LayerEntry]]:
    """The selected layers as chains: each chain holds layers of one LSN range with disjoint key
    ranges, in key order, so it reads as one sorted stream with one layer open at a time and
    holds each key in at most one of its layers. Chains come in LSN order, bands first."""
    by_lsn: dict[tuple[int, int], list[tuple[KeyRange, LayerEntry]]] = {}
    for entry in entries:
        layer = entry.layer
        by_lsn.setdefault(layer.lsn_range, []).append((layer.key_range, entry))
    out: list[list[LayerEntry]] = []
    for lsn_range in sorted(by_lsn):
        ends: list[bytes] = []  # key end of each open chain's last layer
        band: list[list[LayerEntry]] = []
        for key_range, entry in sorted(by_lsn[lsn_range], key=lambda item: item[0]):
            for i, end in enumerate(ends):
                if end <= key_range.start:
                    band[i].append(entry)
                    ends[i] = key_range.end
                    break
            else:
                band.append([entry])
                ends.append(key_range.end)
        out.extend(band)
    return out


READ_AHEAD_BYTES: Final = 20 << 20
"""What the merge reads ahead across all its chains: one read batch of each."""


def chain_batch_bytes(chains: int) -> int:
    """The read batch of each of ``chains`` chains: ``READ_AHEAD_BYTES`` shared out, at least
    ``READ_BATCH_BYTES`` and at most four times that. Every batch costs the merge and retention
    the same Python and kernel calls whatever its size (4 MiB batches took 9-14% less worker CPU
    per job than 1 MiB ones on five chains, docs/benchmarks.md), while the merge holds a batch
    or two of every chain: an L0 compaction of twenty L0s still reads 1 MiB batches."""
    return min(4 * READ_BATCH_BYTES, max(READ_BATCH_BYTES, READ_AHEAD_BYTES // max(chains, 1)))


_KEY_WORDS = np.dtype([("high", "<u8"), ("middle", "<u8"), ("low", "<u2")])
"""A key as three integers, to compare keys for equality: NumPy compares ``S`` arrays byte by
byte in a string loop, four times slower than three integer comparisons."""
assert _KEY_WORDS.itemsize == KEY_SIZE


def key_starts(keys: np.ndarray) -> np.ndarray:
    """Row index where each key of the sorted ``keys`` (a ``key_array``) begins, and the row
    count at the end."""
    words = keys.view(_KEY_WORDS)
    changed = np.zeros(max(len(keys) - 1, 0), dtype=bool)
    for field in ("high", "middle", "low"):
        column = words[field]
        changed |= column[1:] != column[:-1]
    starts: np.ndarray = np.concatenate(([0], np.flatnonzero(changed) + 1, [len(keys)])).astype(np.int64)
    return starts


def key_at(keys: np.ndarray, i: int) -> bytes:
    """Key ``i`` of a ``key_array`` as bytes (``bytes(keys[i])`` would drop trailing NULs)."""
    return keys[i : i + 1].tobytes()


def key_array(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A fixed-width key column as a NumPy ``S`` array (zero-copy for one chunk)."""
    column = one_array(column)
    data = column.buffers()[1]
    if data is None:
        return np.empty(0, dtype=KEY_DTYPE)
    return np.frombuffer(data, dtype=KEY_DTYPE, count=len(column) + column.offset)[column.offset :]


@runtime_checkable
class Prefetched(Protocol):
    """A stream of batches that can tell whether taking the next one would wait."""

    def __next__(self) -> pa.RecordBatch: ...

    def ready(self) -> bool:
        """Whether the next batch (or the stream's end) is here already."""
        ...


def _always() -> bool:
    return True


@dataclass
class _Chain:
    batches: Iterator[pa.RecordBatch]
    buffered: list[pa.RecordBatch]
    ended: bool = False
    ready: Callable[[], bool] = _always
    """Whether ``pull`` would not wait (``Prefetched.ready``; always, for other streams)."""

    def pull(self) -> bool:
        """Buffer the next non-empty batch; False once the chain has ended."""
        for batch in self.batches:
            if batch.num_rows:
                self.buffered.append(batch)
                return True
        self.ended = True
        return False

    def last_key(self) -> bytes:
        keys = key_array(self.buffered[-1].column(0))
        return key_at(keys, len(keys) - 1)

    def buffered_bytes(self) -> int:
        """Bytes of the buffers behind the buffered batches: more than their rows only by what
        slices leave out (less than a read batch per batch), and constant time per
        batch (``nbytes`` of a slice costs microseconds, which showed in profiles)."""
        return sum(batch.get_total_buffer_size() for batch in self.buffered)

    def take_below(self, boundary: bytes | None) -> list[pa.RecordBatch]:
        """Remove and return the buffered rows with keys below ``boundary`` (all if None)."""
        if boundary is None:
            out, self.buffered = self.buffered, []
            return out
        out = []
        while self.buffered:
            batch = self.buffered[0]
            keys = key_array(batch.column(0))
            cut = int(np.searchsorted(keys, np.array(boundary, dtype=KEY_DTYPE), side="left"))
            if cut == batch.num_rows:
                out.append(self.buffered.pop(0))
                continue
            if cut:
                out.append(batch.slice(0, cut))
                self.buffered[0] = batch.slice(cut)
            break
        return out


CHUNK_BYTES: Final = 32 << 20
"""What the chains buffer before a chunk is cut, at least: a chunk is then about this big less
what lies above its boundary. Every chunk costs the merge, retention and the writers the same
NumPy and Arrow calls whatever its size; cutting as soon as every chain held a batch made chunks
of 1.8 MB on average (``pages``: 148 of them), and 32 MiB took 5-13% of the main thread's CPU
off an engine run (docs/benchmarks.md)."""


def _fill(live: list[_Chain], target: int) -> None:
    """Buffer more of the chain whose buffered rows end first, while the chains hold less than
    ``target`` bytes in all and that chain's next batch is here already: its last key is the
    next chunk's boundary, so the chunk grows with every batch it takes, and it never waits for
    input still on its way (progress and cancellation stay as prompt as the input is)."""
    buffered = sum(chain.buffered_bytes() for chain in live)
    while buffered < target:
        growing = [chain for chain in live if not chain.ended]
        if not growing:
            return
        first = min(growing, key=_Chain.last_key)
        if not first.ready():
            return
        if first.pull():
            buffered += first.buffered[-1].get_total_buffer_size()


def merged_chunks(
    streams: list[Iterator[pa.RecordBatch]],
    limit: int,
    too_much: Callable[[bytes, int], None],
    chunk_bytes: int,
) -> Iterator[pa.Table]:
    """Tables of whole keys in key order, each sorted by ``(key, lsn, kind)``, from key-sorted
    streams of layer-schema batches (one per chain, in chain order), cut once the chains buffer
    ``chunk_bytes`` or the batch to take next is not here yet (``Prefetched``). A stream that
    buffers more than ``limit`` bytes for a single key calls ``too_much(key, bytes)``, which
    must raise."""
    live = [
        _Chain(iter(stream), [], ready=stream.ready if isinstance(stream, Prefetched) else _always)
        for stream in streams
    ]
    for chain in live:
        chain.pull()
    live = [chain for chain in live if not chain.ended]
    while live:
        _fill(live, chunk_bytes)
        open_ends = [chain.last_key() for chain in live if not chain.ended]
        boundary = min(open_ends) if open_ends else None
        taken = [chain.take_below(boundary) for chain in live]
        pieces = [piece for chain_pieces in taken for piece in chain_pieces]
        if pieces:
            yield _sorted(pieces, [sum(piece.num_rows for piece in chain_pieces) for chain_pieces in taken])
        elif boundary is not None:
            # Every buffered row left has the boundary key: that key spans batches.
            for chain in live:
                if not chain.ended and chain.last_key() == boundary:
                    chain.pull()
                    size = chain.buffered_bytes()
                    if size >= limit:
                        too_much(boundary, size)
        for chain in live:
            if not chain.buffered and not chain.ended:
                chain.pull()
        live = [chain for chain in live if chain.buffered or not chain.ended]


def _sorted(pieces: list[pa.RecordBatch], runs: list[int]) -> pa.Table:
    """The rows of ``pieces`` sorted by ``(key, lsn, kind)``: they come as ``runs`` (rows per
    chain, in chain order), each sorted already."""
    table = pa.Table.from_batches(pieces, schema=SCHEMA).combine_chunks()
    if sum(1 for rows in runs if rows) < 2:
        return table  # one chain: already in order
    order = _merge_order(table, runs)
    if order is None:
        return table.take(pc.sort_indices(table, sort_keys=_SORT))
    return table.take(order)


def _merge_order(table: pa.Table, runs: list[int]) -> np.ndarray | None:
    """The order merging sorted ``runs`` by key, a key's rows in chain order: a stable sort of
    the keys as integers (``_key_codes``), which finds the runs and merges them. Chains come in
    LSN order, so a key's rows are then in LSN order too, except where chains' LSN ranges
    overlap: checked, and None then (the caller sorts by every column instead), as when the
    keys differ before their last 8 bytes."""
    keys = key_array(table.column(0))
    bounds = np.cumsum([0, *runs])
    codes = _key_codes(keys, [(int(bounds[r]), int(bounds[r + 1])) for r in range(len(runs)) if runs[r]])
    if codes is None:
        return None
    order: np.ndarray = np.argsort(codes, kind="stable")
    merged = codes[order]
    same = merged[1:] == merged[:-1]
    if same.any():
        lsns = table.column(1).to_numpy()[order]
        kinds = table.column(2).to_numpy()[order]
        later = (lsns[1:] > lsns[:-1]) | ((lsns[1:] == lsns[:-1]) & (kinds[1:] > kinds[:-1]))
        if not later[same].all():
            return None
    return order


_CODE_BYTES = 8


def _key_codes(keys: np.ndarray, runs: list[tuple[int, int]]) -> np.ndarray | None:
    """The keys as integers that order as they do: their last 8 bytes, big-endian, when every key
    shares its first ``KEY_SIZE - 8`` bytes (a chunk of a few MiB mostly lies within one relation,
    whose keys differ only in the block number); None otherwise. ``runs`` are ``[start, end)``
    row ranges of sorted keys, so the smallest and largest key are among their ends."""
    ends = np.concatenate([keys[[start, end - 1]] for start, end in runs])
    prefix = KEY_SIZE - _CODE_BYTES
    first = ends.view(np.uint8).reshape(-1, KEY_SIZE)[:, :prefix]
    if not (first == first[0]).all():
        return None
    suffix = np.ascontiguousarray(keys.view(np.uint8).reshape(-1, KEY_SIZE)[:, prefix:])
    codes: np.ndarray = suffix.view(">u8").ravel().astype(np.uint64)
    return codes
