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

With ``--backend etcd`` it starts an etcd cluster instead (Debian's
etcd-server, ``--members`` of them on loopback, data in a temp dir); server
*j* asks member *j* first. Then, in the same run and on the same cluster,
the same number of clients fight for one lock through etcd's own v3 lock API
(a lease each, then /v3/lock/lock and /v3/lock/unlock through the HTTP
gateway, client *i* on member *i* mod M), measured the same way (its fence
is the revision the lock was taken at).

    .venv/bin/python bench/shared_mutex.py [--backend memcache] [--servers 2]
        [--clients 50] [--duration 10] [--members 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
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


def start_etcd(members: int, data: str) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    """An etcd cluster of ``members`` on loopback; its processes and client URLs."""
    if shutil.which("etcd") is None:
        sys.exit("etcd is not installed (apt-get install etcd-server)")
    ports = [(free_port(), free_port()) for _ in range(members)]
    initial = ",".join(f"b{i}=http://{LOOPBACK}:{peer}" for i, (_c, peer) in enumerate(ports))
    procs, urls = [], []
    for i, (client, peer) in enumerate(ports):
        url = f"http://{LOOPBACK}:{client}"
        cmd = ["etcd", f"--name=b{i}", f"--data-dir={data}/b{i}", f"--listen-client-urls={url}"]
        cmd += [f"--advertise-client-urls={url}", f"--initial-cluster={initial}"]
        cmd += [f"--listen-peer-urls=http://{LOOPBACK}:{peer}", "--logger=zap"]
        cmd += [f"--initial-advertise-peer-urls=http://{LOOPBACK}:{peer}", "--log-level=error"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        urls.append(url)
    deadline = time.monotonic() + 30
    for url in urls:
        while True:
            try:
                request = urllib.request.Request(f"{url}/v3/kv/range", data=b'{"key":"eA=="}')
                urllib.request.urlopen(request, timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    for proc in procs:
                        proc.kill()
                    sys.exit("etcd did not start")
                time.sleep(0.1)
    return procs, urls


async def etcd_lock_loop(
    index: int,
    base: str,
    window: tuple[float, float],
    grants: list[tuple[Grant, int]],
    waits: list[float],
    counts: list[int],
) -> None:
    """One contender on etcd's own lock API: a lease, then lock / unlock in a loop."""
    connector = aiohttp.TCPConnector(limit=1)
    timeout = aiohttp.ClientTimeout(total=60)
    name = base64.b64encode(POOL.encode()).decode()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async with session.post(f"{base}/v3/lease/grant", json={"TTL": 120}) as resp:
            lease = (await resp.json())["ID"]
        while time.monotonic() < window[1]:
            sent = time.monotonic_ns()
            async with session.post(
                f"{base}/v3/lock/lock", json={"name": name, "lease": lease}
            ) as resp:
                answer = await resp.json()
            yes = time.monotonic_ns()
            if "key" not in answer:
                continue
            releasing = time.monotonic_ns()
            fence = int(answer["header"]["revision"])
            grants.append((Grant(index, POOL, sent, yes, releasing, fence), index))
            if window[0] <= yes / 1e9 <= window[1]:
                waits.append((yes - sent) / 1e9)
                counts[index] += 1
            async with session.post(f"{base}/v3/lock/unlock", json={"key": answer["key"]}) as resp:
                await resp.read()
        async with session.post(f"{base}/v3/lease/revoke", json={"ID": lease}) as resp:
            await resp.read()


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


async def load(
    bases: list[str], clients: int, warmup: float, duration: float, loop: Any = None
) -> dict[str, Any]:
    grants: list[tuple[Grant, int]] = []
    waits: list[float] = []
    counts = [0] * clients
    start = time.monotonic()
    window = (start + warmup, start + warmup + duration)
    loop = loop or client_loop
    tasks = [loop(i, bases[i % len(bases)], window, grants, waits, counts) for i in range(clients)]
    await asyncio.gather(*tasks)
    return {"grants": grants, "waits": sorted(waits), "counts": counts}


def handoffs(result: dict[str, Any], groups: int) -> tuple[list[float], list[float]]:
    """Hand-off latencies (a release sent -> the next YES): within a group, across groups."""
    ordered = sorted(result["grants"], key=lambda item: item[0].yes_ns)
    same, cross = [], []
    for (prev, prev_client), (cur, cur_client) in itertools.pairwise(ordered):
        handoff = (cur.yes_ns - prev.release_ns) / 1e9
        if handoff < 0:
            continue
        crossing = prev_client % groups != cur_client % groups
        (cross if crossing else same).append(handoff)
    return sorted(same), sorted(cross)


def etcd_lock_api(urls: list[str], args: argparse.Namespace, pids: list[int]) -> dict[str, Any]:
    """etcd's own lock API under the same load, on the same cluster."""
    cpu0 = sum(proc_cpu_seconds(pid) for pid in pids)
    result = asyncio.run(load(urls, args.clients, args.warmup, args.duration, etcd_lock_loop))
    cpu = sum(proc_cpu_seconds(pid) for pid in pids) - cpu0
    grants = [g for g, _ in result["grants"]]
    same, cross = handoffs(result, len(urls))
    every = sorted(same + cross)
    counts = result["counts"]
    return {
        "grants_per_s": sum(counts) / args.duration,
        "wait_p50_s": percentile(result["waits"], 50),
        "wait_p99_s": percentile(result["waits"], 99),
        "fairness_jain": jain(counts),
        "grants_min_max": (min(counts), max(counts)),
        "handoff_p50_s": percentile(every, 50),
        "handoff_p99_s": percentile(every, 99),
        "etcd_cpu_us_per_grant": cpu / max(1, len(grants)) * 1e6,
        "violations": safety_violations(grants),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backend", choices=["memcache", "sqlite", "inmemory", "etcd"], default="memcache"
    )
    parser.add_argument("--servers", type=int, default=None, help="memcache, etcd 2; sqlite 1")
    parser.add_argument("--sync", choices=["full", "normal"], default="full", help="sqlite")
    parser.add_argument("--members", type=int, default=3, help="etcd cluster size")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    memcached = None
    etcd: list[subprocess.Popen[bytes]] = []
    store_pids: list[int] = []
    configs: list[str] = []
    state = tempfile.TemporaryDirectory()

    def write_config(text: str) -> str:
        path = os.path.join(state.name, f"config-{len(configs)}.yaml")
        with open(path, "w") as fh:
            fh.write(text + f"autocreate: true\npools:\n  - name: {POOL}\n")
        configs.append(path)
        return path

    if args.backend == "memcache":
        memcached, mc_port = start_memcached()
        store_pids = [memcached.pid]
        servers_n = args.servers or 2
        text = f"backend: memcache\nmemcachehost: {LOOPBACK}\nmemcacheport: {mc_port}\n"
        paths = [write_config(text)] * servers_n
    elif args.backend == "etcd":
        etcd, urls = start_etcd(args.members, state.name)
        store_pids = [p.pid for p in etcd]
        servers_n = args.servers or 2
        paths = []
        for j in range(servers_n):  # server j asks member j first
            order = urls[j % len(urls) :] + urls[: j % len(urls)]
            paths.append(write_config(f"backend: etcd\netcd_endpoints: {','.join(order)}\n"))
    elif args.backend == "sqlite":
        # On the disk the tests use (not a tmpfs): fsyncs cost what they cost there.
        path = os.path.join(state.name, "state.db")
        servers_n = args.servers or 1
        text = f"backend: sqlite\nsqlite_path: {path}\nsqlite_sync: {args.sync}\n"
        paths = [write_config(text)] * servers_n
    else:
        servers_n = 1
        paths = [write_config("backend: inmemory\n")]
    servers = [Server(config=path).start() for path in paths]
    lock_api: dict[str, Any] | None = None
    try:
        cpu0 = [s.cpu_seconds() for s in servers]
        store0 = sum(proc_cpu_seconds(pid) for pid in store_pids)
        wall0 = time.monotonic()
        result = asyncio.run(
            load([s.base for s in servers], args.clients, args.warmup, args.duration)
        )
        wall = time.monotonic() - wall0
        cpu = sum(s.cpu_seconds() - c for s, c in zip(servers, cpu0, strict=True))
        store_cpu = sum(proc_cpu_seconds(pid) for pid in store_pids) - store0
        for server in servers:
            server.stop()
        if etcd:
            lock_api = etcd_lock_api(urls, args, store_pids)
    finally:
        for server in servers:
            server.stop()
        if memcached is not None:
            memcached.terminate()
            memcached.wait(10)
        for proc in etcd:
            proc.terminate()
            proc.wait(10)
        state.cleanup()

    grants = [g for g, _ in result["grants"]]
    counts = [
        (int(m.group(1)), int(m.group(2)))
        for s in servers
        for m in re.finditer(r": (\d+) commits since start, (\d+) fsync'd", s.final_log)
    ]
    commits = sum(c for c, _ in counts)
    fsyncs = sum(f for _, f in counts)
    violations = safety_violations(grants)
    same, cross = handoffs(result, servers_n)
    counts = result["counts"]
    total = sum(counts)
    store = {"memcache": "memcached", "etcd": "etcd"}.get(args.backend, "store")
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
        f"{store}_cpu_us_per_grant": store_cpu / max(1, len(grants)) * 1e6,
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
            f"CPU per grant: servers / {store}",
            f"{rows['server_cpu_us_per_grant']:.0f} µs / "
            f"{rows[f'{store}_cpu_us_per_grant']:.0f} µs",
        ),
        ("safety violations", str(sum(violations.values()))),
    ]
    if args.backend == "sqlite":
        label = f"commits / fsyncs per grant (sync {args.sync})"
        per_grant = (
            f"{rows['sqlite_commits_per_grant']:.2f} / {rows['sqlite_fsyncs_per_grant']:.2f}"
        )
        table.insert(-1, (label, per_grant))
    bad = sum(violations.values())
    if lock_api is not None:
        rows["etcd_lock_api"] = lock_api
        api = lock_api
        table += [
            (f"etcd's lock API ({args.members} members): grants/s", fmt_int(api["grants_per_s"])),
            (
                "  wait p50 / p99",
                f"{fmt_ms(api['wait_p50_s'])} / {fmt_ms(api['wait_p99_s'])}",
            ),
            (
                "  fairness (Jain), grants min-max",
                f"{api['fairness_jain']:.4f}, {api['grants_min_max'][0]}-"
                f"{api['grants_min_max'][1]}",
            ),
            (
                "  hand-off p50 / p99",
                f"{fmt_ms(api['handoff_p50_s'])} / {fmt_ms(api['handoff_p99_s'])}",
            ),
            ("  CPU per grant: etcd", f"{api['etcd_cpu_us_per_grant']:.0f} µs"),
            ("  safety violations", str(sum(api["violations"].values()))),
        ]
    emit(rows, table, "shared mutex fight", args.json)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
