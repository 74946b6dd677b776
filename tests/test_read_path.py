"""The read path against an independent replay, over random histories and branches.

Layers live in memory here (the read path only needs a LayerSource); the same property runs
through a real S3 endpoint in test_timeline_store.py.
"""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compactor.storage.errors import RedoError
from compactor.storage.keys import FULL_KEY_RANGE, key_from_int, key_to_int
from compactor.storage.manifest import Manifest
from compactor.storage.read_path import read_key, read_range
from tests.engine_memory import MemoryIO
from tests.timelines import PARENT, Timeline, reference_read, timelines


def load(tls: dict[str, Timeline]) -> tuple[dict[str, Manifest], MemoryIO]:
    io = MemoryIO()
    io.load(tls)
    return io.manifests, io


def read_all(manifests: dict[str, Manifest], io: MemoryIO, tl_id: str, lsn: int) -> dict[int, bytes | type]:
    return io.read_keys(manifests[tl_id], lsn)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tls=timelines(allow_incomplete=True), data=st.data())
def test_read_path_matches_reference(tls: dict[str, Timeline], data: st.DataObject) -> None:
    manifests, source = load(tls)
    for tl_id, tl in tls.items():
        lsns = {0, tl.top_lsn, tl.top_lsn + 5, data.draw(st.integers(0, tl.top_lsn + 1))}
        if tl.ancestor:
            lsns |= {tl.ancestor[1], tl.ancestor[1] + 1}
        for lsn in sorted(lsns):
            expected = {
                k: (RedoError if isinstance(v, Exception) else v) for k, v in reference_read(tls, tl_id, lsn).items()
            }
            assert read_all(manifests, source, tl_id, lsn) == expected, (tl_id, lsn)


@settings(max_examples=60, deadline=None)
@given(tls=timelines(allow_incomplete=False, branch=False))
def test_range_read_equals_key_reads(tls: dict[str, Timeline]) -> None:
    manifests, source = load(tls)
    tl = tls[PARENT]
    lsn = tl.top_lsn
    whole = {key_to_int(k): v for k, v in read_range(manifests[PARENT], source, FULL_KEY_RANGE, lsn)}
    assert whole == read_all(manifests, source, PARENT, lsn)


def test_missing_base_names_key_and_lsn() -> None:
    from tests.timelines import Layer, Value, record

    layer = Layer("delta", (0, 4), (10, 20), {1: [Value(12, record=record(b"x"))]})
    manifests, source = load({PARENT: Timeline(PARENT, [layer])})
    with pytest.raises(RedoError, match=r"key 0+1 at LSN 15"):
        read_key(manifests[PARENT], source, key_from_int(1), 15)
