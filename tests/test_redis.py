"""The redis backend when things go wrong: Redis stops, loses its memory, a server dies,
a server's clock is off, the pub/sub connection is killed.

Each test has a redis-server of its own (Debian's package, nothing saved to
disk), started and stopped by the test, and real distributexd processes
sharing it. The rules themselves are checked by the conformance suite, which
runs on three servers sharing one Redis (tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tests.conftest import (
    RedisServer,
    Server,
    free_port,
    freeze,
    start_redis,
    wait_for_port,
    wait_until,
)
from tests.test_http import ParkedWait, q

pytestmark = pytest.mark.timeout(120)

PREFIX = "distributex/"


@pytest.fixture
def rs() -> Iterator[RedisServer]:
    server = start_redis()
    yield server
    server.stop()


def config(rs: RedisServer, pools: str = "") -> str:
    head = f"backend: redis\nredis_url: {rs.url}\n"
    return head + "autocreate: true\npools:\n  - name: p\n    expire: 3\n" + pools


def record_key(pool: str) -> str:
    return f"{PREFIX}pool/{{{hashlib.sha256(pool.encode()).hexdigest()[:40]}}}"


def queued(rs: RedisServer, pool: str, owner: str) -> bool:
    """The pool's stored record names ``owner`` (a waiter's entry was written)."""
    return f'"{owner}"' in rs.command("GET", record_key(pool))


# -- configuration and start-up ------------------------------------------------------------


def start_server(
    tmp_path: Path, config: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run distributexd with this configuration until it exits (a refused start)."""
    cfg = tmp_path / "start.yaml"
    cfg.write_text(config)
    return subprocess.run(
        [sys.executable, "-m", "distributex", "-c", str(cfg), "-p", str(free_port())],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "http://127.0.0.1:6379",
            "must start with redis://, rediss://, unix:// or redis+sentinel://",
        ),
        ("redis://127.0.0.1:99999/0", "has a bad port"),
        ("redis://127.0.0.1:6379/zero", "must end in a database number"),
        ("redis:///0", "must name a host"),
        ("redis://h:6379/0?socket_timeout=1", "unknown option 'socket_timeout'"),
        ("redis+sentinel://h:0/mymaster", "has a bad Sentinel port"),
        ("redis+sentinel://h:26379", "must name the Sentinel service"),
    ],
)
def test_a_bad_redis_url_is_one_line(server_factory, tmp_path: Path, url: str, expected: str):
    done = start_server(tmp_path, f"backend: redis\nredis_url: '{url}'\n")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "redis_url" in lines[0] and expected in lines[0], lines[0]


def test_the_password_is_not_shown(tmp_path: Path) -> None:
    done = start_server(tmp_path, "backend: redis\nredis_url: 'redis://u:s3cret@h:6379/x'\n")
    assert done.returncode == 2 and "s3cret" not in done.stderr and "***" in done.stderr


def test_without_redis_py_the_server_names_the_extra(tmp_path: Path) -> None:
    # A "redis" package that cannot be imported stands for one not installed.
    (tmp_path / "redis").mkdir()
    (tmp_path / "redis" / "__init__.py").write_text("raise ImportError('not installed')\n")
    done = start_server(
        tmp_path,
        "backend: redis\nredis_url: redis://127.0.0.1:1/0\n",
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "distributexd: error: backend 'redis' needs redis-py: pip install 'distributex[redis]'"
    ]


def test_a_cluster_node_is_refused_in_one_line(tmp_path: Path) -> None:
    port = free_port()
    node = subprocess.Popen(
        [
            *("redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""),
            *("--appendonly", "no", "--cluster-enabled", "yes", "--dir", str(tmp_path)),
            *("--cluster-port", str(free_port())),  # port + 10000 may not exist
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, node)
        done = start_server(tmp_path, f"backend: redis\nredis_url: redis://127.0.0.1:{port}/0\n")
        assert done.returncode == 1
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "Redis Cluster" in lines[0], done.stderr
    finally:
        node.kill()
        node.wait()


def test_unreachable_at_start_is_one_line(tmp_path: Path) -> None:
    done = start_server(tmp_path, f"backend: redis\nredis_url: redis://127.0.0.1:{free_port()}/0\n")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "unreachable" in lines[0], done.stderr


# -- Redis goes away -----------------------------------------------------------------------


def test_stopped_redis_is_a_bounded_503_and_service_resumes(rs: RedisServer, server_factory):
    server: Server = server_factory(config(rs))
    assert server.call(q("get", "a", "other")).body == "YES"
    rs.stop()
    began = time.monotonic()
    answer = server.call(q("get", "b", "other"), timeout=30)
    assert time.monotonic() - began < 5
    assert (answer.status, answer.body) == (503, "UNAVAILABLE")
    assert "redis 127.0.0.1" in answer.headers["X-Distributex-Reason"]
    rs.start()
    # Restarted empty: a lease from before could still be live for the pool's expire.
    took = wait_until(lambda: server.call(q("get", "b", "p")).body == "YES", 20, "service back")
    assert took < 10
    # No spin while it was down or after: the log holds one line per change.
    # (Refused requests have event lines of their own, which name the reason too.)
    text = server.log.read_text()
    warnings = [line for line in text.splitlines() if "WARNING" in line and "unreachable" in line]
    assert len(warnings) <= 3, text


def test_frozen_redis_is_a_bounded_503_for_every_request(rs: RedisServer, server_factory):
    # SIGSTOP: connections stay open and nothing answers (a black-holed store).
    server: Server = server_factory(config(rs))
    assert server.call(q("get", "a", "p")).body == "YES"
    assert rs.proc is not None
    freeze(rs.proc)
    try:
        results: list[tuple[float, int]] = []

        def one(i: int) -> None:
            began = time.monotonic()
            answer = server.call(q("get", f"h{i}", f"pool{i % 3}"), timeout=30)
            results.append((time.monotonic() - began, answer.status))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert len(results) == 6
        assert all(status == 503 for _took, status in results), results
        assert max(took for took, _status in results) < 5, results
    finally:
        rs.proc.send_signal(signal.SIGCONT)
    took = wait_until(lambda: server.call(q("get", "b", "other")).body == "YES", 15, "back")
    assert took < 10


@pytest.mark.parametrize("how", ["restart", "flushall"])
def test_lost_state_grants_nothing_while_an_old_lease_could_live(
    rs: RedisServer, server_factory, how: str
) -> None:
    first: Server = server_factory(config(rs))
    second: Server = server_factory(config(rs))
    held = first.call(q("get", "a", "p"))
    assert held.body == "YES"
    fence_before = int(held.headers["X-Distributex-Fence"])
    if how == "restart":
        rs.start()  # restarted: every key is gone
    else:
        assert rs.command("FLUSHALL") == "OK"
    lost = time.monotonic()
    answers = []
    while time.monotonic() - lost < 2.0:  # expire is 3 s
        answers.append(second.call(q("get", "b", "p")).body)
        answers.append(first.call(q("get", "b", "p")).body)
        time.sleep(0.1)
    assert "YES" not in answers, "granted while the old lease could still be live"
    took = wait_until(lambda: second.call(q("get", "b", "p")).body == "YES", 10, "granted later")
    assert took < 5
    after = first.call(q("get", "b", "p"))
    assert int(after.headers["X-Distributex-Fence"]) > fence_before
    # The old holder's lease is gone with the store: its renewal says so.
    token = held.headers["X-Distributex-Lease"]
    assert second.call(q("renew", "a", "p", f"&lease={token}")).status == 410


def grant_to_a_killed_servers_waiter(rs: RedisServer, server_factory, expire: int) -> float:
    """A release grants a waiter whose server was just killed: seconds until the
    next waiter (on a live server) gets the slot."""
    pools = f"  - name: dying\n    expire: {expire}\n"
    first: Server = server_factory(config(rs, pools))
    doomed: Server = server_factory(config(rs, pools))
    assert first.call(q("get", "holder", "dying")).body == "YES"
    # Kept open (an unreferenced socket would be closed: a hang-up) until its server dies.
    lost = ParkedWait(doomed, "on-doomed", "dying")
    wait_until(lambda: queued(rs, "dying", "on-doomed"), 10, "first waiter queued")
    survivor = ParkedWait(first, "survivor", "dying")
    wait_until(lambda: queued(rs, "dying", "survivor"), 10, "second waiter queued")
    doomed.stop(signal.SIGKILL)
    lost.hang_up()
    released = time.monotonic()
    assert first.call(q("release", "holder", "dying")).body == "OK"
    status, _headers, body = survivor.answer(timeout=40)
    assert (status, body) == (200, "YES")
    return time.monotonic() - released


def test_a_killed_servers_waiters_are_dropped_and_its_grant_passed_on(
    rs: RedisServer, server_factory
) -> None:
    # A long lease is delivered by a write before its YES: the grant to the dead
    # server's waiter is undone once its heartbeat lapses, and passed on.
    assert grant_to_a_killed_servers_waiter(rs, server_factory, 300) < 12  # heartbeat 8 s + check


def test_a_killed_servers_short_lease_grant_holds_until_it_expires(
    rs: RedisServer, server_factory
) -> None:
    # A grant of a lease of 60 s or less is answered by the waiter's server on
    # reading it, without a write: when that server dies, nobody can tell
    # whether it answered, so the grant holds until its lease ends, not just
    # until the dead server is noticed.
    assert 14 < grant_to_a_killed_servers_waiter(rs, server_factory, 15) < 15 + 12


# -- one clock: Redis's --------------------------------------------------------------------


def test_servers_with_skewed_clocks_agree_on_every_lease(
    rs: RedisServer, server_factory, skewed_factory
) -> None:
    pools = "  - name: short\n    expire: 1\n  - name: long\n    expire: 20\n"
    honest: Server = server_factory(config(rs, pools))
    ahead: Server = skewed_factory(config(rs, pools), 60)
    # The skewed server's own clock really is a minute ahead (its Date header).
    answer = ahead.call(q("get", "x", "probe"))
    said = email.utils.parsedate_to_datetime(answer.headers["Date"]).timestamp()
    assert said - time.time() > 50, "faketime did not move the server's clock"

    # A lease granted by the honest server is not taken for expired by the other:
    # on its own clock it ran out 40 s ago.
    assert honest.call(q("get", "a", "long")).body == "YES"
    assert ahead.call(q("get", "b", "long")).body == "NO"
    # Granted by the skewed server, a 1 s lease ends after about 1 s for both,
    # not a minute later.
    assert ahead.call(q("get", "c", "short")).body == "YES"
    granted = time.monotonic()
    assert honest.call(q("get", "d", "short")).body == "NO"
    wait_until(lambda: honest.call(q("get", "d", "short")).body == "YES", 10, "expired")
    d_granted = time.monotonic()
    assert 0.5 < d_granted - granted < 5
    # And the honest server's 1 s lease lives its second on the skewed server too.
    assert ahead.call(q("get", "e", "short")).body == "NO"
    waiter = ParkedWait(ahead, "f", "short", "&timeout=10")
    status, _headers, body = waiter.answer(timeout=15)
    assert (status, body) == (200, "YES")
    assert time.monotonic() - d_granted > 0.5


# -- nudges over pub/sub -------------------------------------------------------------------


def nudge_channels(client: redis.Redis) -> list[bytes]:
    return client.pubsub_channels(f"{PREFIX}nudge/*")


def test_a_killed_pubsub_connection_loses_no_wake_up(rs: RedisServer, server_factory) -> None:
    """Nudges sent while a server was not subscribed are made up for at once.

    The grant is made (and its nudge published to nobody) while the waiter's
    server cannot subscribe; as soon as it can, its waiter is answered: by the
    full check after the new subscription, well before the slow safety poll
    (every 1 s) would find it. Without that check a round passes only when the
    poll happens to fall in the same half second: about one time in two, so
    eight rounds must all pass.
    """
    pools = "  - name: h\n    expire: 60\n"
    giver: Server = server_factory(config(rs, pools))
    taker: Server = server_factory(config(rs, pools))
    client = redis.Redis(port=rs.port)
    try:
        wait_until(lambda: len(nudge_channels(client)) == 2, 10, "both servers subscribed")
        for round_ in range(8):
            assert giver.call(q("get", f"holder{round_}", "h")).body == "YES"
            waiter = ParkedWait(taker, f"w{round_}", "h", "&timeout=30")
            wait_until(lambda r=round_: queued(rs, "h", f"w{r}"), 10, "waiter queued")
            # No subscriptions for a while: the nudge of the grant goes to nobody.
            client.execute_command("ACL", "SETUSER", "default", "-subscribe")
            client.client_kill_filter(_type="pubsub")
            wait_until(lambda: not nudge_channels(client), 10, "unsubscribed", every=0.001)
            assert giver.call(q("release", f"holder{round_}", "h")).body == "OK"
            client.execute_command("ACL", "SETUSER", "default", "+subscribe")
            wait_until(lambda: len(nudge_channels(client)) == 2, 10, "back", every=0.001)
            resubscribed = time.monotonic()
            status, _headers, body = waiter.answer(timeout=15)
            assert (status, body) == (200, "YES")
            late = time.monotonic() - resubscribed
            assert late < 0.4, f"answered {late:.2f} s after the new subscription: a lost wake-up"
            assert taker.call(q("release", f"w{round_}", "h")).body == "OK"
    finally:
        client.close()
    # Subscribed again: hand-offs across servers are nudged, not polled.
    hand_offs = []
    for i in range(8):
        assert giver.call(q("get", f"g{i}", "h")).body == "YES"
        waiter = ParkedWait(taker, f"t{i}", "h", "&timeout=30")
        wait_until(lambda i=i: queued(rs, "h", f"t{i}"), 10, "waiter queued")
        released = time.monotonic()
        assert giver.call(q("release", f"g{i}", "h")).body == "OK"
        assert waiter.answer(timeout=15)[2] == "YES"
        hand_offs.append(time.monotonic() - released)
        assert taker.call(q("release", f"t{i}", "h")).body == "OK"
    assert statistics.median(hand_offs) < 0.25, hand_offs


def test_many_pools_at_once_are_served(rs: RedisServer, server_factory) -> None:
    # More steps at once than the server keeps connections to Redis: they
    # wait for a connection, none is refused.
    server: Server = server_factory(config(rs))
    answers: list[str] = []

    def one(i: int) -> None:
        answers.append(server.call(q("get", "a", f"many{i}"), timeout=30).body)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(80)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert answers == ["YES"] * 80, [a for a in answers if a != "YES"][:3]
    assert "UNAVAILABLE" not in server.log.read_text()


# -- Sentinel ------------------------------------------------------------------------------


@dataclass
class SentinelSetup:
    master: RedisServer
    replica: RedisServer
    sentinel: subprocess.Popen
    port: int

    def command(self, *args: str) -> str:
        cmd = ["redis-cli", "-p", str(self.port), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()

    def master_port(self) -> int | None:
        answer = self.command("SENTINEL", "get-master-addr-by-name", "mymaster").split()
        return int(answer[1]) if len(answer) == 2 else None


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[SentinelSetup]:
    """A master, its replica, and one Sentinel watching them."""
    master = start_redis()
    replica = RedisServer(None, free_port(), ["--replicaof", "127.0.0.1", str(master.port)])
    sentinel_proc = None
    try:
        replica.start()
        wait_until(
            lambda: "master_link_status:up" in replica.command("INFO", "replication"),
            20,
            "replica in sync",
        )
        port = free_port()
        conf = tmp_path / "sentinel.conf"  # Sentinel rewrites its file: one of its own
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
            f"sentinel monitor mymaster 127.0.0.1 {master.port} 1\n"
            "sentinel down-after-milliseconds mymaster 1000\n"
            "sentinel failover-timeout mymaster 5000\n"
        )
        sentinel_proc = subprocess.Popen(
            ["redis-server", str(conf), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(port, sentinel_proc)
        setup = SentinelSetup(master, replica, sentinel_proc, port)
        wait_until(
            lambda: str(replica.port) in setup.command("SENTINEL", "replicas", "mymaster"),
            30,
            "Sentinel knows the replica",
        )
        yield setup
    finally:
        if sentinel_proc is not None:
            sentinel_proc.kill()
            sentinel_proc.wait()
        replica.stop()
        master.stop()


def test_sentinel_fail_over_keeps_the_leases_redis_had_replicated(
    sentinel: SentinelSetup, server_factory
) -> None:
    url = f"redis+sentinel://127.0.0.1:{sentinel.port}/mymaster/0"
    text = f"backend: redis\nredis_url: {url}\nautocreate: true\n"
    text += "pools:\n  - name: p\n    expire: 60\n"
    first: Server = server_factory(text)
    second: Server = server_factory(text)
    held = first.call(q("get", "a", "p"))
    assert held.body == "YES"
    token, fence = held.headers["X-Distributex-Lease"], int(held.headers["X-Distributex-Fence"])
    assert second.call(q("get", "b", "p")).body == "NO"
    # Every write has reached the replica (replication is asynchronous: WAIT makes sure).
    assert sentinel.master.command("WAIT", "1", "5000") == "1"
    assert sentinel.command("SENTINEL", "FAILOVER", "mymaster") == "OK"
    wait_until(lambda: sentinel.master_port() == sentinel.replica.port, 30, "fail-over")
    # The servers follow the new master by themselves (each asks the Sentinels
    # every second). Until they do, the old master may still take writes, and
    # those are lost when it is made a replica: the split brain of any Redis
    # fail-over, which this test does not cover (docs/backends.md).
    moved = f"moved from 127.0.0.1:{sentinel.master.port} to 127.0.0.1:{sentinel.replica.port}"
    for server in (first, second):
        wait_until(lambda s=server: moved in s.log.read_text(), 20, "server followed")
    # The lease is still there.
    renew = q("renew", "a", "p", f"&lease={token}")
    wait_until(lambda: second.call(renew).body == "OK", 20, "renewed on the new master")
    assert first.call(q("get", "b", "p")).body == "NO"
    assert second.call(q("release", "a", "p", f"&lease={token}")).body == "OK"
    after = first.call(q("get", "b", "p"))
    assert after.body == "YES"
    assert int(after.headers["X-Distributex-Fence"]) > fence
    # A waiter on one server is still woken by a release on the other.
    waiter = ParkedWait(second, "c", "p", "&timeout=30")
    wait_until(lambda: '"c"' in sentinel.replica.command("GET", record_key("p")), 10, "queued")
    assert first.call(q("release", "b", "p")).body == "OK"
    assert waiter.answer(timeout=30)[2] == "YES"


def test_no_sentinel_at_start_is_one_line(tmp_path: Path) -> None:
    url = f"redis+sentinel://127.0.0.1:{free_port()}/mymaster"
    done = start_server(tmp_path, f"backend: redis\nredis_url: {url}\n")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no Sentinel answered" in lines[0], done.stderr


# -- TLS, a user and a password, a database number --------------------------------------


def make_certificates(folder: Path) -> None:
    """A CA and a server certificate for 127.0.0.1, made with the openssl command."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    ca_key, ca, key = folder / "ca.key", folder / "ca.crt", folder / "server.key"
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key),
            "-out", str(ca), "-days", "2", "-subj", "/CN=distributex test CA")  # fmt: skip
    (folder / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
            "-out", str(folder / "server.csr"), "-subj", "/CN=127.0.0.1")  # fmt: skip
    openssl("x509", "-req", "-in", str(folder / "server.csr"), "-CA", str(ca),
            "-CAkey", str(ca_key), "-CAcreateserial", "-out", str(folder / "server.crt"),
            "-days", "2", "-extfile", str(folder / "ext.cnf"))  # fmt: skip


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis that speaks TLS only and knows one user, alice (password s3cret)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (scripts/test.sh installs it)")
    make_certificates(tmp_path)
    port = free_port()
    args = ["--port", "0", "--tls-port", str(port), "--tls-auth-clients", "no"]
    args += ["--tls-cert-file", str(tmp_path / "server.crt")]
    args += ["--tls-key-file", str(tmp_path / "server.key")]
    args += ["--tls-ca-cert-file", str(tmp_path / "ca.crt")]
    args += ["--user", "alice", "on", ">s3cret", "~*", "&*", "+@all", "--user", "default", "off"]
    server = RedisServer(None, port, args)
    server.start()  # its --port 0 (no plain TCP) comes after the fixture's own --port
    yield server
    server.stop()


def test_tls_with_a_user_a_password_and_a_database(
    tls_redis: RedisServer, server_factory, tmp_path: Path
) -> None:
    ca = tmp_path / "ca.crt"
    url = f"rediss://alice:s3cret@127.0.0.1:{tls_redis.port}/3?ssl_ca_certs={ca}"
    server: Server = server_factory(f"backend: redis\nredis_url: '{url}'\nautocreate: true\n")
    assert server.call(q("get", "a", "p")).body == "YES"
    assert server.call(q("get", "b", "p")).body == "NO"
    client = redis.Redis(
        host="127.0.0.1",
        port=tls_redis.port,
        ssl=True,
        ssl_ca_certs=str(ca),
        username="alice",
        password="s3cret",
        db=3,
    )
    try:
        assert client.exists(record_key("p")) == 1  # in database 3, over TLS
    finally:
        client.close()
    # A wrong password, or a CA that did not sign Redis's certificate: one line at start.
    for bad, reason in [
        (url.replace("s3cret", "wrong"), "invalid username-password"),
        (url.replace(str(ca), str(tmp_path / "server.crt")), "certificate verify failed"),
    ]:
        done = start_server(tmp_path, f"backend: redis\nredis_url: '{bad}'\n")
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1 and len(lines) == 1, done.stderr
        assert reason in lines[0].lower() and "s3cret" not in lines[0] and "wrong" not in lines[0]


class TwoServers:
    """Two shared-state backends in this process on one real Redis, for tests
    that need to hold a step at a given point (a linger, a clock)."""

    def __init__(self, rs: RedisServer, spec) -> None:
        from distributex.backends.redis import RedisStore
        from distributex.backends.shared import SharedStateBackend

        self.rs, self.spec = rs, spec
        self.a = SharedStateBackend(RedisStore(rs.url, PREFIX), key_prefix=PREFIX)
        self.b = SharedStateBackend(RedisStore(rs.url, PREFIX), key_prefix=PREFIX)
        self.served: list[str] = []  # owners in the order they were granted
        self.tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> TwoServers:
        await self.a.start()
        await self.b.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.a.close()
        await self.b.close()

    def wait(self, backend, owner: str) -> None:
        """A /wait/ on ``backend`` that releases as soon as it is granted."""

        async def run() -> None:
            lease = await backend.wait(self.spec, owner, 60, 30, lambda: True)
            assert lease is not None
            self.served.append(owner)
            await backend.release(self.spec, owner, lease.token)

        self.tasks.append(asyncio.create_task(run()))

    async def serve(self, backend, holder) -> list[str]:
        """Release ``holder`` (on ``backend``): the owners waiting, in the order served."""
        await backend.release(self.spec, holder.owner, holder.token)
        async with asyncio.timeout(20):
            await asyncio.gather(*self.tasks)
        return self.served

    @staticmethod
    async def until(condition) -> None:
        async with asyncio.timeout(20):
            while not condition():
                await asyncio.sleep(0.01)

    def queued(self, owner: str) -> bool:
        return queued(self.rs, self.spec.name, owner)

    @staticmethod
    def came(backend) -> bool:
        """A wait on ``backend`` has run on the engine once (its place is set)."""
        return any(w.since is not None for room in backend.pools for w in room.waiters.all.values())


def test_a_wait_written_late_takes_its_place_by_arrival(
    rs: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A queue entry that lingered (written after a later request's entry on the
    other server) is served first."""
    from distributex.backends import steps
    from distributex.engine import PoolSpec

    # Steps that only queue linger until another request comes (not 2-50 ms),
    # so the order of events below does not depend on the machine's speed.
    monkeypatch.setattr(steps, "LINGER", 30.0)
    monkeypatch.setattr(steps, "LINGER_MAX", 30.0)

    async def scenario() -> list[str]:
        async with TwoServers(rs, PoolSpec("late", maxlocks=1, expire=60)) as s:
            holder = await s.a.acquire(s.spec, "holder", 60)
            assert holder is not None
            s.wait(s.a, "early")  # lingers on server a
            await s.until(lambda: s.came(s.a))
            s.wait(s.b, "late")
            await s.until(lambda: s.came(s.b))
            assert await s.b.acquire(s.spec, "other", 60) is None  # ends b's linger
            await s.until(lambda: s.queued("late"))
            assert not s.queued("early")
            assert await s.a.acquire(s.spec, "other", 60) is None  # ends a's
            await s.until(lambda: s.queued("early"))
            return await s.serve(s.a, holder)

    assert asyncio.run(scenario()) == ["early", "late"]


@pytest.mark.parametrize("holder_on", ["a", "b"])
def test_a_server_whose_clock_is_behind_passes_no_entry_queued_before_it(
    rs: RedisServer, monkeypatch: pytest.MonkeyPatch, holder_on: str
) -> None:
    """Places by arrival compare clocks of different servers: a server whose clock
    is behind still queues behind every entry that came more than ARRIVAL_TRUST
    (here 0) before the latest one queued, also when its first try ran on the
    record it kept from its own last write (holder taken on it)."""
    from distributex.backends import waiting
    from distributex.engine import PoolSpec

    monkeypatch.setattr(waiting, "ARRIVAL_TRUST", 0.0)

    async def scenario() -> list[str]:
        async with TwoServers(rs, PoolSpec("skew", maxlocks=1, expire=600)) as s:
            real = s.a.store.now
            monkeypatch.setattr(s.a.store, "now", lambda: real() - 20)
            on = s.a if holder_on == "a" else s.b
            holder = await on.acquire(s.spec, "holder", 600)
            assert holder is not None
            s.wait(s.b, "first")
            await s.until(lambda: s.queued("first"))
            s.wait(s.a, "second")
            await s.until(lambda: s.queued("second"))
            return await s.serve(on, holder)

    assert asyncio.run(scenario()) == ["first", "second"]


def test_a_wait_held_up_behind_a_step_keeps_its_place(
    rs: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A /wait/ that comes while its server's step is still writing runs on a
    record that may already hold a later request of the other server: it still
    goes first (it came within ARRIVAL_TRUST of that one)."""
    from distributex.engine import PoolSpec

    async def scenario() -> list[str]:
        async with TwoServers(rs, PoolSpec("held", maxlocks=1, expire=60)) as s:
            holder = await s.a.acquire(s.spec, "holder", 60)
            assert holder is not None
            gate = asyncio.Event()
            put = s.a.store.put

            async def held_put(*args, **kwargs):
                await gate.wait()
                return await put(*args, **kwargs)

            monkeypatch.setattr(s.a.store, "put", held_put)
            # A renewal: a step of a's that writes, held at its write.
            busy = asyncio.create_task(s.a.renew(s.spec, "holder", holder.token, 60))
            await s.until(
                lambda: (room := s.a.pools.get("held")) is not None and room.runner is not None
            )
            s.wait(s.a, "early")  # waits for a's step
            await s.until(
                lambda: (room := s.a.pools.get("held")) is not None and bool(room.waiters)
            )
            s.wait(s.b, "late")
            await s.until(lambda: s.queued("late"))
            gate.set()
            assert await busy is not None
            await s.until(lambda: s.queued("early"))
            return await s.serve(s.a, holder)

    assert asyncio.run(scenario()) == ["early", "late"]
