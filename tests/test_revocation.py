"""A reload that removes or changes a token ends that identity's parked waits and streams."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from tests.conftest import wait_until
from tests.test_auth import ADMIN_TOKEN, DB1_TOKEN, WEB1_TOKEN, call, sha
from tests.test_reload import Reloadable

pytestmark = pytest.mark.timeout(120)

WEB2_TOKEN = "web2-Rt6yUi9oPa2sDf4g"


def tokens(*names: str) -> str:
    known = {"web1": WEB1_TOKEN, "web2": WEB2_TOKEN, "db1": DB1_TOKEN}
    lines = ["tokens:", "  - identity: root", f"    sha256: {sha(ADMIN_TOKEN)}"]
    for name in names:
        lines += [f"  - identity: {name}", f"    sha256: {sha(known[name])}"]
    return "\n".join(lines) + "\npools:\n  - name: p\n    expire: 300\n"


class Raw:
    """A request on its own socket with a token, answered (or closed) later."""

    def __init__(self, port: int, path: str, token: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        head = f"GET {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n"
        self.sock.sendall((head + "Connection: close\r\n\r\n").encode())

    def read_all(self) -> bytes:
        data = b""
        while chunk := self.sock.recv(4096):
            data += chunk
        self.sock.close()
        return data


class Watched(Reloadable):
    """Reads /status with the operators' token (status pages need one here)."""

    def pool(self, name: str) -> dict:
        answer = call(self.server, f"/status?pool={name}", ADMIN_TOKEN)
        assert answer.status == 200, answer.body
        return json.loads(answer.body)["pools"][0]


@pytest.mark.parametrize("backend_name", ["inmemory", "sqlite"])
def test_a_removed_token_loses_its_parked_wait_and_stream(
    cluster_factory, tmp_path: Path, backend_name: str
) -> None:
    srv = Watched(cluster_factory, tmp_path, tokens("web1", "web2", "db1"))
    s = srv.server
    holder = Raw(s.port, "/get/?pool=p", DB1_TOKEN)
    assert holder.read_all().endswith(b"YES")
    web1 = Raw(s.port, "/wait/?pool=p", WEB1_TOKEN)
    srv.until_waiting("p", ["web1"])
    web2 = Raw(s.port, "/wait/?pool=p", WEB2_TOKEN)
    srv.until_waiting("p", ["web1", "web2"])
    stream = Raw(s.port, "/status/events", WEB1_TOKEN)
    assert stream.sock.recv(4096).startswith(b"HTTP/1.1 200")

    srv.reload(tokens("web2", "db1"))
    answer = web1.read_all()  # at once: the wait is over
    assert answer.startswith(b"HTTP/1.1 403") and answer.endswith(b"INVALID"), answer
    assert b"the token of 'web1' was removed or changed by a reload" in answer
    assert stream.read_all() is not None  # closed by the server (read_all returned)
    srv.until_waiting("p", ["web2"])  # web1 left the queue as a hang-up does
    release = Raw(s.port, "/release/?pool=p", DB1_TOKEN)
    assert release.read_all().endswith(b"OK")
    assert web2.read_all().endswith(b"YES")  # the next in line, not web1
    assert srv.holders("p") == ["web2"]
    log = s.log.read_text()
    line = next(x for x in log.splitlines() if "reloaded " in x)
    assert "tokens removed for web1" in line and "ended 2 parked requests" in line, line
    for secret in (WEB1_TOKEN, sha(WEB1_TOKEN)):
        assert secret not in log


def test_a_changed_token_is_ended_and_the_new_token_works(cluster_factory, tmp_path: Path) -> None:
    srv = Watched(cluster_factory, tmp_path, tokens("web1", "db1"))
    s = srv.server
    assert Raw(s.port, "/get/?pool=p", DB1_TOKEN).read_all().endswith(b"YES")
    web1 = Raw(s.port, "/wait/?pool=p", WEB1_TOKEN)
    srv.until_waiting("p", ["web1"])
    # web1's token replaced (same identity, another secret).
    srv.reload(tokens("web2", "db1").replace("identity: web2", "identity: web1"))
    assert web1.read_all().startswith(b"HTTP/1.1 403")
    wait_until(lambda: srv.waiters("p") == [], what="web1 out of the queue")
    assert "tokens changed for web1" in s.log.read_text()
    assert Raw(s.port, "/get/?pool=p", WEB1_TOKEN).read_all().startswith(b"HTTP/1.1 401")
    assert Raw(s.port, "/get/?pool=p", WEB2_TOKEN).read_all().endswith(b"NO")
