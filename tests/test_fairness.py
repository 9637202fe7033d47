"""One client, identity or peer address cannot starve the others (real servers, real sockets).

Each attack fills ``max_connections: 40`` and then checks that a holder of
another identity or address still renews its lease and a new client is served.
"""

from __future__ import annotations

import json
import select
import socket
from pathlib import Path

import pytest

from distributex.config import parse_config
from tests.conftest import Server, wait_until
from tests.pki import Pki
from tests.test_auth import (  # noqa: F401 - pki: a fixture used by name
    ADMIN_TOKEN,
    DB1_TOKEN,
    POOLS,
    TOKENS,
    WEB1_TOKEN,
    call,
    pki,
    reason,
    tls_keys,
)
from tests.test_config_hostile import refused
from tests.test_http_hostile import open_sockets  # noqa: F401 - a fixture used by name

pytestmark = pytest.mark.timeout(120)

CAP = 40


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=20, source_address=(source, 0))


def answered(sockets: list[socket.socket]) -> bool:
    """Whether the server has sent something (an answer's head, or EOF) on every socket."""
    pending = list(sockets)
    while pending:
        readable, _, _ = select.select(pending, [], [], 0)
        if len(readable) < len(pending):
            return False
        pending = []
    return True


def status_of_first_line(sock: socket.socket) -> int | None:
    """The status of the answer the server began on ``sock`` (None: closed without one)."""
    try:
        head = sock.recv(64, socket.MSG_PEEK)
    except ConnectionResetError:
        return None
    return int(head.split()[1]) if head.startswith(b"HTTP/1.1 ") else None


def metric(server: Server, name: str, **kwargs: object) -> float:
    """A value of the server's /metrics (asked as db1)."""
    text = call(server, "/metrics", DB1_TOKEN, **kwargs).body  # type: ignore[arg-type]
    line = next(line for line in text.splitlines() if line.startswith(name + " "))
    return float(line.split()[1])


def hold(server: Server, token: str, pool: str, **kwargs: object) -> str:
    got = call(server, f"/get/?pool={pool}&ttl=60", token, **kwargs)  # type: ignore[arg-type]
    assert got.body == "YES", got
    return got.headers["X-Distributex-Lease"]


def renew(server: Server, token: str, pool: str, lease: str, **kwargs: object) -> None:
    for _ in range(3):  # a holder renewing, each time on a new connection
        answer = call(server, f"/renew/?pool={pool}&lease={lease}", token, **kwargs)  # type: ignore[arg-type]
        assert (answer.status, answer.body) == (200, "OK"), answer


@pytest.mark.parametrize("per_identity", [None, CAP], ids=["default-caps", "streams-evicted"])
def test_one_identity_with_40_streams_locks_no_one_out(
    server_factory,
    open_sockets: list[socket.socket],  # noqa: F811 - the imported fixture
    per_identity: int | None,
) -> None:
    config = f"max_connections: {CAP}\nmax_connections_per_peer: {CAP}\n"
    if per_identity is not None:  # no cap per identity: only eviction keeps room
        config += f"max_requests_per_identity: {per_identity}\n"
    srv = server_factory(config + TOKENS + POOLS)
    lease = hold(srv, DB1_TOKEN, "pool2")
    auth = f"Authorization: Bearer {WEB1_TOKEN}"
    request = f"GET /status/events HTTP/1.1\r\nHost: t\r\n{auth}\r\n\r\n"
    for _ in range(CAP):
        sock = connect(srv.port)
        sock.sendall(request.encode())
        open_sockets.append(sock)
    wait_until(lambda: answered(open_sockets), what="every stream answered")
    statuses = [status_of_first_line(sock) for sock in open_sockets]
    if per_identity is None:  # half the cap each: the rest is refused with the reason
        assert statuses.count(200) == CAP // 2, statuses
        assert statuses.count(429) == CAP // 2, statuses
        assert metric(srv, "distributex_status_streams") == CAP // 2
    # The holder of another identity keeps its lease; a new client is served.
    renew(srv, DB1_TOKEN, "pool2", lease)
    assert call(srv, "/get/?pool=pool1", ADMIN_TOKEN).body == "YES"
    assert call(srv, "/release/?pool=pool2", DB1_TOKEN).body == "OK"


def waits(server: Server, pool: str) -> int:
    doc = json.loads(call(server, f"/status?pool={pool}", DB1_TOKEN).body)
    return sum(waiter["requests"] for waiter in doc["pools"][0]["waiters"])


def test_identity_cap_answers_429_with_the_reason(
    server_factory,
    open_sockets: list[socket.socket],  # noqa: F811 - the imported fixture
) -> None:
    srv = server_factory("max_requests_per_identity: 2\n" + TOKENS + POOLS)
    assert hold(srv, DB1_TOKEN, "pool1")
    for i in range(2):  # two parked waits of web1
        sock = connect(srv.port)
        sock.sendall(
            f"GET /wait/?pool=pool1 HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {WEB1_TOKEN}"
            "\r\n\r\n".encode()
        )
        open_sockets.append(sock)
        wait_until(lambda n=i + 1: waits(srv, "pool1") == n, what="web1 waits")
    refused = call(srv, "/status/events", WEB1_TOKEN)
    assert refused.status == 429, refused
    assert "max_requests_per_identity" in reason(refused)
    assert call(srv, "/get/?pool=shared", WEB1_TOKEN).body == "YES"  # short requests pass


def park(port: int, source: str, host: str) -> socket.socket | None:
    """A /wait/ parked on the server from ``source``; None if the server closed the connection."""
    sock = connect(port, source)
    try:
        sock.sendall(
            f"GET /get/?host={host}&pool=sync-{host} HTTP/1.1\r\nHost: t\r\n\r\n"
            f"GET /wait/?host={host}&pool=p HTTP/1.1\r\nHost: t\r\n\r\n".encode()
        )
        head = sock.recv(4096)
    except ConnectionResetError:
        head = b""
    if not head.startswith(b"HTTP/1.1 200"):
        sock.close()
        return None
    return sock


def test_one_peer_address_cannot_take_every_connection(
    server_factory,
    open_sockets: list[socket.socket],  # noqa: F811 - the imported fixture
) -> None:
    """Without authentication: parked waits (never closed to make room) from one address."""
    srv = server_factory(f"max_connections: {CAP}\nautocreate: true\n")
    got = srv.call("/get/?host=holder&pool=p&ttl=60")
    assert got.body == "YES"
    parked = [park(srv.port, "127.0.0.2", f"w{i}") for i in range(CAP)]
    open_sockets += [sock for sock in parked if sock is not None]
    assert len(open_sockets) == CAP // 2, "half the cap per peer address"
    lease = got.headers["X-Distributex-Lease"]
    for _ in range(3):
        assert srv.call(f"/renew/?host=holder&pool=p&lease={lease}").body == "OK"
    assert srv.call("/get/?host=newcomer&pool=q").body == "YES"


def accepted(port: int, clients: list[socket.socket]) -> int:
    """How many of ``clients`` the server listening on ``port`` has accepted.

    A connection still in the listen queue has no socket of the server's yet
    (inode 0 in /proc/net/tcp).
    """
    ports = {sock.getsockname()[1] for sock in clients}
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], fields[9]
        if int(local.rsplit(":", 1)[1], 16) == port and inode != "0":
            count += int(remote.rsplit(":", 1)[1], 16) in ports
    return count


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs /proc")
def test_stalled_tls_handshakes_do_not_block_accepting(
    server_factory,
    open_sockets: list[socket.socket],  # noqa: F811 - the imported fixture
    pki: Pki,  # noqa: F811 - the imported fixture
) -> None:
    # A long header_timeout: without eviction the handshakes would hold for a minute.
    config = f"max_connections: {CAP}\nmax_connections_per_peer: {CAP}\nheader_timeout: 60\n"
    srv = server_factory(config + tls_keys(pki, client_ca=False) + TOKENS + POOLS)
    lease = hold(srv, DB1_TOKEN, "pool2", tls=pki)
    for _ in range(CAP + 5):  # never a ClientHello
        open_sockets.append(connect(srv.port))
    wait_until(lambda: accepted(srv.port, open_sockets) >= CAP, what="the handshakes accepted")
    renew(srv, DB1_TOKEN, "pool2", lease, tls=pki, timeout=15)
    assert call(srv, "/get/?pool=pool1", ADMIN_TOKEN, tls=pki, timeout=15).body == "YES"
    # Stalled handshakes were closed to make room, the oldest first.
    assert answered(open_sockets[:1]) and status_of_first_line(open_sockets[0]) is None
    assert metric(srv, "distributex_connections_evicted_total", tls=pki) >= 5


def test_renewal_gets_a_reserved_place_when_nothing_can_be_closed(
    server_factory,
    open_sockets: list[socket.socket],  # noqa: F811 - the imported fixture
) -> None:
    """Every connection a parked /wait/, two addresses each within its share."""
    srv = server_factory(f"max_connections: {CAP}\nautocreate: true\n")
    got = srv.call("/get/?host=holder&pool=p&ttl=60")
    lease = got.headers["X-Distributex-Lease"]
    for source in ("127.0.0.2", "127.0.0.3"):
        for i in range(CAP // 2):
            sock = park(srv.port, source, f"w{source[-1]}-{i}")
            assert sock is not None, f"{source}: wait {i} refused"
            open_sockets.append(sock)
    for _ in range(3):
        assert srv.call(f"/renew/?host=holder&pool=p&lease={lease}").body == "OK"
    refused = srv.call("/get/?host=newcomer&pool=q")
    assert (refused.status, refused.body) == (503, "UNAVAILABLE"), refused
    assert "only /renew/ and /release/" in refused.headers["X-Distributex-Reason"]
    assert srv.call(f"/release/?host=holder&pool=p&lease={lease}").body == "OK"


def test_fairness_keys_load_and_are_bounded() -> None:
    config = parse_config("pools: []\n")
    assert (config.max_connections_per_peer, config.max_requests_per_identity) == (0, 0)
    assert config.max_status_streams == 100
    config = parse_config(
        "max_connections_per_peer: 5\nmax_requests_per_identity: 7\nmax_status_streams: 1\n"
    )
    assert (config.max_connections_per_peer, config.max_requests_per_identity) == (5, 7)
    assert config.max_status_streams == 1
    for text, problem in (
        ("max_connections_per_peer: -1\n", "max_connections_per_peer must be a whole number >= 0"),
        ("max_requests_per_identity: 1.5\n", "max_requests_per_identity must be a whole number"),
        ("max_status_streams: 0\n", "max_status_streams must be a whole number >= 1"),
        ("max_status_streams: 10000001\n", "max_status_streams must be at most 10000000"),
    ):
        assert problem in refused(text), text
