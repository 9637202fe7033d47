"""The shared layer alone: the mutex fight on a backend in this process, no HTTP.

    .venv/bin/python bench/backend_alone.py [--backend redis|memcache] [--clients 50]
        [--duration 4] [--warmup 1] [--json]

N coroutines (default 50) in this process loop ``wait()`` -> ``release()``
on one ``SharedStateBackend`` (one server's worth) over a store started
here (redis-server or memcached from Debian's packages, on loopback), each
asking a 60 s lease as the HTTP benches do. No sockets to clients, no
request parsing, no answers, no log lines: what is left is the shared
layer's steps, the store client and the store's round trips. Reported:
grants/s, this process's CPU per grant (the store's own apart), store
commands per grant (Redis ``INFO commandstats``: a Lua compare-and-set is
one ``EVALSHA``), and the safety check of the HTTP benches on the fences
and hold intervals.

Set beside ``shared_mutex.py --servers 1`` (the same fight over HTTP,
same store), it splits a grant's server CPU into the shared layer's part
and the HTTP part.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

from _common import Grant, emit, fmt_int, safety_violations, use_uvloop
from shared_mutex import start_memcached, start_redis

from distributex.backends.base import LockBackend
from distributex.backends.memcache import MemcacheStore
from distributex.backends.redis import RedisStore
from distributex.backends.shared import SharedStateBackend
from distributex.engine import PoolSpec

LOOPBACK = "127.0.0.1"


async def _redis_commands(port: int) -> int:
    import redis.asyncio as aioredis

    client = aioredis.Redis(host=LOOPBACK, port=port)
    try:
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    # Redis counts the GET, SET and PUBLISH a script runs as commands too: left out.
    inside = ("cmdstat_get", "cmdstat_set", "cmdstat_publish", "cmdstat_info")
    return sum(v["calls"] for k, v in stats.items() if k not in inside)


async def fight(
    backend_name: str, port: int, clients: int, warmup: float, duration: float
) -> dict[str, Any]:
    backend: LockBackend
    if backend_name == "redis":
        backend = SharedStateBackend(
            RedisStore(f"redis://{LOOPBACK}:{port}/0", "bench/"), key_prefix="bench/"
        )
    else:
        backend = SharedStateBackend(MemcacheStore(LOOPBACK, port), advertise=LOOPBACK)
    await backend.start()
    spec = PoolSpec("fight")
    grants: list[Grant] = []
    stopping = False

    async def client(i: int) -> None:
        host = f"host{i}"
        while not stopping:
            sent = time.monotonic_ns()
            lease = await backend.wait(spec, host, 60, None, lambda: True)
            assert lease is not None
            yes = time.monotonic_ns()
            grants.append(Grant(i, spec.name, sent, yes, time.monotonic_ns(), lease.fence))
            await backend.release(spec, host, lease.token)

    tasks = [asyncio.create_task(client(i)) for i in range(clients)]
    try:
        await asyncio.sleep(warmup)
        commands0 = await _redis_commands(port) if backend_name == "redis" else 0
        n0, cpu0, wall0 = len(grants), time.process_time(), time.monotonic()
        await asyncio.sleep(duration)
        n, cpu, wall = len(grants) - n0, time.process_time() - cpu0, time.monotonic() - wall0
        commands = await _redis_commands(port) - commands0 if backend_name == "redis" else 0
    finally:
        stopping = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await backend.close()
    return {
        "backend": backend_name,
        "clients": clients,
        "grants_per_s": n / wall,
        "cpu_us_per_grant": cpu / n * 1e6 if n else float("nan"),
        "cpu_pct": cpu / wall * 100,
        "store_commands_per_grant": commands / n if n else float("nan"),
        "safety_violations": safety_violations(grants),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["redis", "memcache"], default="redis")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    use_uvloop(True)  # the server's default loop
    store, port = start_redis() if args.backend == "redis" else start_memcached()
    try:
        r = asyncio.run(fight(args.backend, port, args.clients, args.warmup, args.duration))
    finally:
        store.terminate()
        store.wait(10)
    violations = sum(r["safety_violations"].values())
    rows = [
        ("backend, clients", f"{r['backend']} (in process, no HTTP), {r['clients']}"),
        ("grants/s", fmt_int(r["grants_per_s"])),
        ("CPU per grant (this process)", f"{r['cpu_us_per_grant']:.0f} µs ({r['cpu_pct']:.0f} %)"),
    ]
    if args.backend == "redis":
        rows.append(("store commands per grant", f"{r['store_commands_per_grant']:.2f}"))
    rows.append(("safety violations", str(violations)))
    emit(r, rows, "backend_alone: the shared layer without HTTP", args.json)
    return 0 if violations == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
