"""Durable job records in Redis, kept outside the broker (docs/design/README.md: lifecycle of a
job); the changes of a sub-job's state are the attempt protocol's
(``compactor.worker.runtime.attempts``).

A *meta job* is one gc-compaction request for a timeline; planning splits it into *sub-jobs*
(key ranges) that workers run. Each record is a pydantic model stored as JSON under its own key:

```
compactor:meta:{job_id}               MetaJobRecord
compactor:sub:{job_id}.{index}        SubJobRecord
compactor:meta:{job_id}:finished      set of sub-job ids that have ended
compactor:meta:{job_id}:finalize      finalize claim (SET NX), value = claim time
compactor:jobs                        sorted set of meta job ids by creation time
compactor:active                      set of meta job ids not yet ended
compactor:inflight:{tenant}/{tl}/{q}  meta job id in flight for the timeline and queue (SET NX)
compactor:breaker:{tenant}/{tl}       BreakerState of the timeline
compactor:node-lock:{node}            the node lock (compactor.worker.runtime.node_lock)
compactor:held:{job_id}.{index}       the worker process that last received the sub-job's message
compactor:held-requests               hash: meta job id -> HeldRequest, a compact_timeline message
                                      received and not yet turned into a meta job
compactor:alive:{hostname}:{pid}      a worker process's liveness (expires when it stops renewing)
```

Every change of a record is a read-modify-write under WATCH/MULTI (``JobRecords._transact``),
in Python rather than a Lua script because Lua's cjson would round LSNs (64-bit integers)
through doubles.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from compactor.storage.errors import CompactorError, InvalidInput, NotFound, one_line
from compactor.storage.ids import validate_id
from compactor.worker.engine.jobs import CommitProposal, SubJobSpec
from compactor.worker.engine.statistics import CompactionStatistics, NumSize
from compactor.worker.runtime.payloads import CompactRequest

log = logging.getLogger(__name__)

PREFIX = "compactor:"
_TRANSACTION_TRIES = 100

M = TypeVar("M", bound=BaseModel)


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def now() -> float:
    return time.time()


# ----------------------------------------------------------------------------- records


class JobState(StrEnum):
    """The state of a meta job or a sub-job, and who may move it where (docs/design/README.md);
    each sub-job transition is a function of ``compactor.worker.runtime.attempts``.

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
    below_lsn: int = 0  # statistics count the layers starting at or below this LSN (inclusive)
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
    below_lsn: int = 0  # statistics count the layers starting at or below this LSN (inclusive)
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


class HeldRequest(Record):
    """A ``compact_timeline`` message that a worker process received and has not yet turned into
    a meta job: sent again with the same job id if that process dies."""

    holder: str  # hostname:pid
    request: CompactRequest


class BreakerState(Record):
    tenant_id: str
    timeline_id: str
    consecutive_failures: int = 0
    open_until: float | None = None
    last_job_id: str | None = None
    last_error: str | None = None

    def is_open(self, at: float) -> bool:
        return self.open_until is not None and at < self.open_until


def _key_meta(job_id: str) -> str:
    return f"{PREFIX}meta:{job_id}"


def _key_sub(sub_id: str) -> str:
    return f"{PREFIX}sub:{sub_id}"


def _key_finished(job_id: str) -> str:
    return f"{PREFIX}meta:{job_id}:finished"


def _key_finalize(job_id: str) -> str:
    return f"{PREFIX}meta:{job_id}:finalize"


def _key_inflight(tenant_id: str, timeline_id: str, queue: str) -> str:
    return f"{PREFIX}inflight:{tenant_id}/{timeline_id}/{queue}"


def _key_breaker(tenant_id: str, timeline_id: str) -> str:
    return f"{PREFIX}breaker:{tenant_id}/{timeline_id}"


def _key_held(sub_id: str) -> str:
    return f"{PREFIX}held:{sub_id}"


def _key_alive(holder: str) -> str:
    return f"{PREFIX}alive:{holder}"


# A received message is held at most until the broker's visibility timeout gives it back.
_HELD_TTL_S = 24 * 3600

KEY_JOBS = f"{PREFIX}jobs"
KEY_HELD_REQUESTS = f"{PREFIX}held-requests"
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

    def hold_request(self, request: CompactRequest, holder: str) -> None:
        """A worker process received ``compact_timeline`` for ``request``, which names its job
        id: it holds the message until the meta job exists."""
        if request.job_id is None:
            raise InvalidInput("only a request with a job id can be sent again safely")
        held = HeldRequest(holder=holder, request=request)
        self.r.hset(KEY_HELD_REQUESTS, request.job_id, held.model_dump_json())

    def release_request(self, job_id: str) -> None:
        """The request of ``job_id`` needs no holder any more (its meta job exists, or it was
        rejected, or it is about to be sent again)."""
        self.r.hdel(KEY_HELD_REQUESTS, job_id)

    def held_requests(self) -> dict[str, HeldRequest]:
        """Every held request by job id. An entry that does not parse is logged and dropped: it
        could never be sent again, and kept it would be logged on every look."""
        out: dict[str, HeldRequest] = {}
        for raw_id, raw in self.r.hgetall(KEY_HELD_REQUESTS).items():
            job_id = _text(raw_id)
            try:
                out[job_id] = HeldRequest.model_validate_json(raw)
            except ValidationError as err:
                log.error("held request unreadable, dropped job=%s error=%r", job_id, one_line(err))
                self.release_request(job_id)
        return out

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

    # The in-flight marker: one per timeline and queue (``dispatch.queue_of`` its kind), so that
    # L0 compaction and image creation are auto-triggered beside a gc-compaction, never behind it.

    def set_inflight(self, tenant_id: str, timeline_id: str, queue: str, meta_id: str) -> bool:
        return bool(self.r.set(_key_inflight(tenant_id, timeline_id, queue), meta_id, nx=True))

    def get_inflight(self, tenant_id: str, timeline_id: str, queue: str) -> str | None:
        raw = self.r.get(_key_inflight(tenant_id, timeline_id, queue))
        return _text(raw) if raw is not None else None

    def clear_inflight(self, tenant_id: str, timeline_id: str, queue: str, meta_id: str) -> bool:
        return bool(self._compare_and_delete(keys=[_key_inflight(tenant_id, timeline_id, queue)], args=[meta_id]))

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
