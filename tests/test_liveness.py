"""Liveness of the worker processes (issue 12): ``compactor worker`` fails loudly when Celery gives
up, and a node takes gc work only when it can run it. Real processes on an embedded stack."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_distributed import STACK_ENV

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
from coordinator.cli import main
sys.argv[0] = "compactor"
main()
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from coordinator.embedded import EmbeddedStack

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
