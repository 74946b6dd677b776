"""ObjectStore against a real S3 endpoint (moto server over HTTP), with faults injected through
botocore's ``before-send`` hook: a handler that returns a response (or raises) replaces the
network round trip for that attempt."""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import xxhash
from botocore.awsrequest import AWSPreparedRequest, AWSResponse
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

import compactor.storage.object_store as object_store_module
from compactor.storage.checksum import Checksum
from compactor.storage.errors import CorruptLayer, NotFound, StoreError
from compactor.storage.object_store import AlreadyExists, ObjectStore, PreconditionFailed, is_transient
from compactor.storage.settings import Settings
from tests.conftest import MIB, TEST_BACKOFF

# ---------------------------------------------------------------------------- fault injection


class _RawBody:
    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._body


def error_response(request: AWSPreparedRequest, status: int, code: str, message: str = "injected") -> AWSResponse:
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message></Error>'
    ).encode()
    headers = {"Content-Type": "application/xml", "Content-Length": str(len(body))}
    return AWSResponse(request.url, status, headers, _RawBody(body))  # type: ignore[arg-type]


Fault = Callable[[AWSPreparedRequest], AWSResponse | None]


class Attempts:
    """Counts the HTTP attempts of one operation and applies ``faults`` to the first ones
    (None = let the attempt through)."""

    def __init__(self, store: ObjectStore, operation: str, faults: list[Fault | None] | None = None) -> None:
        self.count = 0
        self.faults = list(faults or [])
        store.client.meta.events.register(f"before-send.s3.{operation}", self._on_send)  # type: ignore[arg-type]

    def _on_send(self, request: AWSPreparedRequest, **_: Any) -> AWSResponse | None:
        self.count += 1
        if self.faults:
            fault = self.faults.pop(0)
            if fault is not None:
                return fault(request)
        return None


def slow_down(request: AWSPreparedRequest) -> AWSResponse:
    return error_response(request, 503, "SlowDown", "Please reduce your request rate.")


def internal_error(request: AWSPreparedRequest) -> AWSResponse:
    return error_response(request, 500, "InternalError", "We encountered an internal error.")


def read_timeout(request: AWSPreparedRequest) -> AWSResponse:
    raise ReadTimeoutError(endpoint_url=request.url)


def access_denied(request: AWSPreparedRequest) -> AWSResponse:
    return error_response(request, 403, "AccessDenied", "Access Denied")


# ---------------------------------------------------------------------------- round trips


def test_put_get_head_range_delete(object_store: ObjectStore) -> None:
    object_store.put_bytes("a/one", b"hello world", metadata={"layer": "x"})
    assert object_store.get_bytes("a/one") == b"hello world"
    assert object_store.get_range("a/one", 6, 5) == b"world"
    assert object_store.get_range("a/one", 6, 100) == b"world"  # short only at the end
    assert object_store.get_range("a/one", 0, 0) == b""
    info = object_store.head("a/one")
    assert info is not None
    assert (info.key, info.size, info.metadata["layer"]) == ("a/one", 11, "x")
    assert info.etag.strip('"') == hashlib.md5(b"hello world").hexdigest()
    assert info.last_modified is not None
    data, got = object_store.get_with_info("a/one")
    assert data == b"hello world" and got.etag == info.etag

    object_store.put_bytes("a/one", b"replaced")  # plain PUT overwrites
    assert object_store.get_bytes("a/one") == b"replaced"
    object_store.delete("a/one")
    assert object_store.head("a/one") is None
    object_store.delete("a/one")  # deleting a missing object is fine


def test_missing_object(object_store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="not-there"):
        object_store.get_bytes("not-there")
    with pytest.raises(NotFound):
        object_store.get_range("not-there", 0, 10)
    assert object_store.head("not-there") is None
    target = tmp_path / "dl" / "file"
    with pytest.raises(NotFound):
        object_store.download_file("not-there", target)
    assert list(target.parent.iterdir()) == []  # no partial file left behind


def test_create_only(object_store: ObjectStore) -> None:
    object_store.put_bytes("k", b"first", create_only=True)
    attempts = Attempts(object_store, "PutObject")
    with pytest.raises(AlreadyExists, match="k already exists"):
        object_store.put_bytes("k", b"second", create_only=True)
    assert attempts.count == 1  # a 412 is an answer, not a fault: never retried
    assert object_store.get_bytes("k") == b"first"


def test_verify_conditional_writes(object_store: ObjectStore) -> None:
    object_store.verify_conditional_writes()
    assert list(object_store.list_keys("")) == []  # the probe is cleaned up

    def drop_condition(request: AWSPreparedRequest, **_: Any) -> None:
        request.headers.pop("If-None-Match", None)  # a server that ignores the header

    object_store.client.meta.events.register("before-send.s3.PutObject", drop_condition)
    with pytest.raises(StoreError, match="ignores If-None-Match"):
        object_store.verify_conditional_writes()


def test_if_match(object_store: ObjectStore) -> None:
    object_store.put_bytes("k", b"v1")
    info = object_store.head("k")
    assert info is not None
    object_store.put_bytes("k", b"v2", if_match=info.etag)
    with pytest.raises(PreconditionFailed):
        object_store.put_bytes("k", b"v3", if_match=info.etag)
    with pytest.raises(PreconditionFailed):
        object_store.put_bytes("missing", b"v3", if_match=info.etag)
    assert object_store.get_bytes("k") == b"v2"


def test_list_keys_paginates(object_store: ObjectStore) -> None:
    keys = [f"p/{i:03d}" for i in range(7)]
    for key in keys:
        object_store.put_bytes(key, key.encode())
    object_store.put_bytes("q/outside", b"")
    pages = Attempts(object_store, "ListObjectsV2")
    listed = list(object_store.list_keys("p/", page_size=2))
    assert [info.key for info in listed] == keys
    assert [info.size for info in listed] == [5] * 7
    assert pages.count == 4
    assert [info.key for info in object_store.list_keys("p/", start_after="p/004", page_size=2)] == keys[5:]
    assert list(object_store.list_keys("nothing/")) == []


def test_list_prefixes(object_store: ObjectStore) -> None:
    for key in ["t/a/1", "t/a/2", "t/b/1", "t/c", "u/x"]:
        object_store.put_bytes(key, b"")
    assert list(object_store.list_prefixes("t/")) == ["t/a/", "t/b/"]
    assert list(object_store.list_prefixes("")) == ["t/", "u/"]


def test_delete_many_batches(object_store: ObjectStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(object_store_module, "DELETE_BATCH", 3)
    keys = [f"d/{i}" for i in range(7)]
    for key in keys:
        object_store.put_bytes(key, b"x")
    calls = Attempts(object_store, "DeleteObjects")
    assert object_store.delete_many([*keys, "d/missing"]) == {}
    assert calls.count == 3
    assert list(object_store.list_keys("d/")) == []
    assert object_store.delete_many([]) == {}


def test_delete_many_reports_per_key_errors(object_store: ObjectStore) -> None:
    def partial_failure(request: AWSPreparedRequest) -> AWSResponse:
        body = (
            b'<?xml version="1.0" encoding="UTF-8"?><DeleteResult>'
            b"<Error><Key>d/locked</Key><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
            b"</DeleteResult>"
        )
        headers = {"Content-Type": "application/xml"}
        return AWSResponse(request.url, 200, headers, _RawBody(body))  # type: ignore[arg-type]

    Attempts(object_store, "DeleteObjects", [partial_failure])
    assert object_store.delete_many(["d/ok", "d/locked"]) == {"d/locked": "AccessDenied: Access Denied"}


# ---------------------------------------------------------------------------- files


def _write_random(path: Path, size: int) -> Checksum:
    data = os.urandom(size)
    path.write_bytes(data)
    return Checksum("xxh3_128", xxhash.xxh3_128(data).hexdigest())


def test_multipart_upload_round_trip(object_store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "big"
    digest = _write_random(src, 20 * MIB + 123)
    creates = Attempts(object_store, "CreateMultipartUpload")
    parts = Attempts(object_store, "UploadPart")
    object_store.upload_file(src, "big/object", metadata={"xxh3_128": digest.hexdigest})
    assert creates.count == 1
    assert parts.count == 5  # 4 full 5 MiB parts and a short last one
    info = object_store.head("big/object")
    assert info is not None and info.size == 20 * MIB + 123 and info.metadata["xxh3_128"] == digest.hexdigest

    dest = tmp_path / "down" / "big"
    assert object_store.download_file("big/object", dest, expected_size=info.size, expected=digest) == digest
    assert xxhash.xxh3_128(dest.read_bytes()).hexdigest() == digest.hexdigest
    assert [p.name for p in dest.parent.iterdir()] == ["big"]


def test_small_upload_is_one_put(object_store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "small"
    digest = _write_random(src, 1000)
    puts = Attempts(object_store, "PutObject", [internal_error])  # the retry must resend the file
    object_store.upload_file(src, "small/object")
    assert puts.count == 2
    assert object_store.download_file("small/object", tmp_path / "copy") == digest


def test_every_body_sent_carries_its_signed_sha256(object_store: ObjectStore, tmp_path: Path) -> None:
    """What makes a server reject a layer part damaged in transit: the SHA-256 of each body,
    covered by the request's signature. (moto does not check it; S3 and MinIO do.)"""
    sent: list[tuple[str, str, str, str]] = []

    def record(request: AWSPreparedRequest, event_name: str, **_: Any) -> None:
        body = request.body
        if hasattr(body, "read"):
            start = body.tell()
            data = body.read()
            body.seek(start)
        else:
            data = body or b""

        def text(value: str | bytes) -> str:
            return value.decode() if isinstance(value, bytes) else value

        signed, claimed = text(request.headers["Authorization"]), text(request.headers["X-Amz-Content-SHA256"])
        sent.append((event_name.rsplit(".", 1)[-1], claimed, hashlib.sha256(data).hexdigest(), signed))

    object_store.client.meta.events.register("before-send.s3", record)  # type: ignore[arg-type]
    object_store.put_bytes("signed/small", b"a layer's bytes")
    for size in (1000, 11 * MIB):  # one PUT of a file, and a multipart upload of three parts
        _write_random(tmp_path / "src", size)
        object_store.upload_file(tmp_path / "src", f"signed/{size}")
    bodies = [
        (op, claimed, actual, signed) for op, claimed, actual, signed in sent if op in ("PutObject", "UploadPart")
    ]
    assert [op for op, *_ in bodies] == ["PutObject", "PutObject"] + ["UploadPart"] * 3
    for op, claimed, actual, signed in bodies:
        assert claimed == actual, f"{op} sent a body whose SHA-256 is not the one it claims"
        assert "x-amz-content-sha256" in signed.split("SignedHeaders=")[1].split(",")[0].split(";"), op


def test_multipart_failure_aborts_upload(object_store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "big"
    _write_random(src, 11 * MIB)
    parts = Attempts(object_store, "UploadPart", [None, slow_down, access_denied])
    with pytest.raises(StoreError, match="AccessDenied"):
        object_store.upload_file(src, "big/failed")
    # Parts go up in parallel: one is throttled and retried on its own, one is denied, and the
    # denial ends the whole upload (parts still queued are not sent).
    assert 3 <= parts.count <= 4
    assert object_store.head("big/failed") is None
    uploads = object_store.client.list_multipart_uploads(Bucket=object_store.bucket)
    assert uploads.get("Uploads", []) == []


def test_download_checks_size_and_digest(object_store: ObjectStore, tmp_path: Path) -> None:
    object_store.put_bytes("obj", b"0123456789")
    dest = tmp_path / "out"
    with pytest.raises(CorruptLayer, match="has 10 bytes, expected 11"):
        object_store.download_file("obj", dest, expected_size=11)
    with pytest.raises(CorruptLayer, match=r"has xxh3_128 [0-9a-f]{32}, expected xxh3_128 0{32}"):
        object_store.download_file("obj", dest, expected=Checksum("xxh3_128", "0" * 32))
    # A layer written before XXH3-128 checksums is checked by its SHA-256.
    with pytest.raises(CorruptLayer, match=r"has sha256 [0-9a-f]{64}, expected sha256 0{64}"):
        object_store.download_file("obj", dest, expected=Checksum("sha256", "0" * 64))
    assert list(tmp_path.iterdir()) == []
    legacy = Checksum("sha256", hashlib.sha256(b"0123456789").hexdigest())
    assert object_store.download_file("obj", dest, expected=legacy) == legacy
    assert dest.read_bytes() == b"0123456789"


def test_download_retry_restarts(object_store: ObjectStore, tmp_path: Path) -> None:
    payload = os.urandom(3 * MIB)
    object_store.put_bytes("obj", payload)
    gets = Attempts(object_store, "GetObject", [read_timeout, slow_down])
    dest = tmp_path / "out"
    assert object_store.download_file("obj", dest) == Checksum("xxh3_128", xxhash.xxh3_128(payload).hexdigest())
    assert gets.count == 3
    assert dest.read_bytes() == payload
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# ---------------------------------------------------------------------------- retries


@pytest.mark.parametrize("fault", [slow_down, internal_error, read_timeout])
def test_transient_faults_are_retried(object_store: ObjectStore, fault: Fault) -> None:
    object_store.put_bytes("k", b"data")
    gets = Attempts(object_store, "GetObject", [fault, fault])
    assert object_store.get_bytes("k") == b"data"
    assert gets.count == 3


def test_retries_exhausted_raise_one_line_store_error(object_store: ObjectStore, s3_settings: Settings) -> None:
    gets = Attempts(object_store, "GetObject", [slow_down] * 10)
    with pytest.raises(StoreError) as info:
        object_store.get_bytes("some/key")
    assert gets.count == s3_settings.s3_max_attempts == 3
    message = str(info.value)
    assert "\n" not in message
    assert "get" in message and f"s3://{s3_settings.s3_bucket}/some/key" in message
    assert "SlowDown" in message and "after 3 attempts" in message
    assert "testing-key" not in message and "testing-secret" not in message


def test_client_errors_are_not_retried(object_store: ObjectStore) -> None:
    gets = Attempts(object_store, "GetObject")
    with pytest.raises(NotFound):
        object_store.get_bytes("missing")
    assert gets.count == 1

    heads = Attempts(object_store, "HeadObject", [access_denied])
    with pytest.raises(StoreError, match="AccessDenied"):
        object_store.head("anything")
    assert heads.count == 1


def test_soft_time_limit_is_never_retried(object_store: ObjectStore) -> None:
    class SoftTimeLimitExceeded(Exception):  # stands in for Celery's, matched by name
        pass

    def time_limit(request: AWSPreparedRequest) -> AWSResponse:
        raise SoftTimeLimitExceeded()

    gets = Attempts(object_store, "GetObject", [time_limit] * 3)
    with pytest.raises(SoftTimeLimitExceeded):
        object_store.get_bytes("k")
    assert gets.count == 1


def test_is_transient_classification() -> None:
    def client_error(status: int, code: str) -> ClientError:
        response: Any = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
        return ClientError(response, "GetObject")

    assert is_transient(client_error(503, "SlowDown"))
    assert is_transient(client_error(500, "InternalError"))
    assert is_transient(client_error(400, "RequestTimeout"))
    assert is_transient(client_error(400, "Throttling"))
    assert is_transient(EndpointConnectionError(endpoint_url="http://x"))
    assert not is_transient(client_error(404, "NoSuchKey"))
    assert not is_transient(client_error(412, "PreconditionFailed"))
    assert not is_transient(client_error(403, "AccessDenied"))
    assert not is_transient(client_error(501, "NotImplemented"))
    assert not is_transient(ValueError("x"))


def test_create_only_retry_after_landed_attempt_succeeds(object_store: ObjectStore) -> None:
    """The first PUT lands but its response is lost; the retry gets 412 for our own object."""
    http = object_store.client._endpoint.http_session  # type: ignore[attr-defined]

    def lands_then_times_out(request: AWSPreparedRequest) -> AWSResponse:
        assert http.send(request).status_code == 200
        raise ReadTimeoutError(endpoint_url=request.url)

    puts = Attempts(object_store, "PutObject", [lands_then_times_out])
    object_store.put_bytes("m/1", b"ours", create_only=True)
    assert puts.count == 2
    assert object_store.get_bytes("m/1") == b"ours"


def test_create_only_retry_against_other_writer_fails(object_store: ObjectStore) -> None:
    """The first PUT never reached the server; the retry's 412 is another writer's object."""
    object_store.put_bytes("m/1", b"theirs", create_only=True)
    puts = Attempts(object_store, "PutObject", [read_timeout])
    with pytest.raises(AlreadyExists):
        object_store.put_bytes("m/1", b"ours", create_only=True)
    assert puts.count == 2
    assert object_store.get_bytes("m/1") == b"theirs"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_unreachable_endpoint(s3_settings: Settings) -> None:
    settings = s3_settings.model_copy(
        update={"s3_endpoint_url": f"http://127.0.0.1:{_closed_port()}", "s3_max_attempts": 2}
    )
    store = ObjectStore(settings, **TEST_BACKOFF)
    started = time.monotonic()
    with pytest.raises(StoreError) as info:
        store.get_bytes("some/key")
    assert time.monotonic() - started < 3
    message = str(info.value)
    assert "\n" not in message
    assert "get" in message and "some/key" in message and "after 2 attempts" in message
    assert "testing-secret" not in message


def test_credentials_must_come_in_pairs(s3_settings: Settings) -> None:
    from compactor.storage.errors import InvalidInput

    with pytest.raises(InvalidInput, match="set together"):
        ObjectStore(s3_settings.model_copy(update={"s3_secret_access_key": None}))


def test_listing_a_missing_bucket_is_a_store_error(s3_settings: Settings) -> None:
    store = ObjectStore(s3_settings, **TEST_BACKOFF)  # bucket never created
    with pytest.raises(StoreError, match="NoSuchBucket"):
        list(store.list_keys("x/"))
    with pytest.raises(StoreError, match="NoSuchBucket"):
        store.get_bytes("x")
