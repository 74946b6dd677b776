"""Liveness of the worker processes (issue 12): ``compactor worker`` fails loudly when Celery gives
up, and a node takes gc work only when it can run it. Real processes on an embedded stack."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faultplugin import set_fault
from tests.test_distributed import STACK_ENV
from tests.test_up_and_demo import parents

pytestmark = pytest.mark.integration

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# `compactor worker` with a test hook in its main process: once the pool has started and just
# before Celery checks that it did (worker_ready is sent right before that check), every pool
# process is killed and reaped. This is the startup crash of issue 12, made deterministic.
KILL_POOL_AT_START = """
import os, signal, sys
from celery.signals import worker_ready

def kill_pool(sender, **_):
    for process in sender.pool._pool._pool:
        os.kill(process.pid, signal.SIGKILL)
        process.join()

worker_ready.connect(kill_pool, weak=False)
from compactor.coordinator.cli.main import main
sys.argv[0] = "compactor"
main()
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from compactor.coordinator.local.embedded import EmbeddedStack

    embedded = EmbeddedStack(
        tmp_path_factory.mktemp("liveness"), workers=2, coordinator=True, coordinator_interval_s=0.5, env=STACK_ENV
    )
    with embedded:
        yield embedded


def compactor_env(stack: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPACTOR_")}
    env.update(stack.env)
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    return env


def test_worker_exits_non_zero_when_its_pool_dies_at_start(stack: Any, tmp_path: Path) -> None:
    args = [sys.executable, "-c", KILL_POOL_AT_START, "worker", "--node-id", "doomed", "--concurrency", "1"]
    env = {**compactor_env(stack), "COMPACTOR_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    print(result.stderr[-2000:])
    assert "Could not start worker processes" in result.stderr
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: the Celery worker stopped with exit code")


def test_busy_nodes_take_no_gc_work_they_cannot_run(stack: Any) -> None:
    """Eight sub-jobs of about half a second on two nodes: each node takes a sub-job only when
    its gc slot is free, so none is bounced back ("node busy") and the wall time is about four
    sub-jobs long."""
    from compactor.storage.timeline import Storage
    from compactor.worker.runtime.records import JobRecords, JobState
    from compactor.worker.runtime.redis_client import connect
    from tests.test_distributed import import_timeline, send_compact, wait_ended

    storage = Storage(stack.settings)
    records = JobRecords(connect(stack.settings))
    tid = "9a" * 16
    import_timeline(storage, tid, bands=8)
    job_id = os.urandom(16).hex()
    set_fault(records.r, "pause_before_commit", job_id, {"seconds": 0.5})
    logs_before = {node: proc.log_path.stat().st_size for node, proc in stack.workers.items()}
    started = time.monotonic()
    # The smallest size: one sub-job per band, eight sub-jobs.
    send_compact(stack, timeline_id=tid, max_job_bytes=1, job_id=job_id)
    meta = wait_ended(records, job_id, timeout_s=120)
    wall = time.monotonic() - started
    assert meta.state == JobState.SUCCEEDED, meta.error
    subs = records.get_subs(meta.sub_jobs)
    runs = [(a.started_at, a.ended_at, a.node) for s in subs for a in s.attempts]
    busy = sum(end - start for start, end, _ in runs if end is not None)
    logs = {node: proc.log_path.read_bytes()[logs_before[node] :] for node, proc in stack.workers.items()}
    bounces = {node: log.count(b"node busy") for node, log in logs.items()}
    print(
        f"\n{len(subs)} sub-jobs on {len(stack.workers)} nodes: wall {wall:.2f}s from submit to end, "
        f"sub-jobs busy {busy:.2f}s, per node {sorted({n for _, _, n in runs})}, node-busy bounces {bounces}"
    )
    assert len(subs) >= 8
    assert all(s.state == JobState.SUCCEEDED and s.attempt == 1 and len(s.attempts) == 1 for s in subs)
    assert len({node for _, _, node in runs}) == 2, "both nodes ran sub-jobs"
    assert sum(bounces.values()) == 0, f"sub-jobs taken only to be bounced back: {bounces}"


def start_node(stack: Any, node: str, tmp_path: Path) -> subprocess.Popen[bytes]:
    """``compactor worker`` for ``node`` logging to ``tmp_path/node.log``, once both its Celery
    workers answer a ping."""
    from compactor.worker.runtime.app import app

    env = {**compactor_env(stack), "COMPACTOR_CACHE_DIR": str(tmp_path / node)}
    with open(tmp_path / f"{node}.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "compactor.coordinator.cli.main", "worker", "--node-id", node, "--concurrency", "1"],
            env=env,
            stderr=log,
        )
    pending = set(stack.hostnames(node))
    deadline = time.monotonic() + 90
    while pending:
        assert proc.poll() is None, (tmp_path / f"{node}.log").read_text()
        assert time.monotonic() < deadline, f"not ready: {pending}"
        for reply in app.control.ping(destination=sorted(pending), timeout=0.5) or []:
            pending -= set(reply)
    return proc


def light_worker_of(proc: subprocess.Popen[bytes]) -> int:
    children = [pid for pid, parent in parents().items() if parent == proc.pid]
    [light] = [pid for pid in children if b"light" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    return light


def test_a_node_stops_cleanly_with_both_workers_and_fails_when_its_light_worker_dies(
    stack: Any, tmp_path: Path
) -> None:
    calm = start_node(stack, "calm", tmp_path)
    light = light_worker_of(calm)
    calm.send_signal(signal.SIGTERM)
    assert calm.wait(timeout=60) == 0, (tmp_path / "calm.log").read_text()
    assert not Path(f"/proc/{light}").exists(), "the light worker outlived its node"

    broken = start_node(stack, "broken", tmp_path)
    os.kill(light_worker_of(broken), signal.SIGKILL)
    assert broken.wait(timeout=60) != 0
    last = (tmp_path / "broken.log").read_text().strip().splitlines()[-1]
    assert last.startswith("error: the light-queue worker exited with code -9"), last
