"""Shared helpers for the benchmarks: the server process, /proc readings, statistics.

Every benchmark starts its own ``distributexd`` (``python -m distributex``) on a
free loopback port, measures it from outside through ``/proc/PID``, and stops
it with SIGTERM at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import resource
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
LOOPBACK = "127.0.0.1"
FENCE_HEADER = "X-Distributex-Fence"


def free_port() -> int:
    """A TCP port on the loopback interface that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def raise_nofile(wanted: int) -> int:
    """Raise this process's RLIMIT_NOFILE soft limit towards ``wanted``; returns the new one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    with contextlib.suppress(ValueError, OSError):
        # Root may raise the hard limit too.
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(wanted, hard)))
        return wanted
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def _nofile_raiser(wanted: int) -> Callable[[], None]:
    def preexec() -> None:
        raise_nofile(wanted)

    return preexec


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (from /proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may hold spaces; fields after ')' are fixed.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / CLK_TCK


def proc_rss_kb(pid: int) -> int:
    """Resident set size of process ``pid`` in KiB (VmRSS from /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def established_to(port: int) -> int:
    """Established TCP connections whose local port is ``port`` (the server's side)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as fh:
            next(fh)
            for line in fh:
                parts = line.split()
                if parts[3] == "01" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


@dataclass
class Server:
    """A ``distributexd`` child process on a free loopback port."""

    config: str | None = None
    nofile: int | None = None
    extra_args: Sequence[str] = ()
    port: int = field(default_factory=free_port)
    # Another server to run in its place (the bare protocol): its argv, the port appended.
    command: Sequence[str] | None = None
    proc: subprocess.Popen[bytes] | None = None
    final_log: str = ""
    _log: Any = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def base(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self, ready_timeout: float = 15.0) -> Server:
        if self.command is not None:
            cmd = [*self.command, str(self.port)]
        else:
            cmd = [sys.executable, "-m", "distributex", "-p", str(self.port), *self.extra_args]
            # Extra server options for every script, e.g. to compare settings:
            # DISTRIBUTEX_BENCH_SERVER_ARGS="-c metrics-off.yaml --log-level warning"
            cmd += shlex.split(os.environ.get("DISTRIBUTEX_BENCH_SERVER_ARGS", ""))
            if self.config:
                cmd += ["-c", self.config]
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_nofile_raiser(self.nofile) if self.nofile else None,
        )
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log()}")
            try:
                url = f"{self.base}/release/?host=bench-probe&pool=bench-probe"
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if resp.read() == b"OK":
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"server not ready within {ready_timeout} s: {self.log()}")

    def log(self, tail: int | None = 2000) -> str:
        """The server's output: its last ``tail`` characters (None: all of it)."""
        if self._log is None:
            return ""
        self._log.seek(0)
        text = self._log.read().decode(errors="replace")
        return text if tail is None else text[-tail:]

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid)

    def rss_kb(self) -> int:
        return proc_rss_kb(self.pid)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait, SIGKILL if it will not go; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log is not None:
            self.final_log = self.log()  # what it said on the way out, for the caller
            self._log.close()
            self._log = None
        return self.proc.returncode

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of already sorted values (NaN for none)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, round(pct / 100 * len(sorted_values) + 0.5 - 1e-9))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def jain(values: Sequence[float]) -> float:
    """Jain's fairness index: (sum x)^2 / (n * sum x^2); 1.0 means perfectly equal."""
    total = sum(values)
    squares = sum(v * v for v in values)
    return total * total / (len(values) * squares) if squares else float("nan")


@dataclass(frozen=True)
class Grant:
    """One grant as the load generator saw it (monotonic ns, comparable across processes)."""

    client: int
    pool: str
    sent_ns: int  # /get/ or /wait/ sent
    yes_ns: int  # YES received
    release_ns: int  # /release/ about to be sent
    fence: int


def safety_violations(grants: Iterable[Grant]) -> dict[str, int]:
    """Check fencing and mutual exclusion per pool (maxlocks 1).

    Within a pool, grant k+1 can only happen after holder k sent its release,
    which it does after recording ``yes_ns``; so ordering by ``yes_ns`` is the
    grant order. Fences must then strictly increase and hold intervals
    ``[yes_ns, release_ns]`` must not overlap.
    """
    by_pool: dict[str, list[Grant]] = {}
    for grant in grants:
        by_pool.setdefault(grant.pool, []).append(grant)
    out = {"fence_not_increasing": 0, "fence_duplicate": 0, "overlapping_holders": 0}
    for pool_grants in by_pool.values():
        pool_grants.sort(key=lambda g: g.yes_ns)
        seen: set[int] = set()
        for prev, cur in itertools.pairwise(pool_grants):
            if cur.fence <= prev.fence:
                out["fence_not_increasing"] += 1
            if cur.yes_ns < prev.release_ns:
                out["overlapping_holders"] += 1
        for grant in pool_grants:
            if grant.fence in seen:
                out["fence_duplicate"] += 1
            seen.add(grant.fence)
    return out


def use_uvloop(enabled: bool) -> None:
    """Install uvloop's event loop policy in this (load-generator) process."""
    if enabled:
        import uvloop  # optional: pip install uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def add_load_options(parser: Any) -> None:
    """Options every load-generating benchmark takes (after its own --clients)."""
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    parser.add_argument("--procs", type=int, default=1, help="load-generator processes")
    parser.add_argument("--uvloop", action="store_true", help="uvloop in the load generator")
    parser.add_argument(
        "--profile", metavar="FILE", help="py-spy the server in the window (collapsed stacks)"
    )
    parser.add_argument(
        "--client",
        choices=["aiohttp", "raw"],
        default="aiohttp",
        help="HTTP client in the load generator (raw: minimal hand-written, for comparison)",
    )
    parser.add_argument("--json", action="store_true")


def load_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    """The closing rows every load-generating benchmark prints: CPU, safety, errors."""
    violations = sum(r["safety_violations"].values())
    return [
        ("load-generator CPU", " + ".join(f"{p:.0f} %" for p in r["loadgen_cpu_pct"])),
        ("machine busy (all cores)", f"{r['machine_busy_pct']:.0f} %"),
        ("other processes' CPU", f"{r['other_cpu_pct']:.0f} % of a core"),
        (
            "safety violations",
            f"{violations} in {r['safety_checked_grants']:,} grants"
            + ("" if not violations else f" {r['safety_violations']}"),
        ),
        ("errors", str(r["errors"] or 0)),
    ]


def print_table(title: str, rows: Sequence[tuple[str, str]]) -> None:
    """A two-column table of figures, for people."""
    width = max(len(name) for name, _ in rows)
    print(title)
    print("-" * len(title))
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


def emit(
    result: dict[str, Any], rows: Sequence[tuple[str, str]], title: str, as_json: bool
) -> None:
    """Print ``result`` as JSON or ``rows`` as a table."""
    if as_json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print_table(title, rows)


def fmt_int(value: float) -> str:
    return f"{value:,.0f}"


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def start_py_spy(pid: int, duration: float, out: str) -> subprocess.Popen[bytes]:
    """Sample ``pid`` with py-spy for ``duration`` s into ``out`` (collapsed stacks)."""
    spy = Path(sys.executable).with_name("py-spy")
    cmd = [str(spy), "record", "-p", str(pid), "-d", str(max(1, round(duration)))]
    cmd += ["-r", "200", "--nonblocking", "-f", "raw", "-o", out]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarize_profile(path: str, top: int = 25) -> str:
    """The functions with the most samples in a py-spy collapsed-stack file.

    *incl* counts samples with the function anywhere on the stack, *self*
    samples with it on top.
    """
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    total = idle = ours = engine = 0
    for line in Path(path).read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        if frames[-1].startswith("EpollSelector.select"):
            idle += count
        if any(
            "distributex/" in f and "server.py" not in f and "__main__" not in f for f in frames
        ):
            ours += count
        if any("engine.py" in f or "backends/" in f for f in frames):
            engine += count
    if not total:
        return f"py-spy: no samples in {path}"
    lines = [
        f"py-spy: {total} samples of the server ({path}): {100 * idle / total:.0f} % in epoll"
        f" (idle), {100 * ours / total:.0f} % under distributex's request handlers"
        f" (engine + backend {100 * engine / total:.0f} %), the rest aiohttp, asyncio, syscalls",
        " incl%   self%  function",
    ]
    for frame, count in sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{100 * count / total:5.1f}  {100 * own.get(frame, 0) / total:6.1f}  {frame}")
    lines.append(" top self time:")
    for frame, count in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{100 * count / total:5.1f}  {frame}")
    return "\n".join(lines)
