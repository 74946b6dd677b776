"""The node lock against a real Redis: exclusive per node, renewed by a heartbeat thread from a
thread other than its taker, and a lost lock is noticed instead of assumed."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import redis

from compactor.worker.runtime.node_lock import Heartbeat, NodeLock, take_slot


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def test_one_holder_per_node(client: redis.Redis) -> None:
    first = NodeLock(client, "node-a", ttl_s=5)
    second = NodeLock(client, "node-a", ttl_s=5)
    other_node = NodeLock(client, "node-b", ttl_s=5)
    assert first.acquire()
    assert not second.acquire(), "a node runs one gc-compaction at a time"
    assert other_node.acquire(), "another node is not affected"
    first.release()
    assert second.acquire()
    second.release()
    other_node.release()


def test_l0_slots_are_a_limit_of_their_own_beside_the_gc_lock(client: redis.Redis) -> None:
    """Issue 11: L0 compaction and image creation take one of the node's L0 slots, never its gc
    lock, so they run beside a gc-compaction; the slots bound them per node."""
    gc = take_slot(client, "node-s", "gc", l0_slots=2, ttl_s=5)
    assert gc is not None and take_slot(client, "node-s", "gc", l0_slots=2, ttl_s=5) is None
    first = take_slot(client, "node-s", "l0", l0_slots=2, ttl_s=5)
    second = take_slot(client, "node-s", "image", l0_slots=2, ttl_s=5)
    assert first is not None and second is not None and first.name != second.name
    assert take_slot(client, "node-s", "l0", l0_slots=2, ttl_s=5) is None, "two L0 slots, both taken"
    assert take_slot(client, "node-t", "l0", l0_slots=2, ttl_s=5) is not None, "another node is not affected"
    first.release()
    again = take_slot(client, "node-s", "l0", l0_slots=2, ttl_s=5)
    assert again is not None and again.name == first.name
    for lock in (gc, second, again):
        lock.release()


def test_heartbeat_thread_renews_a_lock_taken_by_another_thread(client: redis.Redis) -> None:
    lock = NodeLock(client, "node-a", ttl_s=0.4)
    assert lock.acquire()
    renewals: list[bool] = []
    # The token is not thread-local: the heartbeat thread renews what the main thread took.
    with Heartbeat(0.1, lambda: renewals.append(lock.renew())):
        time.sleep(1.2)  # three TTLs
        assert lock.owned()
        assert not NodeLock(client, "node-a", ttl_s=1).acquire()
    assert len(renewals) >= 5 and all(renewals)
    lock.release()
    assert client.get(lock.name) is None


def test_expired_lock_is_detected_as_lost(client: redis.Redis) -> None:
    lock = NodeLock(client, "node-a", ttl_s=0.2)
    assert lock.acquire()
    time.sleep(0.35)  # no renewal: it expires while its holder "still runs"
    thief = NodeLock(client, "node-a", ttl_s=5)
    assert thief.acquire()
    assert not lock.owned()
    assert not lock.renew(), "renewing a lock another holder took must fail, not steal it back"
    assert thief.owned()
    lock.release()  # logged, harmless
    assert thief.owned(), "releasing a lost lock must not release the new holder's"
    thief.release()


def test_lost_lock_noticed_by_heartbeat(client: redis.Redis) -> None:
    lock = NodeLock(client, "node-a", ttl_s=2)
    assert lock.acquire()
    lost = threading.Event()

    def tick() -> None:
        if not lock.renew():
            lost.set()

    with Heartbeat(0.05, tick):
        client.delete(lock.name)  # e.g. Redis failover without persistence
        assert lost.wait(2)


def test_heartbeat_survives_failing_ticks() -> None:
    calls: list[int] = []

    def tick() -> None:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("redis blip")

    with Heartbeat(0.02, tick):
        deadline = time.monotonic() + 2
        while len(calls) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert len(calls) >= 5
