"""What Flower, the result backend, the worker's log and ``job show`` say about jobs, end to end:
an embedded stack with one real prefork worker node at the production heartbeat interval and
log level, and a real Flower reading its events (issue 13, points 4 to 7).

- a sub-job that fails on a corrupt layer ends its task FAILURE with the one-line reason (in
  Flower and the result backend), its message acknowledged and not run again, and its worker
  logs one line at WARNING;
- a cancelled job ends its tasks REVOKED;
- a running sub-job's progress reaches its record within about a second (`job show`, `jobs`),
  and Flower shows the numbers while it runs.
"""

from __future__ import annotations

import ast
import json
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from compactor.storage.timeline import Storage
from compactor.worker.runtime.payloads import sub_job_id
from compactor.worker.runtime.records import JobRecords, JobState, MetaJobRecord, SubJobRecord
from compactor.worker.runtime.redis_client import celery_redis_url
from tests import test_distributed
from tests.faultplugin import PLUGIN_ENV, hit_key, set_fault
from tests.test_distributed import cli, import_timeline, wait_ended, wait_for
from tests.timelines import TENANT, Layer, Timeline, Value, record

pytestmark = [pytest.mark.integration]

# Production clocks and log level (WARNING): what an operator sees.
ENV = {**PLUGIN_ENV, "COMPACTOR_LOCK_RETRY_DELAY_S": "0.2"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Flower:
    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=5) as answer:
            return json.load(answer)

    def tasks(self, name: str) -> dict[str, dict[str, Any]]:
        return dict(self.get(f"/api/tasks?taskname={name}"))

    def task_of(self, name: str, **kwargs: str) -> tuple[str, dict[str, Any]] | None:
        """The newest task ``name`` called with ``kwargs`` (Flower keeps them as a repr)."""
        found = [
            (task_id, task)
            for task_id, task in self.tasks(name).items()
            if task.get("kwargs") and ast.literal_eval(task["kwargs"]) == kwargs
        ]
        return max(found, key=lambda item: item[1].get("received") or 0, default=None)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from compactor.coordinator.local.embedded import EmbeddedStack

    embedded = EmbeddedStack(
        tmp_path_factory.mktemp("stack"), workers=1, concurrency=2, coordinator_interval_s=0.5, env=ENV
    )
    embedded.start()
    try:
        yield embedded
    finally:
        embedded.stop()


@pytest.fixture(scope="module")
def flower(stack: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flower]:
    from celery import Celery

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPACTOR_")} | stack.env
    env["FLOWER_UNAUTHENTICATED_API"] = "true"
    log = (tmp_path_factory.mktemp("flower") / "flower.log").open("wb")
    args = ["-m", "celery", "-A", "compactor.worker.runtime.app", "flower", f"--port={port}", "--address=127.0.0.1"]
    proc = subprocess.Popen([sys.executable, *args], env=env, stdout=log, stderr=subprocess.STDOUT)
    flower = Flower(port)
    url = celery_redis_url(stack.settings.redis_url)
    client = Celery(broker=url)

    def sees_events() -> bool:
        # A rejected payload is a quick task: once Flower lists one, it receives the events.
        client.send_task("compactor.compact_timeline", args=["probe"], queue="light")
        try:
            return any(t["state"] == "SUCCESS" for t in flower.tasks("compactor.compact_timeline").values())
        except OSError:
            return False

    try:
        wait_for("Flower to receive task events", sees_events, timeout_s=60, interval_s=1.0)
        yield flower
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=15)
        log.close()


# Over this module's stack.
storage, records = test_distributed.storage, test_distributed.records


def send(tid: str, job_id: str, **payload: Any) -> None:
    from compactor.worker.runtime.app import CeleryPublisher

    payload |= {"tenant_id": TENANT, "timeline_id": tid, "job_id": job_id}
    CeleryPublisher().publish("compactor.compact_timeline", payload)


def backend_state(task_id: str) -> str:
    from celery.result import AsyncResult

    from compactor.worker.runtime.app import app

    return str(AsyncResult(task_id, app=app).state)


def unacked(records: JobRecords, task_id: str) -> bool:
    """Whether the broker still holds ``task_id``'s message as delivered but not acknowledged."""
    return any(task_id.encode() in raw for raw in records.r.hvals("unacked"))


@pytest.fixture(scope="module")
def failed_job(stack: Any, storage: Storage, records: JobRecords) -> tuple[MetaJobRecord, SubJobRecord]:
    """A meta job whose one sub-job failed on a corrupt layer, and that sub-job."""
    tid = "a7" * 16
    import_timeline(storage, tid, bands=2)
    entries = sorted(storage.manifest(TENANT, tid).layers.values(), key=lambda e: e.name)
    entry = entries[len(entries) // 2]
    data = storage.objects.get_bytes(entry.object_key)
    storage.objects.put_bytes(entry.object_key, bytes(b ^ 0x5A for b in data))
    job_id = os.urandom(16).hex()
    send(tid, job_id, sub_compaction=False)
    meta = wait_ended(records, job_id)
    assert meta.state == JobState.FAILED and "corrupt layer" in (meta.error or ""), meta
    sub = records.get_sub(sub_job_id(job_id, 0))
    assert sub is not None and sub.state == JobState.FAILED and sub.error is not None
    return meta, sub


def test_failed_sub_job_and_meta_job_end_their_tasks_failure_and_are_not_run_again(
    flower: Flower, records: JobRecords, failed_job: tuple[MetaJobRecord, SubJobRecord]
) -> None:
    meta, sub = failed_job

    def failed_in_flower() -> tuple[str, dict[str, Any]] | None:
        found = flower.task_of("compactor.run_sub_job", sub_job_id=sub.id)
        return found if found is not None and found[1]["state"] == "FAILURE" else None

    task_id, task = wait_for("Flower to show the sub-job's task FAILURE", failed_in_flower, timeout_s=30)
    print(f"\nFlower /api/tasks entry of the failed sub-job:\n{json.dumps({task_id: task}, indent=2)}")
    assert task["exception"] == f"JobEnded({sub.error!r})"
    assert backend_state(task_id) == "FAILURE"
    finalize = wait_for(
        "Flower to show finalize FAILURE",
        lambda: (
            (f := flower.task_of("compactor.finalize_meta_job", job_id=meta.id)) and f[1]["state"] == "FAILURE" and f
        ),
        timeout_s=30,
    )
    assert finalize[1]["exception"] == f"JobEnded({meta.error!r})"

    # Acknowledged like a success: Celery does not deliver it again, the record decides.
    wait_for("the failed task's message to be acknowledged", lambda: not unacked(records, task_id), timeout_s=10)
    assert records.get_sub(sub.id).attempt == 1  # type: ignore[union-attr]


def test_failed_sub_job_logs_one_warning_line_on_its_worker(
    stack: Any, failed_job: tuple[MetaJobRecord, SubJobRecord]
) -> None:
    _, sub = failed_job
    assert sub.owner is None and sub.attempts
    log_text = stack.workers[sub.attempts[-1].node].log_path.read_text(errors="replace")
    lines = [line for line in log_text.splitlines() if f"sub_job={sub.id}" in line]
    assert len(lines) == 1 and "level=warning" in lines[0] and "corrupt layer" in lines[0], lines
    assert "Traceback" not in log_text


def test_cancelled_job_ends_its_tasks_revoked(
    stack: Any, flower: Flower, storage: Storage, records: JobRecords
) -> None:
    tid = "a8" * 16
    import_timeline(storage, tid, bands=2)
    job_id = os.urandom(16).hex()
    sid = sub_job_id(job_id, 0)
    set_fault(records.r, "pause_in_merge", sid, {"seconds": 60, "once": True})
    send(tid, job_id, sub_compaction=False)
    wait_for("the sub-job to pause", lambda: records.r.get(hit_key("pause_in_merge", sid)))
    result = cli(stack, "job", "cancel", job_id)
    assert result.returncode == 0, result.stderr
    # A running sub-job notices the cancel at its next heartbeat (10 s by default).
    meta = wait_ended(records, job_id, timeout_s=40)
    assert meta.state == JobState.CANCELLED
    for name, kwargs in (
        ("compactor.run_sub_job", {"sub_job_id": sid}),
        ("compactor.finalize_meta_job", {"job_id": job_id}),
    ):
        task_id, _ = wait_for(
            f"Flower to show {name} REVOKED",
            lambda name=name, kwargs=kwargs: (t := flower.task_of(name, **kwargs)) and t[1]["state"] == "REVOKED" and t,
            timeout_s=30,
        )
        assert backend_state(task_id) == "REVOKED"
        wait_for(
            "the revoked task's message to be acknowledged", lambda t=task_id: not unacked(records, t), timeout_s=10
        )


def one_chain_timeline(timeline_id: str, bands: int = 3, keys_per_band: int = 16) -> Timeline:
    """Delta layers of one LSN range side by side: one chain, read one layer after the other, so
    a pause in the merge of each layer holds the sub-job between layers."""
    layers = []
    for band in range(bands):
        k0, k1 = band * keys_per_band, (band + 1) * keys_per_band
        delta = Layer("delta", (k0, k1), (11, 50))
        for k in range(k0, k1):
            delta.values[k] = [
                Value(12, record=record(f"N{k};".encode(), clear=True, will_init=True)),
                *(Value(lsn, record=record(f"+{k}@{lsn};".encode())) for lsn in (20, 30, 40)),
            ]
        layers.append(delta)
    return Timeline(timeline_id, layers, cutoff=60, retain_lsns=[25])


def paused_between_layers(storage: Storage, records: JobRecords, tid: str) -> str:
    """Start a one-sub-job meta job over a one-chain timeline that pauses 2.5 s in each layer;
    its sub-job's id once the first pause began."""
    storage.import_timeline(json.dumps(one_chain_timeline(tid).to_json()))
    job_id = os.urandom(16).hex()
    sid = sub_job_id(job_id, 0)
    set_fault(records.r, "pause_in_merge", sid, {"seconds": 2.5})
    send(tid, job_id, sub_compaction=False)
    wait_for("the sub-job to pause", lambda: records.r.get(hit_key("pause_in_merge", sid)))
    return sid


def finish(records: JobRecords, sid: str) -> None:
    records.r.delete(f"compactor:fault:pause_in_merge:{sid}")
    meta = wait_ended(records, sid.split(".")[0])
    assert meta.state == JobState.SUCCEEDED, meta.error


def test_progress_reaches_the_record_within_a_second_and_job_show(
    stack: Any, storage: Storage, records: JobRecords
) -> None:
    sid = paused_between_layers(storage, records, "a9" * 16)
    # The heartbeat writes every 10 s; progress must not wait for it.
    sub = wait_for(
        "the sub-job's record to show keys",
        lambda: (s := records.get_sub(sid)) and s.state == JobState.RUNNING and s.progress.keys > 0 and s,
        timeout_s=2.0,
        interval_s=0.05,
    )
    # "paused" is the fault point's own mark, taken over from the numbers it found.
    assert sub.progress.phase in ("compacting", "paused") and sub.progress.bytes_in > 0, sub.progress
    show = json.loads(cli(stack, "job", "show", sub.meta_id).stdout)
    assert show["state"] == "running" and show["progress"]["keys"] >= sub.progress.keys, show["progress"]
    listing = {j["job_id"]: j for j in json.loads(cli(stack, "jobs", "--json").stdout)["jobs"]}
    assert listing[sub.meta_id]["keys"] >= sub.progress.keys
    finish(records, sid)


def test_flower_shows_progress_while_a_sub_job_runs(flower: Flower, storage: Storage, records: JobRecords) -> None:
    sid = paused_between_layers(storage, records, "aa" * 16)

    def progress_in_flower() -> dict[str, Any] | None:
        found = flower.task_of("compactor.run_sub_job", sub_job_id=sid)
        if found is None or found[1]["state"] != "STARTED" or not found[1]["result"]:
            return None
        shown = ast.literal_eval(found[1]["result"])
        return shown if shown["keys"] > 0 else None

    shown = wait_for("Flower to show the sub-job's progress", progress_in_flower, timeout_s=10)
    assert shown["phase"] == "compacting" and shown["bytes_in"] > 0 and shown["sub_job_id"] == sid, shown
    finish(records, sid)
    done = wait_for(
        "Flower to show SUCCESS",
        lambda: (t := flower.task_of("compactor.run_sub_job", sub_job_id=sid)) and t[1]["state"] == "SUCCESS" and t,
        timeout_s=30,
    )
    assert "'state': 'succeeded'" in done[1]["result"]
