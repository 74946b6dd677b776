"""The columnar retention (``compactor.worker.engine.batch_retention``) and the k-merge into Arrow chunks
(``compactor.worker.engine.merge``) against the per-key reference (``compactor.worker.engine.retention``)."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compactor.storage.errors import RedoError
from compactor.storage.keys import KEY_SIZE, key_from_int
from compactor.storage.layer_file import versions_to_batch
from compactor.storage.redo import TestRecord as _TestRecord
from compactor.storage.values import ValueKind, Version
from compactor.worker.engine.batch_retention import _gather, retain_chunk, simple_keys
from compactor.worker.engine.merge import key_array, key_starts, merged_chunks
from compactor.worker.engine.retention import generate_key_retention, place


def append(data: bytes, **flags: bool | bytes | None) -> bytes:
    rec = _TestRecord(data, bool(flags.get("clear")), bool(flags.get("will_init")), flags.get("only_if"))  # type: ignore[arg-type]
    return rec.payload()


def image(key: int, lsn: int, data: bytes) -> Version:
    return Version(key_from_int(key), lsn, int(ValueKind.IMAGE), data)


def rec(key: int, lsn: int, data: bytes) -> Version:
    return Version(key_from_int(key), lsn, int(ValueKind.RECORD), append(data))


@st.composite
def simple_histories(draw: st.DrawFn) -> list[list[Version]]:
    """Keys whose histories start with an image and then mix images and plain appends at
    distinct LSNs. Keys 0 and 255 have trailing and leading zero bytes."""
    keys = sorted(draw(st.sets(st.integers(0, 300), min_size=1, max_size=6)))
    out = []
    for key in keys:
        lsns = sorted(draw(st.sets(st.integers(1, 60), min_size=1, max_size=25)))
        history = [image(key, lsns[0], draw(st.binary(max_size=6)))]
        for lsn in lsns[1:]:
            data = draw(st.binary(max_size=4))
            history.append(image(key, lsn, data) if draw(st.integers(0, 5)) == 0 else rec(key, lsn, data))
        out.append(history)
    return out


def reference(
    histories: list[list[Version]], cuts: list[int], threshold: int, image_layer: bool
) -> tuple[list[tuple[bytes, bytes]], list[Version]]:
    images, deltas = [], []
    for history in histories:
        key = history[0].key
        retention = generate_key_retention(key, history, cuts[-1], cuts[:-1], threshold, verification=True)
        first, rest = place(key, retention, has_image_layer=image_layer)
        if first is not None:
            images.append((key, first.payload))
        deltas += rest
    return images, deltas


def table_of(histories: list[list[Version]]) -> pa.Table:
    return pa.Table.from_batches([versions_to_batch(itertools.chain.from_iterable(histories))])


@settings(max_examples=300, deadline=None)
@given(
    histories=simple_histories(),
    cuts=st.lists(st.integers(0, 70), min_size=1, max_size=5, unique=True).map(sorted),
    threshold=st.integers(1, 6),
    image_layer=st.booleans(),
)
def test_columnar_retention_matches_the_per_key_retention(
    histories: list[list[Version]], cuts: list[int], threshold: int, image_layer: bool
) -> None:
    table = table_of(histories)
    starts = key_starts(key_array(table.column("key")))
    assert simple_keys(table, starts, 1 << 30).all()
    got = retain_chunk(table, starts, cuts, threshold, image_layer, verification=True)
    want_images, want_deltas = reference(histories, cuts, threshold, image_layer)
    assert list(zip(got.image_keys.to_pylist(), got.image_values.to_pylist(), strict=True)) == want_images
    assert [Version(*row.values()) for row in got.deltas.to_pylist()] == want_deltas


def test_only_simple_histories_take_the_columnar_path() -> None:
    histories = [
        [image(1, 5, b"a"), rec(1, 6, b"b")],  # simple
        [rec(2, 5, b"a"), image(2, 6, b"b")],  # starts with a record
        [image(3, 5, b"a"), Version(key_from_int(3), 6, int(ValueKind.RECORD), append(b"x", clear=True))],
        [image(4, 5, b"a"), Version(key_from_int(4), 6, int(ValueKind.RECORD), append(b"x", only_if=b"a"))],
        [image(5, 5, b"a"), Version(key_from_int(5), 6, int(ValueKind.RECORD), append(b"x") + b"junk")],
        [image(6, 5, b"a"), rec(6, 5, b"b")],  # two versions at one LSN
        [image(7, 5, b"a"), Version(key_from_int(7), 6, int(ValueKind.RECORD), b"other\x00op")],
        [image(8, 5, b"a" * 100)],  # over the limit below
        [image(9, 5, b"")],
    ]
    table = table_of(histories)
    starts = key_starts(key_array(table.column("key")))
    assert simple_keys(table, starts, 50).tolist() == [True, False, False, False, False, False, False, False, True]


@pytest.mark.parametrize("dropped_lsn", [6, 7, 11, 12])
def test_verification_catches_a_lost_record(monkeypatch: pytest.MonkeyPatch, dropped_lsn: int) -> None:
    """A defect in choosing the rows to keep (here: one record lost, below the horizon in a cut
    without an image, or above the horizon) fails verification with the key and LSN."""
    import compactor.worker.engine.batch_retention as br

    histories = [[image(1, 5, b"a"), rec(1, 6, b"b"), rec(1, 7, b"c"), rec(1, 11, b"d"), rec(1, 12, b"e")]]
    table = table_of(histories)
    starts = key_starts(key_array(table.column("key")))
    real = br._kept_rows

    def losing(buckets: np.ndarray, wants: np.ndarray, key_ids: np.ndarray) -> np.ndarray:
        kept = real(buckets, wants, key_ids)
        kept[table.column("lsn").to_pylist().index(dropped_lsn)] = False
        return kept

    retain_chunk(table, starts, [5, 8, 10], 5, True, verification=True)  # fine as it is
    monkeypatch.setattr(br, "_kept_rows", losing)
    at = "LSN 8" if dropped_lsn < 8 else "its newest LSN"
    with pytest.raises(RedoError, match=f"verification failed: key 0+1 at {at}: the retained history does not"):
        retain_chunk(table, starts, [5, 8, 10], 5, True, verification=True)


@settings(max_examples=200, deadline=None)
@given(
    # Keys above 30 differ from the others before their last 8 bytes: the merge sorts those.
    rows=st.lists(
        st.tuples(st.integers(0, 40).map(lambda k: k if k <= 30 else k << 100), st.integers(0, 50)),
        unique=True,
        max_size=120,
    ),
    chains=st.integers(1, 4),
    batch=st.integers(1, 9),
    chunk_bytes=st.sampled_from([0, 2000, 1 << 20]),
    data=st.data(),
)
def test_merge_yields_whole_keys_in_order(
    rows: list[tuple[int, int]], chains: int, batch: int, chunk_bytes: int, data: st.DataObject
) -> None:
    """Rows spread over chains (each key-sorted, cut into small batches) come out sorted, each
    key in exactly one chunk, whether the chains' LSNs overlap (the merge falls back to a sort)
    or not, and whether chunks are cut as soon as every chain holds a batch or later."""
    spread: list[list[Version]] = [[] for _ in range(chains)]
    for key, lsn in rows:
        spread[data.draw(st.integers(0, chains - 1))].append(image(key, lsn, b"%d" % lsn))
    streams = []
    for chain in spread:
        chain.sort()
        streams.append(iter([versions_to_batch(chain[i : i + batch]) for i in range(0, len(chain), batch)]))

    def too_much(key: bytes, size: int) -> None:
        raise AssertionError("no limit here")

    chunks = list(merged_chunks(streams, 1 << 30, too_much, chunk_bytes))
    merged = [Version(*row.values()) for chunk in chunks for row in chunk.to_pylist()]
    assert merged == sorted(v for chain in spread for v in chain)
    keys_per_chunk = [set(chunk.column("key").to_pylist()) for chunk in chunks]
    assert sum(len(k) for k in keys_per_chunk) == len(set().union(*keys_per_chunk))


@pytest.mark.parametrize("chains", [1, 3, 6])
def test_merge_cuts_chunks_of_about_chunk_bytes(chains: int) -> None:
    """The chains buffer ``chunk_bytes`` before a chunk is cut, so every chunk but the last holds
    that much less what lies above its boundary (a batch of each other chain) and what the
    count of a sliced batch's whole buffers overstates (a batch of each chain)."""
    rows_per_batch, batches_per_chain, target_batches = 10, 30, 16
    keys = random.Random(chains).sample(range(100_000), chains * rows_per_batch * batches_per_chain)
    spread = [sorted(keys[i::chains]) for i in range(chains)]

    def batches(chain: list[int]) -> list[pa.RecordBatch]:
        return [
            versions_to_batch([image(key, 5, bytes(100)) for key in chain[i : i + rows_per_batch]])
            for i in range(0, len(chain), rows_per_batch)
        ]

    streams = [iter(batches(chain)) for chain in spread]
    batch_bytes = batches(spread[0])[0].get_total_buffer_size()

    def too_much(key: bytes, size: int) -> None:
        raise AssertionError("no limit here")

    chunks = list(merged_chunks(streams, 1 << 30, too_much, target_batches * batch_bytes))
    rows = [chunk.num_rows for chunk in chunks]
    assert sum(rows) == len(keys)
    least = (target_batches - (2 * chains - 1)) * rows_per_batch
    assert all(n >= least for n in rows[:-1]), rows


@given(st.lists(st.integers(0, KEY_SIZE - 1).flatmap(lambda at: st.tuples(st.just(at), st.integers(0, 255))),
                max_size=40))  # fmt: skip
def test_key_starts_finds_keys_differing_in_any_byte(changes: list[tuple[int, int]]) -> None:
    """Each key of a sorted run differs from the one before it in one byte, anywhere in the key
    (each of the words ``key_starts`` compares, and their edges), or repeats it."""
    keys = [bytes(KEY_SIZE)]
    for at, value in changes:
        key = bytearray(keys[-1])
        key[at] = max(key[at], value)  # a repeat when it cannot grow there
        keys.append(bytes(key))
    keys.sort()
    array = np.array(keys, dtype=f"S{KEY_SIZE}")
    expected = [i for i in range(len(keys)) if i == 0 or keys[i] != keys[i - 1]] + [len(keys)]
    assert key_starts(array).tolist() == expected


class _Decoding:
    """Batches as from a decode-ahead stream whose next batch is, or is not yet, here."""

    def __init__(self, batches: list[pa.RecordBatch], here: bool) -> None:
        self._batches = iter(batches)
        self._here = here

    def __iter__(self) -> _Decoding:
        return self

    def __next__(self) -> pa.RecordBatch:
        return next(self._batches)

    def ready(self) -> bool:
        return self._here


@pytest.mark.parametrize("here", [True, False], ids=["decoded ahead", "still on its way"])
def test_merge_grows_chunks_only_from_batches_already_here(here: bool) -> None:
    """A chunk never waits for input still on its way: with no batch decoded ahead, chunks are
    cut as soon as every chain holds one, as with no chunk size at all."""
    spread = [list(range(chain, 600, 3)) for chain in range(3)]

    def streams(ready: bool) -> list[Iterator[pa.RecordBatch]]:
        batches = [[versions_to_batch([image(key, 5, b"v") for key in keys[i : i + 10]]) for i in range(0, 200, 10)]
                   for keys in spread]  # fmt: skip
        return [_Decoding(chain, ready) for chain in batches]

    def too_much(key: bytes, size: int) -> None:
        raise AssertionError("no limit here")

    grown = list(merged_chunks(streams(here), 1 << 30, too_much, 1 << 20))
    cut_at_once = list(merged_chunks(streams(True), 1 << 30, too_much, 0))
    assert sum(chunk.num_rows for chunk in grown) == 600
    assert len(cut_at_once) > 10
    assert len(grown) == (1 if here else len(cut_at_once))


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=80),
    cuts=st.lists(st.integers(1, 79), max_size=12, unique=True).map(sorted),
    one_by_one=st.integers(0, 2),
)
def test_split_writers_cut_at_the_same_keys_however_rows_arrive(
    tmp_path_factory: pytest.TempPathFactory, sizes: list[int], cuts: list[int], one_by_one: int
) -> None:
    """The same rows, given one key at a time or as tables cut anywhere between keys, make the
    same layers: a second compaction of the same versions then changes nothing."""
    from compactor.storage.layer_file import SCHEMA
    from compactor.worker.engine.split_writers import SplitDeltaWriter, SplitImageWriter

    workdir = tmp_path_factory.mktemp("split")
    rows = [image(key, 7, random.Random(key).randbytes(size)) for key, size in enumerate(sizes)]
    table = pa.Table.from_batches([versions_to_batch(rows)], schema=SCHEMA)

    def names(feed_rows: bool) -> tuple[list[str], list[str]]:
        deltas = SplitDeltaWriter(workdir, (1, 9), 8192)
        images = SplitImageWriter(workdir, key_from_int(0), 7, 8192)
        if feed_rows:
            for row in rows:
                if one_by_one == 1:
                    deltas.put(row)
                else:
                    deltas.put_key([row])
                images.put(row.key, row.payload)
        else:
            for lo, hi in itertools.pairwise([0, *cuts, len(rows)]):
                piece = table.slice(lo, max(hi - lo, 0))
                deltas.put_table(piece)
                images.put_batch(piece.column("key").combine_chunks(), piece.column("value").combine_chunks())
        out = [str(r.name) for r in deltas.finish(lambda name: True)]
        return out, [str(r.name) for r in images.finish(key_from_int(len(rows)), lambda name: True)]

    by_rows, by_tables = names(True), names(False)
    assert by_rows == by_tables
    if sum(sizes) > 3 * 8192:  # incompressible rows: the target is reached
        assert len(by_rows[0]) > 1 and len(by_rows[1]) > 1


@given(st.lists(st.binary(max_size=40), min_size=1, max_size=12), st.integers(0, 3), st.data())
def test_gather_copies_the_values_asked_for(first: list[bytes], cut: int, data: st.DataObject) -> None:
    """Values of an array that is a slice (as chunks often are), whole or without a prefix,
    short enough to sit inline in a view and longer, empty or not, in any order, one buffer out."""
    array = pa.array([b"xx", *first], pa.binary()).slice(1)
    picks = [r % len(first) for r in data.draw(st.lists(st.integers(0, 11), max_size=20))]
    values = [first[r] for r in picks]
    skip = [min(cut, len(v)) for v in values]
    got = _gather(array, np.array(picks, dtype=np.int64), np.array(skip, dtype=np.int64))
    assert got.type == pa.binary()
    assert got.to_pylist() == [v[k:] for v, k in zip(values, skip, strict=True)]


def test_gather_reads_nothing_from_empty_values() -> None:
    for array in (pa.array([b"", b""], pa.binary()), pa.array([b"abc", b""], pa.binary()).slice(1)):
        rows = np.array([len(array) - 1, 0], dtype=np.int64)
        assert _gather(array, rows, np.zeros(2, dtype=np.int64)).to_pylist() == [b"", b""]
