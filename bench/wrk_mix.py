"""wrk against the server and the bare protocol: a get/release mix over 32 connections.

    .venv/bin/python bench/wrk_mix.py [--connections 32] [--threads 2] [--duration 10] [--json]

Each run starts a fresh ``distributexd`` at its default settings (in-memory
backend, INFO log lines, uvloop) and then the bare protocol of
``bare_protocol.py`` (uvloop), and drives each with ``wrk`` and
``wrk_get_release.lua`` for ``--duration`` seconds: requests/s, and the
server's CPU per request, also as a ratio to the bare protocol's. wrk and the
server share this machine's cores: the figure is what one machine serves
with its load generator on it.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from _common import Server, emit, fmt_int

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "wrk_get_release.lua"


def run_wrk(server: Server, connections: int, threads: int, duration: float) -> dict[str, Any]:
    cpu0 = server.cpu_seconds()
    done = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{duration:g}s",
            "-s",
            str(SCRIPT),
            f"{server.base}/",
        ],
        capture_output=True,
        text=True,
        timeout=duration + 60,
        check=True,
    )
    cpu = server.cpu_seconds() - cpu0
    found = re.search(r"Requests/sec:\s+([0-9.]+)", done.stdout)
    total = re.search(r"([0-9]+) requests in", done.stdout)
    errors = re.search(r"Non-2xx or 3xx responses: ([0-9]+)", done.stdout)
    if found is None or total is None:
        raise RuntimeError(f"wrk said: {done.stdout} {done.stderr}")
    requests = int(total.group(1))
    return {
        "requests_per_s": float(found.group(1)),
        "requests": requests,
        "non_2xx": int(errors.group(1)) if errors else 0,
        "server_cpu_us_per_request": cpu / requests * 1e6,
        "server_cpu_pct": cpu / duration * 100,
    }


def run(connections: int = 32, threads: int = 2, duration: float = 10.0) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    figures: dict[str, Any] = {"connections": connections, "threads": threads}
    bare = [sys.executable, str(HERE / "bare_protocol.py"), "--serve", "uvloop"]
    for name, server in (("server", Server()), ("bare_uvloop", Server(command=bare))):
        server.start()
        try:
            figures[name] = run_wrk(server, connections, threads, duration)
        finally:
            server.stop()
    figures["ratio_cpu_to_bare"] = (
        figures["server"]["server_cpu_us_per_request"]
        / figures["bare_uvloop"]["server_cpu_us_per_request"]
    )
    return figures


def rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    out = [("load", f"wrk -t{r['threads']} -c{r['connections']}, get/release mix")]
    for name, label in (("server", "distributexd (defaults)"), ("bare_uvloop", "bare protocol")):
        f = r[name]
        out.append(
            (
                label,
                f"{fmt_int(f['requests_per_s'])} requests/s, "
                f"{f['server_cpu_us_per_request']:.1f} µs CPU per request, "
                f"server {f['server_cpu_pct']:.0f} %, non-2xx {f['non_2xx']}",
            )
        )
    out.append(("server / bare, CPU per request", f"{r['ratio_cpu_to_bare']:.1f} x"))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.connections, args.threads, args.duration)
    emit(result, rows(result), "wrk_mix: a get/release mix, server against the floor", args.json)
    return 0 if result["server"]["non_2xx"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
