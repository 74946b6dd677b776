"""The fault suite's worker plugin: holds or fails a job where a test asked, at the points of
``compactor.worker.runtime.plugins.POINTS``.

Workers load it through ``PLUGIN_ENV`` (``COMPACTOR_WORKER_PLUGINS``, with this checkout on
``PYTHONPATH``). A test sets a fault in Redis with ``set_fault(r, "pause_<point>", target,
{"seconds": s})`` to hold the job there, or ``"fail_<point>"`` to fail it with InjectedFault;
``target`` is a sub-job id or a meta job id (for itself and all its sub-jobs), and a fault with
``"once": true`` is taken by the first attempt that reaches it. A held job leaves a marker
(``hit_key``) naming its node, pid and attempt, so that a test knows the job is where it asked
before it kills, freezes or disturbs that node.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import redis

from compactor.storage.errors import CompactorError
from compactor.storage.settings import Settings
from compactor.worker.runtime.plugins import Attempt, Hold, Plugin
from compactor.worker.runtime.records import now
from compactor.worker.runtime.redis_client import connect

log = logging.getLogger(__name__)

_FAULT = "compactor:fault:"
_HIT = "compactor:fault-hit:"

PLUGIN_ENV = {
    "COMPACTOR_WORKER_PLUGINS": "tests.faultplugin:FaultPoints",
    "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH")])),
}


class InjectedFault(CompactorError):
    """A failure set through a fault point."""


def set_fault(r: redis.Redis, point: str, target: str, value: dict[str, Any], ttl_s: float = 600.0) -> None:
    r.set(f"{_FAULT}{point}:{target}", json.dumps(value), px=int(ttl_s * 1000))


def hit_key(point: str, target: str) -> str:
    """The marker a job held at ``point`` (``pause_<where>``) leaves; ``target`` is the job that
    was held: a sub-job id, or the meta job id for finalize."""
    return f"{_HIT}{point}:{target}"


def _take(r: redis.Redis, point: str, targets: Iterable[str]) -> dict[str, Any] | None:
    """The first fault set for one of ``targets``; a fault with ``"once": true`` is consumed."""
    for target in targets:
        key = f"{_FAULT}{point}:{target}"
        raw = r.get(key)
        if raw is None:
            continue
        value: dict[str, Any] = json.loads(raw)
        if value.get("once") and not r.delete(key):
            continue  # another attempt took it first
        return value
    return None


class FaultPoints(Plugin):
    def __init__(self, settings: Settings) -> None:
        self.r = connect(settings)

    def reached(self, point: str, attempt: Attempt, hold: Hold) -> None:
        targets = [attempt.job_id] if attempt.sub_id is None else [attempt.job_id, attempt.meta_id]
        fault = _take(self.r, f"fail_{point}", targets)
        if fault is not None:
            raise InjectedFault(str(fault.get("message", f"injected failure {point.replace('_', ' ')}")))
        fault = _take(self.r, f"pause_{point}", targets)
        if fault is None:
            return
        seconds = float(fault.get("seconds", 5.0))
        marker = {"node": attempt.node, "pid": attempt.pid, "attempt": attempt.number, "at": now()}
        self.r.set(hit_key(f"pause_{point}", attempt.job_id), json.dumps(marker), ex=600)
        log.warning("fault point: paused job=%s where=%s seconds=%s", attempt.job_id, point, seconds)
        hold(seconds)
