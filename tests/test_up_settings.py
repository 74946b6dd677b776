"""`compactor up` hands the settings it was started with to every process it starts (issue 12):
read back from each process's environment, and seen in what they do (their metrics ports)."""

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.test_up_and_demo import cli, descendants, parents, wait_env_file

pytestmark = pytest.mark.integration


def free_port_run(length: int) -> int:
    """The first of ``length`` consecutive ports that are free now."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = int(probe.getsockname()[1])
        if base + length > 65535:
            continue
        sockets = [socket.socket() for _ in range(length - 1)]
        try:
            for offset, sock in enumerate(sockets, start=1):
                sock.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def cmdline_of(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def serves_metrics(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def test_up_hands_its_settings_to_workers_and_coordinator(tmp_path: Path) -> None:
    stack_dir = tmp_path / "stack"
    base = free_port_run(3)
    given = {
        "COMPACTOR_HEARTBEAT_INTERVAL_S": "0.7",
        "COMPACTOR_MAX_ATTEMPTS": "5",
        "COMPACTOR_METRICS_PORT": str(base),
        # the stack's own Redis wins over one set in the environment
        "COMPACTOR_REDIS_URL": "redis://elsewhere.invalid:6379/0",
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPACTOR_")} | given
    proc = subprocess.Popen(cli("up", "--dir", str(stack_dir), "--workers", "2"), env=env, stderr=subprocess.PIPE)
    try:
        written = wait_env_file(proc, stack_dir)
        assert written["COMPACTOR_HEARTBEAT_INTERVAL_S"] == "0.7" and written["COMPACTOR_MAX_ATTEMPTS"] == "5"
        assert written["COMPACTOR_REDIS_URL"].startswith("unix://"), written["COMPACTOR_REDIS_URL"]

        started = {pid: cmdline_of(pid) for pid in descendants(proc.pid)}
        commands = {
            pid: args[args.index("compactor.coordinator.cli.main") + 1]
            for pid, args in started.items()
            if "compactor.coordinator.cli.main" in args
        }
        parent_of = parents()
        ports: dict[str, list[str | None]] = {}
        for pid, command in commands.items():
            environ = environ_of(pid)
            assert environ["COMPACTOR_HEARTBEAT_INTERVAL_S"] == "0.7", (command, pid)
            assert environ["COMPACTOR_MAX_ATTEMPTS"] == "5", (command, pid)
            assert environ["COMPACTOR_REDIS_URL"] == written["COMPACTOR_REDIS_URL"], (command, pid)
            if parent_of.get(pid) == proc.pid:  # not the pool processes, which share their parent's port
                ports.setdefault(command, []).append(environ.get("COMPACTOR_METRICS_PORT"))
        print(f"\nmetrics ports of the processes `up` started: {ports}")
        assert ports["coordinator"] == [str(base)]
        assert sorted(ports["worker"]) == [str(base + 1), str(base + 2)]
        deadline = time.monotonic() + 60
        while not all(serves_metrics(base + offset) for offset in range(3)):
            assert time.monotonic() < deadline, "a process does not export metrics on its own port"
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode == 0
