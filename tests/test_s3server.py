"""The embedded S3 server (``coordinator/local/s3server.py``): its own answer to plain ranged GETs
(the same bytes and headers as moto's, read from the range alone), and requests that run at once
unless they are on the same object."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import boto3
import pytest
from moto import mock_aws

from compactor.coordinator.local.s3server import _PerObject, _RangedGets
from compactor.storage.errors import StoreError
from compactor.storage.object_store import ObjectStore
from tests.conftest import MIB

BUCKET = "ranged-gets"
DATA = os.urandom(3 * MIB + 17)


def _environ(path: str, range_header: str | None = "bytes=5-9", **extra: str) -> dict[str, Any]:
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": "", "HTTP_HOST": "127.0.0.1:9000"}
    if range_header is not None:
        environ["HTTP_RANGE"] = range_header
    return environ | extra


class _Moto:
    """Stands in for moto behind the fast path: records what reached it."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        self.calls.append(environ)
        start_response("200 OK", [])
        return [b"moto"]


@pytest.fixture
def moto_bucket() -> Iterable[None]:
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        client.put_object(Bucket=BUCKET, Key="layers/a-1", Body=DATA, Metadata={"layer": "x"})
        yield


def _call(app: _RangedGets, environ: dict[str, Any]) -> tuple[str, dict[str, str], bytes]:
    got: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        got["status"], got["headers"] = status, dict(headers)

    body = b"".join(app(environ, start_response))
    return got["status"], got["headers"], body


def test_a_plain_ranged_get_is_answered_from_the_range(moto_bucket: None) -> None:
    moto = _Moto()
    app = _RangedGets(moto)
    status, headers, body = _call(app, _environ(f"/{BUCKET}/layers/a-1", "bytes=1048576-2097151"))
    assert status.startswith("206") and body == DATA[MIB : 2 * MIB] and not moto.calls
    assert headers["content-range"] == f"bytes {MIB}-{2 * MIB - 1}/{len(DATA)}"
    assert headers["content-length"] == str(MIB) and headers["x-amz-meta-layer"] == "x"
    # A range past the end is cut at the end, as S3 does.
    _, headers, body = _call(app, _environ(f"/{BUCKET}/layers/a-1", f"bytes={len(DATA) - 4}-{len(DATA) + 100}"))
    assert body == DATA[-4:] and headers["content-range"].endswith(f"-{len(DATA) - 1}/{len(DATA)}")


@pytest.mark.parametrize(
    "environ",
    [
        _environ(f"/{BUCKET}/layers/a-1", None),  # whole object
        _environ(f"/{BUCKET}/layers/a-1", "bytes=-100"),  # suffix range
        _environ(f"/{BUCKET}/layers/a-1", "bytes=0-1,5-9"),  # several ranges
        _environ(f"/{BUCKET}/layers/a-1", f"bytes={len(DATA)}-{len(DATA) + 5}"),  # unsatisfiable
        _environ(f"/{BUCKET}/layers/a-1", QUERY_STRING="versionId=1"),
        _environ(f"/{BUCKET}/layers/a-1", HTTP_IF_MATCH='"etag"'),
        _environ(f"/{BUCKET}/layers/a-1", HTTP_HOST=f"{BUCKET}.localhost:9000"),  # virtual-hosted
        _environ(f"/{BUCKET}/layers/missing"),
        _environ("/no-such-bucket/layers/a-1"),
        _environ(f"/{BUCKET}/layers/a-1", REQUEST_METHOD="HEAD"),
    ],
)
def test_everything_else_goes_to_moto(moto_bucket: None, environ: dict[str, Any]) -> None:
    moto = _Moto()
    assert _call(_RangedGets(moto), environ)[2] == b"moto" and moto.calls == [environ]


def test_ranged_reads_through_the_server(object_store: ObjectStore) -> None:
    object_store.put_bytes("layers/b-1", DATA)
    for start, length in [(0, 4), (MIB - 3, 10), (len(DATA) - 10, 10), (len(DATA) - 10, 1000), (0, len(DATA))]:
        assert object_store.get_range("layers/b-1", start, length) == DATA[start : start + length]
    with pytest.raises(StoreError):
        object_store.get_range("layers/b-1", len(DATA), 5)  # moto's 416
    object_store.put_bytes("layers/b-1", b"replaced")  # the replaced object's buffer is closed
    assert object_store.get_range("layers/b-1", 2, 3) == b"pla"


# --- one request per object at a time ------------------------------------------------------------


class _Slow:
    """Stands in for moto: each request takes a while, and the requests running at once are
    recorded by what they are on."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: list[str] = []
        self.seen_together: list[tuple[str, ...]] = []

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ["PATH_INFO"]
        with self.lock:
            self.running.append(path)
            self.seen_together.append(tuple(sorted(self.running)))
        time.sleep(0.05)
        with self.lock:
            self.running.remove(path)
        start_response("200 OK", [])
        return [path.encode()]


def _run_at_once(app: _PerObject, environs: list[dict[str, Any]]) -> list[bytes]:
    with ThreadPoolExecutor(len(environs)) as pool:
        return list(pool.map(lambda environ: b"".join(app(environ, lambda *a: None)), environs))


def test_requests_on_different_objects_run_at_once_and_on_one_object_one_at_a_time() -> None:
    moto = _Slow()
    app = _PerObject(moto)
    a, b = _environ(f"/{BUCKET}/layers/a"), _environ(f"/{BUCKET}/layers/b")
    assert _run_at_once(app, [a, b, a, b]) == [b"/ranged-gets/layers/a", b"/ranged-gets/layers/b"] * 2
    together = [paths for paths in moto.seen_together if len(paths) > 1]
    assert together, "requests on two objects never overlapped"
    assert all(len(set(paths)) == len(paths) for paths in moto.seen_together), "one object had two requests at once"


@pytest.mark.parametrize(
    "alone",
    [
        _environ(f"/{BUCKET}", None, REQUEST_METHOD="POST", QUERY_STRING="delete"),  # on the bucket
        _environ(f"/{BUCKET}/", None, QUERY_STRING="list-type=2"),
        _environ("/layers/c", None, HTTP_HOST=f"{BUCKET}.localhost:9000"),  # virtual-hosted: bucket unknown
        _environ(f"/{BUCKET}/layers/c", None, REQUEST_METHOD="PUT", HTTP_X_AMZ_COPY_SOURCE=f"/{BUCKET}/layers/a"),
    ],
)
def test_a_request_on_a_bucket_or_two_objects_runs_alone(alone: dict[str, Any]) -> None:
    moto = _Slow()
    app = _PerObject(moto)
    objects = [_environ(f"/{BUCKET}/layers/{n}") for n in "ab"]
    _run_at_once(app, [*objects, alone, *objects])
    assert all(alone["PATH_INFO"] not in paths or len(paths) == 1 for paths in moto.seen_together)
    assert app._locks == {}, "a finished request left its object's lock behind"
