"""A crowd of parked waiters, run from this process or from helper processes.

One process may hold about 19,000 open sockets here (the hard open-files
limit is 20,000 and cannot be raised), so a crowd of 20,000 is split over
load generators: generator 0 is the calling process, the others are child
processes driven over a pipe. Every generator parks its share, hangs up the
waiters it is told to and reports what each of its waiters saw; the times are
``time.monotonic_ns()``, one clock for every process on the machine, so the
shares merge into one history.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from multiprocessing.connection import Connection
from typing import Any

from _common import LOOPBACK, raise_nofile

CONNECT_WINDOW = 500  # connections being opened at once per generator (the backlog is 4096)
PER_SOURCE = 10_000  # waiters per source address (ephemeral ports per address and server)


@dataclass
class Waiter:
    """One parked client and what it saw (monotonic ns)."""

    index: int
    server: int
    generator: int = 0  # the process that parks it
    written_ns: int = 0  # /wait/ written to the socket
    yes_ns: int = 0
    release_ns: int = 0
    fence: int = 0
    answer: str = ""
    released: bool = False


_SEEN = [f.name for f in fields(Waiter)]


async def read_answer(reader: asyncio.StreamReader) -> tuple[bytes, str | None]:
    """(body, fence); an answer with a reason comes back as ``body (reason)``."""
    head = await reader.readuntil(b"\r\n\r\n")
    length, fence, reason = 0, None, None
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"x-distributex-fence":
            fence = value.strip().decode()
        elif name == b"x-distributex-reason":
            reason = value.strip()
    body = await reader.readexactly(length)
    if reason is not None and fence is None:
        return body + b" (" + reason + b")", None
    return body, fence


def request(verb: str, pool: str, host: str, extra: str = "") -> bytes:
    target = f"/{verb}/?host={host}&pool={pool}{extra}"
    return f"GET {target} HTTP/1.1\r\nHost: {LOOPBACK}\r\n\r\n".encode()


@dataclass
class Plan:
    """What a generator needs to park its share: plain data, so it pickles."""

    pool: str
    ports: list[int]  # one per server; waiter.server indexes it
    sources: int  # 127.0.0.x source addresses in use
    ttl: int
    nofile: int


class Crowd:
    """The waiters this process parks; each releases on the YES it gets."""

    def __init__(self, plan: Plan, waiters: Iterable[Waiter]) -> None:
        self.plan = plan
        self.waiters = {w.index: w for w in waiters}
        self._writers: dict[int, asyncio.StreamWriter] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}

    async def park(self) -> None:
        """Open every connection and write its /wait/ (returns once all are written)."""
        opened = asyncio.Semaphore(CONNECT_WINDOW)
        for waiter in self.waiters.values():
            await opened.acquire()
            self._tasks[waiter.index] = asyncio.create_task(self._run(waiter, opened))
        for _ in range(CONNECT_WINDOW):  # the last connections are written too
            await opened.acquire()

    async def _run(self, waiter: Waiter, opened: asyncio.Semaphore) -> None:
        plan = self.plan
        # Each server sees every source address (one peer may hold half its cap).
        source = f"127.0.0.{1 + (waiter.index // len(plan.ports)) % plan.sources}"
        host = f"w{waiter.index}"
        writer = None
        try:
            reader, writer = await asyncio.open_connection(
                LOOPBACK, plan.ports[waiter.server], local_addr=(source, 0)
            )
            self._writers[waiter.index] = writer
            writer.write(request("wait", plan.pool, host, f"&ttl={plan.ttl}"))
            await writer.drain()
            waiter.written_ns = time.monotonic_ns()
        except OSError as exc:
            waiter.answer = f"(connect: {exc})"
        finally:
            opened.release()
        if writer is None:
            return
        try:
            body, fence = await read_answer(reader)
            waiter.yes_ns = time.monotonic_ns()
            waiter.answer = body.decode(errors="replace")
            if body != b"YES" or fence is None:
                return
            waiter.fence = int(fence)
            waiter.release_ns = time.monotonic_ns()
            writer.write(request("release", plan.pool, host))
            body, _ = await read_answer(reader)
            waiter.released = body == b"OK"
        except (OSError, asyncio.IncompleteReadError) as exc:
            waiter.answer = waiter.answer or f"(connection: {type(exc).__name__})"
        finally:
            writer.close()

    def hang_up(self, indices: Iterable[int]) -> int:
        """Abort the connections of those waiters that are this crowd's; how many."""
        count = 0
        for index in indices:
            writer = self._writers.get(index)
            if writer is not None:
                writer.transport.abort()
                count += 1
        return count

    async def finish(self, bound: float, skip: Sequence[int] = ()) -> int:
        """Wait for every waiter not in ``skip`` to be served; how many are still waiting."""
        gone = set(skip)
        pending = [t for i, t in self._tasks.items() if i not in gone]
        if not pending:
            return 0
        _done, still = await asyncio.wait(pending, timeout=bound)
        return len(still)

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        for writer in self._writers.values():
            writer.transport.abort()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    def seen(self) -> list[dict[str, Any]]:
        return [{name: getattr(w, name) for name in _SEEN} for w in self.waiters.values()]


# -- a generator in a child process --------------------------------------------------------


def _child(conn: Connection, plan: Plan, waiters: list[Waiter]) -> None:
    raise_nofile(plan.nofile)
    asyncio.run(_serve(conn, Crowd(plan, waiters)))


async def _serve(conn: Connection, crowd: Crowd) -> None:
    try:
        while True:
            command, argument = await asyncio.to_thread(conn.recv)
            if command == "park":
                await crowd.park()
                conn.send(None)
            elif command == "hang_up":
                conn.send(crowd.hang_up(argument))
            elif command == "finish":
                bound, skip = argument
                conn.send(await crowd.finish(bound, skip))
            elif command == "seen":
                conn.send(crowd.seen())
            else:  # "close"
                break
    finally:
        await crowd.close()
        conn.send(None)


class RemoteCrowd:
    """A crowd parked by a child process; the same verbs as ``Crowd``, awaited over a pipe."""

    def __init__(self, plan: Plan, waiters: list[Waiter]) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, theirs = context.Pipe()
        self._process = context.Process(target=_child, args=(theirs, plan, waiters), daemon=True)
        self._process.start()
        theirs.close()
        self._lock = asyncio.Lock()

    async def _ask(self, command: str, argument: Any = None) -> Any:
        async with self._lock:
            self._conn.send((command, argument))
            return await asyncio.to_thread(self._conn.recv)

    async def park(self) -> None:
        await self._ask("park")

    async def hang_up(self, indices: Iterable[int]) -> int:
        return int(await self._ask("hang_up", list(indices)))

    async def finish(self, bound: float, skip: Sequence[int] = ()) -> int:
        return int(await self._ask("finish", (bound, list(skip))))

    async def seen(self) -> list[dict[str, Any]]:
        return list(await self._ask("seen"))

    async def close(self) -> None:
        with contextlib.suppress(OSError, EOFError):
            await asyncio.wait_for(self._ask("close"), 30)
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)


class Crowds:
    """Every generator's crowd as one: waiter i is parked by generator (i // servers) % G."""

    def __init__(self, plan: Plan, waiters: list[Waiter], generators: int) -> None:
        servers = len(plan.ports)
        shares: list[list[Waiter]] = [[] for _ in range(generators)]
        for waiter in waiters:
            waiter.generator = (waiter.index // servers) % generators
            shares[waiter.generator].append(waiter)
        self.waiters = waiters
        self.local = Crowd(plan, shares[0])
        self.remote = [RemoteCrowd(plan, share) for share in shares[1:]]

    async def park(self) -> None:
        await asyncio.gather(self.local.park(), *(r.park() for r in self.remote))

    async def hang_up(self, indices: Sequence[int]) -> int:
        counts = await asyncio.gather(*(r.hang_up(indices) for r in self.remote))
        return self.local.hang_up(indices) + sum(counts)

    async def finish(self, bound: float, skip: Sequence[int] = ()) -> int:
        """Wait until every waiter not in ``skip`` is served (bounded); how many are not."""
        counts = await asyncio.gather(
            self.local.finish(bound, skip), *(r.finish(bound, skip) for r in self.remote)
        )
        return sum(counts)

    async def gather_seen(self) -> None:
        """Copy what the child processes' waiters saw into ``self.waiters``."""
        by_index = {w.index: w for w in self.waiters}
        for remote in self.remote:
            for seen in await remote.seen():
                waiter = by_index[seen["index"]]
                for name, value in seen.items():
                    setattr(waiter, name, value)

    async def close(self) -> None:
        await asyncio.gather(self.local.close(), *(r.close() for r in self.remote))
