"""wrk against the server and the bare protocol: a get/release mix over 32 connections.

    .venv/bin/python bench/wrk_mix.py [--connections 32] [--threads 2] [--duration 10]
        [--mode own,shared] [--rounds 1] [--no-count] [--json]

For each mode of ``wrk_get_release.lua`` (``own``: every /get/ is YES;
``cycle``: two hosts over the same 32 pools; ``shared``: one pool for all)
and each round, a fresh ``distributexd`` at its default settings (in-memory
backend, INFO log lines, uvloop) and then the bare protocol of
``bare_protocol.py`` (uvloop) are each driven by ``wrk`` for ``--duration``
seconds: requests/s, the server's CPU per request, wrk's CPU, the rest of
the machine's CPU (other work on the machine disturbs the figures), and the
server's figures as ratios to the bare protocol's of the same round. Then,
unless ``--no-count``, a 2 s run with wrk counting the server's answers
(YES/NO/OK: the mix the figure was taken on; counting costs wrk CPU, so it
is not the measured run). wrk and the server share this machine's cores:
the figure is what one machine serves with its load generator on it.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from _common import CLK_TCK, Server, emit, fmt_int
from _loadgen import machine_busy_ticks

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "wrk_get_release.lua"
MODES = ("own", "cycle", "shared")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_wrk(
    server: Server,
    mode: str,
    connections: int,
    threads: int,
    duration: float,
    count: bool = False,
) -> dict[str, Any]:
    env = dict(os.environ, WRK_COUNT="1" if count else "0")
    cpu0, wrk0, busy0 = server.cpu_seconds(), _children_cpu(), machine_busy_ticks()
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "-s", str(SCRIPT)]
    done = subprocess.run(
        [*argv, f"{server.base}/", "--", mode],
        capture_output=True,
        text=True,
        timeout=duration + 60,
        check=True,
        env=env,
    )
    cpu, wrk_cpu = server.cpu_seconds() - cpu0, _children_cpu() - wrk0
    busy_cores = (machine_busy_ticks()[0] - busy0[0]) / CLK_TCK  # core-seconds, all processes
    found = re.search(r"Requests/sec:\s+([0-9.]+)", done.stdout)
    total = re.search(r"([0-9]+) requests in", done.stdout)
    errors = re.search(r"Non-2xx or 3xx responses: ([0-9]+)", done.stdout)
    socket_errors = re.search(r"Socket errors: (.*)", done.stdout)
    answers = re.search(r"answers: (.*)", done.stdout)
    if found is None or total is None:
        raise RuntimeError(f"wrk said: {done.stdout} {done.stderr}")
    requests = int(total.group(1))
    return {
        "requests_per_s": float(found.group(1)),
        "requests": requests,
        "non_2xx": int(errors.group(1)) if errors else 0,
        "socket_errors": socket_errors.group(1) if socket_errors else "",
        "answers": answers.group(1) if answers else "",
        "server_cpu_us_per_request": cpu / requests * 1e6,
        "server_cpu_pct": cpu / duration * 100,
        "wrk_cpu_pct": wrk_cpu / duration * 100,
        "other_cpu_pct": max(0.0, busy_cores - cpu - wrk_cpu) / duration * 100,
    }


def run_mode(
    mode: str, connections: int, threads: int, duration: float, rounds: int, count: bool
) -> dict[str, Any]:
    bare = [sys.executable, str(HERE / "bare_protocol.py"), "--serve", "uvloop"]
    runs: list[dict[str, Any]] = []
    for _ in range(rounds):
        one: dict[str, Any] = {}
        for name, server in (("server", Server()), ("bare_uvloop", Server(command=bare))):
            server.start()
            try:
                one[name] = run_wrk(server, mode, connections, threads, duration)
            finally:
                server.stop()
        s, b = one["server"], one["bare_uvloop"]
        one["ratio_cpu_to_bare"] = s["server_cpu_us_per_request"] / b["server_cpu_us_per_request"]
        one["ratio_rate_to_bare"] = s["requests_per_s"] / b["requests_per_s"]
        runs.append(one)
    out: dict[str, Any] = {"mode": mode, "rounds": runs}
    if count:
        with Server() as server:
            out["counted"] = run_wrk(server, mode, connections, threads, 2.0, count=True)
    return out


def rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    out = [("load", f"wrk -t{r['threads']} -c{r['connections']}, {r['duration']:g} s per run")]
    for m in r["modes"]:
        for i, one in enumerate(m["rounds"], 1):
            for name, label in (("server", "distributexd"), ("bare_uvloop", "bare")):
                f = one[name]
                out.append(
                    (
                        f"{m['mode']} #{i}: {label}",
                        f"{fmt_int(f['requests_per_s'])} req/s, "
                        f"{f['server_cpu_us_per_request']:.1f} µs CPU/req, "
                        f"server {f['server_cpu_pct']:.0f} %, wrk {f['wrk_cpu_pct']:.0f} %, "
                        f"other {f['other_cpu_pct']:.0f} %, non-2xx {f['non_2xx']}"
                        + (f", socket errors {f['socket_errors']}" if f["socket_errors"] else ""),
                    )
                )
            out.append(
                (
                    f"{m['mode']} #{i}: server / bare",
                    f"requests/s {one['ratio_rate_to_bare']:.2f}, "
                    f"CPU per request {one['ratio_cpu_to_bare']:.1f} x",
                )
            )
        if len(m["rounds"]) > 1:
            rates = [one["server"]["requests_per_s"] for one in m["rounds"]]
            ratios = [one["ratio_cpu_to_bare"] for one in m["rounds"]]
            out.append(
                (
                    f"{m['mode']}: median of {len(rates)}",
                    f"{fmt_int(statistics.median(rates))} req/s, "
                    f"CPU {statistics.median(ratios):.1f} x bare",
                )
            )
        if "counted" in m:
            out.append((f"{m['mode']}: answers (2 s, counted)", m["counted"]["answers"]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--mode", default="own,shared", help=f"one or more of {','.join(MODES)}")
    parser.add_argument("--rounds", type=int, default=1, help="server then bare, this many times")
    parser.add_argument("--no-count", action="store_true", help="skip the counted 2 s run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    modes = args.mode.split(",")
    for mode in modes:
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r}")
    result: dict[str, Any] = {
        "connections": args.connections,
        "threads": args.threads,
        "duration": args.duration,
        "modes": [
            run_mode(
                mode, args.connections, args.threads, args.duration, args.rounds, not args.no_count
            )
            for mode in modes
        ],
    }
    emit(result, rows(result), "wrk_mix: a get/release mix, server against the floor", args.json)
    bad = sum(
        one[name]["non_2xx"]
        for m in result["modes"]
        for one in m["rounds"]
        for name in ("server", "bare_uvloop")
    )
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
