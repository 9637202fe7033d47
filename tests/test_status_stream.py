"""``/status/events`` on a large status: memory per viewer, skipped updates, the viewer cap."""

from __future__ import annotations

import json
import select
import socket
from pathlib import Path

import pytest

from tests.conftest import Server, wait_until
from tests.test_http_hostile import open_sockets  # noqa: F401 - a fixture used by name

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc"),
]

POOLS = 2000
VIEWERS = 150
# 17 names of 28 characters: every pool lists them, /status is about 1.4 MB.
SERVERS = [f"host-{i:04d}.rack-7.example.com" for i in range(17)]
# What 150 open_sockets that never read may cost the server at most, all told
# (one copy of the status per viewer would be over 200 MB).
MAX_GROWTH_MB = 80
# Left over once they are gone (allocator slack; before: hundreds of MB).
MAX_LEFT_MB = 40


def large_config(max_streams: int) -> str:
    lines = [f"max_status_streams: {max_streams}", "autocreate: true", "pools:"]
    lines.append(f"  - name: pool-0000\n    servers: &s [{', '.join(SERVERS)}]")
    lines += [f"  - name: pool-{i:04d}\n    servers: *s" for i in range(1, POOLS)]
    return "\n".join(lines) + "\n"


def rss_mb(server: Server) -> float:
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def viewer(port: int, version: str = "1.1", small: bool = True) -> socket.socket:
    """A viewer that does not read: a small receive buffer, so the server's sends back up."""
    sock = socket.socket()
    if small:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(20)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET /status/events HTTP/{version}\r\nHost: t\r\n\r\n".encode())
    return sock


def answered(sockets: list[socket.socket]) -> bool:
    readable, _, _ = select.select(sockets, [], [], 0)
    return len(readable) == len(sockets)


class Reader:
    """A viewer that reads: the status events it got, in order."""

    def __init__(self, port: int, small: bool = False) -> None:
        self.sock = viewer(port, "1.0", small)  # HTTP/1.0: the events come unchunked
        self.buffer = b""

    def events(self) -> list[dict]:
        """Every whole event received so far (reads what has come)."""
        while select.select([self.sock], [], [], 0.05)[0]:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                break
            self.buffer += chunk
        found = []
        # The last piece is what follows the last whole event (often nothing).
        for block in self.buffer.partition(b"\r\n\r\n")[2].split(b"\n\n")[:-1]:
            for line in block.split(b"\n"):
                if line.startswith(b"data: "):
                    found.append(json.loads(line[6:]))
        return found


def holders(reader: Reader, pool: str) -> list[str]:
    """The holders of ``pool`` in the latest event ``reader`` got (none before the first)."""
    events = reader.events()
    if not events:
        return []
    return [h["host"] for p in events[-1]["pools"] if p["name"] == pool for h in p["holders"]]


def test_viewers_that_never_read_cost_little_memory(
    server_factory,
    open_sockets: list[socket.socket],  # noqa: F811 - the imported fixture
) -> None:
    srv = server_factory(large_config(VIEWERS + 1))
    size = len(srv.call("/status", timeout=30).body)
    assert size > 1_300_000, size
    reader = Reader(srv.port)
    wait_until(lambda: reader.events(), what="the first event")
    before = rss_mb(srv)
    for _ in range(VIEWERS):
        open_sockets.append(viewer(srv.port))
    wait_until(lambda: answered(open_sockets), timeout=60, what="every viewer answered")
    # Changes while they do not read: each one a new event for the reader.
    for i in range(5):
        assert srv.call(f"/get/?host={SERVERS[i]}&pool=pool-{i:04d}").body == "YES"
        wait_until(
            lambda i=i: holders(reader, f"pool-{i:04d}") == [SERVERS[i]],
            timeout=60,
            what=f"change {i} seen",
        )
    grown = rss_mb(srv) - before
    assert grown < MAX_GROWTH_MB, f"{VIEWERS} viewers cost {grown:.0f} MB"
    for sock in open_sockets:
        sock.close()
    open_sockets.clear()
    reader.sock.close()
    wait_until(
        lambda: rss_mb(srv) - before < MAX_LEFT_MB, timeout=30, what="memory back after they left"
    )


def test_viewer_cap_answers_503_with_the_reason(
    server_factory,
    open_sockets: list[socket.socket],  # noqa: F811 - the imported fixture
) -> None:
    srv = server_factory("max_status_streams: 2\nautocreate: true\n")
    for _ in range(2):
        open_sockets.append(viewer(srv.port))
    wait_until(lambda: answered(open_sockets), what="two open_sockets answered")
    refused = srv.call("/status/events")
    assert refused.status == 503, refused
    assert "max_status_streams" in refused.headers["X-Distributex-Reason"]
    assert "max_status_streams" in json.loads(refused.body)["error"]
    open_sockets.pop().close()
    # The place is free again once the viewer has gone.
    wait_until(lambda: viewer_admitted(srv), what="a viewer admitted again")


def viewer_admitted(server: Server) -> bool:
    with viewer(server.port) as sock:
        return sock.recv(64).startswith(b"HTTP/1.1 200")


def test_a_slow_viewer_skips_to_the_latest_event(server_factory) -> None:
    srv = server_factory(large_config(10))
    slow = Reader(srv.port, small=True)
    wait_until(lambda: slow.events(), what="the first event")  # then it stops reading
    fast = Reader(srv.port)
    changes = 4
    for i in range(changes):
        assert srv.call(f"/get/?host={SERVERS[i]}&pool=pool-{i:04d}").body == "YES"
        wait_until(
            lambda i=i: holders(fast, f"pool-{i:04d}") == [SERVERS[i]],
            timeout=60,
            what=f"change {i} seen",
        )
    # The slow viewer reads now: the latest state, without every step between.
    last = f"pool-{changes - 1:04d}"
    wait_until(lambda: holders(slow, last) == [SERVERS[changes - 1]], timeout=60)
    # The first event, then not one per change: some were skipped.
    assert len(slow.events()) < 1 + changes, "intermediate updates are skipped"
    slow.sock.close()
    fast.sock.close()
