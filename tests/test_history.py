"""Random clients on every backend, with faults; the history checker proves the rules.

CI runs a short, seeded run per backend (the seed is printed, so a failure can
be replayed with DISTRIBUTEX_HISTORY_SEED). A longer run is one command::

    DISTRIBUTEX_HISTORY_SECONDS=300 .venv/bin/pytest tests/test_history.py -s
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
import uuid

import pytest

from distributex.check import clients, history, rules, wire
from tests.conftest import Memcached, RedisServer, start_etcd, start_memcached, start_redis

pytestmark = pytest.mark.timeout(600)

SECONDS = float(os.environ.get("DISTRIBUTEX_HISTORY_SECONDS", "8"))
CLIENTS = 8
POOLS = """\
pools:
  - name: mutex
    expire: 2
  - name: sem
    maxlocks: 2
    expire: 2
"""
MAXLOCKS = {"mutex": 1, "sem": 2}


def seed() -> int:
    chosen = int(os.environ.get("DISTRIBUTEX_HISTORY_SEED", random.randrange(1 << 30)))
    print(f"history seed: {chosen} (replay with DISTRIBUTEX_HISTORY_SEED={chosen})")
    return chosen


def test_history_inmemory(server_factory) -> None:
    server = server_factory("backend: inmemory\n" + POOLS)
    result = clients.run(
        lambda: [("127.0.0.1", server.port)],
        list(MAXLOCKS),
        CLIENTS,
        SECONDS,
        seed(),
        min_leases=31,
    )
    rules.assert_held(result, MAXLOCKS, CLIENTS)
    # A floor that says the run did something, as for the other backends (a seed
    # with several long holds on a loaded machine gave 45 in 8 s).
    assert len(result.leases) > 30


def test_history_memcache_three_servers_with_faults(server_factory) -> None:
    mc: Memcached = start_memcached()
    try:
        config = f"backend: memcache\nmemcachehost: 127.0.0.1\nmemcacheport: {mc.port}\n" + POOLS
        servers = [server_factory(config) for _ in range(3)]
        addresses = [("127.0.0.1", s.port) for s in servers]
        lock = threading.Lock()

        def current() -> list[tuple[str, int]]:
            with lock:
                return list(addresses)

        def faults() -> None:
            # A server killed (-9) and replaced; then memcached stopped and started.
            time.sleep(SECONDS * 0.25)
            victim = servers[1]
            with lock:
                addresses.remove(("127.0.0.1", victim.port))
            victim.stop(signal.SIGKILL)
            time.sleep(0.5)
            fresh = server_factory(config)
            with lock:
                addresses.append(("127.0.0.1", fresh.port))
            time.sleep(SECONDS * 0.25)
            mc.stop()
            time.sleep(0.5)
            mc.start()

        injector = threading.Thread(target=faults, daemon=True)
        injector.start()
        result = clients.run(current, list(MAXLOCKS), CLIENTS, SECONDS, seed(), min_leases=31)
        injector.join(30)
        # Waits refused while the store was down or had just lost its state are
        # not starvation: only the safety and fencing rules are checked here.
        result.long_waits_refused.clear()
        rules.assert_held(result, MAXLOCKS, CLIENTS, durable=False)  # memcached restarted empty
        assert len(result.leases) > 30
        print(f"{len(result.leases)} leases, {result.errors} failed calls of {result.calls}")
    finally:
        mc.stop()


def test_history_memcache_two_servers_no_faults(server_factory, memcached: Memcached) -> None:
    config = (
        f"backend: memcache\nmemcachehost: 127.0.0.1\nmemcacheport: {memcached.port}\n"
        f"key_prefix: hist{uuid.uuid4().hex}/\n" + POOLS
    )
    servers = [server_factory(config) for _ in range(2)]
    addresses = [("127.0.0.1", s.port) for s in servers]
    result = clients.run(lambda: addresses, list(MAXLOCKS), CLIENTS, SECONDS, seed(), min_leases=31)
    rules.assert_held(result, MAXLOCKS, CLIENTS)
    assert result.errors == 0
    # Progress (some seeds draw long holds: about 48 leases in the run).
    assert len(result.leases) > 30


def lease(client: str, got: float, end: float, fence: int) -> history.LeaseRecord:
    return history.LeaseRecord(client, "mutex", fence, f"t{fence}", 10.0, got, got, got, end)


@pytest.mark.parametrize(
    "records",
    [
        [lease("a", 0.0, 2.0, 1), lease("b", 1.0, 3.0, 2)],  # two holders at once
        [lease("a", 0.0, 1.0, 5), lease("b", 2.0, 3.0, 4)],  # a fence went back
        [lease("a", 0.0, 1.0, 5), lease("b", 2.0, 3.0, 5)],  # one fence, two owners
    ],
)
def test_the_checker_catches_a_broken_history(records: list[history.LeaseRecord]) -> None:
    with pytest.raises(AssertionError):
        rules.assert_held(history.History(leases=records), {"mutex": 1}, 2)


def test_the_checker_passes_a_good_history() -> None:
    records = [lease("a", 0.0, 1.0, 1), lease("b", 1.0, 2.0, 2), lease("a", 2.5, 3.0, 3)]
    rules.assert_held(history.History(leases=records), {"mutex": 1}, 2)


def test_history_sqlite_two_processes_one_file(server_factory, tmp_path) -> None:
    config = f"backend: sqlite\nsqlite_path: {tmp_path / 'state.db'}\n" + POOLS
    servers = [server_factory(config) for _ in range(2)]
    addresses = [("127.0.0.1", s.port) for s in servers]
    result = clients.run(lambda: addresses, list(MAXLOCKS), CLIENTS, SECONDS, seed(), min_leases=31)
    rules.assert_held(result, MAXLOCKS, CLIENTS)
    assert result.errors == 0
    # Progress (some seeds draw long holds: about 48 leases in the run).
    assert len(result.leases) > 30


@pytest.mark.parametrize("lost", [1, 2], ids=["one-member-lost", "quorum-lost"])
def test_history_etcd_two_servers_members_killed(server_factory, tmp_path, lost: int) -> None:
    # Two servers on a three-member etcd; ``lost`` members killed and restarted
    # mid-run (two: the quorum is lost, then back).
    cluster = start_etcd(tmp_path / "etcd", size=3)
    try:
        config = f"backend: etcd\netcd_endpoints: {cluster.endpoints}\n" + POOLS
        servers = [server_factory(config) for _ in range(2)]
        addresses = [("127.0.0.1", s.port) for s in servers]
        back: list[float] = []
        probe: list[int] = []

        def faults() -> None:
            time.sleep(SECONDS * 0.25)
            victims = [cluster.leader()]  # the leader first: an election too
            victims += [m for m in cluster.members if m not in victims][: lost - 1]
            for member in victims:
                member.stop()
            time.sleep(SECONDS * 0.25)
            if lost == 2:  # a request during the outage meets it
                probe.append(servers[0].call("/get/?host=probe&pool=mutex", timeout=30).status)
            for member in victims:
                member.start()
            cluster.wait_ready()
            back.append(time.monotonic())

        injector = threading.Thread(target=faults, daemon=True)
        injector.start()
        result = clients.run(
            lambda: addresses, list(MAXLOCKS), CLIENTS, SECONDS, seed(), min_leases=31
        )
        injector.join(60)
        # Waits refused while etcd had no quorum are not starvation.
        result.long_waits_refused.clear()
        rules.assert_held(result, MAXLOCKS, CLIENTS)  # etcd keeps the state: durable
        assert back, "etcd did not come back"
        # Service came back by itself: leases granted after the members returned.
        assert any(r.got > back[0] for r in result.leases), "nothing granted after the fault"
        assert len(result.leases) > 30
        if lost == 2:
            assert probe == [503], "the quorum was not lost"
        print(
            f"{len(result.leases)} leases, {result.unavailable} answered 503, "
            f"{result.errors} failed calls of {result.calls}"
        )
    finally:
        cluster.stop()


def test_history_redis_three_servers_with_faults(server_factory) -> None:
    rs: RedisServer = start_redis()
    try:
        config = f"backend: redis\nredis_url: {rs.url}\n" + POOLS
        servers = [server_factory(config) for _ in range(3)]
        addresses = [("127.0.0.1", s.port) for s in servers]
        lock = threading.Lock()
        result = history.History()
        paused: list[tuple[int, str]] = []

        def current() -> list[tuple[str, int]]:
            with lock:
                return list(addresses)

        def pause_a_client() -> None:
            # A client that gets the mutex, stops (no renewals) past its TTL and
            # comes back: its lease is over, and its renewal says so.
            name = f"c{CLIENTS}"
            while True:
                sent = time.monotonic()
                params = {"host": name, "pool": "mutex", "ttl": 1, "timeout": 30}
                try:
                    status, body, headers = wire.call(current()[0], "wait", params, 45)
                except OSError:
                    continue
                if body == "YES":
                    break
            got = time.monotonic()
            token = headers["x-distributex-lease"]
            fence = int(headers["x-distributex-fence"])
            result.add(history.LeaseRecord(name, "mutex", fence, token, 1.0, sent, got, sent))
            time.sleep(2.5)
            params = {"host": name, "pool": "mutex", "lease": token}
            status, body, _headers = wire.call(current()[-1], "renew", params, 10)
            paused.append((status, body))

        def faults() -> None:
            # A client paused; a server killed (-9) and replaced; Redis stopped and started.
            time.sleep(SECONDS * 0.1)
            pause_a_client()
            victim = servers[1]
            with lock:
                addresses.remove(("127.0.0.1", victim.port))
            victim.stop(signal.SIGKILL)
            time.sleep(0.5)
            fresh = server_factory(config)
            with lock:
                addresses.append(("127.0.0.1", fresh.port))
            time.sleep(SECONDS * 0.2)
            rs.stop()
            time.sleep(0.5)
            rs.start()

        injector = threading.Thread(target=faults, daemon=True)
        injector.start()
        run = clients.run(current, list(MAXLOCKS), CLIENTS, SECONDS, seed())
        injector.join(60)
        assert not injector.is_alive()
        assert paused == [(410, "GONE")], paused
        run.leases += result.leases
        # Waits refused while the store was down or had just lost its state are
        # not starvation: only the safety and fencing rules are checked here.
        run.long_waits_refused.clear()
        rules.assert_held(run, MAXLOCKS, CLIENTS + 1, durable=False)  # Redis restarted empty
        assert len(run.leases) > 30
        print(f"{len(run.leases)} leases, {run.errors} failed calls of {run.calls}")
    finally:
        rs.stop()


def test_history_redis_three_servers_no_faults(server_factory, redis_server: RedisServer) -> None:
    config = (
        f"backend: redis\nredis_url: {redis_server.url}\n"
        f"key_prefix: hist{uuid.uuid4().hex}/\n" + POOLS
    )
    servers = [server_factory(config) for _ in range(3)]
    addresses = [("127.0.0.1", s.port) for s in servers]
    result = clients.run(lambda: addresses, list(MAXLOCKS), CLIENTS, SECONDS, seed(), min_leases=31)
    rules.assert_held(result, MAXLOCKS, CLIENTS)
    assert result.errors == 0
    assert len(result.leases) > 30


def test_history_redis_a_server_started_after_the_store_lost_its_state(server_factory) -> None:
    # A rolling restart as it goes wrong: a host holds a long lease through s1
    # (idle otherwise); the clients' server s2 goes down, Redis restarts empty,
    # and a new server starts in s2's place. It must not take the store for a
    # new one and grant the held pool again.
    rs: RedisServer = start_redis()
    try:
        pools = POOLS + "  - name: long\n    expire: 10\n"
        maxlocks = {**MAXLOCKS, "long": 1}
        config = f"backend: redis\nredis_url: {rs.url}\n" + pools
        first, second = server_factory(config), server_factory(config)
        addresses = [("127.0.0.1", second.port)]
        switch = threading.Lock()  # held while the clients' server is replaced
        holder = history.History()

        def current() -> list[tuple[str, int]]:
            with switch:
                return list(addresses)

        def faults() -> None:
            time.sleep(SECONDS * 0.2)
            name = f"c{CLIENTS}"
            while True:  # a lease of 10 s on the pool, without renewals
                sent = time.monotonic()
                params = {"host": name, "pool": "long", "ttl": 10}
                _status, body, headers = wire.call(("127.0.0.1", first.port), "get", params, 10)
                if body == "YES":
                    break
                time.sleep(0.02)
            got = time.monotonic()
            fence = int(headers["x-distributex-fence"])
            token = headers["x-distributex-lease"]
            holder.add(history.LeaseRecord(name, "long", fence, token, 10.0, sent, got, sent))
            with switch:
                second.stop(signal.SIGKILL)
                rs.start()  # restarted: every key is gone
                fresh = server_factory(config)
                addresses[:] = [("127.0.0.1", fresh.port)]

        injector = threading.Thread(target=faults, daemon=True)
        injector.start()
        result = clients.run(current, list(maxlocks), CLIENTS, SECONDS, seed(), min_leases=21)
        injector.join(60)
        assert not injector.is_alive()
        assert holder.leases, "the long lease was never granted"
        result.leases += holder.leases
        result.long_waits_refused.clear()  # waits refused while the loss holds grants
        rules.assert_held(result, maxlocks, CLIENTS + 1, durable=False)
        assert len(result.leases) > 20
    finally:
        rs.stop()


def test_history_memcache_a_server_whose_clock_is_off(
    server_factory, skewed_factory, memcached: Memcached
) -> None:
    # A third server joins with its clock 20 s ahead: on its clock every lease
    # ended long ago. It must refuse rather than grant over them.
    config = (
        f"backend: memcache\nmemcachehost: 127.0.0.1\nmemcacheport: {memcached.port}\n"
        f"key_prefix: hist{uuid.uuid4().hex}/\n" + POOLS
    )
    servers = [server_factory(config) for _ in range(2)]
    addresses = [("127.0.0.1", s.port) for s in servers]
    lock = threading.Lock()

    def current() -> list[tuple[str, int]]:
        with lock:
            return list(addresses)

    def faults() -> None:
        time.sleep(SECONDS * 0.2)
        ahead = skewed_factory(config, 20)
        with lock:
            addresses.append(("127.0.0.1", ahead.port))

    injector = threading.Thread(target=faults, daemon=True)
    injector.start()
    result = clients.run(current, list(MAXLOCKS), CLIENTS, SECONDS, seed(), min_leases=21)
    injector.join(60)
    assert not injector.is_alive()
    result.long_waits_refused.clear()  # the server that refuses answers 503
    rules.assert_held(result, MAXLOCKS, CLIENTS)
    assert result.unavailable > 0, "the server with its clock off was never asked"
    assert len(result.leases) > 20


RW_POOLS = POOLS + "  - name: rw\n    expire: 2\n    max_shared: 3\n"


def test_history_modes_inmemory(server_factory) -> None:
    """Shared and exclusive requests mixed (half each): exclusive holders alone,
    at most max_shared shared ones, nobody starved, fences in order."""
    server = server_factory("backend: inmemory\n" + RW_POOLS)
    result = clients.run(
        lambda: [("127.0.0.1", server.port)],
        ["mutex", "rw"],
        CLIENTS,
        SECONDS,
        seed(),
        shared=0.5,
        min_leases=31,
    )
    rules.assert_held(result, {"mutex": 1, "rw": 1}, CLIENTS, max_shared={"rw": 3})
    assert {r.mode for r in result.leases} == {"shared", "exclusive"}
    assert len(result.leases) > 30


def test_history_modes_redis_two_servers(server_factory) -> None:
    rs: RedisServer = start_redis()
    try:
        config = f"backend: redis\nredis_url: {rs.url}\nkey_prefix: h{uuid.uuid4().hex}/\n"
        servers = [server_factory(config + RW_POOLS) for _ in range(2)]
        addresses = [("127.0.0.1", s.port) for s in servers]
        result = clients.run(
            lambda: addresses, ["mutex", "rw"], CLIENTS, SECONDS, seed(), shared=0.5, min_leases=31
        )
        rules.assert_held(result, {"mutex": 1, "rw": 1}, CLIENTS, max_shared={"rw": 3})
        assert {r.mode for r in result.leases} == {"shared", "exclusive"}
        assert len(result.leases) > 30
    finally:
        rs.stop()


def _lease(client: str, fence: int, got: float, end: float, mode: str) -> history.LeaseRecord:
    return history.LeaseRecord(client, "rw", fence, f"t{fence}", 0, got, got, got, end, mode)


def test_the_checker_finds_shared_beside_exclusive_and_too_many_shared() -> None:
    together = [_lease("a", 1, 0.0, 2.0, "shared"), _lease("b", 2, 0.5, 1.5, "shared")]
    assert not rules.check(history.History(leases=together), {"rw": 1}, max_shared={"rw": 2})
    beside = [_lease("a", 1, 0.0, 2.0, "shared"), _lease("b", 2, 0.5, 1.5, "exclusive")]
    (finding,) = rules.check(history.History(leases=beside), {"rw": 1})
    assert "shared beside" in finding.message and len(finding.leases) == 2
    three = [*together, _lease("c", 3, 0.6, 1.0, "shared")]
    (finding,) = rules.check(history.History(leases=three), {"rw": 1}, max_shared={"rw": 2})
    assert "max_shared 2" in finding.message
