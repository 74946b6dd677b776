"""The S3 client: one bucket, plain string keys, one retry policy per call.

Every call goes through :meth:`ObjectStore._call`, which retries transient failures (5xx,
throttling, connection errors and timeouts) with full-jitter exponential backoff, and nothing
else: botocore's own retries are switched off because layered retries multiply. Errors leave
this module as :mod:`compactor.storage.errors` types with a one-line message naming the operation,
bucket and key; credentials never appear in messages or logs.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import os
import re
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import boto3
import botocore.exceptions as bexc
from botocore.config import Config
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential
from urllib3.exceptions import ProtocolError

from compactor.storage.checksum import Algorithm, Checksum, hasher
from compactor.storage.errors import CompactorError, CorruptLayer, InvalidInput, NotFound, StoreError
from compactor.storage.settings import Settings

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client
    from mypy_boto3_s3.type_defs import (
        CompletedPartTypeDef,
        ListMultipartUploadsRequestTypeDef,
        ListObjectsV2OutputTypeDef,
        ListObjectsV2RequestTypeDef,
        ObjectIdentifierTypeDef,
        PutObjectRequestTypeDef,
    )

logger = logging.getLogger(__name__)

T = TypeVar("T")

# S3 caps DeleteObjects at 1000 keys and multipart uploads at 10000 parts.
DELETE_BATCH = 1000
MAX_PARTS = 10_000
WRITE_PIECE_BYTES = 1 << 20
"""What a download writes to its file at a time (``download_file`` here, the row groups of a
``compactor.storage.layer_cache.LayerDownload``). Written whole, a ranged GET of up to 16 MiB cost
the first job after a timeline was generated 1.37-1.56 s of system CPU against 0.72-1.15 s in
pieces of 64 KiB to 1 MiB, and later jobs now and then 0.75-1.13 s against at most 0.57 s
(docs/benchmarks.md): the copy into the page cache (``copy_folio_from_iter_atomic``, 10.6% of a
first run's samples, 0.7% in pieces), on a VM that hands free memory back to its host."""
# A user-metadata entry put on conditional writes so that an ambiguous outcome (the request
# landed but its response was lost, and the retry then hit 412) can be resolved exactly.
WRITE_TOKEN_META = "compactor-write-token"

_TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "BandwidthLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "503",
        "500",
        "502",
        "504",
    }
)
# 501 NotImplemented is a permanent answer (e.g. a server without conditional writes).
_TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
_TRANSIENT_EXCEPTIONS: tuple[type[BaseException], ...] = (
    bexc.EndpointConnectionError,
    bexc.ConnectTimeoutError,
    bexc.ReadTimeoutError,
    bexc.ConnectionClosedError,
    bexc.ResponseStreamingError,
    bexc.IncompleteReadError,
    bexc.ProxyConnectionError,
    ProtocolError,
    ConnectionError,  # builtin: reset/aborted sockets that slipped past botocore's wrapping
)
# Celery's time limits must end the task, never be swallowed by a retry loop. Checked by name
# so that storage/ does not import Celery.
_NEVER_RETRY_NAMES = frozenset({"SoftTimeLimitExceeded", "TimeLimitExceeded", "Terminated", "WorkerLostError"})


_SESSION_LOCK = threading.Lock()
_SESSION: boto3.session.Session | None = None


def _after_fork_in_child() -> None:
    # A lock held by another thread at fork() time would stay locked forever in the child.
    global _SESSION_LOCK
    _SESSION_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _shared_session() -> boto3.session.Session:
    # One session per process: a fresh one re-parses the S3 service model (~0.15 s per client).
    # Sessions are not thread-safe, hence the lock around client creation; clients are.
    global _SESSION
    if _SESSION is None:
        _SESSION = boto3.session.Session()
    return _SESSION


RequestKind = Literal["get", "put", "part", "multipart", "list", "delete", "head"]
"""What an S3 request is, as S3 bills and throttles it: ``part`` is one uploaded part of a
multipart upload, ``multipart`` its creation, completion or abort."""


class StoreObserver:
    """What an :class:`ObjectStore` reports while it works; every method does nothing here, so
    an observer overrides only what it needs. storage/ knows nothing of metrics: a process
    that exports them (the worker) sets one with its counters.

    Methods run on the thread that made the call (multipart parts run on a pool): they must be
    quick, thread-safe and must not raise.
    """

    def request(self, kind: RequestKind, payload_bytes: int) -> None:
        """One request was sent; every attempt of a retried call is one. ``payload_bytes`` is
        the object data it moved up or down: 0 for metadata requests and failed attempts."""

    def retry(self, kind: RequestKind, operation: str) -> None:
        """A call failed transiently and is about to be sent again."""

    def download(self, seconds: float, size: int) -> None:
        """:meth:`ObjectStore.download_file` put a verified file in place; ``seconds`` covers
        every attempt."""


class RequestCounter(StoreObserver):
    """Counts requests and the object bytes they moved, by kind; thread-safe. Told of one
    job's requests through :meth:`ObjectStore.observed_by`, it counts that job's alone,
    whichever of the job's threads sends them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, tuple[int, int]] = {}

    def request(self, kind: RequestKind, payload_bytes: int) -> None:
        with self._lock:
            requests, moved = self._counts.get(kind, (0, 0))
            self._counts[kind] = (requests + 1, moved + payload_bytes)

    def counts(self) -> dict[str, tuple[int, int]]:
        """``(requests, object bytes)`` by kind, as counted so far."""
        with self._lock:
            return dict(self._counts)


class _Both(StoreObserver):
    def __init__(self, first: StoreObserver, second: StoreObserver) -> None:
        self._first, self._second = first, second

    def request(self, kind: RequestKind, payload_bytes: int) -> None:
        self._first.request(kind, payload_bytes)
        self._second.request(kind, payload_bytes)

    def retry(self, kind: RequestKind, operation: str) -> None:
        self._first.retry(kind, operation)
        self._second.retry(kind, operation)

    def download(self, seconds: float, size: int) -> None:
        self._first.download(seconds, size)
        self._second.download(seconds, size)


def _no_payload(_result: object) -> int:
    return 0


@dataclass(frozen=True, slots=True)
class UploadInfo:
    """A multipart upload in progress."""

    key: str
    upload_id: str
    initiated: datetime | None


class AlreadyExists(StoreError):
    """A create-only write found the object already there (HTTP 412, or 409 on a concurrent
    conditional write)."""


class PreconditionFailed(StoreError):
    """An ``If-Match`` write found a different version of the object (or none)."""


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    """As the server returns it, quotes included: pass it back unchanged to ``if_match``."""
    metadata: Mapping[str, str] = field(default_factory=dict)
    """User metadata; empty in listings, which do not carry it."""
    last_modified: datetime | None = None


def _error_code(err: bexc.ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


def _error_status(err: bexc.ClientError) -> int:
    return int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def is_transient(err: BaseException) -> bool:
    """Whether retrying ``err`` can help: 5xx, throttling, connection errors, timeouts."""
    if any(cls.__name__ in _NEVER_RETRY_NAMES for cls in type(err).__mro__):
        return False
    if isinstance(err, bexc.ClientError):
        return _error_status(err) in _TRANSIENT_STATUS or _error_code(err) in _TRANSIENT_CODES
    return isinstance(err, _TRANSIENT_EXCEPTIONS)


def _is_not_found(err: bexc.ClientError) -> bool:
    return _error_code(err) in {"NoSuchKey", "404", "NotFound"}


def _is_precondition_failed(err: bexc.ClientError) -> bool:
    return _error_status(err) == 412 or _error_code(err) in {"PreconditionFailed", "ConditionalRequestConflict"}


def _describe(err: BaseException) -> str:
    if isinstance(err, bexc.ClientError):
        message = err.response.get("Error", {}).get("Message", "")
        text = f"{_error_code(err) or 'error'} (HTTP {_error_status(err)})"
        return f"{text}: {message}" if message else text
    return f"{type(err).__name__}: {err}"


_URL_USERINFO = re.compile(r"://[^/@\s]+@")


class ObjectStore:
    """A bucket in an S3-compatible store. Thread-safe; create one per process (never share a
    client across ``fork``)."""

    def __init__(
        self,
        settings: Settings,
        *,
        backoff_base_s: float = 0.25,
        backoff_max_s: float = 10.0,
        observer: StoreObserver | None = None,
    ) -> None:
        self.observer = observer or StoreObserver()
        """Told of every request, retry and download; may be replaced at any time."""
        self._settings = settings
        self._bucket = settings.s3_bucket
        self._max_attempts = settings.s3_max_attempts
        self._backoff_base_s = backoff_base_s
        self._backoff_max_s = backoff_max_s
        self._secrets = [
            s
            for s in (
                settings.s3_access_key_id,
                settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else None,
            )
            if s and len(s) >= 4
        ]
        self._client: S3Client = self._make_client(settings)
        # Parts in flight of every multipart upload through this store and its views: memory.
        self._part_slots = threading.Semaphore(settings.multipart_concurrency)

    @staticmethod
    def _make_client(settings: Settings) -> S3Client:
        access_key = settings.s3_access_key_id or None
        secret = settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else None
        if bool(access_key) != bool(secret):
            raise InvalidInput("COMPACTOR_S3_ACCESS_KEY_ID and COMPACTOR_S3_SECRET_ACCESS_KEY must be set together")
        config_args: dict[str, Any] = {
            "connect_timeout": settings.s3_connect_timeout_s,
            "read_timeout": settings.s3_read_timeout_s,
            # One attempt: the retry policy is ours (tenacity), not botocore's as well. Note that
            # botocore's "max_attempts" counts retries after the first try (1 would mean two
            # sends); "total_max_attempts" counts every send.
            "retries": {"total_max_attempts": 1, "mode": "standard"},
            "s3": {
                "addressing_style": "path" if settings.s3_path_style else "auto",
                # The SHA-256 of every body we send is signed (botocore does so by default only
                # over plain HTTP), and S3 and MinIO reject a body that does not match it, so a
                # layer part damaged in transit never lands, TLS or not. It used to be a
                # Content-MD5: where the CPU has SHA extensions (x86 servers from 2017 on for AMD,
                # 2021 for Intel; ARMv8) SHA-256 runs at 2.4 times MD5's speed, and the 14 parts
                # of a 256 MiB job cost the client 0.25 CPU-s instead of 0.43 (docs/benchmarks.md).
                "payload_signing_enabled": True,
            },
            "max_pool_connections": 32,
        }
        if settings.s3_endpoint_url:
            # boto3 >= 1.36 adds CRC checksums to every request, which some S3-compatible
            # servers reject.
            config_args["request_checksum_calculation"] = "when_required"
            config_args["response_checksum_validation"] = "when_required"
        with _SESSION_LOCK:
            client: S3Client = _shared_session().client(
                "s3",
                endpoint_url=settings.s3_endpoint_url or None,
                region_name=settings.s3_region or None,
                aws_access_key_id=access_key,
                aws_secret_access_key=secret,
                config=Config(**config_args),
            )
        return client

    def observed_by(self, observer: StoreObserver) -> ObjectStore:
        """This store, sharing its client, with every request, retry and download told to
        ``observer`` as well as to this store's observer."""
        view = copy.copy(self)
        view.observer = _Both(self.observer, observer)
        return view

    @property
    def bucket(self) -> str:
        return self._bucket

    @property
    def client(self) -> S3Client:
        """The underlying boto3 client (for event hooks in tests and diagnostics)."""
        return self._client

    # ------------------------------------------------------------------ plumbing

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        text = _URL_USERINFO.sub("://***@", text)
        text = " ".join(text.split())
        return text if len(text) <= 400 else text[:397] + "..."

    def _where(self, key: str) -> str:
        return f"s3://{self._bucket}/{key}"

    def _fail(self, op: str, key: str, err: BaseException, attempts: int | None = None) -> StoreError:
        tries = f" after {attempts} attempt{'s' if attempts != 1 else ''}" if attempts else ""
        return StoreError(self._redact(f"s3 {op} {self._where(key)} failed{tries}: {_describe(err)}"))

    def _before_retry(self, op: str, kind: RequestKind, key: str) -> Callable[[RetryCallState], None]:
        def report(state: RetryCallState) -> None:
            self.observer.retry(kind, op)
            err = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            logger.warning(
                "s3 retry op=%s bucket=%s key=%s attempt=%d/%d wait_s=%.3f error=%s",
                op,
                self._bucket,
                key,
                state.attempt_number,
                self._max_attempts,
                wait,
                self._redact(_describe(err)) if err else "?",
                extra={"s3_op": op, "s3_bucket": self._bucket, "s3_key": key, "s3_attempt": state.attempt_number},
            )

        return report

    def _call(
        self, op: str, kind: RequestKind, key: str, fn: Callable[[], T], payload: Callable[[T], int] = _no_payload
    ) -> T:
        """Run ``fn``, which sends one request of ``kind``, under the retry policy; ``payload``
        tells the observer how much object data a successful attempt moved. Non-transient
        ``ClientError``s are re-raised as is for the caller to map (404, 412, ...); everything
        else that is the store's fault becomes a one-line StoreError. Our own errors and local
        OSErrors pass through."""

        def attempt() -> T:
            try:
                result = fn()
            except BaseException:
                self.observer.request(kind, 0)
                raise
            self.observer.request(kind, payload(result))
            return result

        retrying = Retrying(
            stop=stop_after_attempt(self._max_attempts),
            wait=wait_random_exponential(multiplier=self._backoff_base_s, max=self._backoff_max_s),
            retry=retry_if_exception(is_transient),
            before_sleep=self._before_retry(op, kind, key),
            reraise=True,
        )
        try:
            return retrying(attempt)
        except CompactorError:
            raise
        except bexc.ClientError as err:
            if is_transient(err):
                raise self._fail(op, key, err, retrying.statistics.get("attempt_number")) from err
            raise
        except Exception as err:
            if is_transient(err):
                raise self._fail(op, key, err, retrying.statistics.get("attempt_number")) from err
            if isinstance(err, bexc.BotoCoreError):
                raise self._fail(op, key, err) from err
            raise

    def _map_client_error(self, op: str, key: str, err: bexc.ClientError) -> CompactorError:
        if _is_not_found(err):
            return NotFound(f"object {self._where(key)} not found")
        return self._fail(op, key, err)

    # ------------------------------------------------------------------ bucket

    def ensure_bucket(self) -> None:
        """Create the bucket unless it exists and is ours."""
        try:
            self._call("head-bucket", "head", "", lambda: self._client.head_bucket(Bucket=self._bucket))
            return
        except bexc.ClientError as err:
            if _error_status(err) != 404 and _error_code(err) not in {"404", "NoSuchBucket", "NotFound"}:
                raise self._fail("head-bucket", "", err) from err

        region = self._settings.s3_region
        try:
            if region and region != "us-east-1":
                self._call(
                    "create-bucket",
                    "put",
                    "",
                    lambda: self._client.create_bucket(
                        Bucket=self._bucket,
                        CreateBucketConfiguration={"LocationConstraint": region},  # type: ignore[typeddict-item]
                    ),
                )
            else:
                self._call("create-bucket", "put", "", lambda: self._client.create_bucket(Bucket=self._bucket))
            logger.info("s3 created bucket=%s", self._bucket)
        except bexc.ClientError as err:
            if _error_code(err) == "BucketAlreadyOwnedByYou":
                return
            raise self._fail("create-bucket", "", err) from err

    def check_bucket(self) -> None:
        """Raise a one-line error unless the bucket exists and answers: a start-up check for
        processes that need the store but never create the bucket (workers)."""
        try:
            self._call("head-bucket", "head", "", lambda: self._client.head_bucket(Bucket=self._bucket))
        except bexc.ClientError as err:
            if _error_status(err) == 404 or _error_code(err) in {"404", "NoSuchBucket", "NotFound"}:
                where = self._settings.s3_endpoint_url or "AWS"
                raise NotFound(f"bucket {self._bucket} does not exist at {where}") from None
            raise self._fail("head-bucket", "", err) from err

    def verify_conditional_writes(self) -> None:
        """Check that the endpoint honours ``If-None-Match: *``. A server that silently ignores
        it would let two manifest commits overwrite each other, so refuse to run on one."""
        probe = f"_compactor/probe/{uuid.uuid4().hex}"
        try:
            self.put_bytes(probe, b"1", create_only=True)
            try:
                self.put_bytes(probe, b"2", create_only=True)
            except AlreadyExists:
                return
            raise StoreError(
                f"s3 endpoint {self._settings.s3_endpoint_url or 'AWS'} ignores If-None-Match on PUT: "
                "conditional writes are required for safe manifest commits"
            )
        finally:
            self.delete(probe)

    # ------------------------------------------------------------------ writes

    def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        create_only: bool = False,
        if_match: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """Write ``data`` at ``key``.

        ``create_only`` sends ``If-None-Match: *`` and raises :class:`AlreadyExists` if the
        object exists; ``if_match`` (an ETag from :meth:`head` or :meth:`get_with_info`) raises
        :class:`PreconditionFailed` if the object changed or vanished. Neither is retried.
        """
        if create_only and if_match is not None:
            raise ValueError("create_only and if_match are exclusive")
        conditional = create_only or if_match is not None
        meta = dict(metadata or {})
        token = uuid.uuid4().hex
        if conditional:
            meta[WRITE_TOKEN_META] = token
        request: PutObjectRequestTypeDef = {
            "Bucket": self._bucket,
            "Key": key,
            "Body": data,
            "Metadata": meta,
        }
        if create_only:
            request["IfNoneMatch"] = "*"
        elif if_match is not None:
            request["IfMatch"] = if_match

        attempts = 0

        def put() -> None:
            nonlocal attempts
            attempts += 1
            self._client.put_object(**request)

        try:
            self._call("put", "put", key, put, lambda _: len(data))
        except bexc.ClientError as err:
            condition_failed = _is_precondition_failed(err) or (if_match is not None and _is_not_found(err))
            if not (conditional and condition_failed):
                raise self._map_client_error("put", key, err) from err
            # After a retry, the 412 may be our own earlier attempt that landed unseen.
            if attempts > 1 and self._written_by(key, token, data):
                logger.info("s3 put op=put key=%s: retried conditional write had landed", key)
                return
            if create_only:
                raise AlreadyExists(f"object {self._where(key)} already exists") from None
            raise PreconditionFailed(f"object {self._where(key)} changed (If-Match {if_match} failed)") from None

    def _written_by(self, key: str, token: str, data: bytes) -> bool:
        info = self.head(key)
        if info is None:
            return False
        if WRITE_TOKEN_META in info.metadata:
            return info.metadata[WRITE_TOKEN_META] == token
        # A server that drops user metadata: equal bytes are the best evidence we have.
        try:
            return info.size == len(data) and self.get_bytes(key) == data
        except NotFound:
            return False

    def upload_file(self, path: str | os.PathLike[str], key: str, *, metadata: Mapping[str, str] | None = None) -> None:
        """Upload a local file: one PUT below ``multipart_threshold_bytes``, else a multipart
        upload read part by part (memory stays at the parts in flight), each part retried on its
        own and the upload aborted on failure."""
        size = os.path.getsize(path)
        if size < self._settings.multipart_threshold_bytes:
            self._put_file(path, key, size, metadata)
        else:
            self._multipart_upload(path, key, size, metadata)

    def open_upload(self, key: str) -> StreamingUpload:
        """An upload to ``key`` that is written as a stream (see :class:`StreamingUpload`)."""
        return StreamingUpload(self, key, self._settings.multipart_chunk_bytes)

    def _put_file(self, path: str | os.PathLike[str], key: str, size: int, metadata: Mapping[str, str] | None) -> None:
        def put() -> None:
            # Reopened per attempt so that a retry sends the file from its start.
            with open(path, "rb") as fh:
                self._client.put_object(
                    Bucket=self._bucket,
                    Key=key,
                    Body=fh,
                    ContentLength=size,
                    Metadata=dict(metadata or {}),
                )

        try:
            self._call("put", "put", key, put, lambda _: size)
        except bexc.ClientError as err:
            raise self._map_client_error("put", key, err) from err

    def _multipart_upload(
        self, path: str | os.PathLike[str], key: str, size: int, metadata: Mapping[str, str] | None
    ) -> None:
        chunk = self._settings.multipart_chunk_bytes
        if math.ceil(size / chunk) > MAX_PARTS:
            mib = 1024 * 1024
            chunk = math.ceil(size / MAX_PARTS / mib) * mib
        upload = StreamingUpload(self, key, chunk, metadata)
        try:
            sent = 0
            with open(path, "rb") as fh:
                while data := fh.read(chunk):
                    upload.write(data)
                    sent += len(data)
            if sent != size or os.path.getsize(path) != size:
                raise StoreError(f"s3 upload {self._where(key)}: file {path} changed size during upload")
        except BaseException:
            upload.abort()
            raise
        upload.complete()

    def _create_multipart(self, key: str, metadata: Mapping[str, str]) -> str:
        try:
            return self._call(
                "create-multipart",
                "multipart",
                key,
                lambda: self._client.create_multipart_upload(Bucket=self._bucket, Key=key, Metadata=dict(metadata))[
                    "UploadId"
                ],
            )
        except bexc.ClientError as err:
            raise self._map_client_error("create-multipart", key, err) from err

    def _upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> CompletedPartTypeDef:
        upload_part = functools.partial(
            self._client.upload_part,
            Bucket=self._bucket,
            Key=key,
            UploadId=upload_id,
            PartNumber=number,
            Body=data,
        )
        try:
            sent = self._call(f"upload-part {number}", "part", key, upload_part, lambda _: len(data))
        except bexc.ClientError as err:
            raise self._map_client_error("upload-part", key, err) from err
        return {"PartNumber": number, "ETag": sent["ETag"]}

    def _complete_multipart(self, key: str, upload_id: str, parts: list[CompletedPartTypeDef], token: str) -> None:
        attempts = 0

        def complete() -> None:
            nonlocal attempts
            attempts += 1
            self._client.complete_multipart_upload(
                Bucket=self._bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )

        try:
            self._call("complete-multipart", "multipart", key, complete)
        except bexc.ClientError as err:
            # A retried complete whose first attempt landed finds the upload gone.
            if attempts > 1 and _error_code(err) == "NoSuchUpload":
                info = self.head(key)
                if info is not None and info.metadata.get(WRITE_TOKEN_META) == token:
                    return
            raise

    def _abort_multipart(self, key: str, upload_id: str) -> None:
        # One attempt only: this runs while failing (maybe under a time limit). A leftover upload
        # is reclaimed by the bucket's AbortIncompleteMultipartUpload lifecycle rule.
        self.observer.request("multipart", 0)
        try:
            self._client.abort_multipart_upload(Bucket=self._bucket, Key=key, UploadId=upload_id)
        except Exception as err:
            logger.warning(
                "s3 abort-multipart failed bucket=%s key=%s error=%s",
                self._bucket,
                key,
                self._redact(_describe(err)),
            )

    def list_uploads(self, prefix: str) -> Iterator[UploadInfo]:
        """Multipart uploads in progress under ``prefix``; one request per page of up to 1000,
        each retried on its own."""
        request: ListMultipartUploadsRequestTypeDef = {"Bucket": self._bucket, "Prefix": prefix}
        while True:
            try:
                page = self._call(
                    "list-uploads", "list", prefix, functools.partial(self._client.list_multipart_uploads, **request)
                )
            except bexc.ClientError as err:
                raise self._fail("list-uploads", prefix, err) from err
            for upload in page.get("Uploads", []):
                yield UploadInfo(key=upload["Key"], upload_id=upload["UploadId"], initiated=upload.get("Initiated"))
            if not page.get("IsTruncated"):
                return
            request = {
                **request,
                "KeyMarker": page.get("NextKeyMarker", ""),
                "UploadIdMarker": page.get("NextUploadIdMarker", ""),
            }

    def abort_upload(self, key: str, upload_id: str) -> None:
        """Abort a multipart upload found by :meth:`list_uploads`, retried like any call; one
        already gone is not an error."""

        def abort() -> None:
            self._client.abort_multipart_upload(Bucket=self._bucket, Key=key, UploadId=upload_id)

        try:
            self._call("abort-multipart", "multipart", key, abort)
        except bexc.ClientError as err:
            if _error_code(err) != "NoSuchUpload":
                raise self._fail("abort-multipart", key, err) from err

    # ------------------------------------------------------------------ reads

    def get_bytes(self, key: str) -> bytes:
        return self.get_with_info(key)[0]

    def get_with_info(self, key: str) -> tuple[bytes, ObjectInfo]:
        """The object's bytes and its info (ETag for a later ``if_match``); NotFound on 404."""

        def get() -> tuple[bytes, ObjectInfo]:
            resp = self._client.get_object(Bucket=self._bucket, Key=key)
            with resp["Body"] as body:
                data = body.read()
            info = ObjectInfo(
                key=key,
                size=len(data),
                etag=resp.get("ETag", ""),
                metadata=dict(resp.get("Metadata", {})),
                last_modified=resp.get("LastModified"),
            )
            return data, info

        try:
            return self._call("get", "get", key, get, lambda result: result[1].size)
        except bexc.ClientError as err:
            raise self._map_client_error("get", key, err) from err

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """``length`` bytes from offset ``start``; fewer only where the object ends first."""
        if start < 0 or length < 0:
            raise ValueError(f"bad range start={start} length={length}")
        if length == 0:
            return b""

        def get() -> bytes:
            resp = self._client.get_object(Bucket=self._bucket, Key=key, Range=f"bytes={start}-{start + length - 1}")
            with resp["Body"] as body:
                return body.read()

        try:
            return self._call("get-range", "get", key, get, len)
        except bexc.ClientError as err:
            raise self._map_client_error("get-range", key, err) from err

    def head(self, key: str) -> ObjectInfo | None:
        """The object's info, or None if it does not exist."""
        try:
            resp = self._call("head", "head", key, lambda: self._client.head_object(Bucket=self._bucket, Key=key))
        except bexc.ClientError as err:
            if _is_not_found(err):
                return None
            raise self._fail("head", key, err) from err
        return ObjectInfo(
            key=key,
            size=resp.get("ContentLength", 0),
            etag=resp.get("ETag", ""),
            metadata=dict(resp.get("Metadata", {})),
            last_modified=resp.get("LastModified"),
        )

    def download_file(
        self,
        key: str,
        path: str | os.PathLike[str],
        *,
        expected_size: int | None = None,
        expected: Checksum | None = None,
    ) -> Checksum:
        """Stream the object to ``path`` and return its checksum: of the algorithm ``expected``
        has, else XXH3-128, as layers are written (``compactor.storage.checksum``).

        The bytes go to a temporary file beside ``path`` that is renamed into place only once
        complete (and, if given, of the expected size and checksum), so a partial download never
        looks complete. A retry restarts the download. NotFound on 404; CorruptLayer if the
        size or checksum differs from what was expected.
        """
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()

        algorithm: Algorithm = expected.algorithm if expected is not None else "xxh3_128"

        def download() -> tuple[Checksum, int]:
            resp = self._client.get_object(Bucket=self._bucket, Key=key)
            body = resp["Body"]
            try:
                length = resp.get("ContentLength")
                if expected_size is not None and length is not None and length != expected_size:
                    raise CorruptLayer(f"object {self._where(key)} has {length} bytes, expected {expected_size}")
                fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
                try:
                    digest = hasher(algorithm)
                    received = 0
                    with os.fdopen(fd, "wb") as out:
                        for chunk in body.iter_chunks(WRITE_PIECE_BYTES):
                            digest.update(chunk)
                            out.write(chunk)
                            received += len(chunk)
                        out.flush()
                        os.fsync(out.fileno())
                    if expected_size is not None and received != expected_size:
                        raise CorruptLayer(f"object {self._where(key)} has {received} bytes, expected {expected_size}")
                    actual = Checksum(algorithm, digest.hexdigest())
                    if expected is not None and actual != expected:
                        raise CorruptLayer(f"object {self._where(key)} has {actual}, expected {expected}")
                    os.replace(tmp, dest)
                    return actual, received
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
            finally:
                body.close()

        try:
            checksum, size = self._call("download", "get", key, download, lambda result: result[1])
        except bexc.ClientError as err:
            raise self._map_client_error("download", key, err) from err
        self.observer.download(time.perf_counter() - started, size)
        return checksum

    # ------------------------------------------------------------------ listing

    def list_keys(self, prefix: str, *, start_after: str | None = None, page_size: int = 1000) -> Iterator[ObjectInfo]:
        """Objects under ``prefix`` in key order, after ``start_after`` if given; one request per
        page of ``page_size`` keys, each retried on its own."""
        request: ListObjectsV2RequestTypeDef = {"Bucket": self._bucket, "Prefix": prefix, "MaxKeys": page_size}
        if start_after is not None:
            request["StartAfter"] = start_after
        for page in self._pages("list", request):
            for obj in page.get("Contents", []):
                yield ObjectInfo(
                    key=obj["Key"],
                    size=obj.get("Size", 0),
                    etag=obj.get("ETag", ""),
                    last_modified=obj.get("LastModified"),
                )

    def list_prefixes(self, prefix: str, delimiter: str = "/") -> Iterator[str]:
        """The "directories" right under ``prefix`` (each ending with ``delimiter``)."""
        request: ListObjectsV2RequestTypeDef = {"Bucket": self._bucket, "Prefix": prefix, "Delimiter": delimiter}
        for page in self._pages("list-prefixes", request):
            for common in page.get("CommonPrefixes", []):
                if "Prefix" in common:
                    yield common["Prefix"]

    def _pages(self, op: str, request: ListObjectsV2RequestTypeDef) -> Iterator[ListObjectsV2OutputTypeDef]:
        while True:
            prefix = request.get("Prefix", "")
            try:
                page = self._call(op, "list", prefix, functools.partial(self._client.list_objects_v2, **request))
            except bexc.ClientError as err:
                raise self._fail(op, prefix, err) from err
            yield page
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return
            request = {**request, "ContinuationToken": token}

    # ------------------------------------------------------------------ deletes

    def delete(self, key: str) -> None:
        """Delete ``key``; deleting a missing object is not an error."""
        try:
            self._call("delete", "delete", key, lambda: self._client.delete_object(Bucket=self._bucket, Key=key))
        except bexc.ClientError as err:
            if _is_not_found(err):
                return
            raise self._fail("delete", key, err) from err

    def delete_many(self, keys: Iterable[str]) -> dict[str, str]:
        """Delete ``keys`` in batches of 1000. Returns the keys that could not be deleted, each
        with the server's reason; an empty dict means every key is gone."""
        failures: dict[str, str] = {}
        batch: list[str] = []

        def flush() -> None:
            objects: list[ObjectIdentifierTypeDef] = [{"Key": k} for k in batch]
            where = f"{batch[0]} (+{len(batch) - 1} more)"
            try:
                resp = self._call(
                    "delete-many",
                    "delete",
                    where,
                    lambda: self._client.delete_objects(
                        Bucket=self._bucket, Delete={"Objects": objects, "Quiet": True}
                    ),
                )
            except bexc.ClientError as err:
                raise self._fail("delete-many", where, err) from err
            for error in resp.get("Errors", []):
                key = error.get("Key", "?")
                failures[key] = f"{error.get('Code', 'error')}: {error.get('Message', '')}".rstrip(": ")
                logger.warning("s3 delete failed bucket=%s key=%s error=%s", self._bucket, key, failures[key])
            batch.clear()

        for key in keys:
            batch.append(key)
            if len(batch) >= DELETE_BATCH:
                flush()
        if batch:
            flush()
        return failures


class _PartBuffer:
    """The bytes written to a streaming upload and not sent yet, kept as the pieces written (a
    Parquet page each, about 1 MiB) until a part fills. A part is then joined from them, one copy
    into memory of its exact size; only the piece that straddles two parts is cut. Appending to
    one growing ``bytearray`` and copying each part out of it cost 0.15 CPU-s per 277 MB
    written in 1 MiB pieces, most of it in page faults as the buffer grew, against 0.02 CPU-s
    this way (docs/benchmarks.md)."""

    def __init__(self, part_bytes: int) -> None:
        self._part_bytes = part_bytes
        self._pieces: deque[bytes] = deque()
        self.size = 0
        """Bytes buffered."""

    def add(self, data: bytes) -> Iterator[bytes]:
        """Buffer ``data``, then take out and yield each part that is full."""
        # A buffer lent for the call (a memoryview, say) may change after it: keep a copy.
        self._pieces.append(data if isinstance(data, bytes) else bytes(data))
        self.size += len(data)
        while self.size >= self._part_bytes:
            yield self._take(self._part_bytes)

    def rest(self) -> bytes:
        """Everything buffered, taken out."""
        return self._take(self.size)

    def _take(self, n: int) -> bytes:
        taken: list[bytes] = []
        need = n
        while need:
            piece = self._pieces.popleft()
            if len(piece) > need:
                self._pieces.appendleft(piece[need:])
                piece = piece[:need]
            taken.append(piece)
            need -= len(piece)
        self.size -= n
        return taken[0] if len(taken) == 1 else b"".join(taken)


class StreamingUpload:
    """An object uploaded while it is being written.

    A multipart upload that sends a part of ``part_bytes`` each time one fills, up to
    ``multipart_concurrency`` parts in flight per store (``write`` waits for a free slot), so
    memory holds one part being filled per stream and the parts in flight, never the object.
    ``complete`` sends what is left, at most one part, and completes the upload; a stream that
    never filled a part becomes one PUT there. (Waiting for ``multipart_threshold_bytes``
    before choosing, as :meth:`ObjectStore.upload_file` does for a file of known size, would
    hold that much per stream in memory: 64 MiB by default, for each writer open at once.)
    ``abort`` drops what was sent. An upload neither completed nor aborted (its process was
    killed) is left for orphan cleanup, which lists and aborts old ones.

    One thread writes at a time. A part that fails for good does not raise from ``write``,
    whose caller may be a Parquet thread that would bury the error: the stream stops sending
    and ``complete`` raises it.
    """

    def __init__(
        self,
        store: ObjectStore,
        key: str,
        part_bytes: int,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.key = key
        self.size = 0
        """Bytes written so far."""
        self._store = store
        self._part_bytes = part_bytes
        self._metadata = dict(metadata or {})
        self._token = uuid.uuid4().hex
        self._buffer = _PartBuffer(part_bytes)
        self._upload_id: str | None = None
        self._slots = store._part_slots
        self._pool: ThreadPoolExecutor | None = None
        self._parts: list[Future[CompletedPartTypeDef]] = []
        self._failure: BaseException | None = None
        self._ended = False

    def write(self, data: bytes) -> None:
        if self._ended:
            raise ValueError(f"upload to {self.key} has ended")
        self.size += len(data)
        if self._failure is not None:
            return
        try:
            for part in self._buffer.add(data):
                self._send(part)
        except Exception as err:
            self._failure = err

    def _send(self, data: bytes) -> None:
        store = self._store
        if self._upload_id is None:
            meta = {**self._metadata, WRITE_TOKEN_META: self._token}
            self._upload_id = store._create_multipart(self.key, meta)
            concurrency = store._settings.multipart_concurrency
            self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="s3-part")
        assert self._pool is not None
        if len(self._parts) >= MAX_PARTS:
            where = store._where(self.key)
            raise StoreError(f"s3 upload {where}: more than {MAX_PARTS} parts of {self._part_bytes} bytes")
        self._slots.acquire()
        part = self._pool.submit(store._upload_part, self.key, self._upload_id, len(self._parts) + 1, data)
        part.add_done_callback(self._part_done)
        self._parts.append(part)

    def _part_done(self, part: Future[CompletedPartTypeDef]) -> None:
        if not part.cancelled() and part.exception() is not None:
            self._failure = self._failure or part.exception()
        self._slots.release()

    def complete(self) -> None:
        """Send the rest and complete the object; on failure the upload is aborted."""
        if self._ended:
            raise ValueError(f"upload to {self.key} has ended")
        store = self._store
        try:
            if self._upload_id is None and self._failure is None:
                store.put_bytes(self.key, self._buffer.rest(), metadata=self._metadata)
            else:
                if self._buffer.size and self._failure is None:
                    self._send(self._buffer.rest())
                parts = [part.result() for part in self._parts]
                if self._failure is not None:
                    raise self._failure
                assert self._upload_id is not None
                store._complete_multipart(self.key, self._upload_id, parts, self._token)
        except BaseException as err:
            self.abort()
            if isinstance(err, bexc.ClientError):
                raise store._map_client_error("complete-multipart", self.key, err) from err
            raise
        self._end()

    def abort(self) -> None:
        """Drop what was sent; does nothing once the upload has completed or was aborted."""
        if self._ended:
            return
        for part in self._parts:
            part.cancel()
        # A part still being sent would otherwise land after the abort and keep the upload alive.
        self._end()
        if self._upload_id is not None:
            self._store._abort_multipart(self.key, self._upload_id)

    def _end(self) -> None:
        self._ended = True
        self._buffer = _PartBuffer(self._part_bytes)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
