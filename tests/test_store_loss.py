"""A store that lost its state, or a file that is not the one served from: never two holders.

A server that starts on an empty store cannot tell a new store from one that
forgot leases other servers' clients still hold: it waits for the live
servers (which record a loss within an epoch check) before it opens its port.
A SQLite file deleted or replaced under running servers is noticed (device
and inode) and taken as a loss. A server whose writes fail is unhealthy until
one succeeds.
"""

from __future__ import annotations

import json
import sqlite3
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Memcached, RedisServer, Server, start_memcached, start_redis, wait_until
from tests.test_http import q

pytestmark = pytest.mark.timeout(120)

EXPIRE = 10  # long enough for a server's start-up to fall inside it on a busy machine


@pytest.fixture
def mc() -> Iterator[Memcached]:
    server = start_memcached()
    yield server
    server.stop()


@pytest.fixture
def rs() -> Iterator[RedisServer]:
    server = start_redis()
    yield server
    server.stop()


def pools(expire: int = EXPIRE) -> str:
    return f"autocreate: true\npools:\n  - name: p\n    expire: {expire}\n"


def status_of(server: Server, pool: str) -> dict:
    with urllib.request.urlopen(f"{server.url}/status", timeout=10) as answer:
        found = json.load(answer)
    return next(p for p in found["pools"] if p["name"] == pool)


def healthz(server: Server) -> tuple[int, str]:
    answer = server.call("/healthz")
    return answer.status, answer.headers.get("X-Distributex-Reason", answer.body)


def no_grant_then_one(server: Server, other: Server, held_at: float) -> None:
    """While the old lease could live, neither server grants; later one does."""
    answers = [server.call(q("get", "b", "p")).body, other.call(q("get", "b", "p")).body]
    # Meaningful only inside the old lease's life (a very slow start could pass it).
    assert time.monotonic() - held_at < EXPIRE, "the check came after the old lease ended"
    assert "YES" not in answers, "granted while the old lease could still be live"
    assert status_of(server, "p")["blocked_until"] is not None, "the hold is not shown"
    wait_until(lambda: server.call(q("get", "b", "p")).body == "YES", EXPIRE + 10, "granted")


@pytest.mark.parametrize("store", ["redis", "memcache"])
def test_a_server_started_after_the_store_lost_its_state_grants_nothing_at_once(
    request: pytest.FixtureRequest, server_factory, store: str
) -> None:
    # A holds through s1; the store restarts empty; then s5 starts (a rolling
    # restart): s5 must not take the empty store for a new one.
    if store == "redis":
        rs: RedisServer = request.getfixturevalue("rs")
        head = f"backend: redis\nredis_url: {rs.url}\n"
        restart: Callable[[], None] = rs.start
    else:
        mc: Memcached = request.getfixturevalue("mc")
        head = f"backend: memcache\nmemcachehost: 127.0.0.1\nmemcacheport: {mc.port}\n"
        restart = mc.start
    first: Server = server_factory(head + pools())
    assert first.call(q("get", "a", "p")).body == "YES"
    held_at = time.monotonic()
    restart()
    late: Server = server_factory(head + pools())
    no_grant_then_one(late, first, held_at)
    assert "lost its state" in first.log.read_text() + late.log.read_text()


def test_a_brand_new_store_grants_as_soon_as_the_port_opens(
    rs: RedisServer, server_factory
) -> None:
    # Nothing to wait for that a client could meet: the first answer is a grant.
    server: Server = server_factory(f"backend: redis\nredis_url: {rs.url}\n" + pools())
    assert server.call(q("get", "a", "p")).body == "YES"
    assert status_of(server, "p")["blocked_until"] is None
    assert "lost its state" not in server.log.read_text()


def test_sqlite_file_deleted_under_two_servers_is_a_loss_not_two_holders(
    tmp_path: Path, server_factory
) -> None:
    path = tmp_path / "state.db"
    config = f"backend: sqlite\nsqlite_path: {path}\n" + pools()
    first: Server = server_factory(config)
    second: Server = server_factory(config)
    assert first.call(q("get", "a", "p")).body == "YES"
    held_at = time.monotonic()
    for file in tmp_path.glob("state.db*"):
        file.unlink()
    second.stop()
    second = server_factory(config)  # restarted: it finds no file and makes one
    no_grant_then_one(second, first, held_at)
    # Both serve the one file now: they agree on the holder.
    holders = [
        [(h["host"], h["fence"]) for h in status_of(s, "p")["holders"]] for s in (first, second)
    ]
    assert holders[0] == holders[1] == [holders[0][0]]
    assert "was deleted while in use" in first.log.read_text()


def test_sqlite_file_replaced_is_answered_503_with_the_reason(
    tmp_path: Path, server_factory
) -> None:
    path = tmp_path / "state.db"
    config = f"backend: sqlite\nsqlite_path: {path}\n" + pools() + "  - name: idle\n"
    server: Server = server_factory(config)
    assert server.call(q("get", "a", "p")).body == "YES"
    copy = tmp_path / "copy.db"
    with sqlite3.connect(path) as src, sqlite3.connect(copy) as dst:
        src.backup(dst)  # a copy that holds the same epoch and records
    copy.replace(path)
    answer = server.call(q("get", "b", "other"))
    assert answer.status == 503
    assert "replaced" in answer.headers["X-Distributex-Reason"]
    # The copy's records are not what clients were told: a loss, held as one.
    assert server.call(q("get", "b", "idle")).body == "NO"
    assert status_of(server, "idle")["blocked_until"] is not None


def test_healthz_is_503_after_a_failed_write_until_one_succeeds(
    tmp_path: Path, server_factory
) -> None:
    path = tmp_path / "state.db"
    server: Server = server_factory(f"backend: sqlite\nsqlite_path: {path}\n" + pools())
    assert healthz(server)[0] == 200
    locker = sqlite3.connect(path, isolation_level=None, timeout=10)
    locker.execute("BEGIN IMMEDIATE")  # reads still work; every write times out
    try:
        assert server.call(q("get", "a", "p")).status == 503
        status, reason = healthz(server)
        assert status == 503, "healthy while every grant fails"
        assert "writes fail" in reason
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    wait_until(lambda: healthz(server)[0] == 200, 10, "healthy again once a write succeeds")
    assert server.call(q("get", "a", "p")).body == "YES"
