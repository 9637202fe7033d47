"""Load-generator plumbing shared by the closed-loop benchmarks.

The coordinating process starts the server, then runs the clients in one or
more worker processes (``--procs``) so the load generator can use more than
one core. All processes agree on absolute ``time.monotonic_ns()`` instants
(CLOCK_MONOTONIC is system-wide on Linux): the clients start at ``start_ns``,
the measured window is ``[window_ns[0], window_ns[1])`` and clients stop
issuing requests at the end of the window. The coordinator reads the server's
CPU time at the window's edges; each worker reads its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from _common import FENCE_HEADER, Server, start_py_spy, summarize_profile
from yarl import URL

# One client: (client index, measured window (start_ns, end_ns), record) -> None.
# It stops issuing requests at the end of the window.
ClientLoop = Callable[[int, tuple[int, int], "WorkerStats"], Awaitable[None]]


@dataclass
class WorkerStats:
    """What one worker process saw; plain data so it pickles back cheaply."""

    grants: list[tuple[int, str, int, int, int, int]]  # Grant fields
    counters: dict[str, int]
    cpu_window_s: float = 0.0
    late_start_ms: float = 0.0

    def count(self, name: str, by: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + by


class RawHTTP:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams (``--client raw``).

    Only for measuring how much of the load generator's cost is aiohttp's: it
    sends pre-built GET requests and reads Content-Length bodies, nothing else.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, target: str) -> tuple[bytes, str | None]:
        """GET ``target`` (path and query); returns (body, X-Distributex-Fence or None)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        self.writer.write(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        length, fence = 0, None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"x-distributex-fence":
                fence = value.strip().decode()
        return await self.reader.readexactly(length), fence

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()


class AiohttpClient:
    """One aiohttp session with one keep-alive connection, same interface as RawHTTP."""

    def __init__(self, port: int, timeout: float = 60.0) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1),
            timeout=aiohttp.ClientTimeout(total=timeout),
        )
        self._urls: dict[str, URL] = {}

    async def get(self, target: str) -> tuple[bytes, str | None]:
        """GET ``target`` (path and query); returns (body, X-Distributex-Fence or None)."""
        url = self._urls.get(target)
        if url is None:
            url = self._urls[target] = URL(self.base + target, encoded=True)
        async with self.session.get(url) as resp:
            return await resp.read(), resp.headers.get(FENCE_HEADER)

    async def close(self) -> None:
        await self.session.close()


def make_client(kind: str, port: int) -> RawHTTP | AiohttpClient:
    """A one-connection client: ``aiohttp`` (the default) or ``raw``."""
    return RawHTTP(port) if kind == "raw" else AiohttpClient(port)


def machine_busy_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks over all CPUs, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    total = sum(fields[:8])
    return total - idle, total


async def _sleep_until(instant_ns: int) -> None:
    delay = (instant_ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        await asyncio.sleep(delay)


async def run_worker_async(
    make_loop: Callable[[WorkerStats], Awaitable[tuple[ClientLoop, Callable[[], Awaitable[None]]]]],
    clients: list[int],
    start_ns: int,
    window_ns: tuple[int, int],
) -> WorkerStats:
    """Run ``clients`` in this process; ``make_loop`` sets up sessions, returns (loop, close)."""
    stats = WorkerStats(grants=[], counters={})
    client_loop, close = await make_loop(stats)

    async def measure_cpu() -> None:
        await _sleep_until(window_ns[0])
        begin = time.process_time()
        await _sleep_until(window_ns[1])
        stats.cpu_window_s = time.process_time() - begin

    try:
        await _sleep_until(start_ns)
        stats.late_start_ms = max(0.0, (time.monotonic_ns() - start_ns) / 1e6)
        meter = asyncio.create_task(measure_cpu())
        await asyncio.gather(*(client_loop(i, window_ns, stats) for i in clients))
        await meter
    finally:
        await close()
    return stats


@dataclass
class Window:
    """Figures of the measured window, read by the coordinator."""

    seconds: float
    server_cpu_s: float
    machine_busy_pct: float
    start_ns: int
    end_ns: int


def run_closed_loop(
    server: Server,
    worker: Callable[..., WorkerStats],
    worker_args: tuple[Any, ...],
    clients: int,
    procs: int,
    duration: float,
    warmup: float,
    profile: str | None = None,
) -> tuple[list[WorkerStats], Window]:
    """Spread ``clients`` over ``procs`` worker processes; measure one window.

    ``worker(clients, start_ns, window_ns, *worker_args)`` runs in each worker.
    With ``profile``, py-spy samples the server during the window into that
    file (collapsed stacks); the sampling costs some CPU, so figures of a
    profiled run are not the benchmark's figures.
    """
    ctx = multiprocessing.get_context("spawn")
    shares = [list(range(clients))[p::procs] for p in range(procs)]
    with ProcessPoolExecutor(max_workers=procs, mp_context=ctx) as pool:
        # Let the workers start (and import aiohttp) before the clock starts.
        list(pool.map(_noop, range(procs)))
        start_ns = time.monotonic_ns() + 500_000_000
        window = (start_ns + int(warmup * 1e9), start_ns + int((warmup + duration) * 1e9))
        futures = [pool.submit(worker, share, start_ns, window, *worker_args) for share in shares]
        _sleep_until_sync(window[0])
        cpu0, busy0 = server.cpu_seconds(), machine_busy_ticks()
        spy = start_py_spy(server.pid, duration, profile) if profile else None
        _sleep_until_sync(window[1])
        cpu1, busy1 = server.cpu_seconds(), machine_busy_ticks()
        results = [f.result(timeout=duration + 60) for f in futures]
        if spy is not None:
            spy.wait(30)
            print(summarize_profile(profile), file=sys.stderr)  # type: ignore[arg-type]
    busy = busy1[0] - busy0[0]
    total = busy1[1] - busy0[1]
    return results, Window(
        seconds=(window[1] - window[0]) / 1e9,
        server_cpu_s=cpu1 - cpu0,
        machine_busy_pct=100.0 * busy / total if total else float("nan"),
        start_ns=window[0],
        end_ns=window[1],
    )


def other_cpu_pct(window: Window, results: list[WorkerStats]) -> float:
    """CPU used by processes other than the server and the load generator (% of a core)."""
    all_pct = window.machine_busy_pct * (os.cpu_count() or 1)
    ours = 100 * (window.server_cpu_s + sum(r.cpu_window_s for r in results)) / window.seconds
    return max(0.0, all_pct - ours)


def _noop(_: int) -> None:
    import aiohttp  # noqa: F401  (warm the import)


def _sleep_until_sync(instant_ns: int) -> None:
    delay = (instant_ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        time.sleep(delay)
