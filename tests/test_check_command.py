"""``distributex check`` against real servers: it passes where the rules hold (every
backend, one and several servers, a store restarted under it, TLS and tokens) and
names the overlapping leases of a server that breaks them."""

from __future__ import annotations

import http.server
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.conftest import Cluster, RedisServer, Server, start_redis
from tests.pki import Pki, make_pki
from tests.test_auth import sha, tls_keys

pytestmark = pytest.mark.timeout(180)

DURATION = "3"
POOLS = """\
pools:
  - name: chk
    expire: 5
  - name: sem
    maxlocks: 2
    expire: 5
  - name: other
"""


def check_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "distributex.client.cli", "check", *args]


def clean_env(**more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTRIBUTEX_")}
    return {**env, "DISTRIBUTEX_CONFIG": "", **more}


def run_check(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        check_cmd(*args), capture_output=True, text=True, timeout=timeout, env=clean_env(**env)
    )


def servers_arg(servers: list[Server]) -> str:
    return ",".join(f"127.0.0.1:{s.port}" for s in servers)


@pytest.mark.parametrize("pool", ["chk", "sem"])
def test_the_rules_hold_on_every_backend(cluster_factory, backend_name: str, pool: str) -> None:
    if pool == "sem" and backend_name not in ("inmemory", "redis"):
        pytest.skip("the semaphore on two backends is enough")
    cluster: Cluster = cluster_factory(POOLS, servers=2)
    done = run_check(
        "-H", servers_arg(cluster.servers), "-r", pool, "--duration", DURATION, "--clients", "4"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "overlaps: none" in out and "fence order: held" in out, out
    assert "result: the rules held" in out
    grants = int(out.split("grants: ")[1].split()[0])
    assert grants > 5, out
    maxlocks = 2 if pool == "sem" else 1
    assert f"maxlocks {maxlocks}" in out
    assert f"over {len(cluster.servers)} server(s)" in done.stderr


class YesToEveryone(http.server.BaseHTTPRequestHandler):
    """A broken lock server: every get and wait answered YES with a made-up fence."""

    fences = itertools.count(1)

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        verb = parts.path.strip("/")
        headers = {"Content-Type": "text/plain"}
        if verb == "status":
            pool = parse_qs(parts.query).get("pool", ["chk"])[0]
            body = f'{{"pools": [{{"name": "{pool}", "maxlocks": 1, "holders": []}}]}}'
            headers["Content-Type"] = "application/json"
        elif verb in ("get", "wait"):
            fence = next(self.fences)
            body = "YES"
            headers.update(
                {
                    "X-Distributex-Fence": str(fence),
                    "X-Distributex-Lease": uuid.uuid4().hex,
                    "X-Distributex-Ttl": "2",
                }
            )
        else:
            body = "OK"
        data = body.encode()
        self.send_response(200)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def broken_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), YesToEveryone)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_a_server_that_says_yes_to_everyone_is_caught(broken_server: int) -> None:
    done = run_check(
        "-H", f"127.0.0.1:{broken_server}", "-r", "chk", "--duration", "2", "--clients", "3"
    )
    assert done.returncode == 65, done.stdout + done.stderr
    out = done.stdout
    assert "result: VIOLATION" in out
    overlap = next(line for line in out.splitlines() if "holders > maxlocks 1" in line)
    # The overlapping leases are named: client, fence and when each was held.
    named = [part for part in overlap.split("; ") if " fence " in part]
    assert len(named) >= 2, overlap
    assert len({part.split(" fence ")[0].split()[-1] for part in named}) >= 2, overlap


def answered_503(servers: list[Server]) -> float:
    """Lock verbs the servers answered 503, from their /metrics."""
    total = 0.0
    for server in servers:
        for line in server.call("/metrics").body.splitlines():
            if line.startswith("distributex_requests_total{") and 'status="503"' in line:
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_store_restarted_during_the_check_is_counted_not_a_violation(server_factory) -> None:
    rs: RedisServer = start_redis()
    try:
        config = f"backend: redis\nredis_url: {rs.url}\n" + POOLS
        servers = [server_factory(config) for _ in range(2)]
        proc = subprocess.Popen(
            check_cmd("-H", servers_arg(servers), "-r", "chk", "--duration", "6", "--clients", "4"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(),
        )
        try:
            deadline = time.monotonic() + 30
            while '"host": "check-' not in servers[0].call("/status?pool=chk").body:
                assert time.monotonic() < deadline, "the check never held the pool"
                time.sleep(0.05)
            rs.stop()
            # Down until a call of the check's was answered 503 (more 503s than the
            # probes'), then back, empty.
            probes = 0
            while probes == 0 or answered_503(servers) <= probes:
                assert time.monotonic() < deadline, "no call of the check met the outage"
                probes += servers[0].call("/get/?host=probe&pool=other").status == 503
                time.sleep(0.05)
            rs.start()
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        assert proc.returncode == 0, out + err
        assert "result: the rules held" in out
        errors = out.split("errors: ")[1]
        failed, unavailable = int(errors.split()[0]), int(errors.split(", ")[1].split()[0])
        assert failed + unavailable > 0, out
    finally:
        rs.stop()


TOKENS = [f"check-token-{i}-Qx7vPz2m" for i in range(3)]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_tls_and_a_token_per_client(server_factory, pki: Pki, tmp_path: Path) -> None:
    tokens = "tokens:\n" + "".join(
        f"  - identity: checker{i}\n    sha256: {sha(token)}\n" for i, token in enumerate(TOKENS)
    )
    servers = [server_factory(tls_keys(pki, client_ca=False) + tokens + POOLS) for _ in range(1)]
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("# one per identity\n" + "\n".join(TOKENS) + "\n")
    tls = ["-H", f"https://localhost:{servers[0].port}", "--cacert", str(pki.ca)]
    done = run_check(*tls, "-r", "chk", "--duration", DURATION, "--tokens-file", str(tokens_file))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "grants: " in done.stdout and "to 3 clients" in done.stdout, done.stdout
    for token in TOKENS:
        assert token not in done.stdout + done.stderr
    # One token is one identity: one client, and asking for more is a usage error.
    one = run_check(*tls, "-r", "chk", "--duration", "1", DISTRIBUTEX_TOKEN=TOKENS[0])
    assert one.returncode == 0, one.stdout + one.stderr
    assert "1 clients" in one.stderr
    more = run_check(
        *tls, "-r", "chk", "--duration", "1", "--clients", "3", DISTRIBUTEX_TOKEN=TOKENS[0]
    )
    assert more.returncode == 2 and "identity of its own" in more.stderr
    assert TOKENS[0] not in more.stdout + more.stderr
    # Without a token the server refuses: the check cannot run.
    refused = run_check(*tls, "-r", "chk", "--duration", "1")
    assert refused.returncode == 67, refused.stdout + refused.stderr


def test_usage_and_could_not_run(server_factory) -> None:
    server = server_factory(POOLS)
    abbreviated = run_check("-H", f"127.0.0.1:{server.port}", "-r", "chk", "--dur", "1")
    assert abbreviated.returncode == 2
    helped = run_check("--help")
    assert helped.returncode == 0
    assert "65" in helped.stdout and "68" in helped.stdout and "69" in helped.stdout
    nobody = run_check("-H", "127.0.0.1:1", "-r", "chk", "--duration", "1")
    assert nobody.returncode == 69 and nobody.stderr.count("\n") == 1, nobody.stderr
    unknown = run_check("-H", f"127.0.0.1:{server.port}", "-r", "nope", "--duration", "1")
    assert unknown.returncode == 77 and "unknown pool" in unknown.stderr


def test_a_server_killed_and_restarted_during_the_check(server_factory, tmp_path: Path) -> None:
    config = f"backend: sqlite\nsqlite_path: {tmp_path / 'state.db'}\n" + POOLS
    servers = [server_factory(config) for _ in range(2)]
    proc = subprocess.Popen(
        check_cmd("-H", servers_arg(servers), "-r", "chk", "--duration", "5", "--clients", "4"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    try:
        deadline = time.monotonic() + 30
        while '"host": "check-' not in servers[0].call("/status?pool=chk").body:
            assert time.monotonic() < deadline, "the check never held the pool"
            time.sleep(0.05)
        servers[1].stop(signal.SIGKILL)  # its clients' calls fail until it is back
        server_factory(config, port=servers[1].port)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out + err
    assert "result: the rules held" in out
