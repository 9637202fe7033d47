"""SIGTERM with a crowd parked: how long the server takes to stop, what the waiters hear.

    .venv/bin/python bench/stop_parked.py [--waiters 18000] [--timeout 120] [--json]

One in-memory server (``max_waiters_per_pool``, ``max_connections`` and
``max_connections_per_peer`` raised in its configuration file), a holder takes pool ``stop``, then W
clients, each on a connection of its own from 127.0.0.1, .2, ... (4,000 per
address), park on ``/wait/``. Once the server's queue (``/status?pool=``)
shows W, the server gets SIGTERM: reported are the time until it has
exited, its exit status, what the parked clients read before their
connection closed (an answer's first line, or nothing), and the server's
RSS with none and with all parked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from typing import Any

from _common import LOOPBACK, Server, emit, fmt_int, raise_nofile
from _crowd import read_answer, request

POOL = "stop"
PER_SOURCE = 4_000
CONNECT_WINDOW = 500


def _head(verb: str, host: str) -> bytes:
    return request(verb, POOL, host)


async def _ask(port: int, verb: str, host: str) -> bytes:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(_head(verb, host))
        return (await read_answer(reader))[0]
    finally:
        writer.close()


async def _queued(port: int) -> int:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(f"GET /status?pool={POOL} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        body, _ = await read_answer(reader)
    finally:
        writer.close()
    pool = json.loads(body)["pools"][0]
    for name in ("waiters_count", "waiting", "queue_length", "waiters_total"):
        if isinstance(pool.get(name), int):
            return int(pool[name])
    return sum(int(w.get("requests", 1)) for w in pool.get("waiters", []))


async def scenario(server: Server, waiters: int, timeout: float) -> dict[str, Any]:
    result: dict[str, Any] = {"waiters": waiters}
    assert await _ask(server.port, "get", "holder") == b"YES"
    result["rss_idle_kb"] = server.rss_kb()
    heard: Counter[str] = Counter()
    window = asyncio.Semaphore(CONNECT_WINDOW)
    readers: list[asyncio.Task[None]] = []
    writers: list[asyncio.StreamWriter] = []  # a writer collected closes its connection

    async def hear(reader: asyncio.StreamReader) -> None:
        try:
            data = await reader.read(200)
        except OSError as exc:
            heard[type(exc).__name__] += 1
            return
        heard[data.split(b"\r\n", 1)[0].decode(errors="replace") or "(closed, nothing)"] += 1

    async def park(i: int) -> None:
        async with window:
            source = f"127.0.0.{i // PER_SOURCE + 1}"
            reader, writer = await asyncio.open_connection(
                LOOPBACK, server.port, local_addr=(source, 0)
            )
            writer.write(_head("wait", f"w{i}"))
            await writer.drain()
        writers.append(writer)
        readers.append(asyncio.create_task(hear(reader)))

    t0 = time.monotonic()
    async with asyncio.timeout(timeout):
        await asyncio.gather(*(park(i) for i in range(waiters)))
        while (queued := await _queued(server.port)) < waiters:
            await asyncio.sleep(0.5)
    result["park_s"] = time.monotonic() - t0
    result["queued"] = queued
    await asyncio.sleep(1)
    result["rss_parked_kb"] = server.rss_kb()
    result["kib_per_waiter"] = (result["rss_parked_kb"] - result["rss_idle_kb"]) / waiters
    assert server.proc is not None
    t1 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    while server.proc.poll() is None and time.monotonic() - t1 < timeout:
        await asyncio.sleep(0.01)
    result["stop_s"] = time.monotonic() - t1
    result["exit_status"] = server.proc.poll()
    async with asyncio.timeout(timeout):
        await asyncio.gather(*readers)
    result["heard"] = dict(heard)
    return result


def run(waiters: int, timeout: float) -> dict[str, Any]:
    nofile = raise_nofile(waiters + 1024)
    state = tempfile.TemporaryDirectory(prefix="distributex-stop-")
    config = os.path.join(state.name, "server.yaml")
    cap = min(nofile - 200, waiters + 1000)
    with open(config, "w") as fh:
        fh.write(
            f"max_waiters_per_pool: {waiters + 1000}\n"
            f"max_connections: {cap}\nmax_connections_per_peer: {cap}\n"
            f"autocreate: true\npools:\n  - name: {POOL}\n    expire: 600\n"
        )
    server = Server(config=config, nofile=nofile).start()
    try:
        result = asyncio.run(scenario(server, waiters, timeout))
    finally:
        server.stop(timeout)
        state.cleanup()
    result["sources"] = math.ceil(waiters / PER_SOURCE)
    return result


def rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("parked waiters (sources)", f"{fmt_int(r['queued'])} ({r['sources']})"),
        ("parked in", f"{r['park_s']:.1f} s"),
        (
            "server RSS none -> parked (per waiter)",
            f"{r['rss_idle_kb'] / 1024:.1f} -> {r['rss_parked_kb'] / 1024:.1f} MiB "
            f"({r['kib_per_waiter']:.2f} KiB)",
        ),
        ("stopped after SIGTERM", f"{r['stop_s']:.2f} s, exit status {r['exit_status']}"),
        ("the parked clients heard", ", ".join(f"{v:,} x {k!r}" for k, v in r["heard"].items())),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--waiters", type=int, default=18_000)
    parser.add_argument("--timeout", type=float, default=120.0, help="bound on each phase (s)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.waiters, args.timeout)
    emit(result, rows(result), "stop_parked: SIGTERM with a crowd parked", args.json)
    return 0 if result["exit_status"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
