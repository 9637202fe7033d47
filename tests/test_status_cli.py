"""``distributex status``: the table, --json, one pool, --watch, and its errors."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from tests.conftest import Server, free_port
from tests.test_http import ParkedWait, q

pytestmark = pytest.mark.timeout(120)

CONFIG = """\
pools:
  - name: deploy
    expire: 300
  - name: reboot
    maxlocks: 3
    expire: 0
"""


def status_cmd(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DISTRIBUTEX_CONFIG": ""}  # no client config file of this machine
    return subprocess.run(
        [sys.executable, "-m", "distributex.client.cli", "status", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.fixture
def srv(server_factory) -> Server:
    return server_factory(CONFIG)


def test_table(srv: Server) -> None:
    assert srv.call(q("get", "alice", "deploy")).body == "YES"
    for host in ("bob", "carol"):
        assert srv.call(q("get", host, "reboot")).body == "YES"
    waits = [ParkedWait(srv, "dave", "deploy")]
    deadline = time.monotonic() + 15
    while "dave" not in srv.call("/status").body:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    waits.append(ParkedWait(srv, "erin", "deploy"))
    while "erin" not in srv.call("/status").body:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    done = status_cmd("-H", "127.0.0.1", "-p", str(srv.port))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["POOL", "SLOTS", "HOLDER", "MODE", "FENCE", "LEFT", "WAITERS"]
    deploy = lines[1].split()
    assert deploy[:4] == ["deploy", "1/1", "alice", "exclusive"]
    assert deploy[5].startswith("4m") or deploy[5] == "5m00s"
    assert " ".join(deploy[6:]) == "2: dave, erin"
    assert lines[2].split()[:4] == ["reboot", "2/3", "bob", "exclusive"]
    assert lines[2].split()[5] == "never"
    assert lines[3].split()[0] == "carol"  # second holder: a row of its own
    # -H host:port works as well, and one pool only.
    one = status_cmd("-H", f"127.0.0.1:{srv.port}", "reboot")
    assert one.returncode == 0, one.stderr
    assert [line.split()[0] for line in one.stdout.splitlines()] == ["POOL", "reboot", "carol"]
    for wait in waits:
        wait.hang_up()


def test_json(srv: Server) -> None:
    assert srv.call(q("get", "alice", "deploy")).body == "YES"
    done = status_cmd("-H", "127.0.0.1", "-p", str(srv.port), "deploy", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert [p["name"] for p in doc["pools"]] == ["deploy"]
    assert doc["pools"][0]["holders"][0]["host"] == "alice"


def test_errors(srv: Server) -> None:
    unknown = status_cmd("-H", "127.0.0.1", "-p", str(srv.port), "nosuch")
    assert unknown.returncode == 77
    assert unknown.stderr.strip().endswith("404 unknown pool 'nosuch'")
    assert len(unknown.stderr.splitlines()) == 1
    gone = status_cmd("-H", "127.0.0.1", "-p", str(free_port()))
    assert gone.returncode == 69
    assert gone.stderr.startswith("distributex status: cannot reach")
    assert len(gone.stderr.splitlines()) == 1
    bad = status_cmd("-H", "127.0.0.1", "-p", "nope")
    assert bad.returncode == 2


class Watch:
    """A running ``distributex status ... --watch --json``: its documents as they come."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "distributex.client.cli", "status", *args, "--watch", "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**env, "PYTHONUNBUFFERED": "1"},
        )
        self.docs: list[dict] = []
        self.seen = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.docs.append(json.loads(line))
            self.seen.set()

    def doc(self, index: int, timeout: float = 30) -> dict:
        """The ``index``-th document, once it came."""
        deadline = time.monotonic() + timeout
        while len(self.docs) <= index:
            assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""
            assert time.monotonic() < deadline, "no new status document"
            self.seen.wait(0.1)
            self.seen.clear()
        return self.docs[index]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def test_watch_follows_changes(srv: Server) -> None:
    watch = Watch(
        ["-H", "127.0.0.1", "-p", str(srv.port), "deploy"], {**os.environ, "DISTRIBUTEX_CONFIG": ""}
    )
    try:
        assert watch.doc(0)["pools"][0]["holders"] == []
        assert srv.call(q("get", "alice", "deploy")).body == "YES"
        holders = watch.doc(1)["pools"][0]["holders"]
        assert [h["host"] for h in holders] == ["alice"]
        assert srv.call(q("release", "alice", "deploy")).body == "OK"
        assert watch.doc(2)["pools"][0]["holders"] == []
    finally:
        watch.stop()


# -- a hostile server -----------------------------------------------------------------------

CLEAR, TITLE = "\x1b[2J", "\x1b]0;pwned\x07"
FORGED = "\r\nroot  1/1  root  1  never"  # a forged table row


@pytest.fixture
def hostile() -> Iterator[int]:
    """A small real HTTP server whose names carry terminal control sequences (its port)."""
    pool = {
        "name": f"deploy{CLEAR}",
        "maxlocks": f"1{TITLE}",
        "expire": 300,
        "holders": [{"host": f"web1{FORGED}", "fence": f"7{CLEAR}", "ttl_left": 60}],
        "waiters": [{"host": f"web2{TITLE}"}, {"host": "web3\x9b2J"}],
    }

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if "pool=" in self.path:  # one pool: refused, with a hostile reason
                body, code = {"error": f"no{CLEAR}such{FORGED}"}, 404
            else:
                body, code = {"pools": [pool]}, 200
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def no_control_characters(text: str) -> bool:
    return all(ch.isprintable() for line in text.split("\n") for ch in line)


def test_hostile_names_are_escaped_in_the_table(hostile: int) -> None:
    done = status_cmd("-H", "127.0.0.1", "-p", str(hostile))
    assert done.returncode == 0, done.stderr
    assert no_control_characters(done.stdout), repr(done.stdout)
    lines = done.stdout.splitlines()
    assert len(lines) == 2, lines  # the header and the one holder: no forged row
    assert lines[1].startswith("deploy\\x1b[2J")
    assert "web1\\r\\nroot" in lines[1] and "web2\\x1b]0;pwned\\x07" in lines[1]


def test_hostile_reason_is_escaped_in_the_error_line(hostile: int) -> None:
    done = status_cmd("-H", "127.0.0.1", "-p", str(hostile), "deploy")
    assert done.returncode == 77
    assert no_control_characters(done.stderr), repr(done.stderr)
    assert len(done.stderr.splitlines()) == 1, done.stderr


def test_a_long_queue_listed_by_its_head_says_how_many_more() -> None:
    from distributex.client.status import table

    pool = {
        "name": "reboot",
        "maxlocks": 1,
        "holders": [{"host": "h0", "fence": 1, "ttl_left": 10}],
        "waiters": [{"host": "w1", "requests": 1}, {"host": "w2", "requests": 1}],
        "more_waiting": 4998,
        "waiting": 5000,
    }
    row = table({"pools": [pool]}).splitlines()[1]
    assert row.endswith("5000: w1, w2, and 4998 more"), row


def test_the_table_shows_each_holders_mode_and_shared_waiters(srv: Server) -> None:
    for host in ("r1", "r2"):
        assert srv.call(q("get", host, "deploy", "&mode=shared")).body == "YES"
    waits = [ParkedWait(srv, "w", "deploy"), ParkedWait(srv, "r3", "deploy", "&mode=shared")]
    deadline = time.monotonic() + 15
    while "r3" not in srv.call("/status").body:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    done = status_cmd("-H", "127.0.0.1", "-p", str(srv.port), "deploy")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[1].split()[:5] == ["deploy", "2", "shared", "r1", "shared"]
    assert lines[1].endswith("2: w, r3 (shared)"), lines[1]
    assert lines[2].split()[:2] == ["r2", "shared"]
    for wait in waits:
        wait.hang_up()
