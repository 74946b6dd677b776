"""The coordinator loop (``compactor coordinator``): auto-trigger and liveness, one tick at a time.

Each tick

1. **liveness** - for every meta job in flight: a running sub-job whose heartbeat is older than
   ``heartbeat_timeout_s``, or whose progress has not moved for ``no_progress_timeout_s``, is
   taken away (its attempt becomes ``preempted``, so the old worker's later reports are
   ignored) and enqueued again; the attempt cap in the record stops a job that keeps getting
   reclaimed. A waiting sub-job whose message a dead worker held (``worker.runtime.deliveries``)
   is sent again, and so is a meta job's submission whose message a dead worker held before it
   created the job. Steps lost to a crash between two writes are repeated: a waiting sub-job whose
   message never went out, an ended sub-job missing from the finished set, a finalize claimed
   but never run, a meta job never planned;
2. **auto-trigger** - for every timeline in the bucket, ``trigger.decide`` among the kinds of
   ``COMPACTOR_AUTO_TRIGGER_KINDS``: L0 compaction first, then image creation, then the seed's
   ``trigger_auto_compaction`` for gc-compaction (which yields while L0 compaction is due). One
   meta job per timeline and queue is in flight (the in-flight markers), and timelines whose
   circuit breaker is open are skipped;
3. **orphan cleanup** - every ``orphan_interval_s``, ``compactor.coordinator.jobs.orphans.collect_orphans``
   (what ``compactor gc-orphans`` runs) with ``orphan_grace_s``: uploads of killed or failed
   attempts go away without an operator.

Every action is an atomic record update or an idempotent step, so a tick can run next to
workers, next to another coordinator, or twice.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from compactor.coordinator.jobs.orphans import collect_orphans, inflight_from_records
from compactor.coordinator.jobs.trigger import decide
from compactor.storage.errors import CompactorError, one_line
from compactor.storage.settings import Settings
from compactor.storage.timeline import Storage
from compactor.worker.runtime import attempts, dispatch, metrics
from compactor.worker.runtime.dispatch import TASK_COMPACT, TASK_FINALIZE, TASK_PLAN, Publisher
from compactor.worker.runtime.payloads import CompactRequest, new_job_id
from compactor.worker.runtime.records import JobRecords, JobState, MetaJobRecord, SubJobRecord, now

log = logging.getLogger(__name__)


@dataclass
class TickReport:
    triggered: list[str] = field(default_factory=list)  # new auto meta job ids
    reclaimed: list[str] = field(default_factory=list)  # sub-job ids taken from a silent worker
    gave_up: list[str] = field(default_factory=list)  # sub-job ids failed over the attempt cap
    repaired: list[str] = field(default_factory=list)  # steps repeated after a crash
    skipped: dict[str, str] = field(default_factory=dict)  # timeline -> why not triggered
    orphans: dict[str, object] | None = None  # the orphan cleanup's summary, on ticks that ran it
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "triggered": self.triggered,
            "reclaimed": self.reclaimed,
            "gave_up": self.gave_up,
            "repaired": self.repaired,
            "skipped": self.skipped,
            "orphans": self.orphans,
            "errors": self.errors,
        }


class Scheduler:
    def __init__(
        self,
        storage: Storage,
        records: JobRecords,
        publisher: Publisher,
        settings: Settings,
        *,
        auto_trigger: bool = True,
    ) -> None:
        self.storage = storage
        self.records = records
        self.publisher = publisher
        self.settings = settings
        self.auto_trigger = auto_trigger
        # When this coordinator last repeated a step, so that a slow step is not repeated
        # every tick (repeats are harmless, only wasteful).
        self._repeated: dict[str, float] = {}
        # Monotonic time of the last orphan cleanup; None runs one on the first tick, so a
        # coordinator that restarts more often than the interval still cleans up.
        self._orphans_at: float | None = None

    def tick(self) -> TickReport:
        report = TickReport()
        self.check_liveness(report)
        if self.auto_trigger:
            self.trigger(report)
        self.maybe_collect_orphans(report)
        return report

    # ------------------------------------------------------------------ orphans

    def maybe_collect_orphans(self, report: TickReport) -> None:
        interval = self.settings.orphan_interval_s
        at = time.monotonic()
        if interval <= 0 or (self._orphans_at is not None and at - self._orphans_at < interval):
            return
        self._orphans_at = at
        try:
            # In-flight jobs are read from the records on each run: their uploads are not
            # committed yet and must outlive the cleanup however old they are.
            result = collect_orphans(
                self.storage.objects,
                self.storage.manifests,
                grace_s=self.settings.orphan_grace_s,
                inflight=inflight_from_records(self.records),
            )
        except CompactorError as err:
            report.errors.append(f"orphan cleanup: {one_line(err)}")
            log.warning("orphan cleanup failed error=%r", one_line(err))
            return
        report.orphans = result.summary()
        report.errors += [f"orphan cleanup: {e}" for e in result.errors[:5]]
        if result.orphans or result.manifests_pruned:
            log.info(
                "orphan cleanup timelines=%d deleted=%d young=%d manifests_pruned=%d",
                result.timelines, len(result.orphans), result.young, result.manifests_pruned,
            )  # fmt: skip

    # ------------------------------------------------------------------ liveness

    def _due(self, what: str, after_s: float) -> bool:
        at = now()
        if at - self._repeated.get(what, 0.0) < after_s:
            return False
        self._repeated[what] = at
        return True

    def check_liveness(self, report: TickReport) -> None:
        states: dict[str, int] = {}
        for meta_id in self.records.active_meta_ids():
            try:
                self._check_meta(meta_id, report, states)
            except CompactorError as err:
                report.errors.append(f"{meta_id}: {one_line(err)}")
                log.warning("liveness check failed job=%s error=%r", meta_id, one_line(err))
        metrics.set_jobs_in_state(states)
        self._check_held_requests(report)

    def _check_held_requests(self, report: TickReport) -> None:
        """Send again a ``compact_timeline`` message whose holder died before it created the meta
        job (it would wait for the broker's visibility timeout); forget one whose job exists."""
        records = self.records
        for job_id, held in records.held_requests().items():
            if records.get_meta(job_id) is not None:
                records.release_request(job_id)  # created; the task's own release was lost
            elif not records.is_alive(held.holder):
                log.warning("compact request lost with its worker, sent again job=%s holder=%s", job_id, held.holder)
                # Before publishing: the worker that receives the new message holds it anew.
                records.release_request(job_id)
                self.publisher.publish(TASK_COMPACT, held.request.model_dump(mode="json"))
                report.repaired.append(f"submit {job_id}")

    def _check_meta(self, meta_id: str, report: TickReport, states: dict[str, int]) -> None:
        meta = self.records.get_meta(meta_id)
        if meta is None or meta.state.ended:
            self.records.deactivate(meta_id)
            return
        settings = self.settings
        grace = settings.heartbeat_timeout_s
        at = now()
        if meta.planned_at is None:
            if at - meta.created_at > grace and self._due(f"plan:{meta_id}", grace):
                report.repaired.append(f"plan {meta_id}")
                self.publisher.publish(TASK_PLAN, {"job_id": meta_id})
            return
        subs = {sub.id: sub for sub in self.records.get_subs(meta.sub_jobs)}
        for sub in subs.values():
            states[sub.state.value] = states.get(sub.state.value, 0) + 1
        finished = self.records.finished(meta_id)
        for sub in subs.values():
            if sub.state == JobState.RUNNING:
                self._check_running(sub, report)
            elif sub.state in (JobState.QUEUED, JobState.PREEMPTED):
                self._check_waiting(meta, sub, report)
            elif sub.id not in finished and sub.ended_at is not None and at - sub.ended_at > grace:
                report.repaired.append(f"ended {sub.id}")
                dispatch.sub_job_ended(self.records, self.publisher, sub)
        if (subs and all(sub.state.ended for sub in subs.values())) or not meta.sub_jobs:
            claimed = self.records.finalize_claimed_at(meta_id)
            if claimed is None:
                if dispatch.maybe_finalize(self.records, self.publisher, meta_id):
                    report.repaired.append(f"finalize {meta_id}")
            elif at - claimed > grace and self._due(f"finalize:{meta_id}", grace):
                report.repaired.append(f"finalize {meta_id}")
                self.publisher.publish(TASK_FINALIZE, {"job_id": meta_id})

    def _check_running(self, sub: SubJobRecord, report: TickReport) -> None:
        settings = self.settings
        at = now()
        reason = None
        if sub.heartbeat_at is None or at - sub.heartbeat_at > settings.heartbeat_timeout_s:
            silent = at - (sub.heartbeat_at or sub.started_at or at)
            reason = f"no heartbeat for {silent:.1f}s"
        elif sub.progress_changed_at is not None and at - sub.progress_changed_at > settings.no_progress_timeout_s:
            reason = f"no progress for {at - sub.progress_changed_at:.0f}s"
        if reason is None or sub.owner is None:
            return
        taken = attempts.preempt(self.records, sub.id, sub.attempt, sub.owner.token, reason)
        if taken is None:
            return  # it moved on meanwhile
        log.warning(
            "sub-job reclaimed sub_job=%s attempt=%d node=%s reason=%r",
            sub.id, sub.attempt, sub.owner.node, reason,
        )  # fmt: skip
        report.reclaimed.append(sub.id)
        if taken.attempt >= settings.max_attempts:
            failed = attempts.give_up(self.records, sub.id, taken.attempt, reason)
            if failed is not None:
                report.gave_up.append(sub.id)
                dispatch.sub_job_ended(self.records, self.publisher, failed)
            return
        dispatch.enqueue_sub(self.records, self.publisher, sub)

    def _check_waiting(self, meta: MetaJobRecord, sub: SubJobRecord, report: TickReport) -> None:
        settings = self.settings
        at = now()
        if sub.enqueued_at is None:
            since = max(meta.planned_at or at, sub.created_at)
            if at - since > settings.heartbeat_timeout_s:
                report.repaired.append(f"enqueue {sub.id}")
                dispatch.enqueue_sub(self.records, self.publisher, sub)
        elif (holder := self.records.held_by(sub.id)) is not None and not self.records.is_alive(holder):
            # Its message sits in a dead worker's memory (prefetched, or waiting out a
            # countdown) until the broker's visibility timeout: send another now.
            log.warning("sub-job message lost with its worker, sent again sub_job=%s holder=%s", sub.id, holder)
            report.repaired.append(f"enqueue {sub.id}")
            dispatch.enqueue_sub(self.records, self.publisher, sub)
        elif at - sub.enqueued_at > settings.no_progress_timeout_s:
            # Waiting this long: the queue is long, or its message was lost (a worker failing
            # between taking it and claiming). A second message costs one ignored delivery.
            report.repaired.append(f"enqueue {sub.id}")
            dispatch.enqueue_sub(self.records, self.publisher, sub)

    # ------------------------------------------------------------------ auto-trigger

    def trigger(self, report: TickReport) -> None:
        try:
            timelines = list(self.storage.manifests.list_timelines())
        except CompactorError as err:
            report.errors.append(f"listing timelines: {one_line(err)}")
            log.warning("auto-trigger could not list timelines error=%r", one_line(err))
            return
        for tenant_id, timeline_id in timelines:
            name = f"{tenant_id}/{timeline_id}"
            try:
                why_not = self._trigger_one(tenant_id, timeline_id, report)
            except CompactorError as err:
                report.errors.append(f"{name}: {one_line(err)}")
                log.warning("auto-trigger failed tenant=%s timeline=%s error=%r", tenant_id, timeline_id, one_line(err))
                continue
            if why_not is not None:
                report.skipped[name] = why_not

    def _trigger_one(self, tenant_id: str, timeline_id: str, report: TickReport) -> str | None:
        at = now()
        breaker = self.records.breaker(tenant_id, timeline_id)
        if breaker.is_open(at):
            assert breaker.open_until is not None
            return f"circuit breaker open for {breaker.open_until - at:.0f}s ({breaker.consecutive_failures} failures)"
        busy = set()
        for queue in dispatch.SUB_JOB_QUEUES:
            inflight = self.records.get_inflight(tenant_id, timeline_id, queue)
            if inflight is None:
                continue
            holder = self.records.get_meta(inflight)
            if holder is None or holder.state.ended:
                # Its finalize died before clearing the marker.
                self.records.clear_inflight(tenant_id, timeline_id, queue, inflight)
            else:
                busy.add(queue)
        manifest = self.storage.manifests.latest(tenant_id, timeline_id)
        if manifest is None:
            return "no manifest"
        kinds = self.settings.auto_trigger_kinds.split(",")
        decision = decide(manifest, busy=busy, kinds=kinds)
        if not decision.trigger:
            return decision.reason
        job_id = new_job_id()
        queue = dispatch.queue_of(decision.kind)
        if not self.records.set_inflight(tenant_id, timeline_id, queue, job_id):
            return f"a meta job of the {queue} queue is already in flight"
        request = CompactRequest(tenant_id=tenant_id, timeline_id=timeline_id, job_id=job_id, kind=decision.kind)
        meta = MetaJobRecord(id=job_id, tenant_id=tenant_id, timeline_id=timeline_id, request=request, auto=True)
        if not self.records.create_meta(meta):
            self.records.clear_inflight(tenant_id, timeline_id, queue, job_id)
            return "job id clash"
        self.publisher.publish(TASK_PLAN, {"job_id": job_id})
        report.triggered.append(job_id)
        log.info(
            "auto compaction triggered kind=%s job=%s tenant=%s timeline=%s reason=%r",
            decision.kind, job_id, tenant_id, timeline_id, decision.reason,
        )  # fmt: skip
        return None

    # ------------------------------------------------------------------ loop

    def run(self, interval_s: float, stop: Any = None) -> None:
        """Tick every ``interval_s`` until ``stop`` (a threading.Event) is set."""
        while stop is None or not stop.is_set():
            started = time.monotonic()
            try:
                report = self.tick()
                if report.triggered or report.reclaimed or report.repaired or report.errors:
                    log.info(
                        "coordinator tick triggered=%d reclaimed=%d gave_up=%d repaired=%d errors=%d",
                        len(report.triggered), len(report.reclaimed), len(report.gave_up), len(report.repaired),
                        len(report.errors),
                    )  # fmt: skip
            except Exception as err:  # the loop must outlive a Redis or S3 blip
                log.warning("coordinator tick failed error=%r", one_line(err))
            remaining = interval_s - (time.monotonic() - started)
            if remaining > 0:
                if stop is not None:
                    stop.wait(remaining)
                else:
                    time.sleep(remaining)
