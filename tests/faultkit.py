"""What every fault scenario shares: the stack behind the fault proxy, the invariants checked
after each scenario, and the counted summary of the whole fault run.

The stack: the embedded Redis and moto server, two real ``celery worker`` processes and the
coordinator, with every service reaching S3 through :class:`tests.faultproxy.FaultProxy`. The
test process itself talks to moto directly (``direct``), so its checks never meet an injected
fault.

After every scenario :func:`check_invariants` asserts, for the scenario's timeline:

- every meta job ended in a clear state (failed ones with a one-line error);
- the manifest chain is valid: numbers contiguous from the boundary to the newest, each one
  parseable, each one a valid layer map (``check_valid_layermap``);
- every object the newest manifest references is in the bucket, and checks out (size, checksum);
- every retained read equals the reference reader's;
- after ``collect_orphans(grace_s=0, now=time.time() + 600)`` no unreferenced layer object is left.

The counts go into :data:`SUMMARY`, written to ``fault-summary.json`` in pytest's temporary
directory and printed at the end of the run (``tests/conftest.py``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from compactor.coordinator.jobs.orphans import collect_orphans, inflight_from_records
from compactor.storage import layout
from compactor.storage.keys import key_to_int
from compactor.storage.layer_map import check_valid_layermap
from compactor.storage.layer_name import LayerName
from compactor.storage.settings import Settings
from compactor.storage.timeline import Storage
from compactor.worker.runtime.dispatch import queue_of
from compactor.worker.runtime.records import JobRecords, JobState, MetaJobRecord, SubJobRecord
from compactor.worker.runtime.redis_client import connect
from tests import faultplugin
from tests.faultproxy import FaultProxy
from tests.test_distributed import STACK_ENV, banded_timeline, retained_lsns
from tests.timelines import TENANT, Timeline, reference_read

T = TypeVar("T")
log = logging.getLogger(__name__)

# Short clocks, and S3 timeouts short enough that an injected timeout costs seconds, not minutes.
FAULT_ENV = {
    **STACK_ENV,
    "COMPACTOR_HEARTBEAT_TIMEOUT_S": "2.5",
    # A message reserved by a killed worker is re-sent after this long; running sub-jobs held
    # at a fault point longer than this would be reclaimed for making no progress.
    "COMPACTOR_NO_PROGRESS_TIMEOUT_S": "6",
    "COMPACTOR_S3_CONNECT_TIMEOUT_S": "2",
    "COMPACTOR_S3_READ_TIMEOUT_S": "2",
    "COMPACTOR_S3_MAX_ATTEMPTS": "3",
    # The coordinator's periodic cleanup runs during the fault run too (tests/test_faults.py
    # checks that it deletes orphans on its own).
    "COMPACTOR_ORPHAN_INTERVAL_S": "1",
    "COMPACTOR_ORPHAN_GRACE_S": "3",
}


# ----------------------------------------------------------------------------- the summary


@dataclass
class FaultSummary:
    scenarios: int = 0
    worker_kills_survived: int = 0
    faults_injected: int = 0
    reads_verified: int = 0
    referenced_objects_lost: int = 0
    orphans_left_after_cleanup: int = 0
    jobs: dict[str, int] = field(default_factory=dict)  # meta job end states
    by_scenario: dict[str, int] = field(default_factory=dict)  # scenario kind -> count
    path: Path | None = None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("path")
        return out

    def write(self) -> None:
        if self.path is not None:
            self.path.write_text(json.dumps(self.as_dict(), indent=1, sort_keys=True) + "\n")

    def render(self) -> str:
        return (
            f"scenarios run: {self.scenarios}, worker kills survived: {self.worker_kills_survived}, "
            f"faults injected: {self.faults_injected}, reads verified: {self.reads_verified}, "
            f"referenced objects lost: {self.referenced_objects_lost}, "
            f"orphans left after cleanup: {self.orphans_left_after_cleanup}, meta jobs: {self.jobs}"
        )


SUMMARY = FaultSummary()


@pytest.fixture(scope="session")
def fault_summary(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultSummary]:
    SUMMARY.path = tmp_path_factory.getbasetemp() / "fault-summary.json"
    yield SUMMARY
    SUMMARY.write()
    print(f"\nfault summary ({SUMMARY.path}): {SUMMARY.render()}")


# ----------------------------------------------------------------------------- the stack


@dataclass
class FaultStack:
    stack: Any  # compactor.coordinator.local.embedded.EmbeddedStack
    proxy: FaultProxy
    direct: Storage  # straight to moto, never through the proxy
    records: JobRecords
    summary: FaultSummary

    @property
    def settings(self) -> Settings:
        return self.stack.settings  # type: ignore[no-any-return]

    def publisher(self) -> Any:
        from compactor.worker.runtime.app import CeleryPublisher

        return CeleryPublisher()

    def kill(self, node: str, *, restart: bool = True) -> None:
        """SIGKILL a worker's whole process group (the machine is gone), then start it again."""
        self.stack.kill_worker(node, signal.SIGKILL)
        self.summary.worker_kills_survived += 1
        if restart:
            self.stack.start_worker(node, wait=False)

    def kill_pid(self, pid: int) -> None:
        """SIGKILL one process (a pool process, as the OOM killer would); its worker lives on."""
        os.kill(pid, signal.SIGKILL)
        self.summary.worker_kills_survived += 1

    def ready(self, *, wait: bool = False) -> None:
        """Every worker process is running (killed ones restarted); with ``wait``, answering
        too. Scenarios need not wait: a worker still starting simply takes no message yet. A
        node that a kill of one of its processes is still taking down (it stops as a whole) may
        exit while we wait: it is restarted and waited for again."""
        from compactor.coordinator.local.embedded import WorkerExited

        for _ in range(3):
            for node, proc in list(self.stack.workers.items()):
                if not proc.alive():
                    self.stack.start_worker(node, wait=False)
            if not wait:
                return
            try:
                self.stack.wait_workers()
                return
            except WorkerExited as err:
                log.info("a node exited while starting, restarting it: %s", err)
        self.stack.wait_workers()


def make_fault_stack(
    directory: Path,
    summary: FaultSummary,
    *,
    prepare: Callable[[Any], None] | None = None,
    workers: int = 2,
    **stack_kwargs: Any,
) -> Iterator[FaultStack]:
    """The stack behind a fault proxy; ``prepare(stack)`` runs before it starts."""
    from compactor.coordinator.local.embedded import EmbeddedStack

    holder: dict[str, Any] = {}
    # The proxy learns the moto port once the stack has started its S3 server.
    proxy = FaultProxy(lambda: holder["stack"].s3.endpoint_url, seed=7).start()
    env = {**FAULT_ENV, "COMPACTOR_S3_ENDPOINT_URL": proxy.url, **stack_kwargs.pop("env", {})}
    stack = EmbeddedStack(
        directory, workers=workers, concurrency=2, coordinator=True, coordinator_interval_s=0.3, env=env, **stack_kwargs
    )
    holder["stack"] = stack
    if prepare is not None:
        prepare(stack)
    try:
        stack.start()
        direct_settings = stack.settings.model_copy(
            update={"s3_endpoint_url": stack.s3.endpoint_url, "cache_dir": directory / "direct-cache"}
        )
        records = JobRecords(connect(stack.settings))
        yield FaultStack(stack, proxy, Storage(direct_settings), records, summary)
    finally:
        summary.faults_injected += proxy.total_injected - _proxy_seen.pop(id(proxy), 0)
        summary.write()
        stack.stop()
        proxy.stop()


# ----------------------------------------------------------------------------- helpers


def wait_for(what: str, probe: Callable[[], T | None], timeout_s: float = 60.0, interval_s: float = 0.05) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


def new_timeline(fs: FaultStack, *, bands: int = 6, seed: int = 1) -> tuple[str, Timeline]:
    """Import a fresh banded timeline (a new random id) straight into the bucket."""
    tid = os.urandom(16).hex()
    tl = banded_timeline(tid, bands=bands, seed=seed)
    fs.direct.import_timeline(json.dumps(tl.to_json()))
    return tid, tl


def total_bytes(fs: FaultStack, tid: str) -> int:
    return sum(e.size for e in fs.direct.manifest(TENANT, tid).layers.values())


def submit(fs: FaultStack, tid: str, *, job_id: str | None = None, parts: int = 4, **fields: Any) -> str:
    """Submit a meta job through the task API (a plain Celery client, by task name), split
    into about ``parts`` sub-jobs."""
    from celery import Celery

    from compactor.worker.runtime.redis_client import celery_redis_url

    job_id = job_id or os.urandom(16).hex()
    url = celery_redis_url(fs.settings.redis_url)
    client = Celery(broker=url)
    payload = {"tenant_id": TENANT, "timeline_id": tid, "job_id": job_id, **fields}
    if "max_job_bytes" not in payload and payload.get("sub_compaction", True):
        payload["max_job_bytes"] = max(1, total_bytes(fs, tid) // parts)
    client.send_task("compactor.compact_timeline", kwargs=payload, queue="light")
    client.close()
    return job_id


def wait_planned(fs: FaultStack, job_id: str, timeout_s: float = 30.0) -> MetaJobRecord:
    def planned() -> MetaJobRecord | None:
        meta = fs.records.get_meta(job_id)
        return meta if meta is not None and meta.planned_at is not None else None

    return wait_for(f"job {job_id} to be planned", planned, timeout_s)


def wait_ended(fs: FaultStack, job_id: str, timeout_s: float = 90.0) -> MetaJobRecord:
    def ended() -> MetaJobRecord | None:
        meta = fs.records.get_meta(job_id)
        return meta if meta is not None and meta.state.ended else None

    try:
        return wait_for(f"job {job_id} to end", ended, timeout_s, interval_s=0.1)
    except AssertionError as err:
        raise AssertionError(f"{err}; {describe(fs, job_id)}") from None


def describe(fs: FaultStack, job_id: str) -> str:
    """The job's state and every sub-job's attempts, for failure messages."""
    meta = fs.records.get_meta(job_id)
    if meta is None:
        return "no meta job record"
    subs = fs.records.get_subs(meta.sub_jobs)
    parts = [f"meta {meta.state.value} planned={meta.planned_at is not None} error={meta.error!r}"]
    finished = fs.records.finished(job_id)
    for s in subs:
        attempts = [(a.node, a.outcome) for a in s.attempts]
        parts.append(
            f"sub {s.index} {s.state.value} enqueued_at={s.enqueued_at} finished={s.id in finished} "
            f"hb={s.heartbeat_at} attempts={attempts}"
        )
    parts.append(f"finalize claimed={fs.records.finalize_claimed_at(job_id)}")
    return "; ".join(parts)


def set_fault(fs: FaultStack, point: str, target: str, **value: Any) -> None:
    """Hold (``pause_*``) or fail (``fail_*``) the sub-jobs of ``target`` at a fault point of
    ``compactor.worker.runtime.plugins.POINTS`` (``tests/faultplugin.py``); counted as one
    injected fault."""
    faultplugin.set_fault(fs.records.r, point, target, value)
    fs.summary.faults_injected += 1


def wait_hit(fs: FaultStack, point: str, target: str, timeout_s: float = 30.0) -> dict[str, Any]:
    """The marker a job leaves when it reaches ``point``: ``node``, ``pid``, ``attempt`` and
    ``sub_job`` (the sub-job id, or the meta job id for the commit points, which finalize
    reaches). ``target`` is a sub-job id, or a meta job id for itself or any of its sub-jobs."""
    pattern = faultplugin.hit_key(point, target) + "*"

    def hit() -> dict[str, Any] | None:
        for key in fs.records.r.scan_iter(match=pattern):
            raw = fs.records.r.get(key)
            if raw:
                fs.records.r.delete(key)
                name = key.decode() if isinstance(key, bytes) else str(key)
                return {**json.loads(raw), "sub_job": name.rsplit(":", 1)[1]}
        return None

    return wait_for(f"{target} to reach {point}", hit, timeout_s)


def commits_by(fs: FaultStack, tid: str) -> dict[str, list[str]]:
    """Per writer (``meta job <id>`` for a meta job's one commit), the manifests it wrote (the
    attempt, for writers that name one)."""
    store = fs.direct.manifests
    newest = fs.direct.manifest(TENANT, tid)
    out: dict[str, list[str]] = {}
    for number in range(store.boundary(TENANT, tid), newest.number + 1):
        writer = store.load(TENANT, tid, number).written_by
        name, _, attempt = writer.partition(" attempt ")
        out.setdefault(name, []).append(attempt)
    return out


# ----------------------------------------------------------------------------- invariants


@dataclass
class Checked:
    manifests: int
    reads: int
    referenced: int
    orphans_deleted: int


def check_invariants(
    fs: FaultStack,
    timelines: dict[str, Timeline],
    tid: str,
    job_ids: list[str],
    *,
    kind: str,
    expect: JobState | None = JobState.SUCCEEDED,
) -> Checked:
    """Assert the invariants of the module docstring for timeline ``tid`` after a scenario, and
    count the scenario in the summary."""
    started = time.monotonic()
    summary = fs.summary
    summary.scenarios += 1
    summary.by_scenario[kind] = summary.by_scenario.get(kind, 0) + 1
    summary.faults_injected += _take_proxy_count(fs)

    # 1. every meta job in a clear end state
    for job_id in job_ids:
        meta = wait_ended(fs, job_id)
        summary.jobs[meta.state.value] = summary.jobs.get(meta.state.value, 0) + 1
        subs = fs.records.get_subs(meta.sub_jobs)
        detail = [(s.id, s.state.value, s.attempt, s.error) for s in subs]
        assert all(s.state.ended for s in subs), f"meta job ended with sub-jobs still open: {detail}"
        if meta.state == JobState.FAILED:
            assert meta.error and "\n" not in meta.error, f"failed without a one-line error: {meta.error!r}"
        for sub in subs:
            if sub.state == JobState.FAILED:
                assert sub.error and "\n" not in sub.error, f"sub-job {sub.id} failed without an error"
        if expect is not None:
            assert meta.state == expect, f"job {job_id} ended {meta.state.value}: {meta.error}; {detail}"
        took = (meta.ended_at or 0) - meta.created_at
        print(f"\n[{kind}] job {job_id[:8]} {meta.state.value} in {took:.1f}s, attempts {[s.attempt for s in subs]}")
        # Finalize ends the record first and clears the marker right after (the coordinator
        # clears it too, should finalize die in between).
        wait_for("the in-flight marker to be cleared", _marker_cleared(fs, meta), timeout_s=15)

    storage = fs.direct
    store = storage.manifests
    # 2. the manifest chain
    newest = storage.manifest(TENANT, tid)
    boundary = store.boundary(TENANT, tid)
    listed = storage.objects.list_keys(layout.manifests_prefix(TENANT, tid))
    found = sorted(n for n in (layout.manifest_number(i.key) for i in listed) if n is not None)
    valid = [n for n in found if n >= boundary]
    assert valid == list(range(boundary, newest.number + 1)), f"manifest numbers not contiguous: {valid}"
    for number in valid:
        manifest = store.load(TENANT, tid, number)  # parses and checks its number
        problem = check_valid_layermap(LayerName.parse(name) for name in manifest.layers)
        assert problem is None, f"manifest {number}: {problem}"

    # 3. nothing the newest manifest references is missing or damaged
    in_bucket = {i.key: i.size for i in storage.objects.list_keys(layout.layers_prefix(TENANT, tid))}
    missing = [e.object_key for e in newest.layers.values() if in_bucket.get(e.object_key) != e.size]
    summary.referenced_objects_lost += len(missing)
    assert not missing, f"referenced objects missing or of the wrong size: {missing}"

    # 4. every retained read exact (a fresh cache: every layer is downloaded and its checksum checked)
    reads = 0
    for lsn in retained_lsns(timelines[tid]):
        expected = reference_read(timelines, tid, lsn)
        got = {key_to_int(k): v for k, v in storage.read(newest, lsn)}
        assert got == expected, f"read of {tid} at LSN {lsn} differs from the reference"
        reads += len(expected)
    summary.reads_verified += reads

    # 5. orphans: all gone after a cleanup past every grace period
    report = collect_orphans(
        storage.objects,
        store,
        grace_s=0,
        inflight=inflight_from_records(fs.records),
        now=time.time() + 600,
    )
    # Other timelines may be damaged on purpose (bad-input tests); this one must clean up.
    assert not [e for e in report.errors if tid in e], report.errors
    left = {i.key for i in storage.objects.list_keys(layout.layers_prefix(TENANT, tid))}
    referenced = {e.object_key for e in storage.manifest(TENANT, tid).layers.values()}
    summary.orphans_left_after_cleanup += len(left - referenced)
    assert left == referenced, f"orphans left after cleanup: {sorted(left - referenced)}"
    summary.write()
    print(f"[{kind}] invariants checked in {time.monotonic() - started:.1f}s: {len(valid)} manifests, {reads} reads")
    return Checked(len(valid), reads, len(referenced), len(report.orphans))


def _marker_cleared(fs: FaultStack, meta: MetaJobRecord) -> Callable[[], bool]:
    queue = queue_of(meta.request.kind if meta.request is not None else "gc")
    return lambda: fs.records.get_inflight(meta.tenant_id, meta.timeline_id, queue) != meta.id


_proxy_seen: dict[int, int] = {}


def _take_proxy_count(fs: FaultStack) -> int:
    """Faults the proxy injected since the last call (counted once per scenario)."""
    total = fs.proxy.total_injected
    before = _proxy_seen.get(id(fs.proxy), 0)
    _proxy_seen[id(fs.proxy)] = total
    return total - before


def sub_attempt_outcomes(subs: list[SubJobRecord]) -> list[list[str | None]]:
    return [[a.outcome for a in s.attempts] for s in subs]
