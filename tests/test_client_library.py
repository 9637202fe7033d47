"""The Python client library, blocking and asyncio, against real servers."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
from typing import Any

import pytest

from distributex.client import (
    AsyncClient,
    Cancelled,
    CancelToken,
    Client,
    LockLost,
    LockRefused,
    LockTimeout,
    ServerUnavailable,
)
from distributex.client.sync import parse_server

Server = Any  # conftest.Server

pytestmark = pytest.mark.timeout(60)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def client(server: Server, host: str = "me", **kw: Any) -> Client:
    return Client("127.0.0.1", server.port, host=host, **kw)


def aclient(server: Server, host: str = "me", **kw: Any) -> AsyncClient:
    return AsyncClient("127.0.0.1", server.port, host=host, **kw)


# -- blocking client -----------------------------------------------------------------------


def test_lock_holds_and_releases(server: Server) -> None:
    with client(server).lock("p") as lease:
        assert isinstance(lease.fence, int) and lease.fence > 0
        assert lease.token and lease.ttl == 1800
        assert server.call("/get/?host=other&pool=p").body == "NO"
        renewed = server.call(f"/renew/?host=me&pool=p&lease={lease.token}")
        assert renewed.status == 200
    assert lease.released and not lease.lost.is_set()
    assert server.call("/get/?host=other&pool=p").body == "YES"


def test_fences_increase(server: Server) -> None:
    c = client(server)
    with c.lock("p") as first:
        pass
    with c.lock("p") as second:
        pass
    assert second.fence > first.fence


def test_query_values_are_escaped(server: Server) -> None:
    name = "a pool&x=1/é"
    with client(server, host="h o+st").lock(name) as lease:
        assert server.call("/get/?host=other&pool=a%20pool%26x%3D1%2F%C3%A9").body == "NO"
        assert lease.pool == name


def test_exception_in_block_propagates_and_releases(server: Server) -> None:
    with pytest.raises(KeyError), client(server).lock("p"):
        raise KeyError("boom")
    assert server.call("/get/?host=other&pool=p").body == "YES"


def test_busy_and_timeout(server: Server) -> None:
    assert server.call("/get/?host=other&pool=p").body == "YES"
    c = client(server)
    with pytest.raises(LockTimeout, match="busy"), c.lock("p", wait=False):
        pass
    began = time.monotonic()
    with pytest.raises(LockTimeout, match=r"within 0\.5s"), c.lock("p", timeout=0.5):
        pass
    assert 0.4 < time.monotonic() - began < 3


def test_unbounded_wait_is_served_on_release(server: Server) -> None:
    assert server.call("/get/?host=other&pool=p").body == "YES"
    got: list[int] = []

    def waiter() -> None:
        with client(server).lock("p") as lease:
            got.append(lease.fence or 0)

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.5)
    assert not got
    server.call("/release/?host=other&pool=p")
    thread.join(5)
    assert got and got[0] > 0


def test_cancel_token_aborts_a_wait_and_leaves_the_queue(server: Server) -> None:
    assert server.call("/get/?host=other&pool=p").body == "YES"
    token = CancelToken()
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            client(server).acquire("p", cancel=token)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.4)
    token.cancel()
    thread.join(5)
    assert not thread.is_alive()
    assert errors and isinstance(errors[0], Cancelled)
    server.call("/release/?host=other&pool=p")
    assert server.call("/get/?host=third&pool=p").body == "YES"


def test_refused_carries_reason_and_status(server_factory) -> None:
    server = server_factory("pools:\n  - name: p1\n")
    with pytest.raises(LockRefused) as info, client(server).lock("nope"):
        pass
    assert info.value.status == 404
    assert "unknown pool" in info.value.reason


def test_unreachable_server() -> None:
    c = Client("127.0.0.1", free_port(), host="me", timeout=2)
    with pytest.raises(ServerUnavailable, match="connection refused"), c.lock("p"):
        pass


def test_renewal_keeps_a_short_lease(server_factory) -> None:
    server = server_factory("pools:\n  - name: p\n    expire: 1\n")
    with client(server).lock("p") as lease:
        assert lease.ttl == 1
        answers = []
        for _ in range(20):
            answers.append(server.call("/get/?host=other&pool=p").body)
            time.sleep(0.15)
        assert set(answers) == {"NO"}
        assert not lease.lost.is_set()


def test_lost_when_released_by_someone_else(server: Server) -> None:
    called: list[str] = []
    c = client(server)
    with (
        pytest.raises(LockLost, match="gone"),
        c.lock("p", ttl=1.5, on_lost=lambda le: called.append(le.pool)) as lease,
    ):
        assert server.call(f"/release/?host=me&pool=p&lease={lease.token}").body == "OK"
        assert lease.lost.wait(3), "renewal did not notice the lease is gone"
        assert "gone" in (lease.lost_reason or "")
    assert called == ["p"]


def test_lost_when_server_dies(server: Server) -> None:
    c = client(server, timeout=1)
    with pytest.raises(LockLost, match="unreachable"), c.lock("p", ttl=2) as lease:
        time.sleep(0.3)
        killed = time.monotonic()
        server.stop(signal.SIGKILL)
        assert lease.lost.wait(5)
        # declared lost before the server could have expired the lease
        assert time.monotonic() - killed < 2
        assert lease.lost_at is not None and lease.lost_at < lease.confirmed_until


def test_lost_is_raised_even_if_the_loss_went_unnoticed(server: Server) -> None:
    # A lease with no expiry is checked rarely; the GONE answer at release reveals the loss.
    with pytest.raises(LockLost, match="ended before"), client(server).lock("p") as lease:
        server.call(f"/release/?host=me&pool=p&lease={lease.token}")


def test_parse_server() -> None:
    assert parse_server("dx") == ("dx", 9889)
    assert parse_server("dx:1234") == ("dx", 1234)
    assert parse_server("dx:1234", 99) == ("dx", 99)
    assert parse_server("http://[::1]:80/") == ("::1", 80)
    # TLS: https:// names the same host and port (the scheme is split_server's).
    assert parse_server("https://dx:443") == ("dx", 443)
    with pytest.raises(ValueError):
        parse_server("ftp://dx")


# -- asyncio client ------------------------------------------------------------------------


def test_async_lock_holds_and_releases(server: Server) -> None:
    async def main() -> int:
        async with aclient(server) as c, c.lock("p") as lease:
            assert lease.token
            assert server.call("/get/?host=other&pool=p").body == "NO"
            return lease.fence or 0

    assert asyncio.run(main()) > 0
    assert server.call("/get/?host=other&pool=p").body == "YES"


def test_async_timeout_busy_refused_unavailable(server_factory) -> None:
    server = server_factory("pools:\n  - name: p\n")

    async def main() -> None:
        async with aclient(server, host="a") as a, aclient(server, host="b") as b:
            await a.acquire("p")
            with pytest.raises(LockTimeout):
                await b.acquire("p", wait=False)
            with pytest.raises(LockTimeout):
                await b.acquire("p", timeout=0.3)
            with pytest.raises(LockRefused):
                await b.acquire("other")
        async with AsyncClient("127.0.0.1", free_port(), timeout=1) as dead:
            with pytest.raises(ServerUnavailable):
                await dead.acquire("p")

    asyncio.run(main())


def test_async_renewal_and_lost(server_factory) -> None:
    server = server_factory("pools:\n  - name: p\n    expire: 1\n")
    lost: list[str] = []

    async def on_lost(lease: Any) -> None:
        lost.append(lease.lost_reason)

    async def main() -> None:
        async with aclient(server) as c:
            async with c.lock("p") as lease:
                for _ in range(10):  # 2 s on a 1 s lease: renewal keeps it
                    assert server.call("/get/?host=other&pool=p").body == "NO"
                    await asyncio.sleep(0.2)
            with pytest.raises(LockLost):
                async with c.lock("p", on_lost=on_lost) as lease:
                    server.call(f"/release/?host=me&pool=p&lease={lease.token}")
                    await asyncio.wait_for(lease.lost.wait(), 3)

    asyncio.run(main())
    assert lost and "gone" in lost[0]


def test_async_cancelled_waiter_leaves_the_queue(server: Server) -> None:
    assert server.call("/get/?host=other&pool=p").body == "YES"

    async def main() -> None:
        async with aclient(server) as c:
            task = asyncio.create_task(c.acquire("p"))
            await asyncio.sleep(0.4)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())
    time.sleep(0.2)
    server.call("/release/?host=other&pool=p")
    assert server.call("/get/?host=third&pool=p").body == "YES"


def test_shared_locks_from_the_library(server: Server) -> None:
    first, second, writer = client(server, "r1"), client(server, "r2"), client(server, "w")
    with first.lock("db", ttl=30, shared=True) as a, second.lock("db", ttl=30, shared=True) as b:
        assert (a.mode, b.mode) == ("shared", "shared")
        assert a.fence is not None and b.fence is not None and a.fence < b.fence
        with pytest.raises(LockTimeout):
            writer.acquire("db", wait=False)
    lease = writer.acquire("db", ttl=30)
    assert lease.mode == "exclusive"
    with pytest.raises(LockTimeout):
        first.acquire("db", wait=False, shared=True)
    writer.release(lease)


def test_shared_locks_from_the_asyncio_library(server: Server) -> None:
    async def main() -> None:
        async with aclient(server, "r1") as one, aclient(server, "r2") as two:
            a_lock, b_lock = (
                one.lock("db", ttl=30, shared=True),
                two.lock("db", ttl=30, shared=True),
            )
            async with a_lock as a, b_lock as b:
                assert (a.mode, b.mode) == ("shared", "shared")

    asyncio.run(main())
