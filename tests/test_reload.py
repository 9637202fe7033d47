"""SIGHUP rereads the configuration without dropping holders or waiters, on every backend."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sqlite3
import textwrap
import time
from pathlib import Path

import pytest

from distributex.backends import shared, sqlite_file, steps
from distributex.backends.shared import SharedStateBackend
from distributex.backends.sqlite import SqliteStore
from distributex.engine import PoolSpec
from tests.conftest import Server, wait_until
from tests.test_http import ParkedWait, q

pytestmark = pytest.mark.timeout(120)


class Reloadable:
    """A server of one backend (made by ``cluster_factory``) whose file a test rewrites."""

    def __init__(self, cluster_factory, tmp_path: Path, pools: str) -> None:
        pools = textwrap.dedent(pools)
        self.server: Server = cluster_factory(pools, servers=1).servers[0]
        self.path = tmp_path / f"distributex-{self.server.port}.yaml"
        text = self.path.read_text()
        assert text.endswith(pools)
        self.head = text[: len(text) - len(pools)]  # the backend's keys, kept on reload

    def log_count(self, needle: str) -> int:
        return self.server.log.read_text().count(needle)

    def reload(self, text: str, head: bool = True, expect: str = "reloaded ") -> None:
        """Write the file, send SIGHUP, wait for the server to log that it was (not) taken."""
        before = self.log_count(expect)
        self.path.write_text((self.head if head else "") + textwrap.dedent(text))
        self.server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while self.log_count(expect) == before:
            assert time.monotonic() < deadline, self.server.log.read_text()[-2000:]
            time.sleep(0.02)

    def pool(self, name: str) -> dict:
        answer = self.server.call(f"/status?pool={name}")
        assert answer.status == 200, answer.body
        return json.loads(answer.body)["pools"][0]

    def holders(self, name: str) -> list[str]:
        return [h["host"] for h in self.pool(name)["holders"]]

    def waiters(self, name: str) -> list[str]:
        return [w["host"] for w in self.pool(name)["waiters"]]

    def until_waiting(self, name: str, hosts: list[str]) -> None:
        deadline = time.monotonic() + 15
        while self.waiters(name) != hosts:
            assert time.monotonic() < deadline, self.waiters(name)
            time.sleep(0.05)


@pytest.fixture
def make(cluster_factory, tmp_path: Path):
    def factory(pools: str) -> Reloadable:
        return Reloadable(cluster_factory, tmp_path, pools)

    return factory


ONE = """\
pools:
  - name: p
    expire: 300
"""


def test_raising_maxlocks_grants_waiters_at_once_and_a_new_pool_serves(make) -> None:
    srv = make(ONE)
    s = srv.server
    assert s.call(q("get", "a", "p")).body == "YES"
    assert s.call(q("get", "x", "q")).status == 404  # not yet
    b = ParkedWait(s, "b", "p")
    srv.until_waiting("p", ["b"])
    c = ParkedWait(s, "c", "p")
    srv.until_waiting("p", ["b", "c"])
    srv.reload("pools:\n  - name: p\n    expire: 300\n    maxlocks: 3\n  - name: q\n")
    started = time.monotonic()
    assert b.answer()[2] == "YES"
    assert c.answer()[2] == "YES"
    assert time.monotonic() - started < 5  # at once, not at the next request
    assert srv.holders("p") == ["a", "b", "c"]
    assert srv.pool("p")["maxlocks"] == 3
    assert s.call(q("get", "x", "q")).body == "YES"
    assert "added q; changed p" in s.log.read_text()


def test_raising_max_shared_grants_shared_waiters_and_lock_delay_takes_effect(make) -> None:
    srv = make("pools:\n  - name: p\n    expire: 300\n    max_shared: 1\n")
    s = srv.server
    assert s.call(q("get", "a", "p", "&mode=shared")).body == "YES"
    b = ParkedWait(s, "b", "p", "&mode=shared")
    srv.until_waiting("p", ["b"])
    srv.reload("pools:\n  - name: p\n    expire: 1\n    max_shared: 2\n    lock_delay: 30\n")
    assert b.answer()[2] == "YES"  # at once, not at the next request
    assert srv.pool("p")["max_shared"] == 2 and srv.pool("p")["lock_delay"] == 30
    assert s.call(q("get", "c", "p", "&mode=shared")).body == "NO"  # two shared: the bound
    # The new lock_delay holds for leases that expire after the reload.
    assert s.call(q("release", "a", "p")).body == "OK"
    assert s.call(q("get", "c", "p", "&mode=shared&ttl=0.5")).body == "YES"
    assert s.call(q("release", "b", "p")).body == "OK"
    wait_until(lambda: srv.pool("p")["lock_delays"], what="c's lease expired")
    assert srv.holders("p") == []
    assert s.call(q("get", "d", "p")).body == "NO"  # its slot is kept for 30 s


def test_lowering_maxlocks_evicts_no_holder(make) -> None:
    srv = make("pools:\n  - name: p\n    maxlocks: 3\n")
    s = srv.server
    for host in "abc":
        assert s.call(q("get", host, "p")).body == "YES"
    srv.reload("pools:\n  - name: p\n    maxlocks: 1\n")
    assert srv.holders("p") == ["a", "b", "c"]
    assert s.call(q("get", "a", "p")).body == "YES"  # a holder asking again still holds
    assert s.call(q("get", "d", "p")).body == "NO"
    assert s.call(q("release", "a", "p")).body == "OK"
    assert s.call(q("release", "b", "p")).body == "OK"
    assert s.call(q("get", "d", "p")).body == "NO"  # c alone fills the one slot
    assert s.call(q("release", "c", "p")).body == "OK"
    assert s.call(q("get", "d", "p")).body == "YES"


def test_changing_expire_applies_to_new_grants_and_renewals(make) -> None:
    srv = make(ONE)
    s = srv.server
    old = s.call(q("get", "a", "p"))
    assert old.headers["X-Distributex-TTL"] == "300"
    expires_before = srv.pool("p")["holders"][0]["expires_at"]
    srv.reload("pools:\n  - name: p\n    expire: 100\n")
    assert srv.pool("p")["expire"] == 100
    # The lease keeps the time it was given ...
    assert srv.pool("p")["holders"][0]["expires_at"] == pytest.approx(expires_before, abs=0.01)
    # ... its renewal, and new grants, get the new expire.
    lease = old.headers["X-Distributex-Lease"]
    renewed = s.call(q("renew", "a", "p", f"&lease={lease}"))
    assert renewed.headers["X-Distributex-TTL"] == "100"
    assert s.call(q("release", "a", "p")).body == "OK"
    assert s.call(q("get", "b", "p")).headers["X-Distributex-TTL"] == "100"


@pytest.mark.parametrize(
    "broken",
    ["pools: [\n", "pools:\n  - name: p\n    maxlocks: -1\n", "pools:\n  - expire: 3\n"],
)
def test_a_broken_file_is_refused_and_holders_keep_their_locks(make, broken: str) -> None:
    srv = make(ONE)
    s = srv.server
    assert s.call(q("get", "a", "p")).body == "YES"
    b = ParkedWait(s, "b", "p")
    srv.until_waiting("p", ["b"])
    srv.reload(broken, expect="reload refused")
    refusals = [line for line in s.log.read_text().splitlines() if "reload refused" in line]
    assert len(refusals) == 1
    assert str(srv.path) in refusals[0]  # names the file (and the place in it)
    assert s.proc.poll() is None
    assert srv.holders("p") == ["a"]
    assert srv.waiters("p") == ["b"]
    assert s.call(q("get", "c", "p")).body == "NO"  # the old configuration still serves
    assert s.call(q("release", "a", "p")).body == "OK"
    assert b.answer()[2] == "YES"


def test_a_removed_pool_drains(make) -> None:
    srv = make(ONE + "  - name: r\n")
    s = srv.server
    lease = s.call(q("get", "a", "r")).headers["X-Distributex-Lease"]
    b = ParkedWait(s, "b", "r")
    srv.until_waiting("r", ["b"])
    srv.reload(ONE)
    assert "removed r; draining r" in s.log.read_text()
    refused = s.call(q("get", "c", "r"))
    assert refused.status == 404
    assert "draining" in refused.headers["X-Distributex-Reason"]
    assert s.call(q("wait", "c", "r")).status == 404
    pool = srv.pool("r")
    assert pool["draining"] is True and pool["configured"] is False
    assert [h["host"] for h in pool["holders"]] == ["a"]
    # The holder can still renew and release; the queued waiter is served.
    assert s.call(q("renew", "a", "r", f"&lease={lease}")).body == "OK"
    assert s.call(q("release", "a", "r")).body == "OK"
    assert b.answer()[2] == "YES"
    assert s.call(q("release", "b", "r")).body == "OK"
    # Drained: the pool is gone.
    assert "r" not in [p["name"] for p in json.loads(s.call("/status").body)["pools"]]
    assert s.call(q("release", "b", "r")).status == 404


def test_restart_only_keys_are_kept(make) -> None:
    srv = make(ONE)
    s = srv.server
    srv.reload("header_timeout: 5\nmetrics: false\n" + ONE)
    assert "header_timeout, metrics need a restart; kept the running values" in s.log.read_text()
    assert s.call(q("get", "a", "p")).body == "YES"
    assert s.call("/metrics").status == 200  # still on


def test_without_a_file_sighup_changes_nothing(server_factory) -> None:
    s = server_factory()
    s.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 15
    while "no configuration file" not in s.log.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert s.call(q("get", "a", "p")).body == "YES"


@pytest.mark.parametrize("backend_name", ["sqlite"])
def test_a_store_lost_after_expire_was_lowered_grants_nothing_while_an_old_lease_could_live(
    make, backend_name: str
) -> None:
    srv = make("pools:\n  - name: p\n    expire: 8\n")
    s = srv.server
    assert s.call(q("get", "a", "p")).body == "YES"  # may live 8 s
    srv.reload("pools:\n  - name: p\n    expire: 2\n")
    reloaded = time.monotonic()
    path = re.search(r"sqlite_path: (.*)", srv.head).group(1)
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("DELETE FROM kv")  # the store loses every record
    conn.close()
    answers = []
    while time.monotonic() - reloaded < 5:  # past the new expire, before the old one
        answers.append(s.call(q("get", "b", "p")).body)
        time.sleep(0.1)
    assert "YES" not in answers, "granted while a lease of the old expire could still be live"
    wait_until(lambda: s.call(q("get", "b", "p")).body == "YES", 20, "granted later")
    assert time.monotonic() - reloaded > 7.5


# -- a reload while a step of a shared-state backend is under way -----------------------
# Two backends in this process on one real SQLite file, so the test can hold a
# step at the point where the reload comes. CI met this through the server: a
# waiter still waiting 10 s after maxlocks was raised.

OLD = PoolSpec("p", maxlocks=1, expire=300)
RAISED = PoolSpec("p", maxlocks=3, expire=300)


async def _until(condition) -> None:
    async with asyncio.timeout(20):
        while not await condition():
            await asyncio.sleep(0.005)


class OneFile:
    """Two backends on one SQLite file, and the test's own connection to take
    the file's write lock as another process would."""

    def __init__(self, tmp_path: Path) -> None:
        self.path = str(tmp_path / "state.db")
        self.reloaded = SharedStateBackend(SqliteStore(self.path))
        self.other = SharedStateBackend(SqliteStore(self.path))
        self.locker = sqlite3.connect(self.path, isolation_level=None)

    async def __aenter__(self) -> OneFile:
        await self.reloaded.start()
        await self.other.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.locker.close()
        await self.reloaded.close()
        await self.other.close()

    async def hosts(self, kind: str) -> list[str]:
        """The holders or waiters of pool p, as stored."""
        pool = (await self.reloaded.status([OLD]))[0]
        return sorted(x.host for x in getattr(pool, kind))

    async def until_waiting(self, hosts: list[str]) -> None:
        async def waiting() -> bool:
            return await self.hosts("waiters") == hosts

        await _until(waiting)

    async def until_in_flight(self) -> None:
        """A step of pool p on the reloaded server is with the store."""

        async def in_flight() -> bool:
            backend = self.reloaded
            room = backend.pools.get("p")
            return (
                backend.store._in_flight is not None
                and room is not None
                and room.runner is not None
            )

        await _until(in_flight)

    async def until_idle(self) -> None:
        async def idle() -> bool:
            return not any(
                any(room.runner for room in b.pools) or b._tasks
                for b in (self.reloaded, self.other)
            )

        await _until(idle)


def test_a_reload_during_a_step_hands_the_new_slots_on(tmp_path: Path) -> None:
    """The reload's step queues behind a step that began under the old spec; it
    must run under the new one. (The waiter is on the other server: no poller of
    the reloaded server steps the pool again, and that server, not reloaded,
    grants nothing over maxlocks 1.)"""

    async def scenario() -> None:
        async with OneFile(tmp_path) as f:
            assert await f.reloaded.acquire(OLD, "h", None) is not None
            waiter = asyncio.create_task(f.other.wait(OLD, "w", None, 30, lambda: True))
            await f.until_waiting(["w"])
            # The step of a second lease for h writes: the write lock holds it
            # until the reload has come (well within the store's 1 s busy timeout).
            f.locker.execute("BEGIN IMMEDIATE")
            again = asyncio.create_task(f.reloaded.acquire(OLD, "h", None))
            await f.until_in_flight()
            f.reloaded.reconfigure({"p": RAISED})
            f.locker.execute("ROLLBACK")
            assert await again is not None
            async with asyncio.timeout(5):
                assert await waiter is not None
            assert await f.hosts("holders") == ["h", "w"]

    asyncio.run(scenario())


def test_a_reload_whose_step_fails_is_stepped_again(tmp_path: Path) -> None:
    """The store refuses the reload's own step: the waiter's poller steps the
    pool again (before, it stepped only when the record changed)."""

    async def scenario() -> None:
        async with OneFile(tmp_path) as f:
            backend = f.reloaded

            async def refused() -> bool:
                return backend._last_error is not None and not backend._tasks

            assert await backend.acquire(OLD, "h", None) is not None
            waiter = asyncio.create_task(backend.wait(OLD, "w", None, 30, lambda: True))
            await f.until_waiting(["w"])
            f.locker.execute("BEGIN IMMEDIATE")  # the grant's write fails (busy)
            backend.reconfigure({"p": RAISED})
            await _until(refused)
            f.locker.execute("ROLLBACK")
            async with asyncio.timeout(5):
                assert await waiter is not None

    asyncio.run(scenario())


def test_a_lowered_maxlocks_holds_in_a_step_begun_before_the_reload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lease that ends in the next step of a runner begun before the reload
    (maxlocks 2 -> 1) hands its slot to nobody while the other holder holds."""
    # The write lock below is held past the lease's end: store calls wait for it.
    monkeypatch.setattr(sqlite_file, "BUSY_TIMEOUT_MS", 60_000)
    monkeypatch.setattr(shared, "CALL_TIMEOUT", 60.0)
    monkeypatch.setattr(steps, "STEP_TIMEOUT", 60.0)
    two, one = PoolSpec("p", maxlocks=2, expire=300), PoolSpec("p", maxlocks=1, expire=300)

    async def scenario() -> None:
        async with OneFile(tmp_path) as f:
            assert await f.reloaded.acquire(two, "h", None) is not None
            short = await f.reloaded.acquire(two, "s", 3)  # ends in 3 s
            assert short is not None
            waiter = asyncio.create_task(f.other.wait(two, "w", None, 30, lambda: True))
            await f.until_waiting(["w"])
            f.locker.execute("BEGIN IMMEDIATE")
            again = asyncio.create_task(f.reloaded.acquire(two, "h", None))
            await f.until_in_flight()  # read before s's lease ended
            for backend in (f.other, f.reloaded):
                backend.reconfigure({"p": one})
            await asyncio.sleep(max(0.0, short.expires_at + 0.3 - f.reloaded.store.now()))
            f.locker.execute("ROLLBACK")
            assert await again is not None
            await f.until_idle()
            assert await f.hosts("holders") == ["h"]
            assert await f.hosts("waiters") == ["w"]
            assert not waiter.done()

    asyncio.run(scenario())
