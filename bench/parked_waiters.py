"""Memory per parked /wait/ client, then how fast the queue drains.

A holder takes a mutex with /get/; then N clients (default 10,000), each on
its own TCP connection (from 127.0.0.1, .2, ..., 4,000 per address), park on
/wait/. The server's RSS (VmRSS) is read with
none parked and with all N parked (once its CPU time and RSS have stopped
moving and the kernel shows N+ established connections); the difference / N
is the memory per parked client. Then the holder releases; every waiter, on
YES, releases at once, so the mutex passes through all N one after another.
The drain rate is N / (time from the holder's release to the last release).

    .venv/bin/python bench/parked_waiters.py [--waiters 10000] [--baseline] [--json]

``--baseline`` runs the same against ``bare_mutex.py`` (a bare asyncio
protocol on uvloop that parks waiters in a FIFO queue) in the same
invocation: the floor a parked connection costs in a Python process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from _common import (
    FENCE_HEADER,
    Grant,
    Server,
    emit,
    established_to,
    fmt_int,
    raise_nofile,
    safety_violations,
    use_uvloop,
)
from yarl import URL

POOL = "parked"
PER_SOURCE = 4_000  # waiters per source address
CONNECT_WINDOW = 500  # connections being opened at once (the server's backlog is 4096)


async def _settle(server: Server, min_established: int, timeout: float) -> tuple[int, float]:
    """Poll until the server is idle and its RSS stable; returns (RSS KiB, seconds waited)."""
    began = time.monotonic()
    last_rss, last_cpu, calm = -1, -1.0, 0
    while time.monotonic() - began < timeout:
        await asyncio.sleep(0.25)
        rss, cpu = server.rss_kb(), server.cpu_seconds()
        enough = established_to(server.port) >= min_established
        steady = abs(rss - last_rss) <= max(64, last_rss // 1000) and cpu - last_cpu < 0.02
        calm = calm + 1 if enough and steady else 0
        last_rss, last_cpu = rss, cpu
        if calm >= 4:  # a second of nothing moving
            return rss, time.monotonic() - began
    raise TimeoutError(f"server did not settle within {timeout} s")


async def _answer(session: aiohttp.ClientSession, url: URL) -> tuple[bytes, str | None]:
    async with session.get(url) as resp:
        return await resp.read(), resp.headers.get(FENCE_HEADER)


async def run_async(server: Server, waiters: int, timeout: float) -> dict[str, Any]:
    base = f"{server.base}"

    def url(verb: str, host: str) -> URL:
        return URL(f"{base}/{verb}/?host={host}&pool={POOL}", encoded=True)

    result: dict[str, Any] = {"waiters": waiters}
    no_timeout = aiohttp.ClientTimeout(total=None)
    connected = 0

    async def on_connection(*_: object) -> None:
        nonlocal connected
        connected += 1

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(on_connection)
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as holder,
        contextlib.AsyncExitStack() as stack,
    ):
        # The server takes at most half its connection cap from one address
        # (max_connections_per_peer): the crowd comes from 127.0.0.1, .2, ...
        crowds = [
            await stack.enter_async_context(
                aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(
                        limit=0, limit_per_host=0, local_addr=(f"127.0.0.{k + 1}", 0)
                    ),
                    timeout=no_timeout,
                    trace_configs=[trace],
                )
            )
            for k in range(max(1, math.ceil(waiters / PER_SOURCE)))
        ]
        # Warm the server's code paths (and the holder's connection) first.
        for _ in range(200):
            await _answer(holder, url("get", "warm"))
            await _answer(holder, url("release", "warm"))
        rss0, _ = await _settle(server, 1, 30)
        result["rss_idle_kb"] = rss0

        body, _ = await _answer(holder, url("get", "holder"))
        assert body == b"YES", body

        grants: list[tuple[int, str, int, int, int, int]] = []
        answers: dict[str, int] = {}
        done_ns: list[int] = []

        def count(answer: str) -> None:
            answers[answer] = answers.get(answer, 0) + 1

        async def waiter(i: int) -> None:
            sent = time.monotonic_ns()
            crowd = crowds[i % len(crowds)]
            body, fence = await _answer(crowd, url("wait", f"w{i}"))
            yes = time.monotonic_ns()
            count(f"wait {body.decode()}")
            if body != b"YES" or fence is None:
                return
            release = time.monotonic_ns()
            body, _ = await _answer(crowd, url("release", f"w{i}"))
            count(f"release {body.decode()}")
            grants.append((i, POOL, sent, yes, release, int(fence)))
            done_ns.append(time.monotonic_ns())

        async def park_all() -> list[asyncio.Task[None]]:
            # Open at most CONNECT_WINDOW connections at once, in order.
            tasks = []
            for i in range(waiters):
                while i - connected >= CONNECT_WINDOW:
                    await asyncio.sleep(0.005)
                tasks.append(asyncio.create_task(waiter(i)))
            return tasks

        parked_at = time.monotonic()
        async with asyncio.timeout(timeout):
            tasks = await park_all()
        rss1, _ = await _settle(server, waiters + 1, timeout)
        result["park_s"] = time.monotonic() - parked_at
        result["rss_parked_kb"] = rss1
        result["established"] = established_to(server.port)
        probe, _ = await _answer(holder, url("get", "probe"))
        result["probe_get_while_parked"] = probe.decode()
        result["kb_per_parked"] = (rss1 - rss0) / waiters

        cpu0 = server.cpu_seconds()
        t0 = time.monotonic_ns()
        body, _ = await _answer(holder, url("release", "holder"))
        assert body == b"OK", body
        async with asyncio.timeout(timeout):
            await asyncio.gather(*tasks)
        drain_s = (max(done_ns) - t0) / 1e9 if done_ns else float("nan")
        cpu1 = server.cpu_seconds()
        served = len(grants)
        result.update(
            served=served,
            drain_s=drain_s,
            drained_per_s=served / drain_s if served else 0.0,
            server_cpu_us_per_served=(cpu1 - cpu0) / served * 1e6 if served else float("nan"),
            answers=answers,
            safety_violations=safety_violations(Grant(*g) for g in grants),
            fifo_inversions=_inversions([g[0] for g in sorted(grants, key=lambda g: g[3])]),
        )
    return result


def _inversions(order: list[int]) -> int:
    """Adjacent pairs served out of the order the requests were started in.

    Only a rough FIFO indicator: requests started in order may reach the
    server in a slightly different order (separate connections).
    """
    return sum(1 for a, b in itertools.pairwise(order) if b < a)


def run(
    waiters: int = 10_000,
    timeout: float = 120.0,
    uvloop: bool = False,
    command: list[str] | None = None,
) -> dict[str, Any]:
    """Run the benchmark (against ``command`` instead of the server if given)."""
    # The server's automatic connection cap is its file limit less an eighth
    # (transport.connection_limit): leave room for all the waiters above it.
    nofile = waiters + waiters // 7 + 1024
    raise_nofile(nofile)
    use_uvloop(uvloop)
    with Server(nofile=nofile, command=command) as server:
        result = asyncio.run(run_async(server, waiters, timeout))
        result["server_exit_status"] = server.stop()
    return result


def rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    violations = sum(r["safety_violations"].values())
    return [
        ("parked waiters", fmt_int(r["waiters"])),
        ("server RSS, none parked", f"{r['rss_idle_kb'] / 1024:.1f} MiB"),
        ("server RSS, all parked", f"{r['rss_parked_kb'] / 1024:.1f} MiB"),
        ("established connections", fmt_int(r["established"])),
        ("/get/ by another host meanwhile", r["probe_get_while_parked"]),
        ("memory per parked client", f"{r['kb_per_parked']:.1f} KiB"),
        ("time to park all (incl. settling)", f"{r['park_s']:.1f} s"),
        ("served after release", f"{fmt_int(r['served'])} in {r['drain_s']:.2f} s"),
        ("drained", f"{fmt_int(r['drained_per_s'])} waiters/s"),
        ("server CPU per waiter served", f"{r['server_cpu_us_per_served']:.0f} µs"),
        ("answers", ", ".join(f"{k}: {v}" for k, v in sorted(r["answers"].items()))),
        ("safety violations", str(r["safety_violations"] if violations else 0)),
        ("adjacent out-of-start-order grants", fmt_int(r["fifo_inversions"])),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--waiters", type=int, default=10_000)
    parser.add_argument("--timeout", type=float, default=120.0, help="bound on each phase (s)")
    parser.add_argument("--uvloop", action="store_true", help="uvloop in the load generator")
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="then the same against bare_mutex.py (uvloop), and the server's figures over it",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.waiters, args.timeout, args.uvloop)
    table = rows(result)
    ok = result["served"] == args.waiters and not sum(result["safety_violations"].values())
    if args.baseline:
        bare = [sys.executable, str(Path(__file__).resolve().parent / "bare_mutex.py")]
        result["bare_mutex"] = run(args.waiters, args.timeout, args.uvloop, bare)
        b = result["bare_mutex"]
        result["ratio_kb_per_parked"] = result["kb_per_parked"] / b["kb_per_parked"]
        result["ratio_cpu_per_served"] = (
            result["server_cpu_us_per_served"] / b["server_cpu_us_per_served"]
        )
        table += [
            (
                "bare mutex: RSS none -> all parked",
                f"{b['rss_idle_kb'] / 1024:.1f} -> {b['rss_parked_kb'] / 1024:.1f} MiB",
            ),
            ("bare mutex: memory per parked client", f"{b['kb_per_parked']:.2f} KiB"),
            ("bare mutex: CPU per waiter served", f"{b['server_cpu_us_per_served']:.0f} µs"),
            (
                "server / bare mutex: memory, CPU",
                f"{result['ratio_kb_per_parked']:.1f} x, {result['ratio_cpu_per_served']:.1f} x",
            ),
        ]
    emit(result, table, "parked_waiters: memory per parked /wait/, then drain", args.json)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
