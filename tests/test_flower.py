"""What Flower, the result backend, the worker's log and ``job show`` say about jobs, end to end:
an embedded stack with one real prefork worker node at the production heartbeat interval and
log level, and a real Flower reading its events (issue 13, points 4 and 6).

- a sub-job that fails on a corrupt layer ends its task FAILURE with the one-line reason (in
  Flower and the result backend), its message acknowledged and not run again, and its worker
  logs one line at WARNING;
- a cancelled job ends its tasks REVOKED.
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
from compactor.worker.runtime.records import (
    JobRecords,
    JobState,
    MetaJobRecord,
    SubJobRecord,
    celery_redis_url,
    connect,
    sub_job_id,
)
from tests.test_distributed import cli, import_timeline, wait_ended, wait_for
from tests.timelines import TENANT

pytestmark = [pytest.mark.integration]

# Production clocks and log level (WARNING): what an operator sees.
ENV = {"COMPACTOR_FAULTS_ENABLED": "true", "COMPACTOR_LOCK_RETRY_DELAY_S": "0.2"}


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


@pytest.fixture(scope="module")
def storage(stack: Any) -> Storage:
    return Storage(stack.settings)


@pytest.fixture(scope="module")
def records(stack: Any) -> JobRecords:
    return JobRecords(connect(stack.settings))


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
    records.set_fault("pause_in_merge", sid, {"seconds": 60, "once": True})
    send(tid, job_id, sub_compaction=False)
    wait_for("the sub-job to pause", lambda: records.r.get(f"compactor:fault-hit:pause_in_merge:{sid}"))
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
