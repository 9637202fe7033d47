"""N clients spread over several servers that share one backend fight for one mutex.

Starts memcached (Debian's package) on a free loopback port and S distributexd
servers with ``backend: memcache`` on it (or, with ``--backend inmemory``, one
inmemory server, for the same load in the same run). Client i talks to server
i mod S and loops /wait/ -> YES -> /release/. Reported: grants/s; wait latency
p50/p99 (sending /wait/ to YES); Jain's fairness index over clients; hand-off
latency (a release sent -> the next holder's YES) for hand-offs within one
server and across servers; CPU per grant of the servers and of memcached; and
safety over every grant (fences strictly increase in grant order, hold
intervals never overlap). Exit status 1 on a violation.

With ``--backend redis`` (three servers by default) it starts redis-server
(Debian's package) instead, and after the distributex run, on the same Redis,
runs the same clients through redis-py's own ``Lock`` (redis.asyncio.lock:
``SET NX PX``, polling every ``--lock-sleep`` seconds; redis-py's default is
0.1) for the same time: grants/s, waits, fairness, hand-off and Redis CPU
per grant side by side.

    .venv/bin/python bench/shared_mutex.py [--backend memcache|redis|sqlite|inmemory]
        [--servers N] [--clients 50] [--duration 10] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import itertools
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import aiohttp
from _common import (
    LOOPBACK,
    Grant,
    Server,
    emit,
    fmt_int,
    fmt_ms,
    free_port,
    jain,
    percentile,
    proc_cpu_seconds,
    safety_violations,
)

POOL = "fight"


def start_redis() -> tuple[subprocess.Popen[bytes], int]:
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    cmd = ["redis-server", "--port", str(port), "--bind", LOOPBACK, "--save", ""]
    # A folder of its own: Redis loads a dump.rdb it finds in its folder at start.
    folder = tempfile.mkdtemp(prefix="distributex-bench-redis-")
    atexit.register(shutil.rmtree, folder, True)
    cmd += ["--appendonly", "no", "--dir", folder]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection((LOOPBACK, port), timeout=0.5).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    sys.exit("redis-server did not start")


async def redis_lock_loop(
    index: int,
    client: Any,
    sleep: float,
    window: tuple[float, float],
    grants: list[tuple[Grant, int]],
    waits: list[float],
    counts: list[int],
) -> None:
    """One contender on redis-py's own Lock: acquire (blocking), release, again."""
    lock = client.lock(f"bench:{POOL}", timeout=30, sleep=sleep)
    fence = itertools.count()
    while time.monotonic() < window[1]:
        sent = time.monotonic_ns()
        await lock.acquire()
        yes = time.monotonic_ns()
        # redis-py's Lock has no fencing token: the grant order stands in for it.
        grants.append((Grant(index, POOL, sent, yes, time.monotonic_ns(), next(fence)), index))
        if window[0] <= yes / 1e9 <= window[1]:
            waits.append((yes - sent) / 1e9)
            counts[index] += 1
        await lock.release()


async def redis_lock_load(
    port: int, clients: int, warmup: float, duration: float, sleep: float
) -> dict[str, Any]:
    import redis.asyncio as aioredis

    grants: list[tuple[Grant, int]] = []
    waits: list[float] = []
    counts = [0] * clients
    start = time.monotonic()
    window = (start + warmup, start + warmup + duration)
    client = aioredis.Redis(host=LOOPBACK, port=port, max_connections=clients + 4)
    try:
        await asyncio.gather(
            *(
                redis_lock_loop(i, client, sleep, window, grants, waits, counts)
                for i in range(clients)
            )
        )
    finally:
        await client.aclose()
    return {"grants": grants, "waits": sorted(waits), "counts": counts}


def start_memcached() -> tuple[subprocess.Popen[bytes], int]:
    if shutil.which("memcached") is None:
        sys.exit("memcached is not installed (apt-get install memcached)")
    port = free_port()
    cmd = ["memcached", "-l", LOOPBACK, "-p", str(port), "-U", "0", "-M", "-m", "64"]
    if os.geteuid() == 0:
        cmd += ["-u", "nobody"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection((LOOPBACK, port), timeout=0.5).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    sys.exit("memcached did not start")


async def client_loop(
    index: int,
    base: str,
    window: tuple[float, float],
    grants: list[tuple[Grant, int]],
    waits: list[float],
    counts: list[int],
) -> None:
    connector = aiohttp.TCPConnector(limit=1)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        wait = f"{base}/wait/?host=c{index}&pool={POOL}"
        release = f"{base}/release/?host=c{index}&pool={POOL}"
        while time.monotonic() < window[1]:
            sent = time.monotonic_ns()
            async with session.get(wait) as resp:
                body = await resp.read()
                fence = resp.headers.get("X-Distributex-Fence")
            yes = time.monotonic_ns()
            if body != b"YES" or fence is None:
                continue
            releasing = time.monotonic_ns()
            grants.append((Grant(index, POOL, sent, yes, releasing, int(fence)), index))
            if window[0] <= yes / 1e9 <= window[1]:
                waits.append((yes - sent) / 1e9)
                counts[index] += 1
            async with session.get(release) as resp:
                await resp.read()


async def load(bases: list[str], clients: int, warmup: float, duration: float) -> dict[str, Any]:
    grants: list[tuple[Grant, int]] = []
    waits: list[float] = []
    counts = [0] * clients
    start = time.monotonic()
    window = (start + warmup, start + warmup + duration)
    tasks = [
        client_loop(i, bases[i % len(bases)], window, grants, waits, counts) for i in range(clients)
    ]
    await asyncio.gather(*tasks)
    return {"grants": grants, "waits": sorted(waits), "counts": counts}


STORE_PROCESS = {"memcache": "memcached", "redis": "redis"}


def summarize(
    result: dict[str, Any], servers_n: int, duration: float, cpu: float, store_cpu: float
) -> dict[str, Any]:
    """Figures of one run: client i talked to server i mod ``servers_n``."""
    grants = [g for g, _ in result["grants"]]
    ordered = sorted(result["grants"], key=lambda item: item[0].yes_ns)
    same, cross = [], []
    for (prev, prev_client), (cur, cur_client) in itertools.pairwise(ordered):
        handoff = (cur.yes_ns - prev.release_ns) / 1e9
        if handoff < 0:
            continue
        crossing = prev_client % servers_n != cur_client % servers_n
        (cross if crossing else same).append(handoff)
    same.sort()
    cross.sort()
    counts = result["counts"]
    return {
        "grants_per_s": sum(counts) / duration,
        "wait_p50_s": percentile(result["waits"], 50),
        "wait_p99_s": percentile(result["waits"], 99),
        "fairness_jain": jain(counts),
        "grants_min_max": (min(counts), max(counts)),
        "handoff_same_p50_s": percentile(same, 50),
        "handoff_same_p99_s": percentile(same, 99),
        "handoff_cross_p50_s": percentile(cross, 50),
        "handoff_cross_p99_s": percentile(cross, 99),
        "server_cpu_us_per_grant": cpu / max(1, len(grants)) * 1e6,
        # the store's process: memcached or redis-server (the key keeps its old name)
        "memcached_cpu_us_per_grant": store_cpu / max(1, len(grants)) * 1e6,
        "violations": safety_violations(grants),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backend", choices=["memcache", "redis", "sqlite", "inmemory"], default="memcache"
    )
    parser.add_argument("--servers", type=int, default=None, help="memcache 2, redis 3, sqlite 1")
    parser.add_argument(
        "--lock-sleep", type=float, default=0.1, help="redis: redis-py Lock's polling interval"
    )
    parser.add_argument("--sync", choices=["full", "normal"], default="full", help="sqlite")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    memcached = None  # the store's process (memcached or redis-server), for its CPU
    config = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)  # noqa: SIM115
    state = tempfile.TemporaryDirectory()
    if args.backend == "memcache":
        memcached, mc_port = start_memcached()
        config.write(f"backend: memcache\nmemcachehost: {LOOPBACK}\nmemcacheport: {mc_port}\n")
        servers_n = args.servers or 2
    elif args.backend == "redis":
        memcached, redis_port = start_redis()
        config.write(f"backend: redis\nredis_url: redis://{LOOPBACK}:{redis_port}/0\n")
        servers_n = args.servers or 3
    elif args.backend == "sqlite":
        # On the disk the tests use (not a tmpfs): fsyncs cost what they cost there.
        path = os.path.join(state.name, "state.db")
        config.write(f"backend: sqlite\nsqlite_path: {path}\nsqlite_sync: {args.sync}\n")
        servers_n = args.servers or 1
    else:
        config.write("backend: inmemory\n")
        servers_n = 1
    config.write(f"autocreate: true\npools:\n  - name: {POOL}\n")
    config.close()
    servers = [Server(config=config.name).start() for _ in range(servers_n)]
    try:
        cpu0 = [s.cpu_seconds() for s in servers]
        mc0 = proc_cpu_seconds(memcached.pid) if memcached else 0.0
        wall0 = time.monotonic()
        result = asyncio.run(
            load([s.base for s in servers], args.clients, args.warmup, args.duration)
        )
        wall = time.monotonic() - wall0
        cpu = sum(s.cpu_seconds() - c for s, c in zip(servers, cpu0, strict=True))
        mc_cpu = (proc_cpu_seconds(memcached.pid) - mc0) if memcached else 0.0
        for server in servers:
            server.stop()  # idle servers' heartbeats stay out of the next run
        lock_rows = lock_result = None
        if args.backend == "redis" and memcached is not None:
            # The same clients on redis-py's own Lock, on the same Redis.
            cpu_r = proc_cpu_seconds(memcached.pid)
            lock_result = asyncio.run(
                redis_lock_load(
                    redis_port, args.clients, args.warmup, args.duration, args.lock_sleep
                )
            )
            cpu_r = proc_cpu_seconds(memcached.pid) - cpu_r
            lock_rows = summarize(lock_result, 1, args.duration, 0.0, cpu_r)
    finally:
        for server in servers:
            server.stop()
        state.cleanup()
        if memcached is not None:
            memcached.terminate()
            memcached.wait(10)
        os.unlink(config.name)

    counts = [
        (int(m.group(1)), int(m.group(2)))
        for s in servers
        for m in re.finditer(r": (\d+) commits since start, (\d+) fsync'd", s.final_log)
    ]
    rows = {
        "backend": args.backend,
        "servers": servers_n,
        "clients": args.clients,
        **summarize(result, servers_n, args.duration, cpu, mc_cpu),
        "server_cpu_pct": cpu / wall * 100,
        "sqlite_commits_per_grant": sum(c for c, _ in counts) / max(1, len(result["grants"])),
        "sqlite_fsyncs_per_grant": sum(f for _, f in counts) / max(1, len(result["grants"])),
    }
    violations = rows["violations"]
    counts = result["counts"]
    table = [
        ("backend, servers, clients", f"{args.backend}, {servers_n}, {args.clients}"),
        ("grants/s", fmt_int(rows["grants_per_s"])),
        ("wait p50 / p99", f"{fmt_ms(rows['wait_p50_s'])} / {fmt_ms(rows['wait_p99_s'])}"),
        (
            "fairness (Jain), grants min-max",
            f"{rows['fairness_jain']:.4f}, {min(counts)}-{max(counts)}",
        ),
        (
            "hand-off same server p50 / p99",
            f"{fmt_ms(rows['handoff_same_p50_s'])} / {fmt_ms(rows['handoff_same_p99_s'])}",
        ),
        (
            "hand-off across servers p50 / p99",
            f"{fmt_ms(rows['handoff_cross_p50_s'])} / {fmt_ms(rows['handoff_cross_p99_s'])}",
        ),
        (
            f"CPU per grant: servers / {STORE_PROCESS.get(args.backend, 'store')}",
            f"{rows['server_cpu_us_per_grant']:.0f} µs / "
            f"{rows['memcached_cpu_us_per_grant']:.0f} µs",
        ),
        ("safety violations", str(sum(violations.values()))),
    ]
    if args.backend == "sqlite":
        label = f"commits / fsyncs per grant (sync {args.sync})"
        per_grant = (
            f"{rows['sqlite_commits_per_grant']:.2f} / {rows['sqlite_fsyncs_per_grant']:.2f}"
        )
        table.insert(-1, (label, per_grant))
    if lock_rows is not None and lock_result is not None:
        rows["redis_py_lock"] = lock_rows
        lock_counts = lock_result["counts"]
        table += [
            (
                f"redis-py Lock (sleep {args.lock_sleep} s): grants/s",
                fmt_int(lock_rows["grants_per_s"]),
            ),
            (
                "  wait p50 / p99",
                f"{fmt_ms(lock_rows['wait_p50_s'])} / {fmt_ms(lock_rows['wait_p99_s'])}",
            ),
            (
                "  fairness (Jain), grants min-max",
                f"{lock_rows['fairness_jain']:.4f}, {min(lock_counts)}-{max(lock_counts)}",
            ),
            (
                "  hand-off p50 / p99",
                f"{fmt_ms(lock_rows['handoff_same_p50_s'])} / "
                f"{fmt_ms(lock_rows['handoff_same_p99_s'])}",
            ),
            ("  CPU per grant: redis", f"{lock_rows['memcached_cpu_us_per_grant']:.0f} µs"),
        ]
    emit(rows, table, "shared mutex fight", args.json)
    return 1 if sum(violations.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
