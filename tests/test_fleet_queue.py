"""A queue longer than a pool's record holds: its tail lives in pages (backends/pages.py).

Hundreds of waiters (several pages) park on one pool across two servers on
each shared store, in batches whose arrival is confirmed before the next
(/status counts every wait, listed or on pages); some hang up from the
middle; then the queue drains, each waiter releasing as soon as it is
granted. The drain must grant every waiter still there once, in arrival
order by batch, with fences that go up, and none of those that hung up.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.request

import pytest

from tests.conftest import Cluster, Server, wait_until
from tests.test_http import q

pytestmark = pytest.mark.timeout(300)

WAITERS = 600  # window (128) + about four pages (128 each)
BATCH = 100
GONE = range(200, 300)  # hang up together while on pages (behind the window)


@pytest.fixture(params=["sqlite", "memcache", "redis", "etcd"])
def backend_name(request: pytest.FixtureRequest) -> str:
    return request.param


def waiting(server: Server) -> int:
    with urllib.request.urlopen(f"{server.url}/status", timeout=10) as answer:
        pool = json.load(answer)["pools"][0]
    assert pool["waiting"] == sum(w["requests"] for w in pool["waiters"]) + pool["more_waiting"]
    return pool["waiting"]


async def park(server: Server, host: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    path = f"/wait/?host={host}&pool=p&timeout=240"
    writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


async def answer(reader: asyncio.StreamReader) -> tuple[str, dict[str, str]]:
    status = await reader.readline()
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status.decode() + body.decode(), headers


def test_a_long_queue_drains_in_order_across_pages(cluster_factory) -> None:
    cluster: Cluster = cluster_factory("autocreate: true\npools:\n  - name: p\n    expire: 300\n")
    servers = cluster.servers
    first = servers[0]
    assert first.call(q("get", "holder", "p")).body == "YES"

    async def run() -> list[tuple[int, int]]:
        parked = {}
        for start in range(0, WAITERS, BATCH):
            for i in range(start, start + BATCH):
                parked[i] = await park(servers[i % len(servers)], f"w{i}")
            await asyncio.to_thread(
                wait_until, lambda n=start + BATCH: waiting(first) == n, 60, "batch queued"
            )
        for i in GONE:  # hang-ups from the middle of the queue
            parked.pop(i)[1].close()
        await asyncio.to_thread(
            wait_until, lambda: waiting(first) == WAITERS - len(GONE), 60, "hang-ups left"
        )
        granted: list[tuple[int, int]] = []  # (fence, waiter)

        async def drain(i: int) -> None:
            reader, writer = parked[i]
            text, headers = await answer(reader)
            assert "YES" in text, (i, text)
            granted.append((int(headers["x-distributex-fence"]), i))
            lease = headers["x-distributex-lease"]
            server = servers[i % len(servers)]
            await asyncio.to_thread(server.call, q("release", f"w{i}", "p", f"&lease={lease}"))
            writer.close()

        tasks = [asyncio.ensure_future(drain(i)) for i in parked]
        assert first.call(q("release", "holder", "p")).body == "OK"
        await asyncio.wait_for(asyncio.gather(*tasks), 200)
        return granted

    granted = asyncio.run(run())
    assert len(granted) == WAITERS - len(GONE)
    assert not {i for _fence, i in granted} & set(GONE)
    order = [i for _fence, i in sorted(granted)]
    batches = [i // BATCH for i in order]
    assert batches == sorted(batches), "a later batch was granted before an earlier one"
    assert len({fence for fence, _i in granted}) == len(granted)


def test_a_long_queue_of_a_killed_server_is_dropped_and_the_rest_drains(
    cluster_factory, backend_name: str
) -> None:
    if backend_name == "sqlite":
        pytest.skip("one process per file in this test; the sqlite case is the drain above")
    cluster: Cluster = cluster_factory("autocreate: true\npools:\n  - name: p\n    expire: 300\n")
    live, doomed = cluster.servers[0], cluster.servers[1]
    assert live.call(q("get", "holder", "p")).body == "YES"

    async def run() -> int:
        parked = {}
        for i in range(400):  # most of them on the server that dies, on pages
            server = doomed if i % 4 else live
            parked[i] = (server, await park(server, f"w{i}"))
        await asyncio.to_thread(wait_until, lambda: waiting(live) == 400, 60, "queued")
        doomed.stop(signal.SIGKILL)
        mine = {i: conn for i, (server, conn) in parked.items() if server is live}
        granted = 0

        async def drain(i: int) -> None:
            nonlocal granted
            reader, writer = mine[i]
            text, headers = await answer(reader)
            assert "YES" in text, (i, text)
            granted += 1
            lease = headers["x-distributex-lease"]
            await asyncio.to_thread(live.call, q("release", f"w{i}", "p", f"&lease={lease}"))
            writer.close()

        tasks = [asyncio.ensure_future(drain(i)) for i in mine]
        assert live.call(q("release", "holder", "p")).body == "OK"
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
        return granted

    assert asyncio.run(run()) == 100  # every live waiter, none of the dead server's


def test_sigterm_with_a_long_queue_answers_every_waiter_and_stops_within_seconds(
    cluster_factory,
) -> None:
    cluster: Cluster = cluster_factory(
        "autocreate: true\npools:\n  - name: p\n    expire: 300\n", servers=1
    )
    server = cluster.servers[0]
    assert server.call(q("get", "holder", "p")).body == "YES"

    async def run() -> list[str]:
        parked = [await park(server, f"w{i}") for i in range(500)]
        await asyncio.to_thread(wait_until, lambda: waiting(server) == 500, 60, "queued")
        began = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        answers = await asyncio.wait_for(
            asyncio.gather(*(answer(reader) for reader, _writer in parked)), 30
        )
        await asyncio.to_thread(server.proc.wait, 30)
        assert time.monotonic() - began < 10, "slow to stop with a long queue"
        return [text for text, _headers in answers]

    assert all("UNAVAILABLE" in text for text in asyncio.run(run()))
