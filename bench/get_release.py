"""N clients over P pools doing /get/ + /release/ cycles, never waiting.

Each client (own keep-alive connection) loops: pick a pool at random, /get/;
on YES /release/ it (one *cycle*), on NO just go on. Reports cycles/s, NO
answers/s, requests/s and server CPU per request and per get+release pair,
and checks fencing and mutual exclusion per pool.

    .venv/bin/python bench/get_release.py [--clients 50] [--pools 64] [--duration 10]
        [--procs 1] [--uvloop] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from _common import (
    Grant,
    Server,
    add_load_options,
    emit,
    fmt_int,
    load_rows,
    safety_violations,
    use_uvloop,
)
from _loadgen import (
    AiohttpClient,
    ClientLoop,
    RawHTTP,
    WorkerStats,
    make_client,
    other_cpu_pct,
    run_closed_loop,
    run_worker_async,
)


def worker(
    clients: list[int],
    start_ns: int,
    window_ns: tuple[int, int],
    port: int,
    pools: int,
    uvloop: bool,
    client: str,
) -> WorkerStats:
    """One load-generator process running ``clients``."""
    use_uvloop(uvloop)
    make = _make_loop(port, pools, client)
    return asyncio.run(run_worker_async(make, clients, start_ns, window_ns))


def _make_loop(
    port: int, pools: int, client: str
) -> Callable[[WorkerStats], Awaitable[tuple[ClientLoop, Callable[[], Awaitable[None]]]]]:
    async def make(stats: WorkerStats) -> tuple[ClientLoop, Callable[[], Awaitable[None]]]:
        conns: list[RawHTTP | AiohttpClient] = []

        async def client_loop(index: int, window: tuple[int, int], stats: WorkerStats) -> None:
            conn = make_client(client, port)
            conns.append(conn)
            targets = [
                (f"p{p}", f"/get/?host=c{index}&pool=p{p}", f"/release/?host=c{index}&pool=p{p}")
                for p in range(pools)
            ]
            rng = random.Random(index)
            grants = stats.grants
            # Grants are counted in the window by the coordinator; NOs here.
            no_in_window = 0
            window_start, stop_ns = window
            while (sent := time.monotonic_ns()) < stop_ns:
                pool, get, release = rng.choice(targets)
                body, fence = await conn.get(get)
                yes = time.monotonic_ns()
                if body == b"NO":
                    stats.count("no")
                    if window_start <= yes < stop_ns:
                        no_in_window += 1
                    continue
                if body != b"YES" or fence is None:
                    stats.count("get_not_yes_or_no")
                    continue
                releasing = time.monotonic_ns()
                if (await conn.get(release))[0] != b"OK":
                    stats.count("release_not_ok")
                grants.append((index, pool, sent, yes, releasing, int(fence)))
            stats.count("no_in_window", no_in_window)

        async def close() -> None:
            for conn in conns:
                await conn.close()

        return client_loop, close

    return make


def run(
    clients: int = 50,
    pools: int = 64,
    duration: float = 10.0,
    procs: int = 1,
    uvloop: bool = False,
    warmup: float = 1.0,
    profile: str | None = None,
    client: str = "aiohttp",
    config: str | None = None,
) -> dict[str, Any]:
    """Run the benchmark; returns its figures (``config``: a server configuration file)."""
    with Server(config=config) as server:
        args = (server.port, pools, uvloop, client)
        results, window = run_closed_loop(
            server, worker, args, clients, procs, duration, warmup, profile
        )
        status = server.stop()
    grants = [Grant(*g) for r in results for g in r.grants]
    cycles = sum(1 for g in grants if window.start_ns <= g.yes_ns < window.end_ns)
    nos = sum(r.counters.get("no_in_window", 0) for r in results)
    requests = 2 * cycles + nos
    errors = {
        k: v
        for r in results
        for k, v in r.counters.items()
        if k not in ("no", "no_in_window") and v
    }
    cpu_us = window.server_cpu_s * 1e6
    return {
        "clients": clients,
        "pools": pools,
        "procs": procs,
        "uvloop": uvloop,
        "client": client,
        "duration_s": window.seconds,
        "cycles": cycles,
        "cycles_per_s": cycles / window.seconds,
        "no_per_s": nos / window.seconds,
        "no_fraction": nos / (nos + cycles) if nos + cycles else float("nan"),
        "requests_per_s": requests / window.seconds,
        "server_cpu_pct": 100 * window.server_cpu_s / window.seconds,
        "server_cpu_us_per_request": cpu_us / requests if requests else float("nan"),
        "server_cpu_us_per_get_release": 2 * cpu_us / requests if requests else float("nan"),
        "server_cpu_us_per_cycle_incl_no": cpu_us / cycles if cycles else float("nan"),
        "loadgen_cpu_pct": [round(100 * r.cpu_window_s / window.seconds, 1) for r in results],
        "machine_busy_pct": window.machine_busy_pct,
        "other_cpu_pct": other_cpu_pct(window, results),
        "safety_checked_grants": len(grants),
        "safety_violations": safety_violations(grants),
        "errors": errors,
        "server_exit_status": status,
    }


def rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    lg = f", {r['client']} client" + (" + uvloop" if r["uvloop"] else "")
    return [
        ("clients / pools / load processes", f"{r['clients']} / {r['pools']} / {r['procs']}{lg}"),
        ("measured window", f"{r['duration_s']:.1f} s"),
        ("get+release cycles/s (YES)", fmt_int(r["cycles_per_s"])),
        ("gets answered NO /s", f"{fmt_int(r['no_per_s'])} ({100 * r['no_fraction']:.0f} %)"),
        ("requests/s", fmt_int(r["requests_per_s"])),
        ("server CPU", f"{r['server_cpu_pct']:.0f} % of a core"),
        ("server CPU per request", f"{r['server_cpu_us_per_request']:.0f} µs"),
        ("server CPU per get+release", f"{r['server_cpu_us_per_get_release']:.0f} µs"),
        ("server CPU per cycle, NOs included", f"{r['server_cpu_us_per_cycle_incl_no']:.0f} µs"),
        *load_rows(r),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--pools", type=int, default=64)
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="server configuration (e.g. backend: sqlite; it must allow pools made on first use)",
    )
    add_load_options(parser)
    args = parser.parse_args(argv)
    result = run(
        args.clients,
        args.pools,
        args.duration,
        args.procs,
        args.uvloop,
        args.warmup,
        args.profile,
        args.client,
        args.config,
    )
    emit(result, rows(result), "get_release: get+release cycles over many pools", args.json)
    ok = sum(result["safety_violations"].values()) == 0 and not result["errors"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
