"""A whole fleet parked on one pool: cost per arrival, per departure and per hand-off.

For each backend and each number of waiters W (``--waiters 100,1000,10000``)
the script starts the store and the servers on it (memcache, redis, etcd: 2
servers; sqlite and inmemory: 1), a holder takes the pool, then W clients,
each on its own TCP connection (waiter i on server i mod S, from source
addresses 127.0.0.1.. when W is large), park on ``/wait/``. One process may
hold 20,000 open files here, so past 18,000 waiters the crowd is split over
load-generator processes (``--generators``; ``_crowd.py``). Then:

* **arrivals**: server CPU from the first ``/wait/`` until the servers are
  quiet again with all W connected, / W; the queue's length is then checked
  on ``/status``;
* **store bytes per waiter**: the size of every key under the key prefix in
  the store (memcached: its keys from ``lru_crawler metadump``, then their
  values; redis ``STRLEN`` and ``MEMORY USAGE``; etcd a range read; sqlite the
  length of every column of every row), with W parked minus with none, / W;
  also the largest single value (the record that meets a size limit);
* **departures**: K waiters from the middle of the queue hang up; server CPU
  until the servers are quiet again, / K;
* **drain**: the holder releases, every waiter releases as soon as it gets
  YES. Drain rate (hand-offs/s), server CPU per hand-off, wait (request
  written -> YES) and hand-off (a release sent -> the next YES) percentiles,
  FIFO (adjacent grants of one server whose requests were written in the
  other order, more than 1 ms apart) and safety (fences strictly increase,
  holders never overlap: ``_common.safety_violations``).

Each phase is bounded by ``--timeout``; a phase that does not finish is
reported as such (with what it did), and every process the script starts is
stopped (SIGTERM, then SIGKILL) at the end. The growth of each cost from the
smallest W to the largest is printed last.

    .venv/bin/python bench/fleet_queue.py --backend redis --waiters 100,1000,5000
        [--cancel K] [--timeout 120] [--servers S] [--members 3] [--sources N] [--generators G]
        [--set 'max_waiters_per_pool: 20000' ...] [--profile FILE] [--json]

``--set`` adds a line to every server's configuration file (repeat it), e.g.
to raise ``max_waiters_per_pool`` (10,000 by default) for 18,000 waiters on
one in-memory server. The servers' RSS is read with none parked and with all
W parked: the difference / W is the memory per parked waiter (kernel socket
buffers are not in it).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import math
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from _common import (
    LOOPBACK,
    Grant,
    Server,
    emit,
    fmt_int,
    percentile,
    proc_cpu_seconds,
    raise_nofile,
    safety_violations,
    start_py_spy,
    summarize_profile,
)
from _crowd import PER_SOURCE, Crowds, Plan, Waiter, read_answer, request
from shared_mutex import start_etcd, start_memcached, start_redis

POOL = "fleet"
PREFIX = "distributex/"  # the servers' default key_prefix
BACKENDS = ("inmemory", "sqlite", "memcache", "redis", "etcd")
GENERATOR_SOCKETS = 18_000  # waiters one load generator parks at most (20,000 open files)
FIFO_SLACK_NS = 1_000_000  # requests written closer than this may reach the server either way
HOLDER_TTL = 3600  # the holder's lease outlives every phase
WAITER_TTL = 60


@dataclass
class Setup:
    """The store's processes, the servers, and how to read the store's size."""

    backend: str
    servers: list[Server]
    store_procs: list[subprocess.Popen[bytes]]
    store_bytes: Callable[[], tuple[int, int, int]] | None  # (keys, bytes, largest value)
    state: tempfile.TemporaryDirectory[str]
    notes: dict[str, Any] = field(default_factory=dict)

    def server_cpu(self) -> float:
        return sum(s.cpu_seconds() for s in self.servers)

    def server_rss_kb(self) -> int:
        return sum(s.rss_kb() for s in self.servers)

    def store_cpu(self) -> float:
        return sum(proc_cpu_seconds(p.pid) for p in self.store_procs)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
        for proc in self.store_procs:
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.state.cleanup()


# -- the store's size ----------------------------------------------------------------------


def memcached_bytes(port: int, known: set[str]) -> tuple[int, int, int]:
    """Keys under the prefix, the sum and largest of their values.

    ``lru_crawler metadump`` may miss an item just replaced (a cas): the keys
    of two dumps and of earlier calls (``known``) are all read with ``get``.
    """

    def ask(command: bytes, end: bytes) -> bytes:
        with socket.create_connection((LOOPBACK, port), timeout=30) as sock:
            sock.sendall(command)
            data = b""
            while not data.endswith(end):
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                data += chunk
            return data

    for _ in range(2):
        dump = ask(b"lru_crawler metadump all\r\n", b"END\r\n").decode()
        for line in dump.splitlines():
            if line.startswith("key="):
                key = urllib.parse.unquote(line.split()[0][4:])
                if key.startswith(PREFIX):
                    known.add(key)
    keys = sorted(known)
    found = 0
    total = largest = 0
    for start in range(0, len(keys), 100):
        batch = keys[start : start + 100]
        data = ask(b"get " + " ".join(batch).encode() + b"\r\n", b"END\r\n")
        for row in data.split(b"\r\n"):
            if row.startswith(b"VALUE "):
                found += 1
                size = int(row.split()[3])
                total += size
                largest = max(largest, size)
    return found, total, largest


def redis_bytes(port: int) -> tuple[int, int, int]:
    """Keys under the prefix: the sum of their ``MEMORY USAGE``, the largest ``STRLEN``."""
    import redis

    client = redis.Redis(host=LOOPBACK, port=port)
    try:
        keys = total = largest = 0
        for key in client.scan_iter(match=PREFIX + "*", count=1000):
            keys += 1
            total += int(client.memory_usage(key, samples=0) or 0)
            if client.type(key) == b"string":
                largest = max(largest, int(client.strlen(key)))
        return keys, total, largest
    finally:
        client.close()


def etcd_bytes(url: str) -> tuple[int, int, int]:
    """Keys under the prefix (a range read through the JSON gateway): key + value bytes."""
    end = PREFIX[:-1] + chr(ord(PREFIX[-1]) + 1)
    body = json.dumps(
        {
            "key": base64.b64encode(PREFIX.encode()).decode(),
            "range_end": base64.b64encode(end.encode()).decode(),
        }
    ).encode()
    request = urllib.request.Request(f"{url}/v3/kv/range", data=body)
    with urllib.request.urlopen(request, timeout=30) as resp:
        kvs = json.loads(resp.read()).get("kvs", [])
    sizes = [len(base64.b64decode(kv.get("value", ""))) for kv in kvs]
    keys = sum(len(base64.b64decode(kv["key"])) for kv in kvs)
    return len(kvs), keys + sum(sizes), max(sizes, default=0)


def sqlite_bytes(path: str) -> tuple[int, int, int]:
    """Rows of every table and the length of all their columns; the largest single value."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        rows = total = largest = 0
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            columns = [r[1] for r in conn.execute(f"PRAGMA table_info('{table}')")]
            lengths = " + ".join(f'coalesce(length("{c}"), 0)' for c in columns)
            widest = ", ".join(f'coalesce(length("{c}"), 0)' for c in columns)
            widest = f"max({widest})" if len(columns) > 1 else widest
            count, size, big = conn.execute(
                f'SELECT count(*), sum({lengths}), max({widest}) FROM "{table}"'
            ).fetchone()
            rows += count
            total += size or 0
            largest = max(largest, big or 0)
        return rows, total, largest
    finally:
        conn.close()


# -- setting up ----------------------------------------------------------------------------


def start_setup(
    backend: str, servers_n: int | None, members: int, nofile: int, extra: Sequence[str] = ()
) -> Setup:
    """The store (if any) and the servers on it; everything stopped by ``Setup.stop``.

    ``extra``: ``key: value`` lines added to every server's configuration file."""
    state = tempfile.TemporaryDirectory(prefix="distributex-fleet-")
    setup = Setup(backend, [], [], None, state)
    pool = "".join(f"{line}\n" for line in extra)
    pool += f"autocreate: true\npools:\n  - name: {POOL}\n    expire: 600\n"
    try:
        if backend == "memcache":
            proc, port = start_memcached()
            setup.store_procs = [proc]
            known: set[str] = set()
            setup.store_bytes = lambda: memcached_bytes(port, known)
            texts = [f"backend: memcache\nmemcachehost: {LOOPBACK}\nmemcacheport: {port}\n"]
            default_servers = 2
        elif backend == "redis":
            proc, port = start_redis()
            setup.store_procs = [proc]
            setup.store_bytes = lambda: redis_bytes(port)
            texts = [f"backend: redis\nredis_url: redis://{LOOPBACK}:{port}/0\n"]
            default_servers = 2
        elif backend == "etcd":
            setup.store_procs, urls = start_etcd(members, state.name)
            setup.store_bytes = lambda: etcd_bytes(urls[0])
            setup.notes["etcd_members"] = members
            texts = [
                f"backend: etcd\netcd_endpoints: {','.join(urls[j:] + urls[:j])}\n"
                for j in range(len(urls))
            ]
            default_servers = 2
        elif backend == "sqlite":
            path = os.path.join(state.name, "state.db")
            setup.store_bytes = lambda: sqlite_bytes(path)
            texts = [f"backend: sqlite\nsqlite_path: {path}\nsqlite_sync: full\n"]
            default_servers = 1
        else:
            texts = ["backend: inmemory\n"]
            default_servers = 1
        count = 1 if backend == "inmemory" else (servers_n or default_servers)
        for j in range(count):
            config = os.path.join(state.name, f"server-{j}.yaml")
            with open(config, "w") as fh:
                fh.write(texts[j % len(texts)] + pool)
            setup.servers.append(Server(config=config, nofile=nofile).start())
    except BaseException:
        setup.stop()
        raise
    return setup


# -- the clients ---------------------------------------------------------------------------


async def ask(port: int, verb: str, host: str, extra: str = "") -> tuple[bytes, str | None]:
    """One request on a connection of its own."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(request(verb, POOL, host, extra))
        return await read_answer(reader)
    finally:
        writer.close()


async def queue_length(port: int) -> int:
    """The pool's waiters as ``/status?pool=`` shows them (a count field if it has
    one); -1 if the server answered something else (shown with FQDEBUG)."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(f"GET /status?pool={POOL} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        body, _ = await read_answer(reader)
    finally:
        writer.close()
    try:
        pool = json.loads(body)["pools"][0]
    except ValueError:
        if os.environ.get("FQDEBUG"):
            print(f"/status answered {body[:200]!r}", file=sys.stderr)
        return -1
    for name in ("waiters_count", "waiting", "queue_length", "waiters_total"):
        if isinstance(pool.get(name), int):
            return int(pool[name])
    return sum(int(w.get("requests", 1)) for w in pool.get("waiters", []))


async def settle(setup: Setup, queued: int, bound: float) -> tuple[float, float, float, int]:
    """Poll ``/status`` (every 0.5 s) until the pool's queue is ``queued`` long.

    Returns (server CPU, store CPU, monotonic s) at that moment and the polls
    made. The polls' own cost (a read of every page) is in the CPU figures;
    ``status_cost`` measures it so that it can be taken out.
    """
    deadline = time.monotonic() + bound
    port = setup.servers[0].port
    polls = 0
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        polls += 1
        now = time.monotonic()
        async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
            length = await queue_length(port)
        if os.environ.get("FQDEBUG"):
            print(f"settle: queue {length}", file=sys.stderr)
        if length == queued:
            return setup.server_cpu(), setup.store_cpu(), now, polls
    raise TimeoutError


async def status_cost(setup: Setup, polls: int = 10) -> tuple[float, float]:
    """Server and store CPU seconds of one ``/status?pool=`` poll, the queue at rest."""
    port = setup.servers[0].port
    cpu0, store0 = setup.server_cpu(), setup.store_cpu()
    for _ in range(polls):
        await queue_length(port)
    return (setup.server_cpu() - cpu0) / polls, (setup.store_cpu() - store0) / polls


async def at_rest(setup: Setup, seconds: float = 2.0) -> float:
    """The servers' CPU (% of a core) over ``seconds`` with nothing arriving or leaving."""
    cpu0, t0 = setup.server_cpu(), time.monotonic()
    await asyncio.sleep(seconds)
    return (setup.server_cpu() - cpu0) / (time.monotonic() - t0) * 100


# -- one run -------------------------------------------------------------------------------


async def scenario(
    setup: Setup, waiters_n: int, cancel: int, bound: float, args: Any
) -> dict[str, Any]:
    servers = setup.servers
    s0 = servers[0]
    result: dict[str, Any] = {
        "backend": setup.backend,
        "servers": len(servers),
        "waiters": waiters_n,
        **setup.notes,
    }
    answer, _ = await ask(s0.port, "get", "holder", f"&ttl={HOLDER_TTL}")
    assert answer == b"YES", answer
    if setup.store_bytes is not None:
        result["store_keys_idle"], result["store_bytes_idle"], _ = setup.store_bytes()

    sources = args.sources or max(1, math.ceil(waiters_n / PER_SOURCE))
    generators = args.generators or max(1, math.ceil(waiters_n / GENERATOR_SOCKETS))
    result["sources"], result["generators"] = sources, generators
    crowd = [Waiter(i, i % len(servers)) for i in range(waiters_n)]
    plan = Plan(POOL, [s.port for s in servers], sources, WAITER_TTL, args.nofile)
    crowds = Crowds(plan, crowd, generators)
    try:
        return await _phases(setup, crowds, cancel, bound, args, result)
    finally:
        await crowds.close()


async def _phases(
    setup: Setup, crowds: Crowds, cancel: int, bound: float, args: Any, result: dict[str, Any]
) -> dict[str, Any]:
    servers, s0, crowd = setup.servers, setup.servers[0], crowds.waiters
    waiters_n = len(crowd)

    # Arrivals.
    result["server_rss_kb_idle"] = setup.server_rss_kb()
    cpu0, store0, t0 = setup.server_cpu(), setup.store_cpu(), time.monotonic()
    try:
        async with asyncio.timeout(bound):
            await crowds.park()
        cpu1, store1, t1, polls = await settle(setup, waiters_n, bound)
    except TimeoutError:
        result["arrivals_timed_out"] = True
        await crowds.gather_seen()
        result["arrivals_written"] = sum(1 for w in crowd if w.written_ns)
        answered: dict[str, int] = {}
        for w in crowd:
            if w.answer:
                answered[w.answer[:200]] = answered.get(w.answer[:200], 0) + 1
        result["arrivals_answered"] = answered  # what the waits that did not park were told
        if os.environ.get("FQDEBUG"):
            for server in setup.servers:
                ss = subprocess.run(
                    ["ss", "-Htn", "state", "established", f"( sport = :{server.port} )"],
                    capture_output=True,
                    text=True,
                )
                lines = ss.stdout.splitlines()
                unread = sum(1 for line in lines if line.split()[0] != "0")
                print(
                    f"server :{server.port}: {len(lines)} connections, {unread} with unread bytes",
                    file=sys.stderr,
                )
                kinds: dict[str, int] = {}
                for line in server.log(tail=None).splitlines():
                    if " INFO " not in line and " DEBUG " not in line:
                        kind = line.split(" ", 3)[-1][:100]
                        kinds[kind] = kinds.get(kind, 0) + 1
                for kind, count in sorted(kinds.items(), key=lambda kv: -kv[1])[:8]:
                    print(f"  {count} x {kind}", file=sys.stderr)
        return result
    result["park_s"] = t1 - t0
    result["server_rss_kb_parked"] = setup.server_rss_kb()
    result["server_kib_per_waiter"] = (
        result["server_rss_kb_parked"] - result["server_rss_kb_idle"]
    ) / waiters_n
    result["server_cpu_us_per_arrival"] = (cpu1 - cpu0) / waiters_n * 1e6
    result["store_cpu_us_per_arrival"] = (store1 - store0) / waiters_n * 1e6
    result["queued"] = waiters_n
    result["server_cpu_pct_parked"] = await at_rest(setup)
    poll_cpu, poll_store = await status_cost(setup)
    result["status_polls_while_parking"] = polls
    result["server_cpu_us_per_status"] = poll_cpu * 1e6
    result["server_cpu_us_per_arrival_without_polls"] = (
        (cpu1 - cpu0 - polls * poll_cpu) / waiters_n * 1e6
    )
    result["store_cpu_us_per_arrival_without_polls"] = (
        (store1 - store0 - polls * poll_store) / waiters_n * 1e6
    )
    if setup.store_bytes is not None:
        keys, size, largest = setup.store_bytes()
        result.update(store_keys_parked=keys, store_bytes_parked=size, store_largest_value=largest)
        result["store_bytes_per_waiter"] = (size - result["store_bytes_idle"]) / waiters_n

    # Departures: K from the middle hang up.
    middle = max(0, waiters_n // 2 - cancel // 2)
    leaving = crowd[middle : middle + cancel]
    if leaving:
        cpu0, store0 = setup.server_cpu(), setup.store_cpu()
        await crowds.hang_up([w.index for w in leaving])
        try:
            cpu1, store1, _, _ = await settle(setup, waiters_n - cancel, bound)
            result["server_cpu_us_per_departure"] = (cpu1 - cpu0) / cancel * 1e6
            result["store_cpu_us_per_departure"] = (store1 - store0) / cancel * 1e6
        except TimeoutError:
            result["departures_timed_out"] = True
    result["departures"] = len(leaving)
    gone = {w.index for w in leaving}
    staying = [w for w in crowd if w.index not in gone]

    # Drain.
    spy = None
    if args.profile:
        spy = start_py_spy(s0.pid, min(bound, args.profile_seconds), args.profile)
    cpu0, store0 = setup.server_cpu(), setup.store_cpu()
    t0_ns = time.monotonic_ns()
    answer, _ = await ask(s0.port, "release", "holder")
    assert answer == b"OK", answer
    still = await crowds.finish(bound, skip=sorted(gone))
    end_ns = time.monotonic_ns()
    cpu1, store1 = setup.server_cpu(), setup.store_cpu()
    await crowds.gather_seen()
    if spy is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            spy.wait(bound)
        result["profile"] = summarize_profile(args.profile)
    served = [w for w in staying if w.released]
    last_ns = max((w.release_ns for w in served), default=end_ns)
    drain_s = ((end_ns if still else last_ns) - t0_ns) / 1e9
    result.update(
        drain_timed_out=bool(still),
        served=len(served),
        drain_s=drain_s,
        handoffs_per_s=len(served) / drain_s if drain_s > 0 else float("nan"),
        server_cpu_us_per_handoff=(cpu1 - cpu0) / max(1, len(served)) * 1e6,
        store_cpu_us_per_handoff=(store1 - store0) / max(1, len(served)) * 1e6,
        answers=_answers(staying),
    )
    granted = sorted(served, key=lambda w: w.yes_ns)
    # The wait from the holder's release (every waiter was parked before it).
    waits = sorted((w.yes_ns - t0_ns) / 1e9 for w in granted)
    gaps = sorted(
        (b.yes_ns - a.release_ns) / 1e9
        for a, b in itertools.pairwise(granted)
        if b.yes_ns > a.release_ns
    )
    for pct in (50, 99):
        result[f"wait_p{pct}_s"] = percentile(waits, pct)
        result[f"handoff_p{pct}_s"] = percentile(gaps, pct)
    result["wait_max_s"] = waits[-1] if waits else float("nan")
    result["fifo_out_of_order_in_server"] = sum(
        _inversions([w for w in granted if w.server == j]) for j in range(len(servers))
    )
    # Across load generators the times of writing are not the server's order of
    # reading: it reads connections in the order they were connected, and a
    # generator may write a while after its connection is accepted.
    result["fifo_out_of_order_in_server_and_generator"] = sum(
        _inversions([w for w in granted if (w.server, w.generator) == (j, g)])
        for j in range(len(servers))
        for g in range(result["generators"])
    )
    result["fifo_out_of_order_all"] = _inversions(granted)
    result["safety_violations"] = safety_violations(
        Grant(w.index, POOL, w.written_ns, w.yes_ns, w.release_ns, w.fence) for w in granted
    )
    return result


def _inversions(granted: Sequence[Waiter]) -> int:
    """Adjacent grants whose requests were written in the other order, > 1 ms apart."""
    return sum(
        1 for a, b in itertools.pairwise(granted) if b.written_ns < a.written_ns - FIFO_SLACK_NS
    )


def _answers(crowd: Sequence[Waiter]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for waiter in crowd:
        name = waiter.answer or "(none yet)"
        counts[name] = counts.get(name, 0) + 1
    return counts


def run_one(backend: str, waiters_n: int, args: Any) -> dict[str, Any]:
    nofile = raise_nofile(waiters_n + 4096)
    args.nofile = nofile
    # Enough departures to see past the CPU clock's 10 ms ticks.
    cancel = (
        args.cancel if args.cancel is not None else max(waiters_n // 10, min(50, waiters_n // 2))
    )
    setup = start_setup(backend, args.servers, args.members, nofile, args.set)
    began = time.monotonic()
    try:
        result = asyncio.run(scenario(setup, waiters_n, min(cancel, waiters_n), args.timeout, args))
    finally:
        stop0 = time.monotonic()
        statuses = [s.stop(args.timeout) for s in setup.servers]
        stop_s = time.monotonic() - stop0
        setup.stop()
    result["server_exit_statuses"] = statuses
    result["servers_stop_s"] = stop_s
    result["run_s"] = time.monotonic() - began
    return result


# -- the report ----------------------------------------------------------------------------


def _us(r: dict[str, Any], key: str) -> str:
    value = r.get(key)
    return "-" if value is None else f"{value:,.0f} µs"


def rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    out = [
        ("backend, servers, waiters", f"{r['backend']}, {r['servers']}, {fmt_int(r['waiters'])}"),
        ("load generators, source addresses", f"{r['generators']}, {r['sources']}"),
    ]
    if r.get("arrivals_timed_out"):
        out.append(("arrivals", f"not done in the bound ({r['arrivals_written']:,} written)"))
        for answer, count in r.get("arrivals_answered", {}).items():
            out.append(("  answered meanwhile", f"{count:,} x {answer!r}"))
        return out
    out += [
        ("parked (queue on /status)", f"{r['park_s']:.1f} s ({fmt_int(r['queued'])})"),
        (
            "CPU per arrival: servers / store",
            f"{_us(r, 'server_cpu_us_per_arrival')} / {_us(r, 'store_cpu_us_per_arrival')}",
        ),
    ]
    out.append(
        (
            "  without the /status polls (polls; each)",
            f"{_us(r, 'server_cpu_us_per_arrival_without_polls')} / "
            f"{_us(r, 'store_cpu_us_per_arrival_without_polls')} "
            f"({r['status_polls_while_parking']}; {_us(r, 'server_cpu_us_per_status')})",
        )
    )
    out.append(
        ("server CPU while parked, at rest", f"{r['server_cpu_pct_parked']:.1f} % of a core")
    )
    out.append(
        (
            "servers' RSS: none parked -> parked (per waiter)",
            f"{r['server_rss_kb_idle'] / 1024:.1f} -> {r['server_rss_kb_parked'] / 1024:.1f} MiB "
            f"({r['server_kib_per_waiter']:.2f} KiB)",
        )
    )
    if "store_bytes_per_waiter" in r:
        out.append(
            (
                "store bytes per waiter (keys; largest value)",
                f"{r['store_bytes_per_waiter']:,.0f} B ({r['store_keys_parked']} keys; "
                f"{r['store_largest_value']:,} B)",
            )
        )
    departures = f"{r['departures']:,}"
    if r.get("departures_timed_out"):
        departures += " (not quiet within the bound)"
    else:
        departures += f", queue then {r['waiters'] - r['departures']:,}"
    out += [
        ("departures (hang-ups from the middle)", departures),
        (
            "CPU per departure: servers / store",
            f"{_us(r, 'server_cpu_us_per_departure')} / {_us(r, 'store_cpu_us_per_departure')}",
        ),
        (
            "drained",
            f"{fmt_int(r['served'])} in {r['drain_s']:.1f} s"
            + (" (bound reached)" if r["drain_timed_out"] else ""),
        ),
        ("hand-offs/s", fmt_int(r["handoffs_per_s"])),
        (
            "CPU per hand-off: servers / store",
            f"{_us(r, 'server_cpu_us_per_handoff')} / {_us(r, 'store_cpu_us_per_handoff')}",
        ),
        (
            "wait from the release p50 / p99 / max",
            f"{r['wait_p50_s']:.2f} / {r['wait_p99_s']:.2f} / {r['wait_max_s']:.2f} s",
        ),
        (
            "hand-off p50 / p99",
            f"{r['handoff_p50_s'] * 1000:.1f} / {r['handoff_p99_s'] * 1000:.1f} ms",
        ),
        (
            "out of arrival order: in a server and generator / in a server / all",
            f"{r['fifo_out_of_order_in_server_and_generator']} / "
            f"{r['fifo_out_of_order_in_server']} / {r['fifo_out_of_order_all']}",
        ),
        ("safety violations", str(sum(r["safety_violations"].values()))),
        ("answers", ", ".join(f"{k}: {v}" for k, v in sorted(r["answers"].items()))),
        ("servers stopped in", f"{r['servers_stop_s']:.1f} s, status {r['server_exit_statuses']}"),
    ]
    return out


def growth(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per backend: each cost at its largest W over its smallest W (where both finished)."""
    out: dict[str, dict[str, float]] = {}
    for backend in dict.fromkeys(r["backend"] for r in results):
        mine = sorted((r for r in results if r["backend"] == backend), key=lambda r: r["waiters"])
        ratios: dict[str, float] = {}
        for cost in ("arrival", "arrival_without_polls", "departure", "handoff"):
            key = f"server_cpu_us_per_{cost}"
            done = [r for r in mine if r.get(key) and not r.get("drain_timed_out")]
            if len(done) >= 2:
                ratios[f"{cost}_{done[0]['waiters']}_to_{done[-1]['waiters']}"] = (
                    done[-1][key] / done[0][key]
                )
        out[backend] = ratios
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="redis", help=f"one or more of {','.join(BACKENDS)}")
    parser.add_argument("--waiters", default="100,1000", help="comma-separated W")
    parser.add_argument("--cancel", type=int, default=None, help="departures (default W/10)")
    parser.add_argument("--timeout", type=float, default=120.0, help="bound on each phase (s)")
    parser.add_argument("--servers", type=int, default=None, help="default 2; sqlite 1")
    parser.add_argument("--members", type=int, default=3, help="etcd cluster size")
    parser.add_argument("--sources", type=int, default=None, help="127.0.0.x source addresses")
    parser.add_argument(
        "--generators", type=int, default=None, help="load-generator processes (default W/18,000)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="'KEY: VALUE'",
        help="a line for every server's configuration file, e.g. 'max_waiters_per_pool: 20000'",
    )
    parser.add_argument("--profile", metavar="FILE", help="py-spy server 0 during the drain")
    parser.add_argument("--profile-seconds", type=float, default=10.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    backends = args.backend.split(",")
    for backend in backends:
        if backend not in BACKENDS:
            parser.error(f"unknown backend {backend!r}")
    sizes = [int(w) for w in args.waiters.split(",")]
    results = []
    for backend in backends:
        for size in sizes:
            result = run_one(backend, size, args)
            results.append(result)
            if not args.json:
                emit(result, rows(result), f"fleet queue: {backend}, {size:,} waiters", False)
                if "profile" in result:
                    print(result["profile"])
                print(flush=True)
    ratios = growth(results)
    if args.json:
        print(json.dumps({"runs": results, "growth": ratios}, indent=2, sort_keys=True))
    else:
        for backend, found in ratios.items():
            text = ", ".join(f"{k.replace('_', ' ')}: x{v:.1f}" for k, v in found.items())
            print(f"server CPU growth, {backend}: {text or '(fewer than two finished runs)'}")
    bad = sum(sum(r.get("safety_violations", {}).values()) for r in results)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
