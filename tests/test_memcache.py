"""The memcache backend when things go wrong: the store stops, loses its memory, a server dies.

Each test has a memcached of its own (Debian's package), started and stopped by
the test, and real distributexd processes sharing it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest

from distributex.backends.memcache import MemcacheStore
from tests.conftest import Memcached, Server, freeze, start_memcached, wait_until
from tests.test_http import ParkedWait, q

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def mc() -> Iterator[Memcached]:
    server = start_memcached()
    yield server
    server.stop()


def config(mc: Memcached, pools: str = "") -> str:
    head = f"backend: memcache\nmemcachehost: 127.0.0.1\nmemcacheport: {mc.port}\n"
    return head + "autocreate: true\npools:\n  - name: p\n    expire: 3\n" + pools


def test_stopped_memcached_is_a_bounded_503_and_service_resumes(
    mc: Memcached, server_factory
) -> None:
    server: Server = server_factory(config(mc))
    assert server.call(q("get", "a", "other")).body == "YES"
    mc.stop()
    began = time.monotonic()
    answer = server.call(q("get", "b", "other"), timeout=30)
    assert time.monotonic() - began < 5
    assert (answer.status, answer.body) == (503, "UNAVAILABLE")
    assert "memcached" in answer.headers["X-Distributex-Reason"]
    mc.start()
    # Restarted empty: a lease from before could still be live for the pool's expire.
    took = wait_until(lambda: server.call(q("get", "b", "p")).body == "YES", 20, "service back")
    assert took < 10


def test_restarted_empty_grants_nothing_while_an_old_lease_could_live(
    mc: Memcached, server_factory
) -> None:
    server: Server = server_factory(config(mc))
    held = server.call(q("get", "a", "p"))
    assert held.body == "YES"
    fence_before = int(held.headers["X-Distributex-Fence"])
    mc.start()  # restarted: every key is gone
    restarted = time.monotonic()
    answers = []
    while time.monotonic() - restarted < 2.0:  # expire is 3 s
        answers.append(server.call(q("get", "b", "p")).body)
        time.sleep(0.1)
    assert set(answers) == {"NO"}, "granted while the old lease could still be live"
    took = wait_until(lambda: server.call(q("get", "b", "p")).body == "YES", 10, "granted later")
    assert took < 5
    after = server.call(q("get", "b", "p"))
    assert int(after.headers["X-Distributex-Fence"]) > fence_before
    # The old holder's lease is gone with the store: its renewal says so.
    token = held.headers["X-Distributex-Lease"]
    assert server.call(q("renew", "a", "p", f"&lease={token}")).status == 410


def test_parked_waiter_survives_an_outage(mc: Memcached, server_factory) -> None:
    server: Server = server_factory(config(mc, "  - name: long\n    expire: 300\n"))
    assert server.call(q("get", "a", "long")).body == "YES"
    waiter = ParkedWait(server, "b", "long", "&timeout=60")
    time.sleep(0.3)
    mc.stop()
    time.sleep(1.0)
    mc.start()  # empty: the waiter queues again; the pool is held back for its expire
    time.sleep(0.5)
    assert not waiter.answered()
    waiter.hang_up()


def test_a_killed_servers_waiters_are_dropped_and_its_grant_passed_on(
    mc: Memcached, server_factory
) -> None:
    first: Server = server_factory(config(mc, "  - name: long\n    expire: 300\n"))
    doomed: Server = server_factory(config(mc, "  - name: long\n    expire: 300\n"))
    assert first.call(q("get", "holder", "long")).body == "YES"
    # Kept open (a socket closed here would cancel the wait): its server dies instead.
    lost = ParkedWait(doomed, "on-doomed", "long")
    wait_until(lambda: queue(first, "long") == ["on-doomed"], 10, "the first waiter queued")
    survivor = ParkedWait(first, "survivor", "long")
    wait_until(lambda: queue(first, "long") == ["on-doomed", "survivor"], 10, "both queued")
    doomed.stop(signal.SIGKILL)
    # The grant goes to the dead server's waiter first, is undone once its
    # heartbeat (8 s) is gone, and passed on.
    released = time.monotonic()
    assert first.call(q("release", "holder", "long")).body == "OK"
    status, _headers, body = survivor.answer(timeout=30)
    assert (status, body) == (200, "YES")
    took = time.monotonic() - released
    assert 4 < took < 12, took
    lost.hang_up()


def queue(server: Server, pool: str) -> list[str]:
    """The hosts waiting on ``pool``, in queue order, as /status shows them."""
    document = json.loads(server.call(f"/status?pool={pool}").body)
    return [waiter["host"] for waiter in document["pools"][0]["waiters"]]


def test_waiters_lost_with_the_store_queue_again_in_their_order(
    mc: Memcached, server_factory
) -> None:
    server: Server = server_factory(config(mc, "  - name: long\n    expire: 300\n"))
    assert server.call(q("get", "holder", "long")).body == "YES"
    hosts = [f"w{i}" for i in range(6)]
    waiters = []
    for i, host in enumerate(hosts):
        waiters.append(ParkedWait(server, host, "long"))
        wait_until(lambda n=i + 1: len(queue(server, "long")) == n, 10, f"{host} queued")
    assert queue(server, "long") == hosts
    mc.start()  # restarted empty: every entry is gone; each waiter finds it and queues again
    wait_until(lambda: len(queue(server, "long")) == len(hosts), 20, "all queued again")
    # In the order they came (a shuffled queue would pass 1 time in 720).
    assert queue(server, "long") == hosts
    for waiter in waiters:
        assert not waiter.answered()
        waiter.hang_up()


def test_fences_never_go_back_after_a_flush(mc: Memcached, server_factory) -> None:
    server: Server = server_factory(config(mc, "  - name: free\n    expire: 0.2\n"))
    before = int(server.call(q("get", "a", "free")).headers["X-Distributex-Fence"])
    server.call(q("release", "a", "free"))
    mc.start()
    wait_until(lambda: server.call(q("get", "b", "free")).body == "YES", 10, "granted after loss")
    after = int(server.call(q("get", "b", "free")).headers["X-Distributex-Fence"])
    assert after > before


def test_frozen_memcached_is_a_bounded_503_for_every_request(mc: Memcached, server_factory) -> None:
    # SIGSTOP: connections stay open and nothing answers (a black-holed store).
    server: Server = server_factory(config(mc))
    assert server.call(q("get", "a", "p")).body == "YES"
    assert mc.proc is not None
    freeze(mc.proc)
    try:
        results: list[tuple[float, int]] = []

        def one(i: int) -> None:
            began = time.monotonic()
            answer = server.call(q("get", f"h{i}", f"pool{i % 3}"), timeout=30)
            results.append((time.monotonic() - began, answer.status))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert len(results) == 6
        assert all(status == 503 for _took, status in results), results
        assert max(took for took, _status in results) < 5, results
    finally:
        mc.proc.send_signal(signal.SIGCONT)
    took = wait_until(lambda: server.call(q("get", "b", "other")).body == "YES", 15, "back")
    assert took < 10


def _with_alarm(seconds: float, scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``scenario``; an event loop spinning without yielding is broken by SIGALRM."""

    def alarm(signum: int, frame: object) -> None:
        raise AssertionError("the event loop spun or hung past its time")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        asyncio.run(scenario())
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


async def _in_flight(store: MemcacheStore, count: int) -> None:
    """Until ``count`` calls hold a connection (and one more turn: they have written)."""
    while len(store._client._pool._in_use) < count:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0)


def test_a_write_whose_connection_closes_mid_answer_fails_and_never_spins(mc: Memcached) -> None:
    # The connection ends while a write waits for its answer. aiomcache's own
    # reader looped for good on the end of file without ever yielding (a server
    # froze at 100 % CPU with 20,000 waiters parked, deaf to SIGTERM).
    async def scenario() -> None:
        store = MemcacheStore("127.0.0.1", mc.port)
        await store.start()
        assert await store.put("k", b"before", None)
        assert mc.proc is not None
        freeze(mc.proc)
        try:
            write = asyncio.create_task(store.put("k2", b"value", None))
            await _in_flight(store, 1)
            for conn in store._client._pool._in_use:  # the connection ends: end of file
                conn.writer.close()
            with pytest.raises(ConnectionResetError, match="mid-answer"):
                await asyncio.wait_for(write, 10)
        finally:
            mc.proc.send_signal(signal.SIGCONT)
        assert await store.put("k", b"after", 12345) is False  # a new connection works
        assert (await store.get(["k"]))["k"].value == b"before"
        await store.close()

    _with_alarm(15, scenario)


def test_a_call_that_times_out_fails_alone_and_its_connection_is_not_reused(
    mc: Memcached,
) -> None:
    # The layer gives up on a call after its time and resets the store. Only
    # that call's connection is out of step; closing every busy one failed all
    # calls in flight with it (4,898 of 20,000 arrivals answered 503).
    async def scenario() -> None:
        store = MemcacheStore("127.0.0.1", mc.port)
        await store.start()
        assert mc.proc is not None
        freeze(mc.proc)
        try:
            late = asyncio.create_task(store.put("late", b"1", None))
            await _in_flight(store, 1)
            other = asyncio.create_task(store.put("other", b"2", None))
            await _in_flight(store, 2)
            late.cancel()  # as the layer's timeout does
            with pytest.raises(asyncio.CancelledError):
                await late
            store.reset()
        finally:
            mc.proc.send_signal(signal.SIGCONT)
        assert await asyncio.wait_for(other, 10) is True
        # memcached stores "late" (its answer is never read), but on its own
        # connection, which one of its threads serves whenever it gets to it:
        # until then a new "add late" may come first.
        for _ in range(1000):
            if "late" in await store.get(["late"]):
                break
            await asyncio.sleep(0.01)
        # Every later answer is its own call's, not a leftover line of that one.
        for _ in range(10):
            assert await store.put("late", b"again", None) is False  # NOT_STORED
            found = await store.get(["late", "other"])
            assert (found["late"].value, found["other"].value) == (b"1", b"2")
            assert await store.put("late", b"3", 12345) is False  # EXISTS: wrong version
        await store.close()

    _with_alarm(20, scenario)
