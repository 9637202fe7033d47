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

    .venv/bin/python bench/shared_mutex.py [--backend memcache] [--servers 2]
        [--clients 50] [--duration 10] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["memcache", "sqlite", "inmemory"], default="memcache")
    parser.add_argument("--servers", type=int, default=None, help="memcache 2, sqlite 1")
    parser.add_argument("--sync", choices=["full", "normal"], default="full", help="sqlite")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    memcached = None
    config = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)  # noqa: SIM115
    state = tempfile.TemporaryDirectory()
    if args.backend == "memcache":
        memcached, mc_port = start_memcached()
        config.write(f"backend: memcache\nmemcachehost: {LOOPBACK}\nmemcacheport: {mc_port}\n")
        servers_n = args.servers or 2
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
    finally:
        for server in servers:
            server.stop()
        state.cleanup()
        if memcached is not None:
            memcached.terminate()
            memcached.wait(10)
        os.unlink(config.name)

    grants = [g for g, _ in result["grants"]]
    counts = [
        (int(m.group(1)), int(m.group(2)))
        for s in servers
        for m in re.finditer(r": (\d+) commits since start, (\d+) fsync'd", s.final_log)
    ]
    commits = sum(c for c, _ in counts)
    fsyncs = sum(f for _, f in counts)
    violations = safety_violations(grants)
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
    total = sum(counts)
    rows = {
        "backend": args.backend,
        "servers": servers_n,
        "clients": args.clients,
        "grants_per_s": total / args.duration,
        "wait_p50_s": percentile(result["waits"], 50),
        "wait_p99_s": percentile(result["waits"], 99),
        "fairness_jain": jain(counts),
        "grants_min_max": (min(counts), max(counts)),
        "handoff_same_p50_s": percentile(same, 50),
        "handoff_same_p99_s": percentile(same, 99),
        "handoff_cross_p50_s": percentile(cross, 50),
        "handoff_cross_p99_s": percentile(cross, 99),
        "server_cpu_us_per_grant": cpu / max(1, len(grants)) * 1e6,
        "memcached_cpu_us_per_grant": mc_cpu / max(1, len(grants)) * 1e6,
        "server_cpu_pct": cpu / wall * 100,
        "sqlite_commits_per_grant": commits / max(1, len(grants)),
        "sqlite_fsyncs_per_grant": fsyncs / max(1, len(grants)),
        "violations": violations,
    }
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
            "CPU per grant: servers / memcached",
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
    emit(rows, table, "shared mutex fight", args.json)
    return 1 if sum(violations.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
