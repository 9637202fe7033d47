"""The HTTP text API against a real distributexd process over real sockets.

The seed transcript and the lock rules every backend must keep (allow-list, semaphore burst, FIFO,
hang-ups, expiry, leases, timeouts) are in ``test_conformance.py``, run on
every backend; this file keeps what is about the HTTP layer and the
in-memory server itself.
"""

from __future__ import annotations

import itertools
import signal
import socket
import time
from urllib.parse import quote

import pytest

from tests.conftest import Server

CONFIG = """\
pools:
  - name: pool1
    expire: 300
  - name: guarded
    servers: acme1, acme2
  - name: sem5
    maxlocks: 5
  - name: short
    expire: 1
  - name: forever
    expire: 0
"""


def q(verb: str, host: str, pool: str, extra: str = "") -> str:
    return f"/{verb}/?host={quote(host)}&pool={quote(pool)}{extra}"


class ParkedWait:
    """A /wait/ sent on its own socket, answered later (or hung up on)."""

    def __init__(self, server: Server, host: str, pool: str, extra: str = "") -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        path = q("wait", host, pool, extra)
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())

    def answer(self, timeout: float = 10) -> tuple[int, dict[str, str], str]:
        self.sock.settimeout(timeout)
        data = b""
        while chunk := self.sock.recv(4096):
            data += chunk
        self.sock.close()
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        return int(lines[0].split()[1]), headers, body.decode()

    def answered(self) -> bool:
        """True if an answer is already waiting on the socket."""
        self.sock.setblocking(False)
        try:
            return bool(self.sock.recv(1, socket.MSG_PEEK))
        except BlockingIOError:
            return False
        finally:
            self.sock.setblocking(True)

    def hang_up(self) -> None:
        self.sock.close()


@pytest.fixture
def srv(server_factory) -> Server:
    return server_factory(CONFIG)


def test_paths_with_and_without_slash(srv: Server) -> None:
    assert srv.call("/get?host=a&pool=pool1").body == "YES"
    assert srv.call("/get/?host=a&pool=pool1").body == "YES"  # re-entrant
    assert srv.call("/wait?host=a&pool=pool1").body == "YES"
    assert srv.call("/release?host=a&pool=pool1").body == "OK"
    assert srv.call("/release/?host=a&pool=pool1").body == "OK"  # held nothing


@pytest.mark.parametrize(
    ("path", "status", "reason"),
    [
        ("/get/?pool=pool1", 400, "host"),
        ("/get/?host=&pool=pool1", 400, "host"),
        ("/wait/?host=a", 400, "pool"),
        ("/release/?host=a&pool=", 400, "pool"),
        ("/get/?host=a&pool=nosuch", 404, "unknown pool"),
        ("/wait/?host=a&pool=nosuch", 404, "unknown pool"),
        ("/get/?host=intruder&pool=guarded", 403, "servers"),
        ("/release/?host=intruder&pool=guarded", 403, "servers"),
        ("/grab/?host=a&pool=pool1", 404, "unknown verb"),
        ("/index.html", 404, "unknown verb"),  # "/" is the dashboard
        ("/wait/?host=a&pool=pool1&timeout=soon", 400, "timeout"),
        ("/wait/?host=a&pool=pool1&timeout=-1", 400, "timeout"),
        ("/get/?host=a&pool=pool1&ttl=0", 400, "ttl"),
        ("/renew/?host=a&pool=pool1", 400, "lease"),
        ("/get/?host=" + "x" * 300 + "&pool=pool1", 400, "longer"),
        ("/get/?host=a&host=b&pool=pool1", 400, "more than once"),
        ("/release/?host=a&pool=pool1&lease=x&lease=y", 400, "more than once"),
    ],
)
def test_invalid_requests(srv: Server, path: str, status: int, reason: str) -> None:
    answer = srv.call(path)
    assert answer.status == status
    assert answer.body == "INVALID"
    assert reason in answer.headers["X-Distributex-Reason"]


def test_malformed_http_is_a_400_and_one_log_line(srv: Server) -> None:
    for raw in (b"GARBAGE\r\n\r\n", b"GET /get/?host=" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            sock.sendall(raw)
            status_line = sock.recv(64).split(b"\r\n")[0]
            assert status_line.split()[1] == b"400", status_line
    assert srv.call(q("get", "a", "pool1")).body == "YES"  # still serving
    srv.stop()
    log = srv.log.read_text()
    assert "bad HTTP request" in log and "Traceback" not in log


def test_unknown_pool_with_builtin_default_is_made_on_first_use(server: Server) -> None:
    assert server.call(q("get", "a", "anything-at-all")).body == "YES"
    assert server.call(q("get", "b", "anything-at-all")).body == "NO"


def test_semaphore_five_then_no(srv: Server) -> None:
    bodies = [srv.call(q("get", f"h{i}", "sem5")).body for i in range(6)]
    assert bodies == ["YES"] * 5 + ["NO"]
    assert srv.call(q("get", "h0", "sem5")).body == "YES"  # a holder asking again
    srv.call(q("release", "h2", "sem5"))
    assert srv.call(q("get", "h5", "sem5")).body == "YES"
    assert srv.call(q("get", "h6", "sem5")).body == "NO"


def test_release_wakes_waiter_at_once(srv: Server) -> None:
    srv.call(q("get", "holder", "pool1"))
    waiter = ParkedWait(srv, "next", "pool1")
    time.sleep(0.2)
    assert not waiter.answered()
    started = time.monotonic()
    srv.call(q("release", "holder", "pool1"))
    status, headers, body = waiter.answer()
    assert (status, body) == (200, "YES")
    assert time.monotonic() - started < 0.5  # no polling interval
    assert int(headers["X-Distributex-Fence"]) > 0


def test_legacy_release_ends_every_run_of_the_host(srv: Server) -> None:
    srv.call(q("get", "hostA", "pool1"))
    srv.call(q("get", "hostA", "pool1"))
    assert srv.call(q("release", "hostA", "pool1")).body == "OK"
    assert srv.call(q("get", "hostB", "pool1")).body == "YES"


def test_fencing_tokens_strictly_increase(srv: Server) -> None:
    fences = []
    for i in range(20):
        answer = srv.call(q("get", f"h{i}", "pool1"))
        fences.append(int(answer.headers["X-Distributex-Fence"]))
        srv.call(q("release", f"h{i}", "pool1"))
    other = srv.call(q("get", "x", "sem5"))
    fences.append(int(other.headers["X-Distributex-Fence"]))
    assert all(a < b for a, b in itertools.pairwise(fences))
    # A holder asking again gets a lease of the same hold: same fencing token.
    again = srv.call(q("get", "x", "sem5"))
    assert int(again.headers["X-Distributex-Fence"]) == fences[-1]


def test_fencing_tokens_increase_across_restart(server_factory) -> None:
    first = server_factory()
    before = int(first.call(q("get", "a", "p")).headers["X-Distributex-Fence"])
    first.stop()
    second = server_factory()
    after = int(second.call(q("get", "a", "p")).headers["X-Distributex-Fence"])
    assert after > before


def test_renew_and_release_by_lease(srv: Server) -> None:
    answer = srv.call(q("get", "a", "short", "&ttl=0.5"))
    token = answer.headers["X-Distributex-Lease"]
    assert answer.headers["X-Distributex-TTL"] == "0.5"
    for _ in range(4):  # 1.2 s in all, well past the 0.5 s TTL
        time.sleep(0.3)
        renewed = srv.call(q("renew", "a", "short", f"&lease={token}"))
        assert (renewed.status, renewed.body) == (200, "OK")
    assert srv.call(q("get", "b", "short")).body == "NO"
    # Someone else's token, or a made-up one, releases nothing.
    assert srv.call(q("release", "b", "short", f"&lease={token}")).status == 410
    assert srv.call(q("release", "a", "short", "&lease=forged")).body == "GONE"
    assert srv.call(q("get", "b", "short")).body == "NO"
    assert srv.call(q("release", "a", "short", f"&lease={token}")).body == "OK"
    assert srv.call(q("release", "a", "short", f"&lease={token}")).status == 410
    assert srv.call(q("renew", "a", "short", f"&lease={token}")).body == "GONE"


def test_ttl_cannot_exceed_expire(srv: Server) -> None:
    answer = srv.call(q("get", "a", "short", "&ttl=100"))
    assert answer.headers["X-Distributex-TTL"] == "1"


def test_escaped_names(server: Server) -> None:
    weird = "a host&pool=x/é"
    assert server.call(q("get", weird, "p q")).body == "YES"
    assert server.call(q("get", "other", "p q")).body == "NO"
    assert server.call(q("release", weird, "p q")).body == "OK"
    assert server.call(q("get", "other", "p q")).body == "YES"


def test_start_delay_holds_grants_back_after_start(server_factory) -> None:
    started = time.monotonic()
    srv = server_factory(CONFIG, ["--start-delay", "1.5"])
    assert srv.call(q("get", "a", "pool1")).body == "NO"
    waiter = ParkedWait(srv, "b", "pool1")
    assert waiter.answer()[2] == "YES"
    assert time.monotonic() - started >= 1.5
    assert srv.call(q("get", "a", "pool1")).body == "NO"  # b holds it now, in order
    assert srv.call(q("get", "c", "sem5")).body == "YES"


def test_sigterm_answers_waiters_and_exits_zero(srv: Server) -> None:
    srv.call(q("get", "holder", "pool1"))
    waiter = ParkedWait(srv, "parked", "pool1")
    time.sleep(0.2)
    srv.proc.send_signal(signal.SIGTERM)
    status, _headers, body = waiter.answer()
    assert (status, body) == (503, "UNAVAILABLE")
    assert srv.proc.wait(10) == 0


def test_port_in_use_is_one_clear_line(server: Server) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "distributex", "-p", str(server.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{server.port}" in result.stderr
    assert "Traceback" not in result.stderr
