"""Hostile HTTP clients against a real distributexd: odd queries, idle floods, fd exhaustion."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Answer, Server, free_port, wait_for_port, wait_until


def q(verb: str, **params: str) -> str:
    # Raw on purpose: the tests write the exact bytes a hostile client sends.
    return f"/{verb}/?" + "&".join(f"{key}={value}" for key, value in params.items())


def send(port: int, path: str) -> socket.socket:
    """Open a connection and send one GET; the answer is read later with read_answer()."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    return sock


def read_answer(sock: socket.socket) -> tuple[int, str]:
    """Read one HTTP answer (status, body) from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed before an answer: {data!r}")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    length = next(
        int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed in the middle of an answer")
        body += chunk
    return int(lines[0].split()[1]), body.decode()


def closed_by_server(sock: socket.socket, timeout: float = 20) -> bool:
    """True once the server closes the connection (EOF or reset) within ``timeout``.

    Whatever it sends first (a ``100 Continue``, an answer) is read and dropped.
    """
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if sock.recv(4096) == b"":
                return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
    return False


@pytest.fixture
def open_sockets() -> Iterator[list[socket.socket]]:
    """Sockets a test opens; closed afterwards whatever happens."""
    sockets: list[socket.socket] = []
    yield sockets
    for sock in sockets:
        sock.close()


# -- 1. empty values are refused, never taken as "left out" -------------------


def test_empty_lease_releases_nothing(server: Server) -> None:
    first = server.call(q("get", host="h", pool="p"))
    assert first.body == "YES"
    token = first.headers["X-Distributex-Lease"]
    for verb in ("release", "renew"):
        answer = server.call(q(verb, host="h", pool="p", lease=""))
        assert (answer.status, answer.body) == (400, "INVALID"), verb
        assert "lease" in answer.headers["X-Distributex-Reason"]
        assert server.call(q(verb, host="h", pool="p") + "&lease").status == 400
    assert server.call(q("get", host="other", pool="p")).body == "NO"  # still held
    assert server.call(q("renew", host="h", pool="p", lease=token)).body == "OK"
    assert server.call(q("release", host="h", pool="p", lease=token)).body == "OK"


def test_empty_numbers_are_refused(server: Server) -> None:
    assert server.call(q("get", host="h", pool="p")).body == "YES"
    # An empty timeout once meant "wait forever": the call must come back at once.
    for path in (
        q("wait", host="w", pool="p", timeout=""),
        q("get", host="w", pool="p2", ttl=""),
        q("wait", host="w", pool="p2", ttl=""),
        q("renew", host="h", pool="p", lease="x", ttl=""),
    ):
        answer = server.call(path, timeout=10)
        assert (answer.status, answer.body) == (400, "INVALID"), path
        assert "empty" in answer.headers["X-Distributex-Reason"], path


# -- 2. strict query parsing ---------------------------------------------------


@pytest.mark.parametrize(
    "path, reason",
    [
        (q("get", host="%ff", pool="p"), "UTF-8"),
        (q("get", host="a", pool="%fe"), "UTF-8"),
        (q("get", host="a", pool="%C3%28"), "UTF-8"),
        (q("get", host="a", pool="%ZZ"), "'%'"),
        (q("get", host="a", pool="p%2"), "'%'"),
        (q("get", host="a", pool="p", ttl="%"), "'%'"),
        ("/get/?host=a&pool=p&x%zz=1", "'%'"),
        ("/get/?host=a&pool=p&x%0D%0A=%ff", "UTF-8"),  # the reason must not carry CR LF
        (q("get", host="a", pool="p", ttl="1_0"), "number"),
        (q("get", host="a", pool="p", ttl="%D9%A1"), "number"),  # ARABIC-INDIC DIGIT ONE
        (q("get", host="a", pool="p", ttl="inf"), "number"),
        (q("get", host="a", pool="p", ttl="0x10"), "number"),
        (q("get", host="a", pool="p", ttl="1e+3"), "number"),  # '+' is a space
        (q("wait", host="a", pool="p", timeout="%201"), "number"),
        (q("get", host="%E2%80%8B", pool="p"), "not printable"),
        (q("get", host="a%07", pool="p"), "control characters"),
        (q("get", host="a", pool="p", ttl="1e300"), "at most"),
        (q("wait", host="a", pool="p", timeout="1e18"), "at most"),
        ("/get/?host=a&pool=p&host=a", "more than once"),
        ("/get/?host=a&pool=p&h%6Fst=b", "more than once"),
    ],
)
def test_query_is_parsed_strictly(server: Server, path: str, reason: str) -> None:
    answer = server.call(path)
    assert (answer.status, answer.body) == (400, "INVALID"), path
    assert reason in answer.headers["X-Distributex-Reason"], answer.headers


def test_bad_escapes_are_not_one_name(server: Server) -> None:
    # yarl decoded all of these to U+FFFD or kept '%ZZ' as is: one holder, one pool.
    assert server.call(q("get", host="a", pool="%25ZZ")).body == "YES"  # the pool "%ZZ"
    assert server.call(q("get", host="b", pool="%ZZ")).status == 400
    assert server.call(q("get", host="%ff", pool="q")).status == 400
    assert server.call(q("get", host="%fe", pool="q")).status == 400
    assert server.call(q("get", host="%C3%BF", pool="q")).body == "YES"  # a real "ÿ"
    assert server.call(q("get", host="%EF%BF%BD", pool="q")).body == "NO"  # U+FFFD itself


def test_plus_is_a_space_and_plain_numbers_work(server: Server) -> None:
    assert server.call(q("get", host="a+b", pool="p")).body == "YES"
    assert server.call(q("get", host="a%20b", pool="p")).body == "YES"  # the same holder
    assert server.call(q("get", host="c", pool="p")).body == "NO"
    for ttl, header in (("1", "1"), ("1.5", "1.5"), (".5", "0.5"), ("1e3", "1000"), ("2.", "2")):
        answer = server.call(q("get", host="n", pool="nums", ttl=ttl))
        assert answer.body == "YES", ttl
        assert answer.headers["X-Distributex-TTL"] == header
    assert server.call(q("wait", host="w", pool="free", timeout="1e9")).body == "YES"


# -- 3. the TTL header is exact -----------------------------------------------


def test_ttl_header_never_longer_than_the_lease(server_factory) -> None:
    srv = server_factory("pools:\n  - name: big\n    expire: 12345651\n")
    answer = srv.call(q("get", host="h", pool="big"))
    assert answer.body == "YES"
    assert answer.headers["X-Distributex-TTL"] == "12345651"
    renewed = srv.call(
        q("renew", host="h", pool="big", lease=answer.headers["X-Distributex-Lease"], ttl="0.1")
    )
    assert renewed.headers["X-Distributex-TTL"] == "0.1"


# -- 5. pools made on first use are bounded ----------------------------------


def test_max_pools_bounds_pools_made_on_first_use(server_factory) -> None:
    srv = server_factory("max_pools: 3\nautocreate: true\npools:\n  - name: listed\n")
    for i in range(3):
        assert srv.call(q("get", host="h", pool=f"p{i}")).body == "YES"
    for path in (q("get", host="h", pool="p3"), q("wait", host="h", pool="p3", timeout="0")):
        answer = srv.call(path)
        assert (answer.status, answer.body) == (429, "INVALID"), path
        assert "max_pools" in answer.headers["X-Distributex-Reason"]
    assert srv.call(q("get", host="h", pool="listed")).body == "YES"  # listed: not counted
    assert srv.call(q("get", host="other", pool="p0")).body == "NO"  # has state already
    assert srv.call(q("release", host="h", pool="p3")).body == "OK"  # makes no state
    assert srv.call(q("release", host="h", pool="p0")).body == "OK"  # p0 holds nothing now
    assert srv.call(q("get", host="h", pool="p3")).body == "YES"


# -- 6. cosmetics: quiet logs, IPv6 URLs ---------------------------------------


def test_expect_continue_then_half_close_logs_no_traceback(server: Server) -> None:
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(
                b"POST /get/?host=a&pool=p HTTP/1.1\r\nHost: test\r\n"
                b"Content-Length: 10\r\nExpect: 100-continue\r\n\r\n"
            )
            sock.shutdown(socket.SHUT_WR)
            assert closed_by_server(sock, timeout=10)
    assert server.call(q("get", host="b", pool="q")).body == "YES"  # still serving
    server.stop()
    log = server.log.read_text()
    assert "Traceback" not in log and "ERROR" not in log, log


def test_ipv6_bind_is_logged_as_a_url(tmp_path: Path) -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    port = free_port()
    log = tmp_path / "distributexd.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "distributex", "-b", "::1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        wait_until(lambda: "serving" in log.read_text() or proc.poll() is not None, what="start")
        assert f"http://[::1]:{port}/" in log.read_text(), log.read_text()
        with urllib.request.urlopen(f"http://[::1]:{port}/get/?host=a&pool=p", timeout=10) as r:
            assert r.read() == b"YES"
    finally:
        proc.kill()
        proc.wait()


# -- 4. idle connections, timeouts, the cap, running out of descriptors --------


def park(port: int, host: str, pool: str) -> socket.socket:
    """A connection with a /wait/ parked on the server, for sure.

    The /wait/ is pipelined behind a /get/ in one send: once the /get/ is
    answered, the server has read the /wait/ too (one segment on loopback).
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    sock.sendall(
        f"GET /get/?host={host}&pool=sync-{host} HTTP/1.1\r\nHost: test\r\n\r\n"
        f"GET /wait/?host={host}&pool={pool} HTTP/1.1\r\nHost: test\r\n\r\n".encode()
    )
    assert read_answer(sock) == (200, "YES")
    return sock


def test_header_and_idle_timeouts(server_factory, open_sockets: list[socket.socket]) -> None:
    srv = server_factory(
        "header_timeout: 1\nidle_timeout: 2\nautocreate: true\npools:\n  - name: p\n"
    )
    assert srv.call(q("get", host="holder", pool="p")).body == "YES"
    parked = park(srv.port, "waiter", "p")
    silent = socket.create_connection(("127.0.0.1", srv.port), timeout=20)
    partial = socket.create_connection(("127.0.0.1", srv.port), timeout=20)
    partial.sendall(b"GET /get/?host=a&pool=q HTTP/1.1\r\nHost: test\r\n")  # no blank line
    kept = send(srv.port, q("get", host="k", pool="other"))
    open_sockets += [parked, silent, partial, kept]
    assert read_answer(kept) == (200, "YES")
    assert closed_by_server(silent), "a connection that sends nothing must be closed"
    assert closed_by_server(partial), "a request head must come within header_timeout"
    assert closed_by_server(kept), "a kept-alive connection must close after idle_timeout"
    # A parked /wait/ has a request in progress: neither timeout ends it.
    assert srv.call(q("release", host="holder", pool="p")).body == "OK"
    assert read_answer(parked) == (200, "YES")


def test_connection_cap_spares_parked_waiters(
    server_factory, open_sockets: list[socket.socket]
) -> None:
    srv = server_factory("max_connections: 20\nautocreate: true\npools:\n  - name: p\n")
    assert srv.call(q("get", host="holder", pool="p")).body == "YES"
    waiters = [park(srv.port, f"w{i}", "p") for i in range(5)]
    open_sockets += waiters
    for _ in range(40):
        open_sockets.append(socket.create_connection(("127.0.0.1", srv.port), timeout=20))
    # The newest connection closes the oldest idle one: still served.
    assert srv.call(q("get", host="y", pool="other")).body == "YES"
    assert srv.call(q("release", host="holder", pool="p")).body == "OK"
    for i, sock in enumerate(waiters):
        assert read_answer(sock) == (200, "YES"), f"waiter {i} lost"
        assert srv.call(q("release", host=f"w{i}", pool="p")).body == "OK"


def call_when_admitted(srv: Server, path: str) -> Answer:
    """Call, again while the server refuses the connection (it is full)."""
    deadline = time.monotonic() + 20
    while True:
        try:
            return srv.call(path)
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_connection_cap_refuses_when_nothing_is_idle(
    server_factory, open_sockets: list[socket.socket]
) -> None:
    # All from one address: the per-peer share (half the cap) must not come first here.
    srv = server_factory(
        "max_connections: 6\nmax_connections_per_peer: 6\nautocreate: true\npools:\n  - name: p\n"
    )
    assert srv.call(q("get", host="holder", pool="p")).body == "YES"
    waiters = [park(srv.port, f"w{i}", "p") for i in range(6)]
    open_sockets += waiters
    extra = send(srv.port, q("get", host="z", pool="free"))
    open_sockets.append(extra)
    assert closed_by_server(extra, timeout=10), "a 7th connection must be refused"
    # A waiter that hangs up leaves the queue and frees its connection's place.
    waiters.pop(0).close()
    assert call_when_admitted(srv, q("release", host="holder", pool="p")).body == "OK"
    for i, sock in enumerate(waiters, start=1):
        assert read_answer(sock) == (200, "YES"), f"waiter {i} lost"
        assert call_when_admitted(srv, q("release", host=f"w{i}", pool="p")).body == "OK"


@pytest.fixture
def small_fd_server(tmp_path: Path) -> Iterator:
    """Starts distributexd under ``ulimit -n 1024`` (soft and hard) with optional YAML."""
    started: list[Server] = []

    def start(config: str | None) -> Server:
        port = free_port()
        log = tmp_path / f"distributexd-{port}.log"
        cmd = f"ulimit -n 1024 && exec {sys.executable} -m distributex -p {port}"
        if config is not None:
            (tmp_path / "dx.yaml").write_text(config)
            cmd += f" -c {tmp_path / 'dx.yaml'}"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                ["bash", "-c", cmd],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        started.append(Server(proc, port, log))
        wait_for_port(port, proc)
        return started[-1]

    yield start
    for server in started:
        server.stop(signal.SIGKILL)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
@pytest.mark.parametrize(
    "config",
    [
        None,  # the defaults: the cap keeps descriptors free
        "max_connections: 100000\nautocreate: true\n",  # no cap: accept() fails with EMFILE
    ],
    ids=["default-cap", "out-of-fds"],
)
def test_keeps_serving_when_flooded_with_idle_connections(
    small_fd_server, config: str | None, open_sockets: list[socket.socket]
) -> None:
    srv = small_fd_server(config)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        if hard != resource.RLIM_INFINITY and hard < 1300:
            pytest.skip(f"the test needs ~1200 file descriptors (hard limit {hard})")
        wanted = 2048 if hard == resource.RLIM_INFINITY else min(hard, 2048)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    # More idle connections than the server has descriptors.
    for _ in range(1100):
        open_sockets.append(socket.create_connection(("127.0.0.1", srv.port), timeout=20))
    started = time.monotonic()
    got = srv.call(q("get", host="h", pool="p"), timeout=15)
    assert got.body == "YES"
    token = got.headers["X-Distributex-Lease"]
    assert srv.call(q("renew", host="h", pool="p", lease=token), timeout=15).body == "OK"
    assert srv.call(q("release", host="h", pool="p", lease=token), timeout=15).body == "OK"
    assert time.monotonic() - started < 10
    before = cpu_seconds(srv.proc.pid)
    time.sleep(2)  # a measuring window, not a wait for a condition
    assert cpu_seconds(srv.proc.pid) - before < 1.0, "the server spins"
    assert srv.log.stat().st_size < 200_000, srv.log.read_text()[:2000]
    log = srv.log.read_text()
    assert "Traceback" not in log
    assert log.count("cannot accept connections") <= 3, log
