"""Authentication, TLS, owner-only release, limits and the audit log, against real servers."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import Answer, Server, free_port
from tests.pki import Pki, make_pki

WEB1_TOKEN = "web1-Zq8vLr3xT0kPp7sW"
DB1_TOKEN = "db1-Hh2mNc9yQe4uJb6d"
ADMIN_TOKEN = "admin-Ut5gWa1rYo8iKs3f"
WRONG_TOKEN = "wrong-Xe7bVn0cMq2lDz9a"


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


TOKENS = f"""\
tokens:
  - identity: web1
    sha256: {sha(WEB1_TOKEN)}
    pools: [pool1, shared]
  - identity: db1
    sha256: {sha(DB1_TOKEN)}
  - identity: root
    sha256: {sha(ADMIN_TOKEN)}
    admin: true
"""
POOLS = """\
pools:
  - name: pool1
  - name: pool2
  - name: shared
    maxlocks: 2
  - name: dbonly
    servers: db1
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_keys(pki: Pki, client_ca: bool) -> str:
    text = f"tls:\n  cert: {pki.cert('server')}\n  key: {pki.key('server')}\n"
    if client_ca:
        text += f"  client_ca: {pki.ca}\n"
    return text


def call(
    server: Server,
    path: str,
    token: str | None = None,
    *,
    tls: Pki | None = None,
    cert: str | None = None,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 20,
) -> Answer:
    """One request; ``tls`` makes it HTTPS trusting the test CA, ``cert`` a client certificate."""
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    if tls is None:
        conn: http.client.HTTPConnection = http.client.HTTPConnection(
            "127.0.0.1", server.port, timeout=timeout
        )
    else:
        context = ssl.create_default_context(cafile=str(tls.ca))
        if cert is not None:
            context.load_cert_chain(tls.cert(cert), tls.key(cert))
        conn = http.client.HTTPSConnection(
            "localhost", server.port, timeout=timeout, context=context
        )
    try:
        conn.request(method, path, body=body, headers=all_headers)
        resp = conn.getresponse()
        return Answer(resp.status, resp.read().decode(), dict(resp.headers))
    finally:
        conn.close()


def reason(answer: Answer) -> str:
    return answer.headers.get("X-Distributex-Reason", "")


def wait_for_log(server: Server, text: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while True:
        log = server.log.read_text()
        if text in log:
            return log
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not in the log:\n{log}")
        time.sleep(0.05)


@pytest.fixture
def token_server(server_factory) -> Server:
    return server_factory(TOKENS + POOLS)


# -- off unless configured -----------------------------------------------------------------


def test_without_tokens_or_client_ca_nothing_is_asked(server_factory, pki: Pki) -> None:
    server = server_factory(tls_keys(pki, client_ca=False) + POOLS)
    assert call(server, "/get/?host=me&pool=pool1", tls=pki).body == "YES"
    assert call(server, "/get/?host=them&pool=pool1", tls=pki).body == "NO"
    assert call(server, "/release/?host=me&pool=pool1", tls=pki).body == "OK"
    # No host and no identity: the 0.7 rule stands.
    assert call(server, "/get/?pool=pool1", tls=pki).status == 400


# -- bearer tokens ---------------------------------------------------------------------------


def test_a_request_without_a_valid_token_answers_401(token_server: Server) -> None:
    for token, headers in (
        (None, {}),
        (WRONG_TOKEN, {}),
        ("", {}),
        (None, {"Authorization": f"Basic {WEB1_TOKEN}"}),
        (None, {"Authorization": sha(WEB1_TOKEN)}),
        # The hash itself is not a token.
        (sha(WEB1_TOKEN), {}),
    ):
        for verb in ("get", "wait", "release", "renew"):
            answer = call(
                token_server, f"/{verb}/?host=web1&pool=pool1&lease=x", token, headers=headers
            )
            assert (answer.status, answer.body) == (401, "INVALID"), (token, headers, verb)
            assert answer.headers["WWW-Authenticate"].startswith("Bearer")
            assert reason(answer)
    # Nothing was granted by any of them.
    assert call(token_server, "/get/?pool=pool1", DB1_TOKEN).body == "YES"


def test_status_pages_need_a_token_unless_opened(server_factory) -> None:
    closed = server_factory(TOKENS + POOLS)
    for path in ("/status", "/metrics", "/"):
        assert call(closed, path).status == 401
        assert call(closed, path, DB1_TOKEN).status != 401
    # A health check needs no secret.
    assert call(closed, "/healthz").status != 401
    opened = server_factory(TOKENS + "status_public: true\n" + POOLS)
    for path in ("/status", "/metrics", "/"):
        assert call(opened, path).status != 401
    # Opening the pages opens no verb.
    assert call(opened, "/get/?host=web1&pool=pool1").status == 401


def test_the_token_is_the_host(token_server: Server) -> None:
    # host may be left out; the token's identity holds the lock.
    first = call(token_server, "/get/?pool=pool1", WEB1_TOKEN)
    assert first.body == "YES"
    # The same identity asking again with its own name: the same holder.
    assert call(token_server, "/get/?host=web1&pool=pool1", WEB1_TOKEN).body == "YES"
    assert call(token_server, "/get/?pool=pool1", DB1_TOKEN).body == "NO"
    assert call(token_server, "/release/?pool=pool1", WEB1_TOKEN).body == "OK"
    assert call(token_server, "/get/?pool=pool1", DB1_TOKEN).body == "YES"


def test_a_forged_host_under_a_token_is_refused(token_server: Server) -> None:
    assert call(token_server, "/get/?pool=pool1", WEB1_TOKEN).body == "YES"
    for verb in ("get", "wait", "release", "renew"):
        forged = call(token_server, f"/{verb}/?host=web1&pool=pool1&lease=x", DB1_TOKEN)
        assert (forged.status, forged.body) == (403, "INVALID"), verb
        assert "'web1' is not the authenticated identity 'db1'" in reason(forged)
    # web1 still holds pool1.
    assert call(token_server, "/get/?pool=pool1", DB1_TOKEN).body == "NO"
    # The allow-list is checked against the proven identity, not a claimed one.
    assert call(token_server, "/get/?pool=dbonly", DB1_TOKEN).body == "YES"
    denied = call(token_server, "/get/?pool=dbonly", ADMIN_TOKEN)
    assert (denied.status, denied.body) == (403, "INVALID")
    assert "servers list" in reason(denied)


def test_a_token_without_rights_on_a_pool_answers_403(token_server: Server) -> None:
    for verb in ("get", "wait", "release", "renew"):
        answer = call(token_server, f"/{verb}/?pool=pool2&lease=x", WEB1_TOKEN)
        assert (answer.status, answer.body) == (403, "INVALID"), verb
        assert reason(answer) == "'web1' may not use pool 'pool2'"
    assert call(token_server, "/get/?pool=pool2", DB1_TOKEN).body == "YES"


def test_a_foreign_lease_token_cannot_release_or_renew(token_server: Server) -> None:
    held = call(token_server, "/get/?pool=shared", WEB1_TOKEN)
    lease = held.headers["X-Distributex-Lease"]
    # db1 knows web1's lease token (read from a log, /status, a process list...).
    for verb in ("release", "renew"):
        answer = call(token_server, f"/{verb}/?pool=shared&lease={lease}", DB1_TOKEN)
        assert (answer.status, answer.body) == (410, "GONE"), verb
    # A release by host releases only db1's own (nothing).
    assert call(token_server, "/release/?pool=shared", DB1_TOKEN).body == "OK"
    # web1's lease is intact: renewable by its holder, one slot of two taken.
    assert call(token_server, f"/renew/?pool=shared&lease={lease}", WEB1_TOKEN).body == "OK"
    assert call(token_server, "/get/?pool=shared", DB1_TOKEN).body == "YES"
    assert call(token_server, "/get/?pool=shared", ADMIN_TOKEN).body == "NO"
    assert call(token_server, f"/release/?pool=shared&lease={lease}", WEB1_TOKEN).body == "OK"


def test_an_admin_can_force_a_release_and_it_is_logged(token_server: Server) -> None:
    assert call(token_server, "/get/?pool=pool1", WEB1_TOKEN).body == "YES"
    # Not an admin: refused, and web1 keeps the lock.
    assert call(token_server, "/release/?host=web1&pool=pool1", DB1_TOKEN).status == 403
    assert call(token_server, "/get/?pool=pool1", DB1_TOKEN).body == "NO"
    # An admin may not take a lock in another's name, only release it.
    assert call(token_server, "/get/?host=web1&pool=pool1", ADMIN_TOKEN).status == 403
    forced = call(token_server, "/release/?host=web1&pool=pool1", ADMIN_TOKEN)
    assert (forced.status, forced.body) == (200, "OK")
    assert call(token_server, "/get/?pool=pool1", DB1_TOKEN).body == "YES"
    log = wait_for_log(token_server, "forced release")
    line = next(line for line in log.splitlines() if "forced release" in line)
    assert "WARNING distributex.audit" in line
    assert "host='web1'" in line and "identity='root'" in line and "addr=127.0.0.1" in line


def test_the_audit_log_names_identity_and_address(token_server: Server) -> None:
    assert call(token_server, "/get/?pool=pool1", WEB1_TOKEN).body == "YES"
    assert call(token_server, "/release/?pool=pool1", WEB1_TOKEN).body == "OK"
    assert call(token_server, "/get/?pool=pool2", WEB1_TOKEN).status == 403
    assert call(token_server, "/get/?pool=pool1", WRONG_TOKEN).status == 401
    log = wait_for_log(token_server, "refused 401")
    audit = [line for line in log.splitlines() if "distributex.audit" in line]
    assert any(
        "grant pool='pool1' host='web1'" in line and "identity='web1' via=token" in line
        for line in audit
    )
    assert any("release pool='pool1' host='web1'" in line for line in audit)
    assert any("refused 403" in line and "may not use pool 'pool2'" in line for line in audit)
    assert any("refused 401" in line and "identity=- via=none" in line for line in audit)
    assert all("addr=127.0.0.1" in line for line in audit)


def test_secrets_never_reach_the_log_or_status(server_factory) -> None:
    server = server_factory(TOKENS + POOLS, args=["--log-level", "debug", "--access-log"])
    secrets = [WEB1_TOKEN, ADMIN_TOKEN, WRONG_TOKEN]
    assert call(server, "/get/?pool=pool1", WEB1_TOKEN).body == "YES"
    assert call(server, "/get/?pool=pool2", WEB1_TOKEN).status == 403
    assert call(server, "/get/?pool=pool1", WRONG_TOKEN).status == 401
    assert call(server, "/release/?host=web1&pool=pool1", ADMIN_TOKEN).body == "OK"
    # A header line too long for the parser: its text must not be logged either.
    long_secret = "S3cr3t" * 2000
    secrets.append(long_secret[:40])
    assert call(server, "/get/?pool=pool1", long_secret).status in (400, 431)
    answers = [
        call(server, "/status", ADMIN_TOKEN),
        call(server, "/status?pool=pool1", ADMIN_TOKEN),
        call(server, "/metrics", ADMIN_TOKEN),
    ]
    assert call(server, "/get/?pool=pool1", DB1_TOKEN).body == "YES"
    log = wait_for_log(server, "grant pool='pool1' host='db1'")
    for secret in secrets:
        assert secret not in log
        for answer in answers:
            assert secret not in answer.body
            assert secret not in str(answer.headers)
    assert "Traceback" not in log


# -- TLS and client certificates --------------------------------------------------------------


def test_tls_serves_https_only(server_factory, pki: Pki) -> None:
    server = server_factory(tls_keys(pki, client_ca=False) + POOLS)
    assert call(server, "/get/?host=a&pool=pool1", tls=pki).body == "YES"
    # Plain HTTP on the TLS port gets no lock.
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        answer = call(server, "/get/?host=b&pool=pool1", timeout=10)
        assert answer.status == 400  # if an answer comes at all, it is not a grant
        raise ConnectionError("answered")
    assert call(server, "/get/?host=b&pool=pool1", tls=pki).body == "NO"
    # A client that does not trust the server's CA gets no answer.
    with pytest.raises(ssl.SSLError):
        context = ssl.create_default_context()  # the system CAs only
        with (
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock,
            context.wrap_socket(sock, server_hostname="localhost"),
        ):
            pass


def test_mutual_tls_the_certificate_is_the_host(server_factory, pki: Pki) -> None:
    server = server_factory(tls_keys(pki, client_ca=True) + POOLS)
    # host left out: the certificate's CN.
    assert call(server, "/get/?pool=pool1", tls=pki, cert="web1").body == "YES"
    assert call(server, "/get/?pool=pool1", tls=pki, cert="db1").body == "NO"
    # A DNS name of the certificate is one of its names too (a different holder).
    assert (
        call(server, "/get/?pool=shared&host=web1.example.com", tls=pki, cert="web1").body == "YES"
    )
    for verb in ("get", "wait", "release", "renew"):
        forged = call(server, f"/{verb}/?host=web1&pool=pool1&lease=x", tls=pki, cert="db1")
        assert (forged.status, forged.body) == (403, "INVALID"), verb
    assert call(server, "/get/?pool=pool1", tls=pki, cert="db1").body == "NO"
    # servers: allow-list against the certificate's identity.
    assert call(server, "/get/?pool=dbonly", tls=pki, cert="web1").status == 403
    assert call(server, "/get/?pool=dbonly", tls=pki, cert="db1").body == "YES"
    assert call(server, "/release/?pool=pool1", tls=pki, cert="web1").body == "OK"
    assert call(server, "/get/?pool=pool1", tls=pki, cert="db1").body == "YES"


def test_mutual_tls_refuses_clients_without_a_trusted_certificate(server_factory, pki: Pki) -> None:
    server = server_factory(tls_keys(pki, client_ca=True) + POOLS)
    # No certificate: a clear answer.
    none = call(server, "/get/?pool=pool1&host=web1", tls=pki)
    assert (none.status, none.body) == (401, "INVALID")
    assert "client certificate is required" in reason(none)
    # One from another CA: no TLS connection at all.
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
        call(server, "/get/?pool=pool1&host=web1", tls=pki, cert="foreign-web1")
    assert call(server, "/get/?pool=pool1", tls=pki, cert="db1").body == "YES"
    assert "Traceback" not in server.log.read_text()


def test_token_and_certificate_together_must_agree(server_factory, pki: Pki) -> None:
    server = server_factory(tls_keys(pki, client_ca=True) + TOKENS + POOLS)
    # Both are required.
    assert call(server, "/get/?pool=pool1", tls=pki, cert="web1").status == 401
    assert call(server, "/get/?pool=pool1", WEB1_TOKEN, tls=pki, cert="web1").body == "YES"
    # db1's token on web1's certificate: refused.
    mixed = call(server, "/get/?pool=pool2", DB1_TOKEN, tls=pki, cert="web1")
    assert mixed.status == 403
    assert "does not name" in reason(mixed)


@pytest.mark.parametrize(
    ("keys", "problem"),
    [
        ("tls:\n  cert: /nonexistent/server.crt\n  key: {key}\n", "no such file"),
        ("tls:\n  cert: {cert}\n  key: {other_key}\n", "cannot use cert"),
        ("tls:\n  cert: {cert}\n  key: {key}\n  client_ca: {key}\n", "cannot use client_ca"),
        ("tls:\n  cert: {cert}\n", "tls needs key"),
        ("tokens:\n  - identity: a\n    sha256: {token}\n", "never the token itself"),
        ("tokens:\n  - identity: a\n    sha256: {digest}\n    pools: [nope]\n", "unknown pool"),
        ("tokens:\n  - sha256: {digest}\n", "token without identity"),
        ("tokens:\n  - identity: a\n    sha256: {digest}\n    admin: yes please\n", "admin"),
    ],
)
def test_a_bad_tls_or_token_setting_stops_the_server_in_one_line(
    tmp_path: Path, pki: Pki, keys: str, problem: str
) -> None:
    config = tmp_path / "bad.yaml"
    text = keys.format(
        cert=pki.cert("server"),
        key=pki.key("server"),
        other_key=pki.key("web1"),
        token=WEB1_TOKEN,
        digest=sha(WEB1_TOKEN),
    )
    config.write_text(text + POOLS)
    done = subprocess.run(
        [sys.executable, "-m", "distributex", "-c", str(config), "-p", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert problem in lines[0]
    assert WEB1_TOKEN not in done.stderr


# -- limits --------------------------------------------------------------------------------------


def park(server: Server, path: str, token: str | None = None) -> threading.Thread:
    """A /wait/ in a thread, left parked (its answer comes when the server stops)."""

    def run() -> None:
        # The server is killed at the end of the test: that answer is nobody's business.
        with contextlib.suppress(OSError, http.client.HTTPException):
            call(server, path, token, timeout=60)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_waiters_per_pool_and_per_host_are_limited(server_factory) -> None:
    server = server_factory(
        "max_waiters_per_pool: 3\nmax_waiters_per_host: 2\n" + POOLS, args=["--log-level", "debug"]
    )
    assert call(server, "/get/?host=holder&pool=pool1").body == "YES"
    assert call(server, "/get/?host=holder&pool=pool2").body == "YES"
    for host in ("a", "b", "c"):
        park(server, f"/wait/?host={host}&pool=pool1")
        wait_for_log(server, f"waiting: pool='pool1' host='{host}'")
    answer = call(server, "/wait/?host=d&pool=pool1&timeout=0")
    assert (answer.status, answer.body) == (429, "INVALID")
    assert reason(answer) == (
        "too many waiters on pool 'pool1': 3 already wait here (max_waiters_per_pool)"
    )
    assert call(server, "/wait/?host=d&pool=pool2&timeout=0").body == "NO"
    # Per host: 'a' waits on pool1 already; one more wait is allowed, not two.
    park(server, "/wait/?host=a&pool=pool2")
    wait_for_log(server, "waiting: pool='pool2' host='a'")
    answer = call(server, "/wait/?host=a&pool=shared&timeout=5")
    assert (answer.status, answer.body) == (429, "INVALID")
    assert "max_waiters_per_host" in reason(answer)
    # A /get/ never waits, so it is not limited; the queues still work.
    assert call(server, "/get/?host=a&pool=shared").body == "YES"
    assert call(server, "/release/?host=holder&pool=pool1").body == "OK"
    assert call(server, "/get/?host=z&pool=pool1").body == "NO"  # a, b, c come first
    assert "Traceback" not in server.log.read_text()


def test_request_size_limits(server_factory) -> None:
    server = server_factory("max_body_size: 16\nmax_header_size: 1024\nmax_headers: 16\n" + POOLS)
    big_body = call(server, "/get/?host=a&pool=pool1", method="POST", body=b"x" * 17)
    assert (big_body.status, big_body.body) == (413, "INVALID")
    assert "max_body_size" in reason(big_body)
    small_body = call(server, "/get/?host=a&pool=pool1", method="POST", body=b"x" * 16)
    assert small_body.body == "YES"
    assert call(server, "/release/?host=a&pool=pool1").body == "OK"
    # A chunked body (no length).
    chunked = raw_request(
        server.port,
        b"POST /get/?host=a&pool=pool1 HTTP/1.1\r\nHost: t\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    assert chunked.startswith(b"HTTP/1.1 411")
    long_url = call(server, "/get/?host=a&pool=" + "p" * 2000)
    assert long_url.status in (400, 414)
    long_header = call(server, "/get/?host=a&pool=pool1", headers={"X-Big": "v" * 2000})
    assert long_header.status in (400, 431)
    many = call(server, "/get/?host=a&pool=pool1", headers={f"X-H{i}": "v" for i in range(40)})
    assert many.status in (400, 431)
    # None of them took the lock.
    assert call(server, "/get/?host=b&pool=pool1").body == "YES"
    assert "Traceback" not in server.log.read_text()


def raw_request(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(data)
        out = b""
        while b"\r\n\r\n" not in out:
            chunk = sock.recv(4096)
            if not chunk:
                break
            out += chunk
        return out


def test_limits_have_documented_defaults() -> None:
    from distributex.config import parse_config

    config = parse_config(textwrap.dedent(POOLS))
    assert (config.max_waiters_per_pool, config.max_waiters_per_host) == (10000, 100)
    assert (config.max_body_size, config.max_header_size, config.max_headers) == (4096, 8190, 64)
    assert not config.auth_enabled
    reference = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    for key in ("max_waiters_per_pool", "max_waiters_per_host", "max_body_size", "max_headers"):
        assert f"`{key}`" in reference


def test_a_reload_swaps_the_certificate_for_new_connections(pki: Pki) -> None:
    """The hook a configuration reload calls: ``app[TLS_KEY].swap(new_config.tls)``."""
    import asyncio
    from dataclasses import replace

    from distributex.config import ConfigError, TLSSettings, parse_config
    from distributex.server import start_server, stop_server
    from distributex.tls import TLS_KEY

    async def served_name(port: int) -> str:
        context = ssl.create_default_context(cafile=str(pki.ca))
        context.check_hostname = False
        _reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
        cert = writer.get_extra_info("peercert")
        writer.close()
        return dict(rdn[0] for rdn in cert["subject"])["commonName"]

    async def main() -> None:
        config = parse_config(tls_keys(pki, client_ca=False) + POOLS)
        config = replace(config, bind="127.0.0.1", port=free_port())
        runner, backend = await start_server(config)
        try:
            holder = runner.app[TLS_KEY]
            assert await served_name(config.port) == "localhost"
            other = TLSSettings(str(pki.cert("other-server")), str(pki.key("other-server")))
            holder.swap(other)
            assert await served_name(config.port) == "elsewhere.example"
            # A certificate that cannot be used: refused, the current one stays.
            with pytest.raises(ConfigError, match="no such file"):
                holder.swap(TLSSettings("/nonexistent.crt", str(pki.key("server"))))
            with pytest.raises(ConfigError, match="restart"):
                holder.swap(None)
            assert await served_name(config.port) == "elsewhere.example"
        finally:
            await stop_server(runner, backend)

    asyncio.run(main())


def server_side_open(port: int) -> int:
    """Connections the server on ``port`` still has open (established, or closed by the peer
    and not yet by the server), from /proc/net/tcp."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] in ("01", "08"):
                count += 1
    return count


def test_over_tls_a_silent_connection_is_closed_and_a_hung_up_waiter_leaves(
    server_factory, pki: Pki
) -> None:
    server = server_factory(
        "header_timeout: 1\n" + tls_keys(pki, client_ca=False) + POOLS,
        args=["--log-level", "debug"],
    )
    # A connection that never starts its TLS handshake is closed like one that
    # never sends a request head.
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as silent:
        started = time.monotonic()
        assert silent.recv(1) == b""
        assert time.monotonic() - started < 10
    # A waiter over TLS that hangs up leaves the queue: the slot is not given to it.
    assert call(server, "/get/?host=holder&pool=pool1", tls=pki).body == "YES"
    context = ssl.create_default_context(cafile=str(pki.ca))
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=20)
    waiter = context.wrap_socket(raw, server_hostname="localhost")
    waiter.sendall(b"GET /wait/?host=waiter&pool=pool1 HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_for_log(server, "waiting: pool='pool1' host='waiter'")
    waiter.close()
    deadline = time.monotonic() + 20
    while server_side_open(server.port):
        assert time.monotonic() < deadline, "the server never closed the hung-up waiter"
        time.sleep(0.05)
    assert call(server, "/release/?host=holder&pool=pool1", tls=pki).body == "OK"
    assert call(server, "/get/?host=next&pool=pool1", tls=pki).body == "YES"
