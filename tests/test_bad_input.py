"""Bad input, end to end with real processes: hostile task payloads sent by task name with a
plain Celery client, damaged layer objects, a malformed manifest, an invalid layer map, wrong S3
credentials, and Redis or S3 unreachable when a command starts.

Every case must end in a clear one-line error (in the task result and job record, or as the
CLI's last stderr line ``error: ...`` with a non-zero exit), commit nothing, and leave the
workers serving: each group ends by running a valid job to success on the same workers.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from compactor.storage import layout
from compactor.storage.manifest import LayerEntry
from compactor.worker.runtime.records import JobState
from compactor.worker.runtime.redis_client import celery_redis_url
from tests.faultkit import (
    FaultStack,
    FaultSummary,
    check_invariants,
    fault_summary,  # noqa: F401 - the session fixture
    make_fault_stack,
    new_timeline,
    submit,
    wait_ended,
)
from tests.faultproxy import FaultProxy, Rule
from tests.timelines import TENANT

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def fs(tmp_path_factory: pytest.TempPathFactory, fault_summary: FaultSummary) -> Iterator[FaultStack]:  # noqa: F811
    yield from make_fault_stack(tmp_path_factory.mktemp("bad-input"), fault_summary)


@pytest.fixture(scope="module")
def client(fs: FaultStack) -> Iterator[Any]:
    """A plain Celery client, as another service would have: no import of compactor's app."""
    from celery import Celery

    url = celery_redis_url(fs.settings.redis_url)
    app = Celery(broker=url, backend=url)
    yield app
    app.close()


def call(client: Any, task: str, *, args: Any = None, kwargs: Any = None, queue: str = "light") -> Any:
    return client.send_task(task, args=args, kwargs=kwargs, queue=queue).get(timeout=60)


def cli(env: dict[str, str], *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("COMPACTOR_")}
    full.update(env)
    full["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "compactor.coordinator.cli.main", *args],
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def assert_cli_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Non-zero exit, the last stderr line a one-line ``error: ...`` naming ``needles``, and
    no traceback anywhere."""
    assert result.returncode != 0, f"exit 0: {result.stdout[:300]}"
    lines = result.stderr.strip().splitlines()
    assert lines, "no error message"
    last = lines[-1]
    assert last.startswith("error: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for needle in needles:
        assert needle in last, f"{needle!r} not in {last!r}"
    return last


def assert_one_line(error: Any, limit: int = 600) -> None:
    assert isinstance(error, str) and error, error
    assert "\n" not in error and len(error) <= limit, error[:1000]


def valid_job_succeeds(fs: FaultStack, kind: str) -> None:
    """The workers still serve: a valid job on a fresh timeline succeeds, reads exact."""
    tid, tl = new_timeline(fs, bands=2, seed=3)
    job_id = submit(fs, tid, parts=2)
    check_invariants(fs, {tid: tl}, tid, [job_id], kind=kind)
    fs.stack.wait_workers()


def bucket_keys(fs: FaultStack) -> set[str]:
    return {info.key for info in fs.direct.objects.list_keys("")}


# ----------------------------------------------------------------------------- hostile payloads

HUGE = "a" * 1_000_000
TID = "11223344556677889900aabbccddeeff"


def _hostile_compact_payloads() -> list[tuple[str, dict[str, Any]]]:
    base = {"tenant_id": TENANT, "timeline_id": TID}
    return [
        ("tenant id of the wrong type", {**base, "tenant_id": 123}),
        ("timeline id a list", {**base, "timeline_id": ["x"]}),
        ("tenant id null", {**base, "tenant_id": None}),
        ("tenant id traversal", {**base, "tenant_id": "../../x"}),
        ("timeline id traversal", {**base, "timeline_id": "../../../etc/passwd"}),
        ("encoded traversal", {**base, "timeline_id": "..%2F..%2F" + "a" * 22}),
        ("upper-case id", {**base, "tenant_id": TENANT.upper()}),
        ("job id traversal", {**base, "job_id": "../../compactor:active"}),
        ("inverted key range", {**base, "key_start": "F" * 36, "key_end": "0" * 36}),
        ("empty key range", {**base, "key_start": "0" * 36, "key_end": "0" * 36}),
        ("inverted LSN range", {**base, "lsn_start": 100, "lsn_end": 10}),
        ("LSN beyond 64 bits", {**base, "lsn_end": 2**64}),
        ("enormous LSN", {**base, "lsn_end": 10**40}),
        ("negative LSN", {**base, "lsn_start": -1}),
        ("LSN as text", {**base, "lsn_start": "0/16"}),
        ("zero job size", {**base, "max_job_bytes": 0}),
        ("negative job size", {**base, "max_job_bytes": -5}),
        ("key of 35 characters", {**base, "key_start": "0" * 35}),
        ("key not hex", {**base, "key_start": "Z" * 36}),
        ("flag of the wrong type", {**base, "dry_run": {"a": 1}}),
        ("unknown field", {**base, "rm": "-rf /"}),
        ("huge tenant id", {**base, "tenant_id": HUGE}),
        ("huge unknown field", {**base, HUGE[:1000]: HUGE}),
        ("missing timeline id", {"tenant_id": TENANT}),
        ("no fields", {}),
    ]


@pytest.mark.parametrize(
    ("name", "payload"), _hostile_compact_payloads(), ids=[n for n, _ in _hostile_compact_payloads()]
)
def test_hostile_compact_payloads_are_rejected_in_one_line(
    fs: FaultStack, client: Any, name: str, payload: dict[str, Any]
) -> None:
    before = bucket_keys(fs)
    started = time.monotonic()
    result = call(client, "compactor.compact_timeline", kwargs=payload)
    assert time.monotonic() - started < 30
    assert result["state"] in ("failed", "rejected"), result
    assert_one_line(result["error"])
    if result.get("job_id") and result["state"] == "failed":
        meta = fs.records.get_meta(result["job_id"])
        assert meta is not None and meta.state == JobState.FAILED and meta.error == result["error"]
        assert not meta.sub_jobs
    assert bucket_keys(fs) == before, "a rejected payload wrote to the bucket"


def test_positional_and_malformed_payloads_of_every_task(fs: FaultStack, client: Any) -> None:
    """Wrong shapes for every task: positional arguments, ids of the wrong type, traversal and
    huge ids, unknown jobs. Each returns a one-line error (or ``missing``) and nothing is
    written anywhere."""
    before = bucket_keys(fs)
    cases: list[tuple[str, dict[str, Any]]] = [
        ("compactor.compact_timeline", {"args": ["x", 1]}),
        ("compactor.compact_timeline", {"args": ["just a string"]}),
        ("compactor.plan_meta_job", {"kwargs": {"job_id": "../../x"}}),
        ("compactor.plan_meta_job", {"kwargs": {"job_id": 7}}),
        ("compactor.plan_meta_job", {"kwargs": {}}),
        ("compactor.plan_meta_job", {"args": [[1, 2]]}),
        ("compactor.plan_meta_job", {"kwargs": {"job_id": "0" * 32}}),  # well formed, unknown
        ("compactor.finalize_meta_job", {"kwargs": {"job_id": "../../x"}}),
        ("compactor.finalize_meta_job", {"kwargs": {"job_id": HUGE}}),
        ("compactor.finalize_meta_job", {"kwargs": {"job_id": "0" * 32}}),
        ("compactor.run_sub_job", {"kwargs": {"sub_job_id": "../../x.0"}, "queue": "gc"}),
        ("compactor.run_sub_job", {"kwargs": {"sub_job_id": "0" * 32 + ".1234567"}, "queue": "gc"}),
        ("compactor.run_sub_job", {"kwargs": {"sub_job_id": 5}, "queue": "gc"}),
        ("compactor.run_sub_job", {"kwargs": {"sub_job_id": HUGE}, "queue": "gc"}),
        ("compactor.run_sub_job", {"kwargs": {"sub_job_id": "0" * 32 + ".0", "x": 1}, "queue": "gc"}),
        ("compactor.run_sub_job", {"args": ["0" * 32 + ".0", "extra"], "queue": "gc"}),
    ]
    for task, options in cases:
        result = call(client, task, **options)
        assert isinstance(result, dict), (task, options, result)
        if result.get("state") == "missing":  # a well-formed id that names nothing
            continue
        assert result.get("state") in ("rejected", "failed"), (task, str(options)[:200], result)
        assert_one_line(result.get("error"))
    assert bucket_keys(fs) == before
    for key in fs.records.r.scan_iter(match="*"):
        text = key.decode(errors="replace")
        assert ".." not in text and "passwd" not in text and len(text) < 200, text
    valid_job_succeeds(fs, "bad input: hostile payloads, then a valid job")


def test_malformed_task_messages_do_not_stop_workers(fs: FaultStack) -> None:
    """Bodies Celery itself cannot use (keyword arguments that are a list, arguments that are
    an object, a body that is a number): each is dropped with a one-line log entry; both
    workers keep serving."""
    from kombu import Connection

    bodies = [
        [[], ["not", "a", "dict"], {}],
        [{"a": 1}, {}, {}],
        12345,
        [None, None, None],
    ]
    with Connection(celery_redis_url(fs.settings.redis_url)) as conn:
        producer = conn.Producer()
        for body in bodies:
            task_id = os.urandom(16).hex()
            headers = {"task": "compactor.compact_timeline", "id": task_id, "root_id": task_id, "lang": "py"}
            producer.publish(
                json.dumps(body).encode(), exchange="light", routing_key="light", content_type="application/json",
                content_encoding="utf-8", headers=headers,
            )  # fmt: skip
    time.sleep(2.0)
    text = "".join(w.log_path.read_text(errors="replace") for w in fs.stack.workers.values())
    assert text.count("message rejected") + text.count("payload rejected") >= len(bodies) - 1, text[-3000:]
    valid_job_succeeds(fs, "bad input: malformed messages, then a valid job")


# ----------------------------------------------------------------------------- damaged layers


@pytest.mark.parametrize("damage", ["garbage of the same size", "truncated", "missing", "another layer's bytes"])
def test_damaged_layer_object_fails_the_job_clearly_and_commits_nothing(fs: FaultStack, damage: str) -> None:
    tid, _ = new_timeline(fs, bands=3, seed=4)
    manifest = fs.direct.manifest(TENANT, tid)
    entries = sorted(manifest.layers.values(), key=lambda e: e.name)
    victim = entries[len(entries) // 2]
    objects = fs.direct.objects
    data = objects.get_bytes(victim.object_key)
    if damage == "garbage of the same size":
        objects.put_bytes(victim.object_key, bytes(b ^ 0x5A for b in data))
    elif damage == "truncated":
        objects.put_bytes(victim.object_key, data[: len(data) // 2])
    elif damage == "missing":
        objects.delete(victim.object_key)
    else:
        other = next(e for e in entries if e.object_key != victim.object_key)
        objects.put_bytes(victim.object_key, objects.get_bytes(other.object_key))
    fs.summary.faults_injected += 1
    job_id = submit(fs, tid, sub_compaction=False)
    meta = wait_ended(fs, job_id)
    assert meta.state == JobState.FAILED, meta
    assert_one_line(meta.error)
    assert victim.name in (meta.error or ""), meta.error
    expected = "missing layer" if damage == "missing" else "corrupt layer"
    assert expected in (meta.error or ""), meta.error
    sub = fs.records.get_sub(meta.sub_jobs[0])
    assert sub is not None and sub.attempt == 1, "a damaged layer is not worth another attempt"
    after = fs.direct.manifest(TENANT, tid)
    assert after.number == manifest.number and after.layers == manifest.layers, "something was committed"
    left = {i.key for i in objects.list_keys(layout.layers_prefix(TENANT, tid))}
    assert left <= {e.object_key for e in manifest.layers.values()}, "the failed job left uploads behind"

    # The CLI's read of the damaged timeline is a one-line error naming the layer.
    read = cli(fs.stack.env, "timeline", "read", TENANT, tid, "--lsn", "60")
    assert_cli_error(read, victim.name)
    fs.summary.jobs[meta.state.value] = fs.summary.jobs.get(meta.state.value, 0) + 1
    valid_job_succeeds(fs, f"bad input: {damage} layer, then a valid job")


# ----------------------------------------------------------------------------- malformed manifest


MALFORMED = {
    "binary": b"\x00\xffnot json at all",
    "wrong schema": b'{"format": 1, "tenant_id": "x"}',
    "truncated json": b'{"tenant_id": "' + b"a" * 100,
    "a list": b"[]",
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_malformed_newest_manifest(fs: FaultStack, kind: str) -> None:
    """The newest manifest's object overwritten with garbage: every command and the job fail
    with one line naming the object, nothing is written after it, and orphan cleanup reports
    the timeline but still cleans the others."""
    tid, _ = new_timeline(fs, bands=2, seed=5)
    newest = fs.direct.manifest(TENANT, tid)
    key = layout.manifest_key(TENANT, tid, newest.number)
    fs.direct.objects.put_bytes(key, MALFORMED[kind])
    fs.summary.faults_injected += 1
    env = fs.stack.env
    commands = [["timeline", "read", TENANT, tid, "--lsn", "60"]]
    if kind == "binary":  # every command once; one is enough for the other kinds
        commands += [
            ["timeline", "layers", TENANT, tid, "--json"],
            ["timeline", "export", TENANT, tid],
            ["timeline", "set-gc", TENANT, tid, "--cutoff", "70"],
            ["compact", TENANT, tid],
        ]
    for args in commands:
        started = time.monotonic()
        last = assert_cli_error(cli(env, *args), key)
        took = time.monotonic() - started
        print(f"\n[malformed manifest] compactor {' '.join(args[:2])}: {last[:160]} ({took:.1f}s)")
    job_id = submit(fs, tid, sub_compaction=False)
    meta = wait_ended(fs, job_id)
    assert meta.state == JobState.FAILED and key in (meta.error or ""), meta.error
    assert_one_line(meta.error)
    # Nothing was written after the damaged manifest.
    numbers = [layout.manifest_number(i.key) for i in fs.direct.objects.list_keys(layout.manifests_prefix(TENANT, tid))]
    assert max(n for n in numbers if n is not None) == newest.number
    if kind == "binary":
        # Orphan cleanup reports the damaged timeline and still cleans the others.
        other, _ = new_timeline(fs, bands=1, seed=6)
        stray = layout.layers_prefix(TENANT, other) + "stray"
        fs.direct.objects.put_bytes(stray, b"x")
        assert_cli_error(cli(env, "gc-orphans", "--grace", "0"), key)
        assert fs.direct.objects.head(stray) is None, "one damaged timeline stopped the cleanup of the others"
    fs.direct.objects.put_bytes(key, newest.model_dump_json().encode())  # repaired, for later cleanups
    valid_job_succeeds(fs, "bad input: malformed manifest, then a valid job")


# ----------------------------------------------------------------------------- invalid layer map


def test_overlapping_layers_fail_planning_clearly(fs: FaultStack) -> None:
    """A manifest whose deltas overlap in keys and LSNs (the seed's layer-map rule broken):
    the job fails at planning with a one-line error and commits nothing."""
    from compactor.storage.keys import key_from_int
    from compactor.storage.layer_name import LayerName

    tid, _ = new_timeline(fs, bands=3, seed=7)
    current = fs.direct.manifest(TENANT, tid)
    template = next(e for e in current.layers.values() if e.layer.is_delta)
    overlapping = LayerName.delta(key_from_int(0), key_from_int(12), 20, 40)  # crosses bands and LSN bands
    object_key = layout.new_layer_key(TENANT, tid)
    fs.direct.objects.put_bytes(object_key, fs.direct.objects.get_bytes(template.object_key))
    entry = LayerEntry(**{**template.model_dump(), "name": str(overlapping), "object_key": object_key})
    layers = {**current.layers, str(overlapping): entry}
    bad = current.successor(layers=layers, written_by="test: invalid layer map")
    fs.direct.manifests.create(bad)
    fs.summary.faults_injected += 1
    job_id = submit(fs, tid, parts=3)
    meta = wait_ended(fs, job_id)
    print(f"\n[invalid layer map] {meta.error} sub-jobs: {[s.state.value for s in fs.records.get_subs(meta.sub_jobs)]}")
    assert meta.state == JobState.FAILED, meta
    assert_one_line(meta.error)
    assert "layer map" in (meta.error or "") and str(overlapping) in (meta.error or ""), meta.error
    assert fs.direct.manifest(TENANT, tid).number == bad.number, "something was committed on an invalid layer map"
    valid_job_succeeds(fs, "bad input: invalid layer map, then a valid job")


# ----------------------------------------------------------------------------- credentials


def test_wrong_s3_credentials(fs: FaultStack) -> None:
    """moto accepts any credentials, so S3's answer to a wrong key is emulated by the proxy:
    403 InvalidAccessKeyId. It is not transient: no retry storm, a one-line error naming it."""
    message = "The AWS Access Key Id you provided does not exist in our records."
    with FaultProxy(fs.stack.s3.endpoint_url) as denying:
        denying.add(Rule("error", status=403, code="InvalidAccessKeyId", message=message))
        env = {**fs.stack.env, "COMPACTOR_S3_ENDPOINT_URL": denying.url, "COMPACTOR_S3_ACCESS_KEY_ID": "AKIAWRONG"}
        tid, _ = new_timeline(fs, bands=2, seed=8)
        for args in (["timeline", "read", TENANT, tid, "--lsn", "60"], ["compact", TENANT, tid]):
            started = time.monotonic()
            last = assert_cli_error(cli(env, *args), "InvalidAccessKeyId")
            assert time.monotonic() - started < 20, "a 403 was retried"
            assert "AKIAWRONG" not in last
        assert sum(denying.requests.values()) <= 4, denying.requests

    # The same answer to the workers, for this timeline only.
    rule = fs.proxy.add(Rule("error", path=tid, status=403, code="InvalidAccessKeyId", message=message))
    try:
        job_id = submit(fs, tid, sub_compaction=False)
        meta = wait_ended(fs, job_id)
    finally:
        rule.times = rule.injected
    assert meta.state == JobState.FAILED and "InvalidAccessKeyId" in (meta.error or ""), meta.error
    assert_one_line(meta.error)
    valid_job_succeeds(fs, "bad input: wrong credentials, then a valid job")


# ----------------------------------------------------------------------------- services unreachable


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("service", ["redis", "s3"])
def test_service_unreachable_at_start(fs: FaultStack, service: str, tmp_path: Path) -> None:
    """Each command that needs the unreachable service fails quickly with one ``error:`` line;
    commands that do not need it are unaffected."""
    tid, _ = new_timeline(fs, bands=1, seed=9)
    env = dict(fs.stack.env)
    if service == "redis":
        env["COMPACTOR_REDIS_URL"] = f"redis://127.0.0.1:{_closed_port()}/0"
    else:
        env["COMPACTOR_S3_ENDPOINT_URL"] = f"http://127.0.0.1:{_closed_port()}"
    env["COMPACTOR_CACHE_DIR"] = str(tmp_path / "cache")
    commands = {
        "jobs": (["jobs", "--json"], service == "redis"),
        "compact": (["compact", TENANT, tid], True),
        "worker": (["worker", "--node-id", "unreachable-test"], True),
        "timeline read": (["timeline", "read", TENANT, tid, "--lsn", "60"], service == "s3"),
    }
    for name, (args, needs) in commands.items():
        started = time.monotonic()
        result = cli(env, *args, timeout_s=60)
        took = time.monotonic() - started
        if needs:
            last = assert_cli_error(result)
            assert ("Redis" in last) if service == "redis" else ("s3" in last), (name, last)
            assert took < 20, f"{name} took {took:.1f}s to fail"
            print(f"\n[{service} unreachable] compactor {name}: {last} ({took:.1f}s)")
        else:
            assert result.returncode == 0, (name, result.stderr[-500:])
