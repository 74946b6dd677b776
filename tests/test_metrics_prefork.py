"""The metrics a real prefork worker exports after a job that retried S3, had its commit
invalidated by a concurrent commit and lost a manifest race: every family the Grafana dashboard
plots must have moved (issue 13).

The stack: the embedded Redis and moto server behind the fault proxy (``tests.faultproxy``), one
``compactor worker`` (its gc worker with a prefork pool, and the light worker beside it, both
counting into the node's one exporter), and a coordinator for the
job-record gauge; each exports ``/metrics`` on a port of its own. The test process commits to the
timeline straight to moto, never through the proxy.
"""

from __future__ import annotations

import json
import random
import re
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from compactor.storage.timeline import Storage
from compactor.worker.runtime.records import JobRecords, JobState
from compactor.worker.runtime.redis_client import connect
from tests.faultkit import FaultStack, FaultSummary, new_timeline, submit, wait_for
from tests.faultproxy import FaultProxy, Rule
from tests.test_distributed import STACK_ENV
from tests.timelines import TENANT

pytestmark = [pytest.mark.integration]

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana-dashboard.json"
# Long enough for this test to commit (straight to moto) while the worker waits for a layer.
HOLD_S = 4.0


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive free ports, below the kernel's ephemeral range so that
    the servers the stack starts on port 0 (moto, the proxy) cannot take one meanwhile."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rnd = random.Random()
    while True:
        base = rnd.randrange(10_000, low - count)
        try:
            for port in range(base, base + count):
                with socket.socket() as sock:
                    sock.bind(("0.0.0.0", port))
        except OSError:
            continue
        return base


def scrape(port: int) -> dict[str, float]:
    """Every series name with its values summed over all label sets."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def dashboard_series() -> set[str]:
    """The compactor series every panel of the dashboard queries."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    exprs = [target["expr"] for panel in panels for target in panel.get("targets", [])]
    return {name for expr in exprs for name in re.findall(r"\bcompactor_[a-z0-9_]+", expr)}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FaultStack, int, int]]:
    from compactor.coordinator.local.embedded import EmbeddedStack

    directory = tmp_path_factory.mktemp("metrics-prefork")
    holder: dict[str, Any] = {}
    proxy = FaultProxy(lambda: holder["stack"].s3.endpoint_url, seed=13).start()
    # As the embedded stack numbers them: the coordinator on the base port, node k on base + k.
    coordinator_port = free_ports(2)
    worker_port = coordinator_port + 1
    env = {
        **STACK_ENV,
        "COMPACTOR_WORKER_PLUGINS": "",
        "COMPACTOR_S3_ENDPOINT_URL": proxy.url,
        "COMPACTOR_METRICS_PORT": str(coordinator_port),
    }
    embedded = EmbeddedStack(directory, workers=1, concurrency=2, coordinator=False, env=env)
    holder["stack"] = embedded
    try:
        embedded.start()
        # The coordinator publishes the job-record gauge; it needs a port of its own.
        embedded.coordinator = embedded._spawn(
            "coordinator",
            embedded._cli("coordinator", "--interval", "0.2", "--no-auto-trigger"),
            {"COMPACTOR_METRICS_PORT": str(coordinator_port)},
        )
        direct = Storage(
            embedded.settings.model_copy(
                update={"s3_endpoint_url": embedded.s3.endpoint_url, "cache_dir": directory / "direct-cache"}
            )
        )
        fs = FaultStack(embedded, proxy, direct, JobRecords(connect(embedded.settings)), FaultSummary())
        yield fs, worker_port, coordinator_port
    finally:
        embedded.stop()
        proxy.stop()


def test_prefork_worker_exports_every_family_the_dashboard_plots(stack: tuple[FaultStack, int, int]) -> None:
    fs, worker_port, coordinator_port = stack
    plotted = dashboard_series()
    assert {"compactor_s3_retries_total", "compactor_commit_races_lost_total"} <= plotted, plotted
    before = scrape(worker_port)

    tid, tl = new_timeline(fs, bands=4)
    layers = f"/{tid}/layers/"
    retried = fs.proxy.add(Rule("error", method="GET", path=layers, status=503, code="SlowDown", times=1))
    # S3's answer to a create-only write when another writer created that manifest first.
    raced = fs.proxy.add(
        Rule("error", method="PUT", path=f"/{tid}/manifests/", status=412, code="PreconditionFailed", times=1)
    )
    # The node lock still held by an attempt that died a moment ago: the first sub-job finds
    # the node busy and goes back to the queue until the lock expires.
    fs.records.r.set("compactor:node-lock:node-1", "a-killed-attempt", px=3000)
    job_id = submit(fs, tid, parts=2)
    wait_for("planning", lambda: (m := fs.records.get_meta(job_id)) and m.sub_jobs, timeout_s=60)
    held = fs.proxy.add(Rule("slow", method="GET", path=layers, delay_s=HOLD_S, times=1))

    wait_for("the held layer download", lambda: held.injected, timeout_s=60)
    # A lease below the horizon: the meta job's proposal no longer applies; it is planned again.
    fs.direct.set_gc(TENANT, tid, tl.cutoff, leases=[35])

    coordinator_seen: dict[str, float] = {}

    def ended() -> bool:
        for name, total in scrape(coordinator_port).items():
            coordinator_seen[name] = max(total, coordinator_seen.get(name, 0.0))
        meta = fs.records.get_meta(job_id)
        return meta is not None and meta.state.ended

    wait_for(f"job {job_id} to end", ended, timeout_s=120, interval_s=0.1)
    meta = fs.records.get_meta(job_id)
    assert meta is not None and meta.state == JobState.SUCCEEDED, meta
    assert (retried.injected, raced.injected) == (1, 1)
    worker_pid = fs.stack.workers["node-1"].pid
    pids = {attempt.pid for sub in fs.records.get_subs(meta.sub_jobs) for attempt in sub.attempts}
    assert pids and worker_pid not in pids, "the sub-jobs ran in the worker's pool processes"

    # The finalize task counts its meta job just after storing the record that says it ended.
    never_moved: list[str] = []

    def all_moved() -> dict[str, float] | None:
        after = scrape(worker_port)
        never_moved[:] = [
            name
            for name in sorted(plotted)
            if after.get(name, 0.0) - before.get(name, 0.0) + coordinator_seen.get(name, 0.0) <= 0
        ]
        return None if never_moved else after

    try:
        after = wait_for("every family the dashboard plots to move", all_moved, timeout_s=10)
    except AssertionError:
        raise AssertionError(f"plotted by the dashboard but never moved: {never_moved}") from None
    assert after["compactor_commit_conflicts_total"] - before.get("compactor_commit_conflicts_total", 0) == 1
    assert after["compactor_commit_races_lost_total"] - before.get("compactor_commit_races_lost_total", 0) == 1
    assert after["compactor_s3_retries_total"] - before.get("compactor_s3_retries_total", 0) == 1
    print(json.dumps({name: after[name] for name in sorted(after) if name.startswith("compactor_")}, indent=1))
