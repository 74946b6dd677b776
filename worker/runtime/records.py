"""Durable job records in Redis, kept outside the broker, and the attempt protocol
(docs/design/README.md: lifecycle of a job).

A *meta job* is one gc-compaction request for a timeline; planning splits it into *sub-jobs*
(key ranges) that workers run. Each record is a pydantic model stored as JSON under its own key:

```
compactor:meta:{job_id}               MetaJobRecord
compactor:sub:{job_id}.{index}        SubJobRecord
compactor:meta:{job_id}:finished      set of sub-job ids that have ended
compactor:meta:{job_id}:finalize      finalize claim (SET NX), value = claim time
compactor:jobs                        sorted set of meta job ids by creation time
compactor:active                      set of meta job ids not yet ended
compactor:inflight:{tenant}/{tl}      meta job id in flight for the timeline (SET NX)
compactor:breaker:{tenant}/{tl}       BreakerState of the timeline
compactor:node-lock:{node}            the node lock (compactor.worker.runtime.node_lock)
compactor:held:{job_id}.{index}       the worker process that last received the sub-job's message
compactor:alive:{hostname}:{pid}      a worker process's liveness (expires when it stops renewing)
```

Only the current attempt of a sub-job may change it: every worker report carries the sub-job
id, the attempt number and the owner token given out at claim time, and is applied with
WATCH/MULTI only while all three still match and the record is running. Anything else is a
report from a stale attempt (preempted, superseded, cancelled): it is ignored and logged.
WATCH/MULTI in Python rather than a Lua script because Lua's cjson would round LSNs (64-bit
integers) through doubles.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import redis
from pydantic import BaseModel, ConfigDict, Field, model_validator
from redis.backoff import NoBackoff
from redis.retry import Retry

from compactor.storage.errors import CompactorError, InvalidInput, NotFound
from compactor.storage.ids import HexId, validate_id
from compactor.storage.keys import KEY_MAX, KEY_MIN, format_key
from compactor.storage.lsn import LSN_MAX
from compactor.storage.manifest import KeyHex, Lsn
from compactor.storage.settings import Settings
from compactor.worker.engine.jobs import CommitProposal, CompactionJob, JobKind, SubJobSpec, check_kind
from compactor.worker.engine.statistics import CompactionStatistics, NumSize

log = logging.getLogger(__name__)

PREFIX = "compactor:"
_TRANSACTION_TRIES = 100

M = TypeVar("M", bound=BaseModel)


class RedisUnavailable(CompactorError):
    """Redis could not be reached."""


# ----------------------------------------------------------------------------- connections


def redact_url(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    return re.sub(r"://([^:/@]*):[^@/]*@", r"://\1:***@", url)


def redis_py_url(url: str) -> str:
    """The URL in the form redis-py takes: ``redis+socket:///path`` becomes ``unix:///path``."""
    if url.startswith("redis+socket://"):
        return "unix://" + url[len("redis+socket://") :]
    return url


def celery_redis_url(url: str) -> str:
    """The URL in the form kombu (broker) and Celery's redis result backend both take:
    ``unix:///path?db=N`` becomes ``redis+socket:///path?virtual_host=N``."""
    if url.startswith("unix://"):
        parts = urlsplit(url)
        db = parse_qs(parts.query).get("db", ["0"])[0]
        # Keep the credentials (``unix://:password@/path``): found by the security tests, the
        # broker and result backend connected without them while job records used them, so a
        # password-protected Redis on a socket refused every worker (kombu and Celery's
        # backend both read ``redis+socket://:password@/path``).
        userinfo = parts.netloc.rpartition("@")[0]
        return f"redis+socket://{userinfo + '@' if userinfo else ''}{parts.path}?virtual_host={db}"
    return url


def connect(settings: Settings, *, timeout_s: float | None = None, retries: bool = True) -> redis.Redis:
    """A redis-py client for ``settings.redis_url`` (bytes responses).

    One retry policy per call site: redis-py's own retry of a failed command (a few attempts
    with jittered backoff) is the only one on the record paths; the connectivity check turns
    it off so an unreachable Redis fails within ``timeout_s``.
    """
    timeout = timeout_s if timeout_s is not None else settings.redis_timeout_s
    kwargs: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "health_check_interval": 30,
    }
    if not retries:
        kwargs["retry"] = Retry(NoBackoff(), 0)
    try:
        return redis.Redis.from_url(redis_py_url(settings.redis_url), **kwargs)
    except ValueError as err:
        raise InvalidInput(f"invalid COMPACTOR_REDIS_URL {redact_url(settings.redis_url)!r}: {err}") from None


def check_connectivity(settings: Settings, timeout_s: float = 2.0) -> None:
    """Raise RedisUnavailable with a one-line message unless Redis answers a PING in time."""
    client = connect(settings, timeout_s=timeout_s, retries=False)
    try:
        client.ping()
    except (redis.RedisError, OSError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise RedisUnavailable(f"cannot reach Redis at {redact_url(settings.redis_url)}: {reason}") from None
    finally:
        client.close()


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def now() -> float:
    return time.time()


def new_job_id() -> str:
    return uuid.uuid4().hex


def sub_job_id(meta_id: str, index: int) -> str:
    return f"{meta_id}.{index}"


# ----------------------------------------------------------------------------- payloads


_HEX_ID: dict[str, Any] = {"pattern": "^[0-9a-f]{32}$"}
_KEY_HEX: dict[str, Any] = {"pattern": "^[0-9A-Fa-f]{36}$"}


class CompactRequest(BaseModel):
    """Payload of ``compactor.compact_timeline``: one gc-compaction meta job.

    Keys are 36 hex characters, LSNs JSON integers; ``lsn_end`` of 2^64-1 means "up to the gc
    cutoff". ``job_id`` lets a client choose the meta job id (32 lowercase hex characters) so
    that resending the same request is harmless: a second request with the same id and the same
    fields returns the existing job; with different fields it is rejected.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant_id: HexId = Field(json_schema_extra=_HEX_ID)
    timeline_id: HexId = Field(json_schema_extra=_HEX_ID)
    key_start: KeyHex = Field(
        default=format_key(KEY_MIN), description="first key, inclusive", json_schema_extra=_KEY_HEX
    )
    key_end: KeyHex = Field(default=format_key(KEY_MAX), description="end key, exclusive", json_schema_extra=_KEY_HEX)
    lsn_start: Lsn = Field(default=0, description="compact history above this LSN only; 0 = all history")
    lsn_end: Lsn = Field(default=LSN_MAX, description="compact below this LSN, capped by the gc cutoff")
    max_job_bytes: int | None = Field(
        default=None, ge=1, description="split into sub-jobs of about this many bytes of layers; null = server default"
    )
    sub_compaction: bool = Field(default=True, description="false: one job over the whole range")
    dry_run: bool = Field(default=False, description="compute statistics, commit nothing")
    job_id: HexId | None = Field(
        default=None, description="client-chosen meta job id; null = a new one", json_schema_extra=_HEX_ID
    )
    kind: JobKind = Field(
        default="gc",
        description="gc: gc-compaction; l0: L0 compaction; image: image-layer creation (l0 and image: every key, "
        "all history, no dry run)",
    )
    force: bool = Field(default=False, description="l0 and image only: ignore the L0 and image thresholds")

    @model_validator(mode="after")
    def _ranges(self) -> CompactRequest:
        if self.key_start >= self.key_end:
            raise ValueError(f"empty or inverted key range {self.key_start}-{self.key_end}")
        if self.lsn_start >= self.lsn_end:
            raise ValueError(f"empty or inverted LSN range [{self.lsn_start}, {self.lsn_end})")
        full_range = (self.key_start, self.key_end, self.lsn_start, self.lsn_end) == (
            format_key(KEY_MIN),
            format_key(KEY_MAX),
            0,
            LSN_MAX,
        )
        check_kind(self.kind, force=self.force, dry_run=self.dry_run, full_range=full_range)
        return self

    def to_job(self) -> CompactionJob:
        return CompactionJob(
            tenant_id=self.tenant_id,
            timeline_id=self.timeline_id,
            key_start=self.key_start,
            key_end=self.key_end,
            lsn_start=self.lsn_start,
            lsn_end=self.lsn_end,
            dry_run=self.dry_run,
            kind=self.kind,
            force=self.force,
        )

    def same_job(self, other: CompactRequest) -> bool:
        return self.model_dump(exclude={"job_id"}) == other.model_dump(exclude={"job_id"})


class MetaJobRef(BaseModel):
    """Payload of ``compactor.plan_meta_job`` and ``compactor.finalize_meta_job``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: HexId = Field(json_schema_extra=_HEX_ID)


class SubJobRef(BaseModel):
    """Payload of ``compactor.run_sub_job``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sub_job_id: str = Field(pattern=r"^[0-9a-f]{32}\.\d{1,6}$", description="<meta job id>.<index>")


# ----------------------------------------------------------------------------- records


class JobState(StrEnum):
    """The state of a meta job or a sub-job, and who may move it where (docs/design/README.md).

    Sub-job::

        queued ──claim──> running ──finish──> succeeded | failed | cancelled
          │  ^              │  │
          │  └─── claim ────┘  └─finish/preempt─> preempted ──claim──> running (attempt + 1)
          └─cancel_waiting / claim over the cap / give up─> cancelled | failed

    - ``claim`` (the worker taking it): queued or preempted, or running with a silent heartbeat,
      becomes running with a new attempt and owner token; over the attempt cap it fails, after a
      cancel request it is cancelled.
    - ``heartbeat``/``finish`` (the current attempt only, by attempt number and token): running
      becomes an end state, or preempted to run again (a lost lock, a retryable error).
    - ``preempt`` (the coordinator): a running attempt silent or stuck for too long; ``give up``
      (the coordinator) fails a preempted sub-job over the cap.
    - ``cancel_waiting`` (``compactor job cancel``): queued or preempted becomes cancelled.

    Meta job: queued ──plan──> running ──finalize──> succeeded | failed | cancelled; a meta job that
    cannot be planned, or has nothing to do, goes from queued to its end through finalize too.
    Only ``plan`` (and the re-plan after a commit conflict) writes its sub-jobs, only ``finalize``
    (claimed once per plan) ends it.
    """

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PREEMPTED = "preempted"  # a sub-job attempt taken away (dead or stuck worker); runs again

    @property
    def ended(self) -> bool:
        return self in _ENDED


_ENDED = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Owner(Record):
    node: str
    pid: int
    token: str


class JobProgress(Record):
    phase: str = "queued"
    keys: int = 0
    versions_in: int = 0
    bytes_in: int = 0
    bytes_out: int = 0

    def marker(self) -> tuple[str, int, int, int]:
        """What must change for the no-progress clock to restart."""
        return (self.phase, self.versions_in, self.bytes_in, self.bytes_out)


class AttemptInfo(Record):
    """One attempt of a sub-job: who ran it, when it held the node lock, how it ended."""

    attempt: int
    node: str
    pid: int
    # The node lock was held from started_at at least until ended_at; for an attempt taken
    # away from a dead worker, ended_at is when it was taken (its lock had expired by then).
    started_at: float
    ended_at: float | None = None
    outcome: str | None = None


class SubJobRecord(Record):
    id: str
    meta_id: str
    index: int
    spec: SubJobSpec
    state: JobState = JobState.QUEUED
    attempt: int = 0
    owner: Owner | None = None
    heartbeat_at: float | None = None
    progress: JobProgress = Field(default_factory=JobProgress)
    progress_changed_at: float | None = None
    stats: CompactionStatistics | None = None
    proposal: CommitProposal | None = None  # its part of the meta job's commit, once it succeeded
    skipped: str | None = None
    error: str | None = None
    reclaims: int = 0
    created_at: float = Field(default_factory=now)
    enqueued_at: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    attempts: list[AttemptInfo] = Field(default_factory=list)

    def is_current(self, attempt: int, token: str) -> bool:
        return (
            self.state == JobState.RUNNING
            and self.attempt == attempt
            and self.owner is not None
            and self.owner.token == token
        )


def most_at_once(subs: list[SubJobRecord]) -> int:
    """The most sub-jobs that ran at the same moment, from their recorded attempt intervals."""
    events = sorted(
        (at, step)
        for sub in subs
        for attempt in sub.attempts
        for at, step in ((attempt.started_at, 1), (attempt.ended_at or now(), -1))
    )
    running = most = 0
    for _, step in events:  # at equal times an end (-1) sorts before a start
        running += step
        most = max(most, running)
    return most


class MetaStatistics(Record):
    """The seed's ``GcCompactionMetaStatistics``, plus cancelled sub-jobs."""

    total_sub_compaction_jobs: int = 0
    failed_sub_compaction_jobs: int = 0
    succeeded_sub_compaction_jobs: int = 0
    cancelled_sub_compaction_jobs: int = 0
    before_compaction_layer_size: int = 0
    after_compaction_layer_size: int = 0
    start_time: datetime | None = None
    end_time: datetime | None = None
    duration_secs: float = 0.0
    meta_job_id: str = ""
    below_lsn: int = 0
    retention_ratio: float = 0.0
    # The meta job's own object-store requests (planning, commit, deletes), by kind; its
    # sub-jobs' are in theirs.
    s3_requests: dict[str, NumSize] = Field(default_factory=dict)

    def finalize(self) -> None:
        end = datetime.now(UTC)
        if self.start_time is not None and end > self.start_time:
            self.duration_secs = (end - self.start_time).total_seconds()
        # The +1.0 keeps an empty job at ratio 0 instead of dividing by zero (as the seed).
        self.retention_ratio = self.after_compaction_layer_size / (self.before_compaction_layer_size + 1.0)
        self.end_time = end


class MetaJobRecord(Record):
    id: str
    tenant_id: str
    timeline_id: str
    request: CompactRequest | None = None  # None only for a rejected (invalid) payload
    auto: bool = False
    state: JobState = JobState.QUEUED
    cancel_requested: bool = False
    sub_jobs: list[str] = Field(default_factory=list)  # of the current plan (a re-plan replaces them)
    planned_on: int | None = None  # the manifest number the current plan was made on
    replans: int = 0  # plans made again after a commit conflict
    conflicts: list[str] = Field(default_factory=list)  # why each re-plan was needed
    manifest_number: int | None = None  # the manifest its commit wrote
    below_lsn: int = 0
    max_job_bytes: int = 0
    skipped: str | None = None
    error: str | None = None
    created_at: float = Field(default_factory=now)
    planned_at: float | None = None
    ended_at: float | None = None
    statistics: MetaStatistics | None = None
    compaction_statistics: CompactionStatistics | None = None  # the sub-jobs' merged counters
    l2_lsn: int | None = None  # gc_compaction.last_completed_lsn its commit writes (None: a partial job)
    stats_object: str | None = None
    pending: bool = False  # l0: the byte bound left L0s for another job (the seed's CompactionOutcome::Pending)


class BreakerState(Record):
    tenant_id: str
    timeline_id: str
    consecutive_failures: int = 0
    open_until: float | None = None
    last_job_id: str | None = None
    last_error: str | None = None

    def is_open(self, at: float) -> bool:
        return self.open_until is not None and at < self.open_until


class StaleAttempt(CompactorError):
    """A report from an attempt that is no longer the current one; it was ignored."""


class ClaimOutcome(StrEnum):
    CLAIMED = "claimed"
    GAVE_UP = "gave-up"  # over the attempt cap: the record is now failed
    ENDED = "ended"  # the sub-job has ended already (a duplicate delivery)
    BUSY = "busy"  # another attempt is running and alive
    CANCELLED = "cancelled"  # cancel was requested: the record is now cancelled
    MISSING = "missing"


# ----------------------------------------------------------------------------- the store


def _key_meta(job_id: str) -> str:
    return f"{PREFIX}meta:{job_id}"


def _key_sub(sub_id: str) -> str:
    return f"{PREFIX}sub:{sub_id}"


def _key_finished(job_id: str) -> str:
    return f"{PREFIX}meta:{job_id}:finished"


def _key_finalize(job_id: str) -> str:
    return f"{PREFIX}meta:{job_id}:finalize"


def _key_inflight(tenant_id: str, timeline_id: str) -> str:
    return f"{PREFIX}inflight:{tenant_id}/{timeline_id}"


def _key_breaker(tenant_id: str, timeline_id: str) -> str:
    return f"{PREFIX}breaker:{tenant_id}/{timeline_id}"


def _key_held(sub_id: str) -> str:
    return f"{PREFIX}held:{sub_id}"


def _key_alive(holder: str) -> str:
    return f"{PREFIX}alive:{holder}"


# A received message is held at most until the broker's visibility timeout gives it back.
_HELD_TTL_S = 24 * 3600

KEY_JOBS = f"{PREFIX}jobs"
KEY_ACTIVE = f"{PREFIX}active"

# Delete the in-flight marker only if it still names this meta job.
_COMPARE_AND_DELETE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class JobRecords:
    """Job records in one Redis database. Thread-safe (redis-py clients are)."""

    def __init__(self, client: redis.Redis, *, record_ttl_s: float = 14 * 24 * 3600.0) -> None:
        self.r = client
        self.record_ttl_s = record_ttl_s
        self._compare_and_delete = client.register_script(_COMPARE_AND_DELETE)

    # ------------------------------------------------------------------ plumbing

    def _load(self, model: type[M], raw: bytes | str | None) -> M | None:
        if raw is None:
            return None
        return model.model_validate_json(raw)

    def _transact(self, keys: list[str], body: Callable[[Any], Callable[[Any], None] | None]) -> bool:
        """Optimistic transaction: ``body(pipe)`` reads with the keys watched and returns a
        function that queues the writes (or None to write nothing). Retried when a watched key
        changed in between; returns whether anything was written."""
        pipeline: Any = self.r.pipeline()  # redis-py leaves watch/multi untyped
        with pipeline as pipe:
            for _ in range(_TRANSACTION_TRIES):
                try:
                    pipe.watch(*keys)
                    writes = body(pipe)
                    if writes is None:
                        pipe.unwatch()
                        return False
                    pipe.multi()
                    writes(pipe)
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue
        raise CompactorError(f"job record update of {keys[0]} lost {_TRANSACTION_TRIES} races in a row")

    # ------------------------------------------------------------------ meta jobs

    def create_meta(self, meta: MetaJobRecord, *, active: bool = True) -> bool:
        """Store a new meta job record; False if that id exists already."""
        if not self.r.set(_key_meta(meta.id), meta.model_dump_json(), nx=True):
            return False
        with self.r.pipeline(transaction=True) as pipe:
            pipe.zadd(KEY_JOBS, {meta.id: meta.created_at})
            if active:
                pipe.sadd(KEY_ACTIVE, meta.id)
            pipe.execute()
        return True

    def get_meta(self, job_id: str) -> MetaJobRecord | None:
        return self._load(MetaJobRecord, self.r.get(_key_meta(job_id)))

    def require_meta(self, job_id: str) -> MetaJobRecord:
        validate_id(job_id, "job id")
        meta = self.get_meta(job_id)
        if meta is None:
            raise NotFound(f"job {job_id} not found")
        return meta

    def update_meta(self, job_id: str, change: Callable[[MetaJobRecord], MetaJobRecord | None]) -> MetaJobRecord | None:
        """Apply ``change`` atomically; it returns the new record or None to leave it. Returns
        the record as stored afterwards (None if it does not exist)."""
        return self._update(_key_meta(job_id), MetaJobRecord, change, unchanged_result=True)

    def _update(self, key: str, model: type[M], change: Callable[[M], M | None], *, unchanged_result: bool) -> M | None:
        """Read-modify-write of one record under WATCH; ``unchanged_result`` picks what is
        returned when ``change`` leaves the record: the record as it is, or None."""
        result: list[M | None] = [None]

        def body(pipe: Any) -> Callable[[Any], None] | None:
            current = self._load(model, pipe.get(key))
            result[0] = current if unchanged_result else None
            if current is None:
                return None
            new = change(current.model_copy(deep=True))
            if new is None:
                return None
            result[0] = new
            return lambda p: p.set(key, new.model_dump_json(), keepttl=True)

        self._transact([key], body)
        return result[0]

    def store_plan(
        self,
        job_id: str,
        apply: Callable[[MetaJobRecord], MetaJobRecord],
        subs: list[SubJobRecord],
        *,
        replan: bool = False,
    ) -> MetaJobRecord | None:
        """Store the planned meta job (``apply`` sets the planned fields on the current record)
        and its sub-job records in one transaction, only while the meta job is still queued (or,
        for a ``replan``, running with its finalize claimed) and not cancelled. A re-plan also
        releases the finalize claim, for the new sub-jobs' finalize. Returns the stored meta
        record, or None if it was not stored."""
        key = _key_meta(job_id)
        result: list[MetaJobRecord | None] = [None]
        expected = JobState.RUNNING if replan else JobState.QUEUED

        def body(pipe: Any) -> Callable[[Any], None] | None:
            current = self._load(MetaJobRecord, pipe.get(key))
            result[0] = None
            if current is None or current.state != expected or current.cancel_requested:
                return None
            meta = apply(current.model_copy(deep=True))
            result[0] = meta

            def writes(p: Any) -> None:
                for sub in subs:
                    p.set(_key_sub(sub.id), sub.model_dump_json())
                p.set(key, meta.model_dump_json(), keepttl=True)
                if replan:
                    p.delete(_key_finalize(job_id))

            return writes

        self._transact([key], body)
        return result[0]

    def list_meta(self, limit: int = 50) -> list[MetaJobRecord]:
        ids = [_text(i) for i in self.r.zrevrange(KEY_JOBS, 0, max(limit, 1) - 1)]
        out = []
        for job_id, raw in zip(ids, self.r.mget([_key_meta(i) for i in ids]) if ids else [], strict=True):
            meta = self._load(MetaJobRecord, raw)
            if meta is None:
                self.r.zrem(KEY_JOBS, job_id)  # expired
            else:
                out.append(meta)
        return out

    def active_meta_ids(self) -> list[str]:
        return sorted(_text(i) for i in self.r.smembers(KEY_ACTIVE))

    def deactivate(self, job_id: str) -> None:
        self.r.srem(KEY_ACTIVE, job_id)

    def expire_job(self, meta: MetaJobRecord) -> None:
        """Let an ended meta job's records expire after the retention period."""
        ttl = max(1, int(self.record_ttl_s))
        with self.r.pipeline(transaction=False) as pipe:
            for key in (_key_meta(meta.id), _key_finished(meta.id), _key_finalize(meta.id)):
                pipe.expire(key, ttl)
            for sub in meta.sub_jobs:
                pipe.expire(_key_sub(sub), ttl)
            pipe.execute()

    # ------------------------------------------------------------------ sub-jobs

    def get_sub(self, sub_id: str) -> SubJobRecord | None:
        return self._load(SubJobRecord, self.r.get(_key_sub(sub_id)))

    def get_subs(self, sub_ids: Iterable[str]) -> list[SubJobRecord]:
        ids = list(sub_ids)
        if not ids:
            return []
        raws = self.r.mget([_key_sub(i) for i in ids])
        return [rec for rec in (self._load(SubJobRecord, raw) for raw in raws) if rec is not None]

    def update_sub(self, sub_id: str, change: Callable[[SubJobRecord], SubJobRecord | None]) -> SubJobRecord | None:
        """Apply ``change`` atomically (it returns None to leave the record); returns the record
        as written, or None if nothing was written."""
        return self._update(_key_sub(sub_id), SubJobRecord, change, unchanged_result=False)

    def report(self, sub_id: str, attempt: int, token: str, change: Callable[[SubJobRecord], None]) -> SubJobRecord:
        """A report of the attempt ``(attempt, token)``: applied only while it is the current,
        running attempt; raises StaleAttempt (after logging) otherwise."""
        stale: list[SubJobRecord | None] = [None]

        def guarded(rec: SubJobRecord) -> SubJobRecord | None:
            if not rec.is_current(attempt, token):
                stale[0] = rec
                return None
            change(rec)
            return rec

        written = self.update_sub(sub_id, guarded)
        if written is None:
            rec = stale[0]
            log.warning(
                "stale report ignored sub_job=%s attempt=%d current_attempt=%s state=%s",
                sub_id, attempt, rec.attempt if rec else None, rec.state if rec else "missing",
            )  # fmt: skip
            raise StaleAttempt(f"sub-job {sub_id} attempt {attempt} is no longer current")
        return written

    def heartbeat(self, sub_id: str, attempt: int, token: str, progress: JobProgress | None = None) -> SubJobRecord:
        at = now()

        def change(rec: SubJobRecord) -> None:
            rec.heartbeat_at = at
            if progress is not None:
                _set_progress(rec, progress, at)

        return self.report(sub_id, attempt, token, change)

    def report_progress(self, sub_id: str, attempt: int, token: str, progress: JobProgress) -> SubJobRecord:
        """Store the attempt's progress, guarded like :meth:`report`, without renewing its
        heartbeat: only the thread that also renews the node lock may say the attempt is alive."""
        at = now()
        return self.report(sub_id, attempt, token, lambda rec: _set_progress(rec, progress, at))

    def claim(
        self,
        sub_id: str,
        *,
        node: str,
        pid: int,
        heartbeat_timeout_s: float,
        max_attempts: int,
        cancel_requested: Callable[[], bool],
    ) -> tuple[ClaimOutcome, SubJobRecord | None]:
        """Make a new attempt of the sub-job current, owned by ``node``/``pid``.

        Claims a queued or preempted sub-job, or a running one whose heartbeat is older than
        ``heartbeat_timeout_s`` (its attempt is preempted). The attempt number goes up by one;
        over ``max_attempts`` the sub-job fails instead.
        """
        outcome: list[ClaimOutcome] = [ClaimOutcome.MISSING]
        at = now()
        cancelled = cancel_requested()

        def change(rec: SubJobRecord) -> SubJobRecord | None:
            if rec.state.ended:
                outcome[0] = ClaimOutcome.ENDED
                return None
            if rec.state == JobState.RUNNING:
                if rec.heartbeat_at is not None and at - rec.heartbeat_at < heartbeat_timeout_s:
                    outcome[0] = ClaimOutcome.BUSY
                    return None
                _end_attempt(rec, at, "preempted: heartbeat lost")
                rec.reclaims += 1
            if cancelled:
                outcome[0] = ClaimOutcome.CANCELLED
                rec.state, rec.ended_at, rec.owner = JobState.CANCELLED, at, None
                rec.error = rec.error or "cancelled before it ran"
                return rec
            if rec.attempt >= max_attempts:
                outcome[0] = ClaimOutcome.GAVE_UP
                rec.state, rec.ended_at, rec.owner = JobState.FAILED, at, None
                last = rec.attempts[-1].outcome if rec.attempts else None
                rec.error = f"gave up after {rec.attempt} attempts" + (f" (last: {last})" if last else "")
                return rec
            outcome[0] = ClaimOutcome.CLAIMED
            rec.attempt += 1
            rec.state = JobState.RUNNING
            rec.owner = Owner(node=node, pid=pid, token=uuid.uuid4().hex)
            rec.heartbeat_at = at
            rec.progress = JobProgress(phase="starting")
            rec.progress_changed_at = at
            rec.started_at = rec.started_at or at
            rec.error = None
            rec.attempts.append(AttemptInfo(attempt=rec.attempt, node=node, pid=pid, started_at=at))
            return rec

        written = self.update_sub(sub_id, change)
        return outcome[0], written

    def preempt(self, sub_id: str, attempt: int, token: str, reason: str) -> SubJobRecord | None:
        """Take the running attempt ``(attempt, token)`` away (dead or stuck worker): its later
        reports are ignored. None if it is not the current attempt any more."""
        at = now()

        def change(rec: SubJobRecord) -> SubJobRecord | None:
            if not rec.is_current(attempt, token):
                return None
            _end_attempt(rec, at, f"preempted: {reason}")
            rec.state, rec.owner, rec.enqueued_at = JobState.PREEMPTED, None, None
            rec.reclaims += 1
            rec.progress.phase = "preempted"
            return rec

        return self.update_sub(sub_id, change)

    def finish(
        self,
        sub_id: str,
        attempt: int,
        token: str,
        state: JobState,
        change: Callable[[SubJobRecord], None] | None = None,
    ) -> SubJobRecord:
        """End the current attempt (guarded like :meth:`report`): in an ended state, or
        ``PREEMPTED`` to have the sub-job run again as a new attempt."""
        at = now()

        def ending(rec: SubJobRecord) -> None:
            if change is not None:
                change(rec)
            outcome = state.value if rec.error is None else f"{state.value}: {rec.error}"
            _end_attempt(rec, at, outcome)
            rec.state, rec.owner = state, None
            rec.progress.phase = state.value
            if state.ended:
                rec.ended_at = at
            else:
                rec.enqueued_at = None

        return self.report(sub_id, attempt, token, ending)

    def cancel_waiting(self, sub_id: str) -> SubJobRecord | None:
        """Cancel a sub-job that is not running (queued or preempted); None otherwise."""
        at = now()

        def change(rec: SubJobRecord) -> SubJobRecord | None:
            if rec.state not in (JobState.QUEUED, JobState.PREEMPTED):
                return None
            rec.state, rec.ended_at, rec.owner = JobState.CANCELLED, at, None
            rec.progress.phase = "cancelled"
            rec.error = "cancelled before it ran"
            return rec

        return self.update_sub(sub_id, change)

    def mark_enqueued(self, sub_id: str) -> SubJobRecord | None:
        """Note that a message for this waiting sub-job was published; None unless it waits."""
        at = now()

        def change(rec: SubJobRecord) -> SubJobRecord | None:
            if rec.state not in (JobState.QUEUED, JobState.PREEMPTED):
                return None
            rec.enqueued_at = at
            return rec

        return self.update_sub(sub_id, change)

    # ------------------------------------------------------------------ deliveries

    def forget_holder(self, sub_id: str) -> None:
        """Whoever held an earlier message of the sub-job: about to send a new one, which has
        reached no worker yet."""
        self.r.delete(_key_held(sub_id))

    def mark_held(self, sub_id: str, holder: str) -> None:
        """A worker process (``hostname:pid``) received the sub-job's message: it holds it until
        it runs it, also while it waits for a countdown or a free slot."""
        self.r.set(_key_held(sub_id), holder, ex=_HELD_TTL_S)

    def held_by(self, sub_id: str) -> str | None:
        raw = self.r.get(_key_held(sub_id))
        return _text(raw) if raw is not None else None

    def keep_alive(self, holder: str, ttl_s: float) -> None:
        """Say that the worker process ``holder`` is alive for another ``ttl_s`` seconds."""
        self.r.set(_key_alive(holder), "1", px=max(1, int(ttl_s * 1000)))

    def gone(self, holder: str) -> None:
        """The worker process ``holder`` stops: whatever it still holds is lost from now on."""
        self.r.delete(_key_alive(holder))

    def is_alive(self, holder: str) -> bool:
        return bool(self.r.exists(_key_alive(holder)))

    # ------------------------------------------------------------------ ending and finalize

    def mark_finished(self, meta_id: str, sub_id: str) -> int:
        """Add an ended sub-job to its meta job's finished set; returns the set's size."""
        with self.r.pipeline(transaction=True) as pipe:
            pipe.sadd(_key_finished(meta_id), sub_id)
            pipe.scard(_key_finished(meta_id))
            _, count = pipe.execute()
        return int(count)

    def finished(self, meta_id: str) -> set[str]:
        return {_text(i) for i in self.r.smembers(_key_finished(meta_id))}

    def claim_finalize(self, meta_id: str) -> bool:
        """True for exactly one caller per meta job."""
        return bool(self.r.set(_key_finalize(meta_id), str(now()), nx=True))

    def finalize_claimed_at(self, meta_id: str) -> float | None:
        raw = self.r.get(_key_finalize(meta_id))
        return float(raw) if raw is not None else None

    # ------------------------------------------------------------------ per timeline

    def set_inflight(self, tenant_id: str, timeline_id: str, meta_id: str) -> bool:
        return bool(self.r.set(_key_inflight(tenant_id, timeline_id), meta_id, nx=True))

    def get_inflight(self, tenant_id: str, timeline_id: str) -> str | None:
        raw = self.r.get(_key_inflight(tenant_id, timeline_id))
        return _text(raw) if raw is not None else None

    def clear_inflight(self, tenant_id: str, timeline_id: str, meta_id: str) -> bool:
        return bool(self._compare_and_delete(keys=[_key_inflight(tenant_id, timeline_id)], args=[meta_id]))

    def breaker(self, tenant_id: str, timeline_id: str) -> BreakerState:
        found = self._load(BreakerState, self.r.get(_key_breaker(tenant_id, timeline_id)))
        return found or BreakerState(tenant_id=tenant_id, timeline_id=timeline_id)

    def breakers(self) -> list[BreakerState]:
        out = []
        for key in self.r.scan_iter(match=f"{PREFIX}breaker:*", count=500):
            state = self._load(BreakerState, self.r.get(key))
            if state is not None:
                out.append(state)
        return sorted(out, key=lambda b: (b.tenant_id, b.timeline_id))

    def record_outcome(self, meta: MetaJobRecord, *, failures_to_open: int, cooldown_s: float) -> BreakerState | None:
        """Count a meta job's end in its timeline's circuit breaker: a failure adds one and,
        at ``failures_to_open`` in a row, opens the breaker for ``cooldown_s``; a success
        closes it. Cancelled jobs say nothing about the timeline and leave it alone."""
        if meta.state not in (JobState.SUCCEEDED, JobState.FAILED) or meta.request is None:
            return None
        key = _key_breaker(meta.tenant_id, meta.timeline_id)
        result: list[BreakerState | None] = [None]

        def body(pipe: Any) -> Callable[[Any], None]:
            state = self._load(BreakerState, pipe.get(key)) or BreakerState(
                tenant_id=meta.tenant_id, timeline_id=meta.timeline_id
            )
            if meta.state == JobState.FAILED:
                state.consecutive_failures += 1
                state.last_error = meta.error
                if state.consecutive_failures >= failures_to_open:
                    state.open_until = now() + cooldown_s
            else:
                state.consecutive_failures, state.open_until, state.last_error = 0, None, None
            state.last_job_id = meta.id
            result[0] = state
            return lambda p: p.set(key, state.model_dump_json())

        self._transact([key], body)
        if result[0] is not None and result[0].open_until is not None and meta.state == JobState.FAILED:
            log.warning(
                "circuit breaker open tenant=%s timeline=%s failures=%d until=%.0f",
                meta.tenant_id, meta.timeline_id, result[0].consecutive_failures, result[0].open_until,
            )  # fmt: skip
        return result[0]


def _set_progress(rec: SubJobRecord, progress: JobProgress, at: float) -> None:
    if progress.marker() != rec.progress.marker():
        rec.progress = progress
        rec.progress_changed_at = at


def _end_attempt(rec: SubJobRecord, at: float, outcome: str) -> None:
    if rec.attempts and rec.attempts[-1].ended_at is None:
        rec.attempts[-1].ended_at = at
        rec.attempts[-1].outcome = outcome


# ----------------------------------------------------------------------------- task API schemas

PAYLOADS: dict[str, type[BaseModel]] = {
    "CompactRequest": CompactRequest,
    "MetaJobRef": MetaJobRef,
    "SubJobRef": SubJobRef,
}


def payload_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schema of every task payload (docs/task-api.md embeds these)."""
    return {name: model.model_json_schema() for name, model in PAYLOADS.items()}


if __name__ == "__main__":  # python -m compactor.worker.runtime.records: the schemas for the docs
    for name, schema in payload_schemas().items():
        print(f"<!-- schema: {name} -->\n```json\n{json.dumps(schema, indent=2)}\n```\n")
