"""N clients fight for one mutex: each loops /wait/ -> YES -> /release/ -> again.

Reports grants/s, wait latency (from sending /wait/ to receiving YES),
per-client grant counts and Jain's fairness index, server CPU per grant, and
safety: fencing tokens strictly increase in grant order, are never
duplicated, and no two clients ever hold the mutex at once.

    .venv/bin/python bench/mutex_fight.py [--clients 50] [--duration 10] [--procs 1]
        [--uvloop] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
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
    fmt_ms,
    jain,
    load_rows,
    percentile,
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

POOL = "fight"


def worker(
    clients: list[int],
    start_ns: int,
    window_ns: tuple[int, int],
    port: int,
    uvloop: bool,
    client: str,
) -> WorkerStats:
    """One load-generator process: ``clients`` each with its own keep-alive connection."""
    use_uvloop(uvloop)
    return asyncio.run(run_worker_async(_make_loop(port, client), clients, start_ns, window_ns))


def _make_loop(
    port: int, client: str
) -> Callable[[WorkerStats], Awaitable[tuple[ClientLoop, Callable[[], Awaitable[None]]]]]:
    async def make(stats: WorkerStats) -> tuple[ClientLoop, Callable[[], Awaitable[None]]]:
        conns: list[RawHTTP | AiohttpClient] = []

        async def client_loop(index: int, window: tuple[int, int], stats: WorkerStats) -> None:
            conn = make_client(client, port)
            conns.append(conn)
            wait = f"/wait/?host=c{index}&pool={POOL}"
            release = f"/release/?host=c{index}&pool={POOL}"
            grants = stats.grants
            stop_ns = window[1]
            while (sent := time.monotonic_ns()) < stop_ns:
                body, fence = await conn.get(wait)
                yes = time.monotonic_ns()
                if body != b"YES" or fence is None:
                    stats.count("wait_not_yes")
                    continue
                releasing = time.monotonic_ns()
                if (await conn.get(release))[0] != b"OK":
                    stats.count("release_not_ok")
                grants.append((index, POOL, sent, yes, releasing, int(fence)))

        async def close() -> None:
            for conn in conns:
                await conn.close()

        return client_loop, close

    return make


def run(
    clients: int = 50,
    duration: float = 10.0,
    procs: int = 1,
    uvloop: bool = False,
    warmup: float = 1.0,
    profile: str | None = None,
    client: str = "aiohttp",
    server: Server | None = None,
) -> dict[str, Any]:
    """Run the benchmark; returns its figures (``server``: another one than distributexd)."""
    with server or Server() as server:
        results, window = run_closed_loop(
            server, worker, (server.port, uvloop, client), clients, procs, duration, warmup, profile
        )
        status = server.stop()
    grants = [Grant(*g) for r in results for g in r.grants]
    in_window = [g for g in grants if window.start_ns <= g.yes_ns < window.end_ns]
    latencies = sorted((g.yes_ns - g.sent_ns) / 1e9 for g in in_window)
    per_client = [0] * clients
    for g in in_window:
        per_client[g.client] += 1
    counters: dict[str, int] = {}
    for r in results:
        for k, v in r.counters.items():
            counters[k] = counters.get(k, 0) + v
    n = len(in_window)
    return {
        "clients": clients,
        "procs": procs,
        "uvloop": uvloop,
        "client": client,
        "duration_s": window.seconds,
        "grants": n,
        "grants_per_s": n / window.seconds,
        "wait_p50_ms": percentile(latencies, 50) * 1000,
        "wait_p90_ms": percentile(latencies, 90) * 1000,
        "wait_p99_ms": percentile(latencies, 99) * 1000,
        "wait_max_ms": (latencies[-1] if latencies else float("nan")) * 1000,
        "per_client_min": min(per_client),
        "per_client_max": max(per_client),
        "starved_clients": per_client.count(0),
        "jain": jain(per_client),
        "server_cpu_pct": 100 * window.server_cpu_s / window.seconds,
        "server_cpu_us_per_grant": window.server_cpu_s / n * 1e6 if n else float("nan"),
        "loadgen_cpu_pct": [round(100 * r.cpu_window_s / window.seconds, 1) for r in results],
        "machine_busy_pct": window.machine_busy_pct,
        "other_cpu_pct": other_cpu_pct(window, results),
        "safety_checked_grants": len(grants),
        "safety_violations": safety_violations(grants),
        "errors": counters,
        "late_start_ms": max(r.late_start_ms for r in results),
        "server_exit_status": status,
    }


def rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (
            "clients / load processes",
            f"{r['clients']} / {r['procs']}"
            + (" (uvloop)" if r["uvloop"] else "")
            + f", {r['client']} client",
        ),
        ("measured window", f"{r['duration_s']:.1f} s"),
        ("grants/s", fmt_int(r["grants_per_s"])),
        (
            "wait p50 / p90 / p99",
            f"{r['wait_p50_ms']:.1f} / {r['wait_p90_ms']:.1f} / {r['wait_p99_ms']:.1f} ms",
        ),
        ("wait max", fmt_ms(r["wait_max_ms"] / 1000)),
        (
            "grants per client min / max",
            f"{r['per_client_min']} / {r['per_client_max']} ({r['starved_clients']} starved)",
        ),
        ("Jain fairness", f"{r['jain']:.4f}"),
        ("server CPU", f"{r['server_cpu_pct']:.0f} % of a core"),
        ("server CPU per grant", f"{r['server_cpu_us_per_grant']:.0f} µs"),
        *load_rows(r),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    add_load_options(parser)
    args = parser.parse_args(argv)
    result = run(
        args.clients, args.duration, args.procs, args.uvloop, args.warmup, args.profile, args.client
    )
    emit(result, rows(result), "mutex_fight: clients fighting for one mutex", args.json)
    ok = sum(result["safety_violations"].values()) == 0 and not result["errors"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
