"""N clients spread over several servers that share one backend fight for one mutex.

Starts memcached (Debian's package) on a free loopback port and S distributexd
servers with ``backend: memcache`` on it (or, with ``--backend inmemory``, one
inmemory server, for the same load in the same run). Client i talks to server
i mod S and loops /wait/ -> YES -> /release/. Reported: grants/s; wait latency
p50/p99 (sending /wait/ to YES); Jain's fairness index over clients; hand-off
latency (a release sent -> the next holder's YES) for hand-offs within one
server and across servers; CPU per grant of the servers and of the store's
processes; and safety over every grant (fences strictly increase in grant
order, hold intervals never overlap). Exit status 1 on a violation of the
servers' run (a rival lock's figures below are reported, not judged).

With ``--backend redis`` (three servers by default) it starts redis-server
(Debian's package) instead, and after the distributex run, on the same Redis,
runs the same clients through redis-py's own ``Lock`` (redis.asyncio.lock:
``SET NX PX``, polling every ``--lock-sleep`` seconds; redis-py's default is
0.1) for the same time: grants/s, waits, fairness, hand-off and Redis CPU
per grant side by side. redis-py's Lock has no fencing token, so its fence
is the grant order (only the overlap check means anything there).

With ``--backend etcd`` it starts an etcd cluster instead (Debian's
etcd-server, ``--members`` of them on loopback, data in a temp dir); server
*j* asks member *j* first. Then, in the same run and on the same cluster,
the same number of clients fight for one lock through etcd's own v3 lock API
(a lease each, then Lock and Unlock, client *i* on member *i* mod M), measured
the same way (its fence is the revision the lock was taken at): through the
HTTP/JSON gateway (/v3/lock/lock, aiohttp, a connection per client) and over
gRPC (a channel per member, as the servers have), one after the other
(``--lock-api`` picks one).

    .venv/bin/python bench/shared_mutex.py
        [--backend memcache|redis|etcd|sqlite|inmemory] [--servers N]
        [--clients 50] [--duration 10] [--members 3] [--lock-sleep 0.1] [--json]
        [--lock-api gateway|grpc|both]
        [--client aiohttp|raw] [--profile FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import base64
import bisect
import functools
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
from collections.abc import Awaitable, Callable, Coroutine, Sequence
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
    start_py_spy,
    summarize_profile,
)
from _loadgen import make_client

POOL = "fight"
# The lease each /wait/ asks for: the `distributex` client's default.
LEASE_TTL = 60
# The store's process(es) per backend, as named in the figures.
STORE_PROCESS = {"memcache": "memcached", "redis": "redis", "etcd": "etcd"}

Loop = Callable[..., Awaitable[None]]


def spawn(cmd: list[str], package: str) -> subprocess.Popen[bytes]:
    if shutil.which(cmd[0]) is None:
        sys.exit(f"{cmd[0]} is not installed (apt-get install {package})")
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_ready(
    ready: Callable[[], object],
    procs: Sequence[subprocess.Popen[bytes]],
    what: str,
    deadline: float,
) -> None:
    """Call ``ready`` until it stops raising OSError; past ``deadline`` kill and exit."""
    while True:
        try:
            ready()
            return
        except OSError:
            if time.monotonic() > deadline:
                for proc in procs:
                    proc.kill()
                sys.exit(f"{what} did not start")
            time.sleep(0.05)


def start_listener(cmd: list[str], port: int, package: str) -> subprocess.Popen[bytes]:
    """Start ``cmd`` and wait until it accepts TCP connections on ``port``."""
    proc = spawn(cmd, package)
    connect = functools.partial(socket.create_connection, (LOOPBACK, port), timeout=0.5)
    wait_ready(lambda: connect().close(), [proc], cmd[0], time.monotonic() + 10)
    return proc


def start_memcached() -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    cmd = ["memcached", "-l", LOOPBACK, "-p", str(port), "-U", "0", "-M", "-m", "64"]
    if os.geteuid() == 0:
        cmd += ["-u", "nobody"]
    return start_listener(cmd, port, "memcached"), port


def start_redis() -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    # A folder of its own: Redis loads a dump.rdb it finds in its folder at start.
    folder = tempfile.mkdtemp(prefix="distributex-bench-redis-")
    atexit.register(shutil.rmtree, folder, True)
    cmd = ["redis-server", "--port", str(port), "--bind", LOOPBACK, "--save", ""]
    cmd += ["--appendonly", "no", "--dir", folder]
    return start_listener(cmd, port, "redis-server"), port


def start_etcd(members: int, data: str) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    """An etcd cluster of ``members`` on loopback; its processes and client URLs."""
    ports = [(free_port(), free_port()) for _ in range(members)]
    initial = ",".join(f"b{i}=http://{LOOPBACK}:{peer}" for i, (_c, peer) in enumerate(ports))
    procs, urls = [], []
    for i, (client, peer) in enumerate(ports):
        url = f"http://{LOOPBACK}:{client}"
        cmd = ["etcd", f"--name=b{i}", f"--data-dir={data}/b{i}", f"--listen-client-urls={url}"]
        cmd += [f"--advertise-client-urls={url}", f"--initial-cluster={initial}"]
        cmd += [f"--listen-peer-urls=http://{LOOPBACK}:{peer}", "--logger=zap"]
        cmd += [f"--initial-advertise-peer-urls=http://{LOOPBACK}:{peer}", "--log-level=error"]
        procs.append(spawn(cmd, "etcd-server"))
        urls.append(url)
    deadline = time.monotonic() + 30
    for url in urls:
        request = urllib.request.Request(f"{url}/v3/kv/range", data=b'{"key":"eA=="}')
        wait_ready(
            lambda r=request: urllib.request.urlopen(r, timeout=2).read(), procs, "etcd", deadline
        )
    return procs, urls


def note_grant(
    index: int,
    sent: int,
    yes: int,
    fence: int,
    window: tuple[float, float],
    grants: list[tuple[Grant, int]],
    waits: list[float],
    counts: list[int],
) -> None:
    """Record one grant (the release is sent right after); count it if inside the window."""
    grants.append((Grant(index, POOL, sent, yes, time.monotonic_ns(), fence), index))
    if window[0] <= yes / 1e9 <= window[1]:
        waits.append((yes - sent) / 1e9)
        counts[index] += 1


async def client_loop(
    index: int,
    base: str,
    window: tuple[float, float],
    grants: list[tuple[Grant, int]],
    waits: list[float],
    counts: list[int],
    kind: str = "aiohttp",
) -> None:
    """One client on one keep-alive connection: /wait/ -> YES -> /release/, again.

    ``kind``: aiohttp, or the lean raw-socket client (``--client raw``).
    """
    client = make_client(kind, int(base.rsplit(":", 1)[1]))
    wait = f"/wait/?host=c{index}&pool={POOL}&ttl={LEASE_TTL}"
    release = f"/release/?host=c{index}&pool={POOL}"
    try:
        while time.monotonic() < window[1]:
            sent = time.monotonic_ns()
            body, fence = await client.get(wait)
            yes = time.monotonic_ns()
            if body != b"YES" or fence is None:
                continue
            note_grant(index, sent, yes, int(fence), window, grants, waits, counts)
            await client.get(release)
    finally:
        await client.close()


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
            fence = int(answer["header"]["revision"])
            note_grant(index, sent, yes, fence, window, grants, waits, counts)
            async with session.post(f"{base}/v3/lock/unlock", json={"key": answer["key"]}) as resp:
                await resp.read()
        async with session.post(f"{base}/v3/lease/revoke", json={"ID": lease}) as resp:
            await resp.read()


def v3lock_messages() -> tuple[Any, Any, Any, Any]:
    """etcd's v3lock messages (LockRequest/Response, UnlockRequest/Response).

    aetcd ships etcd's KV, lease and watch messages but not the lock service's;
    its four small messages are described here at run time.
    """
    from aetcd import rpc  # noqa: F401 - registers etcdserverpb.ResponseHeader
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    pool = descriptor_pool.Default()
    name = "distributex_bench_v3lock.proto"
    try:
        pool.FindFileByName(name)
    except KeyError:
        field = descriptor_pb2.FieldDescriptorProto
        proto = descriptor_pb2.FileDescriptorProto(
            name=name, package="v3lockpb", dependency=["rpc.proto"]
        )
        shapes = {
            "LockRequest": [
                ("name", 1, field.TYPE_BYTES, None),
                ("lease", 2, field.TYPE_INT64, None),
            ],
            "LockResponse": [
                ("header", 1, field.TYPE_MESSAGE, ".etcdserverpb.ResponseHeader"),
                ("key", 2, field.TYPE_BYTES, None),
            ],
            "UnlockRequest": [("key", 1, field.TYPE_BYTES, None)],
            "UnlockResponse": [("header", 1, field.TYPE_MESSAGE, ".etcdserverpb.ResponseHeader")],
        }
        for message, fields in shapes.items():
            shape = proto.message_type.add(name=message)
            for fname, number, ftype, type_name in fields:
                added = shape.field.add(
                    name=fname, number=number, type=ftype, label=field.LABEL_OPTIONAL
                )
                if type_name:
                    added.type_name = type_name
        pool.Add(proto)
    return tuple(  # type: ignore[return-value]
        message_factory.GetMessageClass(pool.FindMessageTypeByName(f"v3lockpb.{m}"))
        for m in ("LockRequest", "LockResponse", "UnlockRequest", "UnlockResponse")
    )


async def etcd_grpc_lock_load(
    urls: Sequence[str], clients: int, warmup: float, duration: float
) -> dict[str, Any]:
    """The same load on etcd's own lock API over gRPC: one channel per member."""
    import grpc.aio

    channels = [grpc.aio.insecure_channel(url.split("://", 1)[1]) for url in urls]
    try:
        return await load(channels, clients, warmup, duration, etcd_grpc_lock_loop)
    finally:
        for channel in channels:
            await channel.close()


async def etcd_grpc_lock_loop(
    index: int,
    channel: Any,
    window: tuple[float, float],
    grants: list[tuple[Grant, int]],
    waits: list[float],
    counts: list[int],
) -> None:
    """One contender on etcd's own lock API over gRPC: a lease, then Lock / Unlock in a loop."""
    from aetcd import rpc

    lock_request, lock_response, unlock_request, unlock_response = v3lock_messages()
    lock = channel.unary_unary(
        "/v3lockpb.Lock/Lock",
        request_serializer=lock_request.SerializeToString,
        response_deserializer=lock_response.FromString,
    )
    unlock = channel.unary_unary(
        "/v3lockpb.Lock/Unlock",
        request_serializer=unlock_request.SerializeToString,
        response_deserializer=unlock_response.FromString,
    )
    leases = rpc.LeaseStub(channel)
    lease = (await leases.LeaseGrant(rpc.LeaseGrantRequest(TTL=120), timeout=60)).ID
    try:
        while time.monotonic() < window[1]:
            sent = time.monotonic_ns()
            answer = await lock(lock_request(name=POOL.encode(), lease=lease), timeout=60)
            yes = time.monotonic_ns()
            note_grant(index, sent, yes, answer.header.revision, window, grants, waits, counts)
            await unlock(unlock_request(key=answer.key), timeout=60)
    finally:
        await leases.LeaseRevoke(rpc.LeaseRevokeRequest(ID=lease), timeout=60)


async def redis_lock_loop(
    index: int,
    client: Any,
    window: tuple[float, float],
    grants: list[tuple[Grant, int]],
    waits: list[float],
    counts: list[int],
    *,
    sleep: float,
    fences: itertools.count[int],
) -> None:
    """One contender on redis-py's own Lock: acquire (blocking), release, again."""
    lock = client.lock(f"bench:{POOL}", timeout=30, sleep=sleep)
    while time.monotonic() < window[1]:
        sent = time.monotonic_ns()
        await lock.acquire()
        yes = time.monotonic_ns()
        # No fencing token in redis-py's Lock: a counter shared by all contenders
        # (one event loop) numbers the grants in the order they were taken.
        note_grant(index, sent, yes, next(fences), window, grants, waits, counts)
        await lock.release()


async def load(
    targets: Sequence[Any], clients: int, warmup: float, duration: float, loop: Loop = client_loop
) -> dict[str, Any]:
    """Client i runs ``loop`` against target i mod len(targets) for warmup + duration."""
    grants: list[tuple[Grant, int]] = []
    waits: list[float] = []
    counts = [0] * clients
    start = time.monotonic()
    window = (start + warmup, start + warmup + duration)
    tasks = [
        loop(i, targets[i % len(targets)], window, grants, waits, counts) for i in range(clients)
    ]
    await asyncio.gather(*tasks)
    return {"grants": grants, "waits": sorted(waits), "counts": counts, "window": window}


async def redis_lock_load(
    port: int, clients: int, warmup: float, duration: float, sleep: float
) -> dict[str, Any]:
    """The same load on redis-py's own Lock, every contender on one client."""
    import redis.asyncio as aioredis

    client = aioredis.Redis(host=LOOPBACK, port=port, max_connections=clients + 4)
    loop = functools.partial(redis_lock_loop, sleep=sleep, fences=itertools.count())
    try:
        return await load([client], clients, warmup, duration, loop)
    finally:
        await client.aclose()


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


def overtaken(result: dict[str, Any]) -> list[int]:
    """For each wait granted in the window: how many waits sent after it were granted first.

    A queue served strictly by arrival gives 0 everywhere; a wait passed by
    others waits that many hand-offs longer (the tail of the wait times).
    """
    start, end = result["window"]
    later_yes: list[int] = []  # grant times of the waits sent later, kept sorted
    passed: list[int] = []
    for grant in sorted((g for g, _ in result["grants"]), key=lambda g: -g.sent_ns):
        if start <= grant.yes_ns / 1e9 <= end:
            passed.append(bisect.bisect_left(later_yes, grant.yes_ns))
        bisect.insort(later_yes, grant.yes_ns)
    return sorted(passed)


def overtaken_text(rows: dict[str, Any]) -> str:
    return f"{rows['overtaken_share'] * 100:.1f} %, {rows['overtaken_p99']:.0f}"


def summarize(result: dict[str, Any], duration: float, groups: int | None) -> dict[str, Any]:
    """Figures of one run; hand-offs split by server (client i on i mod ``groups``) or not."""
    counts = result["counts"]
    figures: dict[str, Any] = {
        "grants_per_s": sum(counts) / duration,
        "wait_p50_s": percentile(result["waits"], 50),
        "wait_p99_s": percentile(result["waits"], 99),
        "fairness_jain": jain(counts),
        "grants_min_max": (min(counts), max(counts)),
    }
    passed = overtaken(result)
    figures |= {
        "overtaken_share": sum(1 for n in passed if n) / max(1, len(passed)),
        "overtaken_p99": percentile(passed, 99),
    }
    if groups is not None:
        # Client i talks to server i mod groups: the grants each server gave.
        figures["grants_per_server"] = [sum(counts[j::groups]) for j in range(groups)]
    same, cross = handoffs(result, groups or 1)
    if groups is None:
        figures |= {"handoff_p50_s": percentile(same, 50), "handoff_p99_s": percentile(same, 99)}
    else:
        figures |= {
            "handoff_same_p50_s": percentile(same, 50),
            "handoff_same_p99_s": percentile(same, 99),
            "handoff_cross_p50_s": percentile(cross, 50),
            "handoff_cross_p99_s": percentile(cross, 99),
            "handoff_cross_share": len(cross) / max(1, len(same) + len(cross)),
        }
    figures["violations"] = safety_violations(g for g, _ in result["grants"])
    return figures


def per_grant(value: float, result: dict[str, Any]) -> float:
    return value / max(1, len(result["grants"]))


def rival_lock(
    run: Coroutine[Any, Any, dict[str, Any]], pids: list[int], store: str, duration: float
) -> dict[str, Any]:
    """Another lock under the same load, on the same store; the store's CPU per grant."""
    cpu0 = sum(proc_cpu_seconds(pid) for pid in pids)
    result = asyncio.run(run)
    cpu = sum(proc_cpu_seconds(pid) for pid in pids) - cpu0
    figures = summarize(result, duration, None)
    violations = figures.pop("violations")
    return {
        **figures,
        f"{store}_cpu_us_per_grant": per_grant(cpu, result) * 1e6,
        "violations": violations,
    }


def rival_table(title: str, api: dict[str, Any], store: str) -> list[tuple[str, str]]:
    low, high = api["grants_min_max"]
    return [
        (f"{title}: grants/s", fmt_int(api["grants_per_s"])),
        ("  wait p50 / p99", f"{fmt_ms(api['wait_p50_s'])} / {fmt_ms(api['wait_p99_s'])}"),
        ("  fairness (Jain), grants min-max", f"{api['fairness_jain']:.4f}, {low}-{high}"),
        ("  waits passed by a later one, places p99", overtaken_text(api)),
        (
            "  hand-off p50 / p99",
            f"{fmt_ms(api['handoff_p50_s'])} / {fmt_ms(api['handoff_p99_s'])}",
        ),
        (f"  CPU per grant: {store}", f"{api[f'{store}_cpu_us_per_grant']:.0f} µs"),
        ("  safety violations", str(sum(api["violations"].values()))),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backend", choices=["memcache", "redis", "etcd", "sqlite", "inmemory"], default="memcache"
    )
    parser.add_argument(
        "--servers", type=int, default=None, help="memcache, etcd 2; redis 3; sqlite 1"
    )
    parser.add_argument("--sync", choices=["full", "normal"], default="full", help="sqlite")
    parser.add_argument("--members", type=int, default=3, help="etcd cluster size")
    parser.add_argument(
        "--lock-sleep", type=float, default=0.1, help="redis: redis-py Lock's polling interval"
    )
    parser.add_argument(
        "--lock-api",
        choices=["gateway", "grpc", "both"],
        default="both",
        help="etcd: how its own lock API is driven, after the servers' run",
    )
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--client",
        choices=["aiohttp", "raw"],
        default="aiohttp",
        help="the servers' clients: aiohttp, or a lean raw-socket HTTP/1.1 client",
    )
    parser.add_argument(
        "--profile", metavar="FILE", help="py-spy samples server 0 in the window (perturbs it)"
    )
    args = parser.parse_args(argv)

    stores: list[subprocess.Popen[bytes]] = []  # the store's processes, for their CPU
    configs: list[str] = []
    state = tempfile.TemporaryDirectory()
    store = STORE_PROCESS.get(args.backend, "store")

    def write_config(text: str) -> str:
        path = os.path.join(state.name, f"config-{len(configs)}.yaml")
        with open(path, "w") as fh:
            fh.write(text + f"autocreate: true\npools:\n  - name: {POOL}\n")
        configs.append(path)
        return path

    # The store's own lock, run after the servers' on the same store (redis, etcd):
    # (title, key in the figures, the run).
    rivals: list[tuple[str, str, Callable[[], Coroutine[Any, Any, dict[str, Any]]]]] = []
    if args.backend == "memcache":
        memcached, mc_port = start_memcached()
        stores = [memcached]
        servers_n = args.servers or 2
        text = f"backend: memcache\nmemcachehost: {LOOPBACK}\nmemcacheport: {mc_port}\n"
        paths = [write_config(text)] * servers_n
    elif args.backend == "redis":
        redis_server, redis_port = start_redis()
        stores = [redis_server]
        servers_n = args.servers or 3
        text = f"backend: redis\nredis_url: redis://{LOOPBACK}:{redis_port}/0\n"
        paths = [write_config(text)] * servers_n
        run = functools.partial(
            redis_lock_load, redis_port, args.clients, args.warmup, args.duration, args.lock_sleep
        )
        rivals.append((f"redis-py Lock (sleep {args.lock_sleep} s)", "redis_py_lock", run))
    elif args.backend == "etcd":
        stores, urls = start_etcd(args.members, state.name)
        servers_n = args.servers or 2
        paths = []
        for j in range(servers_n):  # server j asks member j first
            order = urls[j % len(urls) :] + urls[: j % len(urls)]
            paths.append(write_config(f"backend: etcd\netcd_endpoints: {','.join(order)}\n"))
        title = f"etcd's lock API ({args.members} members"
        if args.lock_api in ("gateway", "both"):
            run = functools.partial(
                load, urls, args.clients, args.warmup, args.duration, etcd_lock_loop
            )
            rivals.append((f"{title}, JSON gateway)", "etcd_lock_api", run))
        if args.lock_api in ("grpc", "both"):
            run = functools.partial(
                etcd_grpc_lock_load, urls, args.clients, args.warmup, args.duration
            )
            rivals.append((f"{title}, gRPC)", "etcd_lock_api_grpc", run))
    elif args.backend == "sqlite":
        # On the disk the tests use (not a tmpfs): fsyncs cost what they cost there.
        path = os.path.join(state.name, "state.db")
        servers_n = args.servers or 1
        text = f"backend: sqlite\nsqlite_path: {path}\nsqlite_sync: {args.sync}\n"
        paths = [write_config(text)] * servers_n
    else:
        servers_n = 1
        paths = [write_config("backend: inmemory\n")]
    store_pids = [p.pid for p in stores]
    servers: list[Server] = []
    lock_apis: dict[str, dict[str, Any]] = {}
    try:
        servers = [Server(config=path).start() for path in paths]
        cpu0 = [s.cpu_seconds() for s in servers]
        store0 = sum(proc_cpu_seconds(pid) for pid in store_pids)
        wall0 = time.monotonic()
        spy = None
        if args.profile:
            spy = start_py_spy(servers[0].pid, args.warmup + args.duration, args.profile)
        loop = functools.partial(client_loop, kind=args.client)
        result = asyncio.run(
            load([s.base for s in servers], args.clients, args.warmup, args.duration, loop)
        )
        if spy is not None:
            spy.wait(30)
            print(summarize_profile(args.profile), file=sys.stderr)
        wall = time.monotonic() - wall0
        cpu = sum(s.cpu_seconds() - c for s, c in zip(servers, cpu0, strict=True))
        store_cpu = sum(proc_cpu_seconds(pid) for pid in store_pids) - store0
        for server in servers:
            server.stop()  # idle servers' heartbeats stay out of the rival's run
        for _title, key, run in rivals:
            lock_apis[key] = rival_lock(run(), store_pids, store, args.duration)
    finally:
        for server in servers:
            server.stop()
        for proc in stores:
            proc.terminate()
            proc.wait(10)
        state.cleanup()

    counts = [
        (int(m.group(1)), int(m.group(2)))
        for s in servers
        for m in re.finditer(r": (\d+) commits since start, (\d+) fsync'd", s.final_log)
    ]
    figures = summarize(result, args.duration, servers_n)
    violations = figures.pop("violations")
    rows = {
        "backend": args.backend,
        "servers": servers_n,
        "clients": args.clients,
        "client": args.client,
        **figures,
        "server_cpu_us_per_grant": per_grant(cpu, result) * 1e6,
        f"{store}_cpu_us_per_grant": per_grant(store_cpu, result) * 1e6,
        "server_cpu_pct": cpu / wall * 100,
        "sqlite_commits_per_grant": per_grant(sum(c for c, _ in counts), result),
        "sqlite_fsyncs_per_grant": per_grant(sum(f for _, f in counts), result),
        "violations": violations,
    }
    low, high = rows["grants_min_max"]
    table = [
        (
            "backend, servers, clients",
            f"{args.backend}, {servers_n}, {args.clients} ({args.client})",
        ),
        ("grants/s", fmt_int(rows["grants_per_s"])),
        ("wait p50 / p99", f"{fmt_ms(rows['wait_p50_s'])} / {fmt_ms(rows['wait_p99_s'])}"),
        ("fairness (Jain), grants min-max", f"{rows['fairness_jain']:.4f}, {low}-{high}"),
        ("grants per server", ", ".join(fmt_int(n) for n in rows["grants_per_server"])),
        ("waits passed by a later one, places p99", overtaken_text(rows)),
        (
            "hand-off same server p50 / p99",
            f"{fmt_ms(rows['handoff_same_p50_s'])} / {fmt_ms(rows['handoff_same_p99_s'])}",
        ),
        (
            "hand-off across servers p50 / p99, share",
            f"{fmt_ms(rows['handoff_cross_p50_s'])} / {fmt_ms(rows['handoff_cross_p99_s'])}, "
            f"{rows['handoff_cross_share'] * 100:.0f} %",
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
        ratios = f"{rows['sqlite_commits_per_grant']:.2f} / {rows['sqlite_fsyncs_per_grant']:.2f}"
        table.insert(-1, (label, ratios))
    for title, key, _run in rivals:
        rows[key] = lock_apis[key]
        table += rival_table(title, lock_apis[key], store)
    emit(rows, table, "shared mutex fight", args.json)
    return 1 if sum(violations.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
