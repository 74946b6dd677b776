"""The node lock: at most one gc-compaction runs on a node at a time (the seed's
``CONCURRENT_GC_COMPACTION_TASKS`` semaphore of one, across the worker processes of a node), and
beside it ``COMPACTOR_L0_SLOTS`` slots for L0 compaction and image creation (the seed keeps a
separate semaphore for L0, so that L0 work never waits behind gc-compaction): ``take_slot``.

A redis-py ``Lock`` named after the node id, with a TTL renewed by a heartbeat thread. Its
token is shared between threads (``thread_local=False``): the thread that takes it is not the
thread that renews it. A lock can expire while its holder still runs (a long GC pause, a
partitioned node), so the holder checks ownership before committing; safety never depends on
the lock, only the optimistic manifest commit guarantees it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import redis
from redis.exceptions import LockError

from compactor.storage.errors import one_line
from compactor.worker.engine.jobs import JobKind

log = logging.getLogger(__name__)

LOCK_PREFIX = "compactor:node-lock:"


class NodeLock:
    def __init__(self, client: redis.Redis, node_id: str, ttl_s: float) -> None:
        self.node_id = node_id
        self.ttl_s = ttl_s
        self.name = LOCK_PREFIX + node_id
        self._lock = client.lock(self.name, timeout=ttl_s, thread_local=False)

    def acquire(self) -> bool:
        """Take the lock if it is free; never waits (a busy node sends the job elsewhere)."""
        return bool(self._lock.acquire(blocking=False))

    def renew(self) -> bool:
        """Reset the TTL; False if the lock is no longer ours (expired, or taken by another)."""
        try:
            self._lock.reacquire()
        except LockError:
            return False
        return True

    def owned(self) -> bool:
        """Whether Redis still holds our token (one round trip)."""
        return bool(self._lock.owned())

    def release(self) -> None:
        try:
            self._lock.release()
        except LockError:
            log.warning("node lock was not ours any more at release node=%s", self.node_id)


def take_slot(client: redis.Redis, node_id: str, kind: JobKind, *, l0_slots: int, ttl_s: float) -> NodeLock | None:
    """A slot of this node for a sub-job of ``kind``, taken without waiting: the node lock for
    gc-compaction, else the first free one of the ``l0_slots`` L0 slots. None when all are taken."""
    names = [node_id] if kind == "gc" else [f"{node_id}/l0.{slot}" for slot in range(l0_slots)]
    for name in names:
        lock = NodeLock(client, name, ttl_s)
        if lock.acquire():
            return lock
    return None


class Heartbeat:
    """Calls ``tick`` every ``interval_s`` on a daemon thread until stopped. A failing tick is
    logged and the next one runs on time: a heartbeat must survive a Redis blip."""

    def __init__(self, interval_s: float, tick: Callable[[], None], name: str = "heartbeat") -> None:
        self.interval_s = interval_s
        self._tick = tick
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._tick()
            except Exception as err:
                log.warning("heartbeat tick failed error=%r", one_line(err))

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(5.0, self.interval_s * 2))

    def __enter__(self) -> Heartbeat:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
