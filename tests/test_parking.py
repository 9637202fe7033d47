"""Parked /wait/ requests on the in-memory backend: no task each, FIFO, timeouts, hang-ups.

The server runs in this process (real sockets on loopback) so that the
tasks of its loop can be counted: a fleet parks thousands of requests, and
each is meant to cost a future and its coroutine, not a task
(distributex.parking).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

from distributex import server
from distributex.backends.inmemory import InMemoryBackend

Client = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@asynccontextmanager
async def running() -> AsyncIterator[tuple[int, InMemoryBackend]]:
    config = server.resolve_config(server.build_parser().parse_args(["--port", "0"]))
    runner, backend = await server.start_server(config)
    assert isinstance(backend, InMemoryBackend)
    try:
        site = next(iter(runner.sites))
        port = urlsplit(site.name).port
        assert port is not None
        yield port, backend
    finally:
        await server.stop_server(runner, backend)


async def ask(client: Client, verb: str, host: str, extra: str = "") -> None:
    target = f"/{verb}/?host={host}&pool=p{extra}"
    client[1].write(f"GET {target} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    await client[1].drain()


async def answer(client: Client) -> str:
    async with asyncio.timeout(10):
        head = await client[0].readuntil(b"\r\n\r\n")
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        return (await client[0].readexactly(length)).decode()


async def until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "condition not met in 10 s"
        await asyncio.sleep(0.01)


def test_parked_waits_hold_no_task_and_are_granted_in_order() -> None:
    async def main() -> None:
        async with running() as (port, backend):
            holder = await asyncio.open_connection("127.0.0.1", port)
            await ask(holder, "get", "holder")
            assert await answer(holder) == "YES"
            tasks_before = len(asyncio.all_tasks())
            waiters = [await asyncio.open_connection("127.0.0.1", port) for _ in range(30)]
            for n, waiter in enumerate(waiters):
                await ask(waiter, "wait", f"w{n}")
                await until(lambda n=n: len(backend._parked) == n + 1)  # parked in this order
            # The clients' own stream tasks aside, nothing per parked request.
            assert len(asyncio.all_tasks()) - tasks_before < 5
            await ask(holder, "release", "holder")
            assert await answer(holder) == "OK"
            for n, waiter in enumerate(waiters):
                assert await answer(waiter) == "YES", n
                await ask(waiter, "release", f"w{n}")
                assert await answer(waiter) == "OK"
            for _, writer in [holder, *waiters]:
                writer.close()

    asyncio.run(main())


def test_a_parked_wait_times_out_and_leaves_the_queue() -> None:
    async def main() -> None:
        async with running() as (port, backend):
            holder = await asyncio.open_connection("127.0.0.1", port)
            await ask(holder, "get", "holder")
            assert await answer(holder) == "YES"
            waiter = await asyncio.open_connection("127.0.0.1", port)
            await ask(waiter, "wait", "late", "&timeout=0.2")
            assert await answer(waiter) == "NO"
            assert not backend._parked
            assert [w.owner for w in backend.engine.waiters_of("p")] == []
            for _, writer in (holder, waiter):
                writer.close()

    asyncio.run(main())


def test_a_client_that_hangs_up_while_parked_leaves_the_queue() -> None:
    async def main() -> None:
        async with running() as (port, backend):
            holder = await asyncio.open_connection("127.0.0.1", port)
            await ask(holder, "get", "holder")
            assert await answer(holder) == "YES"
            gone = await asyncio.open_connection("127.0.0.1", port)
            await ask(gone, "wait", "gone")
            await until(lambda: len(backend._parked) == 1)
            stays = await asyncio.open_connection("127.0.0.1", port)
            await ask(stays, "wait", "stays")
            await until(lambda: len(backend._parked) == 2)
            gone[1].close()
            await until(lambda: len(backend._parked) == 1)
            await ask(holder, "release", "holder")
            assert await answer(holder) == "OK"
            assert await answer(stays) == "YES"
            for _, writer in (holder, stays):
                writer.close()

    asyncio.run(main())
