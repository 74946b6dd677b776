"""compactor.worker.runtime.metrics: the exporter started by ``serve()`` exposes the defined metrics over HTTP, and
the helpers move them as documented. Also the container healthcheck script against it."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from prometheus_client.parser import text_string_to_metric_families

from compactor.worker.runtime import metrics

ROOT = Path(__file__).resolve().parents[1]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def port() -> int:
    metrics.serve(0, addr="127.0.0.1")  # 0: the OS picks a free loopback port
    bound = metrics.served_port()
    assert bound is not None and bound > 0
    return bound


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_exporter_serves_every_defined_metric_after_the_helpers(port: int) -> None:
    before = scrape(port)
    metrics.observe_job("sub", "succeeded", 42.0)
    metrics.observe_job("sub", "succeeded", 7200.0)
    metrics.observe_job("meta", "failed", 3.0)
    metrics.add_bytes(read=1000, written=300)
    metrics.add_bytes(read=24)
    metrics.set_jobs_in_state({"running": 3, "queued": 5})
    metrics.observe_lock_wait(0.2, contended=True)
    metrics.observe_lock_wait(0.0, contended=False)
    commits, store = metrics.CommitMetrics(), metrics.StoreMetrics()
    commits.conflict("t", "tl", "selected layer gone")
    commits.race_lost("t", "tl", 7)
    commits.race_lost("t", "tl", 8)
    metrics.replanned()
    store.retry("put", "put")
    store.request("put", 10)
    store.request("put", 0)
    store.download(1.5, 76)
    after = scrape(port)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("compactor_jobs_total", kind="sub", state="succeeded") == 2
    assert delta("compactor_jobs_total", kind="meta", state="failed") == 1
    assert delta("compactor_job_duration_seconds_count", kind="sub") == 2
    assert delta("compactor_job_duration_seconds_sum", kind="sub") == pytest.approx(7242.0)
    assert delta("compactor_job_duration_seconds_bucket", kind="sub", le="3600.0") == 1  # 42 s, not 7200 s
    assert delta("compactor_job_duration_seconds_bucket", kind="sub", le="7200.0") == 2
    assert value(after, "compactor_jobs_in_state", state="running") == 3
    assert value(after, "compactor_jobs_in_state", state="queued") == 5
    assert delta("compactor_bytes_read_total") == 1000 + 24, "downloads are not counted twice"
    assert delta("compactor_bytes_written_total") == 300
    assert delta("compactor_lock_wait_seconds_count") == 2
    assert delta("compactor_lock_contended_total") == 1
    assert delta("compactor_commit_conflicts_total") == 1
    assert delta("compactor_commit_races_lost_total") == 2
    assert delta("compactor_replans_total") == 1
    assert delta("compactor_s3_retries_total", operation="put") == 1
    assert delta("compactor_s3_requests_total", kind="put") == 2
    assert delta("compactor_layer_download_seconds_count") == 1
    assert delta("compactor_layer_download_seconds_sum") == pytest.approx(1.5)

    exposed = {name for name, _labels in after}
    required = {
        "compactor_jobs_total",
        "compactor_jobs_in_state",
        "compactor_bytes_read_total",
        "compactor_bytes_written_total",
        "compactor_job_duration_seconds_bucket",
        "compactor_lock_wait_seconds_bucket",
        "compactor_lock_contended_total",
        "compactor_commit_conflicts_total",
        "compactor_commit_races_lost_total",
        "compactor_replans_total",
        "compactor_s3_retries_total",
        "compactor_s3_requests_total",
        "compactor_layer_download_seconds_bucket",
    }
    assert required <= exposed, sorted(required - exposed)


def test_metadata_has_help_and_types(port: int) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
    expected = {
        "compactor_jobs": "counter",
        "compactor_jobs_in_state": "gauge",
        "compactor_job_duration_seconds": "histogram",
        "compactor_lock_wait_seconds": "histogram",
        "compactor_layer_download_seconds": "histogram",
        "compactor_s3_retries": "counter",
    }
    for name, kind in expected.items():
        assert families[name].type == kind, name
        assert len(families[name].documentation) > 20, f"{name} needs a real help text"


def test_job_duration_buckets_span_one_second_to_six_hours(port: int) -> None:
    metrics.observe_job("bucketcheck", "succeeded", 0.5)
    samples = scrape(port)
    bounds = {
        float(dict(labels)["le"])
        for name, labels in samples
        if name == "compactor_job_duration_seconds_bucket" and dict(labels).get("kind") == "bucketcheck"
    }
    finite = sorted(b for b in bounds if b != float("inf"))
    assert finite[0] == 1 and finite[-1] == 6 * 3600 and float("inf") in bounds
    assert len(finite) >= 10


def test_jobs_in_state_drops_states_that_disappear(port: int) -> None:
    metrics.set_jobs_in_state({"running": 2, "retrying": 4})
    metrics.set_jobs_in_state({"running": 1})
    samples = scrape(port)
    assert value(samples, "compactor_jobs_in_state", state="running") == 1
    assert ("compactor_jobs_in_state", (("state", "retrying"),)) in samples
    assert value(samples, "compactor_jobs_in_state", state="retrying") == 0


def test_labels_stay_low_cardinality(port: int) -> None:
    metrics.observe_job("sub", "tenant 3f9a/timeline 77", 1.0)  # not a label-shaped word
    samples = scrape(port)
    states = {dict(labels).get("state") for name, labels in samples if name == "compactor_jobs_total"}
    assert "other" in states and not any(s and "/" in s for s in states)

    seen = [metrics._label("test_only_label", f"value_{i}") for i in range(metrics.MAX_LABEL_VALUES + 5)]
    assert seen[: metrics.MAX_LABEL_VALUES] == [f"value_{i}" for i in range(metrics.MAX_LABEL_VALUES)]
    assert set(seen[metrics.MAX_LABEL_VALUES :]) == {"other"}
    assert metrics._label("test_only_label", "value_0") == "value_0", "known values keep working"
    assert metrics._label("kind", "Sub") == "sub"


def test_add_bytes_rejects_negative_amounts_without_partial_updates(port: int) -> None:
    before = value(scrape(port), "compactor_bytes_read_total")
    with pytest.raises(ValueError, match="negative"):
        metrics.add_bytes(read=10, written=-1)
    assert value(scrape(port), "compactor_bytes_read_total") == before


def test_serve_is_idempotent_per_process(port: int) -> None:
    metrics.serve(0, addr="127.0.0.1")  # same request: no second server
    assert metrics.served_port() == port
    metrics.serve(None)
    assert metrics.served_port() == port
    with pytest.raises(ValueError, match="already served"):
        metrics.serve(port + 1 if port < 65535 else port - 1)
    with pytest.raises(ValueError, match="out of range"):
        metrics.serve(70000)


def test_serve_none_starts_nothing() -> None:
    code = (
        "import threading; from compactor.worker.runtime import metrics; metrics.serve(None); "
        "assert metrics.served_port() is None; assert threading.active_count() == 1"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


POOL_SCRIPT = """
import os, pathlib, tempfile, time, urllib.request
from compactor.worker.runtime import metrics

# What a crashed worker that had this pid left behind.
stale = pathlib.Path(tempfile.gettempdir()) / f"compactor-metrics-{os.getpid()}"
stale.mkdir(exist_ok=True)
(stale / "counter_1.db").write_bytes(b"stale")
directory = metrics.export_pool_processes()
assert directory == stale and not (stale / "counter_1.db").exists()
metrics.serve(0, addr="127.0.0.1")

children = []
for state, running in (("succeeded", 5), ("failed", 1)):  # one after the other: 1 is newer
    pid = os.fork()
    if pid == 0:
        metrics.observe_job("sub", state, 3.0)
        metrics.set_jobs_in_state({"running": running})
        os._exit(0)
    os.waitpid(pid, 0)
    children.append(pid)
metrics.pool_process_exited(children[1])

url = f"http://127.0.0.1:{metrics.served_port()}/metrics"
print(urllib.request.urlopen(url, timeout=5).read().decode())
metrics.stop_exporting_pool_processes()
assert not directory.exists()
"""


def test_a_worker_exports_the_sum_of_its_pool_processes() -> None:
    """Jobs run in forked pool processes while the worker's parent serves /metrics (prefork)."""
    done = subprocess.run(
        [sys.executable, "-c", POOL_SCRIPT], cwd=ROOT, check=True, timeout=60, capture_output=True, text=True
    )
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(done.stdout)
        for sample in family.samples
    }
    assert value(samples, "compactor_jobs_total", kind="sub", state="succeeded") == 1
    assert value(samples, "compactor_jobs_total", kind="sub", state="failed") == 1
    assert value(samples, "compactor_job_duration_seconds_count", kind="sub") == 2
    assert value(samples, "compactor_job_duration_seconds_sum", kind="sub") == 6
    # The newest value of a process that still runs: the second child's 1 went with it.
    assert value(samples, "compactor_jobs_in_state", state="running") == 5
    assert ("compactor_replans_total", ()) in samples, "families of the parent itself are exported too"


# ------------------------------------------------------------------------ container healthcheck


@pytest.fixture(scope="module")
def healthcheck() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("compactor_healthcheck", ROOT / "deploy" / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_healthcheck_passes_on_the_exporter_and_fails_without_it(
    healthcheck: ModuleType, port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COMPACTOR_METRICS_PORT", str(port))
    assert healthcheck.main(["compactor-healthcheck"]) == 0
    monkeypatch.setenv("COMPACTOR_METRICS_PORT", str(closed_port()))
    assert healthcheck.main(["compactor-healthcheck"]) == 1
    monkeypatch.delenv("COMPACTOR_METRICS_PORT")
    assert healthcheck.main(["compactor-healthcheck"]) == 1
    assert healthcheck.main(["compactor-healthcheck", f"http://127.0.0.1:{port}/metrics"]) == 0


def test_healthcheck_fails_on_http_errors(healthcheck: ModuleType) -> None:
    import http.server
    import threading

    class Unavailable(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(503)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Unavailable)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert healthcheck.main(["compactor-healthcheck", f"http://127.0.0.1:{server.server_port}/x"]) == 1
    finally:
        server.shutdown()
        server.server_close()
