"""Compare-and-set on Redis two ways: the redis backend's Lua script, and WATCH/MULTI.

Starts redis-server (Debian's package) on a free loopback port; C asyncio
tasks each write one pool-sized record (400 bytes) by compare-and-set, as the
shared-state layer does: read the version, write if unchanged, read again
on a conflict. Reported for each way: successful writes/s, round trips per
write, conflicts per write and Redis CPU per write.

    .venv/bin/python bench/redis_cas.py [--writers 1,8] [--duration 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import WatchError

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from _common import emit, fmt_int, proc_cpu_seconds
from shared_mutex import start_redis

from distributex.backends.redis import CAS_SCRIPT, VERSION_LENGTH, _new_version

VALUE = b"x" * 400


async def lua_writer(client: Any, script: Any, stop: float, stats: dict[str, int]) -> None:
    key = "bench:cas"
    version = None
    while time.monotonic() < stop:
        if version is None:
            raw = await client.get(key)
            stats["trips"] += 1
            version = raw[:VERSION_LENGTH].decode() if raw else ""
        new = _new_version()
        done = await script(keys=[key], args=[version, new, VALUE, 0])
        stats["trips"] += 1
        if isinstance(done, list):  # refused, with what is stored now: no read needed
            stats["conflicts"] += 1
            version = done[0][:VERSION_LENGTH].decode()
        elif done:
            stats["writes"] += 1
            version = new  # as the layer does: no read before the next write
        else:
            stats["conflicts"] += 1
            version = None


async def watch_writer(client: Any, stop: float, stats: dict[str, int]) -> None:
    key = "bench:watch"
    while time.monotonic() < stop:
        async with client.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(key)
                await pipe.get(key)  # WATCH and GET: two round trips
                pipe.multi()
                pipe.set(key, _new_version().encode() + VALUE)
                await pipe.execute()  # MULTI, SET, EXEC in one
                stats["trips"] += 3
                stats["writes"] += 1
            except WatchError:
                stats["trips"] += 3
                stats["conflicts"] += 1


async def run(port: int, way: str, writers: int, duration: float, pid: int) -> dict[str, float]:
    client = aioredis.Redis(port=port, max_connections=writers + 2)
    script = client.register_script(CAS_SCRIPT)
    await client.delete("bench:cas", "bench:watch")
    stats = {"writes": 0, "trips": 0, "conflicts": 0}
    cpu0 = proc_cpu_seconds(pid)
    stop = time.monotonic() + duration
    if way == "lua":
        tasks = [lua_writer(client, script, stop, stats) for _ in range(writers)]
    else:
        tasks = [watch_writer(client, stop, stats) for _ in range(writers)]
    await asyncio.gather(*tasks)
    cpu = proc_cpu_seconds(pid) - cpu0
    await client.aclose()
    writes = max(1, stats["writes"])
    return {
        "writes_per_s": stats["writes"] / duration,
        "trips_per_write": stats["trips"] / writes,
        "conflicts_per_write": stats["conflicts"] / writes,
        "redis_cpu_us_per_write": cpu / writes * 1e6,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writers", default="1,8")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    proc, port = start_redis()
    rows: dict[str, Any] = {}
    table = []
    try:
        for writers in (int(w) for w in args.writers.split(",")):
            for way in ("lua", "watch"):
                got = asyncio.run(run(port, way, writers, args.duration, proc.pid))
                rows[f"{way}_{writers}"] = got
                table.append(
                    (
                        f"{way}, {writers} writer(s)",
                        f"{fmt_int(got['writes_per_s'])} writes/s, "
                        f"{got['trips_per_write']:.2f} trips, "
                        f"{got['conflicts_per_write']:.2f} conflicts, "
                        f"redis {got['redis_cpu_us_per_write']:.0f} µs per write",
                    )
                )
    finally:
        proc.terminate()
        proc.wait(10)
    emit(rows, table, "redis compare-and-set: Lua vs WATCH/MULTI", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
