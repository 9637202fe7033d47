"""The distributex command and library over TLS, with client certificates and tokens."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from distributex.client import AsyncClient, Client, LockRefused
from distributex.client.errors import (
    AuthenticationFailed,
    CertificateMismatch,
    ServerUnavailable,
    TLSFailed,
)
from tests.conftest import Server
from tests.pki import Pki, make_pki
from tests.test_auth import DB1_TOKEN, POOLS, TOKENS, WEB1_TOKEN, WRONG_TOKEN, call, tls_keys


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def mtls_server(server_factory, pki: Pki) -> Server:
    """TLS, client certificates and tokens: every credential there is."""
    return server_factory(tls_keys(pki, client_ca=True) + TOKENS + POOLS)


def run_client(
    args: list[str], token: str | None = None, timeout: float = 60, **popen: object
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTRIBUTEX_")}
    env["DISTRIBUTEX_CONFIG"] = ""
    if token is not None:
        env["DISTRIBUTEX_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "distributex.client.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **popen,
    )


def tls_args(server: Server, pki: Pki, cert: str | None = "web1") -> list[str]:
    args = ["-H", f"https://localhost:{server.port}", "--cacert", str(pki.ca)]
    if cert is not None:
        args += ["--cert", str(pki.cert(cert)), "--key", str(pki.key(cert))]
    return args


def test_the_client_runs_a_command_under_the_lock_over_mutual_tls(
    mtls_server: Server, pki: Pki, tmp_path: Path
) -> None:
    started, go, out = tmp_path / "started", tmp_path / "go", tmp_path / "out"
    script = (
        f'echo "$DISTRIBUTEX_HOST $DISTRIBUTEX_SERVER" > {out}; touch {started}; '
        f"while [ ! -e {go} ]; do sleep 0.05; done"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTRIBUTEX_")}
    env |= {"DISTRIBUTEX_CONFIG": "", "DISTRIBUTEX_TOKEN": WEB1_TOKEN}
    args = [*tls_args(mtls_server, pki), "-r", "pool1", "--ttl", "30", "--grace", "5", script]
    proc = subprocess.Popen(
        [sys.executable, "-m", "distributex.client.cli", *args],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not started.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the command never started"
            time.sleep(0.05)
        # While the command runs, db1 cannot have the lock.
        busy = call(mtls_server, "/get/?pool=pool1", DB1_TOKEN, tls=pki, cert="db1")
        assert busy.body == "NO"
        go.touch()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert out.read_text().split() == ["web1", f"https://localhost:{mtls_server.port}"]
    assert call(mtls_server, "/get/?pool=pool1", DB1_TOKEN, tls=pki, cert="db1").body == "YES"
    # The token was never on a command line, nor in what the server logged.
    assert WEB1_TOKEN not in " ".join(proc.args)
    assert WEB1_TOKEN not in mtls_server.log.read_text()


def test_the_token_comes_from_a_file(mtls_server: Server, pki: Pki, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(WEB1_TOKEN + "\n")
    token_file.chmod(0o600)
    done = run_client(
        [*tls_args(mtls_server, pki), "--token-file", str(token_file), "-r", "pool1", "true"]
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("token", "cert", "code", "words"),
    [
        (None, "web1", 67, "not authenticated"),
        (WRONG_TOKEN, "web1", 67, "token not recognised"),
        # db1's token, web1's certificate.
        (DB1_TOKEN, "web1", 77, "does not name"),
        (WEB1_TOKEN, "foreign-web1", 76, "refused our client certificate"),
    ],
)
def test_refusals_have_their_exit_codes(
    mtls_server: Server,
    pki: Pki,
    tmp_path: Path,
    token: str | None,
    cert: str,
    code: int,
    words: str,
) -> None:
    marker = tmp_path / "ran"
    done = run_client([*tls_args(mtls_server, pki, cert), "-r", "pool1", f"touch {marker}"], token)
    assert done.returncode == code, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distributex: "), done.stderr
    assert words in lines[0]
    assert not marker.exists()
    for secret in (WEB1_TOKEN, DB1_TOKEN, WRONG_TOKEN):
        assert secret not in done.stderr


def test_a_pool_the_token_may_not_use_is_refused(mtls_server: Server, pki: Pki) -> None:
    done = run_client([*tls_args(mtls_server, pki), "-r", "pool2", "true"], WEB1_TOKEN)
    assert done.returncode == 77
    assert "'web1' may not use pool 'pool2'" in done.stderr
    forged = run_client(
        [*tls_args(mtls_server, pki), "-r", "pool1", "--host-id", "db1", "true"], WEB1_TOKEN
    )
    assert forged.returncode == 77
    assert "not the authenticated identity" in forged.stderr


def test_server_certificate_problems(server_factory, pki: Pki, tmp_path: Path) -> None:
    server = server_factory(tls_keys(pki, client_ca=False) + POOLS)
    base = ["-r", "pool1", "--host-id", "web1", "true"]
    # Not trusted: the system CAs do not know the test CA.
    untrusted = run_client(["-H", f"https://localhost:{server.port}", *base])
    assert untrusted.returncode == 76, untrusted.stderr
    assert "certificate not trusted" in untrusted.stderr and "--cacert" in untrusted.stderr
    # Trusted, but for another name.
    misnamed = server_factory(
        f"tls:\n  cert: {pki.cert('other-server')}\n  key: {pki.key('other-server')}\n" + POOLS
    )
    for host in ("localhost", "127.0.0.1"):
        mismatch = run_client(
            ["-H", f"https://{host}:{misnamed.port}", "--cacert", str(pki.ca), *base]
        )
        assert mismatch.returncode == 79, mismatch.stderr
        assert "certificate is for another name" in mismatch.stderr
    # TLS to a plain HTTP server.
    plain = server_factory(POOLS)
    no_tls = run_client(["-H", f"https://localhost:{plain.port}", "--cacert", str(pki.ca), *base])
    assert no_tls.returncode == 76, no_tls.stderr
    assert "does not speak TLS" in no_tls.stderr
    # And the right CA works.
    ok = run_client(["-H", f"https://localhost:{server.port}", "--cacert", str(pki.ca), *base])
    assert ok.returncode == 0, ok.stderr


def test_bad_tls_options(pki: Pki, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    cases = [
        (["-H", "http://localhost:1", "--cacert", str(pki.ca)], 2, "need TLS"),
        (["-H", "https://localhost:1", "--key", str(pki.key("web1"))], 2, "--key needs --cert"),
        (["-H", "https://localhost:1", "--cacert", missing], 78, "cannot use CA file"),
        (["-H", "https://localhost:1", "--cert", str(pki.ca)], 78, "cannot use client cert"),
        (["-H", "https://localhost:1", "--token-file", missing], 78, "cannot read"),
    ]
    for args, code, words in cases:
        done = run_client([*args, "-r", "pool1", "true"])
        assert done.returncode == code, (args, done.stderr)
        assert words in done.stderr, (args, done.stderr)
    spaced = run_client(["-H", "https://localhost:1", "-r", "p", "true"], token="two words")
    assert spaced.returncode == 78 and "two words" not in spaced.stderr


def test_the_library_over_tls(mtls_server: Server, pki: Pki) -> None:
    creds = {"cacert": str(pki.ca), "cert": str(pki.cert("web1")), "key": str(pki.key("web1"))}
    client = Client(f"https://localhost:{mtls_server.port}", token=WEB1_TOKEN, **creds)
    assert client.host is None and WEB1_TOKEN not in repr(client)
    with client.lock("pool1", ttl=30) as lease:
        assert lease.host == "web1"
        assert call(mtls_server, "/get/?pool=pool1", DB1_TOKEN, tls=pki, cert="db1").body == "NO"
    assert call(mtls_server, "/get/?pool=pool1", DB1_TOKEN, tls=pki, cert="db1").body == "YES"
    with pytest.raises(AuthenticationFailed):
        Client(f"https://localhost:{mtls_server.port}", **creds).acquire("pool2", wait=False)
    with pytest.raises(LockRefused) as refused:
        client.acquire("pool2", wait=False)
    assert refused.value.status == 403

    async def main() -> None:
        async with (
            AsyncClient(
                f"https://localhost:{mtls_server.port}", token=WEB1_TOKEN, **creds
            ) as aclient,
            aclient.lock("shared", ttl=30) as alease,
        ):
            assert alease.host == "web1"
        async with AsyncClient(f"https://localhost:{mtls_server.port}") as untrusting:
            with pytest.raises(TLSFailed):
                await untrusting.acquire("shared", wait=False)
        async with AsyncClient(
            f"https://127.0.0.1:{mtls_server.port}", cacert=str(pki.ca)
        ) as other_name:
            # The server certificate names 127.0.0.1 too: no mismatch, but no client cert.
            with pytest.raises((TLSFailed, AuthenticationFailed)):
                await other_name.acquire("shared", wait=False)

    asyncio.run(main())
    assert not isinstance(CertificateMismatch("x"), AuthenticationFailed)


# -- a server at its connection cap --------------------------------------------------------


def park_over_tls(server: Server, pki: Pki, cert: str, source: str, pool: str) -> ssl.SSLSocket:
    """A /wait/ parked on the server (a connection it may not close), from ``source``.

    The /wait/ is pipelined behind a /get/ in one send: once the /get/ is
    answered, the server has read the /wait/ too.
    """
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(pki.cert(cert), pki.key(cert))
    sock = socket.create_connection(("127.0.0.1", server.port), 20, source_address=(source, 0))
    tls = context.wrap_socket(sock, server_hostname="localhost")
    tls.sendall(
        f"GET /get/?pool=sync-{cert} HTTP/1.1\r\nHost: localhost\r\n\r\n"
        f"GET /wait/?pool={pool} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
    )
    assert tls.recv(4096).startswith(b"HTTP/1.1 200"), "the /get/ before the /wait/"
    return tls


@pytest.fixture
def full_server(server_factory, pki: Pki) -> Iterator[Server]:
    """A mutual-TLS server whose two connections hold parked /wait/s: it is full.

    (A new connection then gets one of the places kept for renewals, whose
    answer to anything else is a 503 naming max_connections; with those
    taken too, the connection is closed: either way, not the certificate.)
    """
    server = server_factory(
        tls_keys(pki, client_ca=True) + "max_connections: 2\nautocreate: true\n"
    )
    # Each pool held by the other identity, so that each /wait/ parks.
    assert call(server, "/get/?pool=held-by-db1", tls=pki, cert="db1").body == "YES"
    assert call(server, "/get/?pool=held-by-web1", tls=pki, cert="web1").body == "YES"
    # From two peer addresses and identities, so no cap per peer or identity is reached first.
    parked = [
        park_over_tls(server, pki, "web1", "127.0.0.2", "held-by-db1"),
        park_over_tls(server, pki, "db1", "127.0.0.3", "held-by-web1"),
    ]
    yield server
    for tls in parked:
        tls.close()


def test_a_server_at_its_connection_cap_is_not_blamed_on_the_certificate(
    full_server: Server, pki: Pki, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    done = run_client([*tls_args(full_server, pki), "-r", "p", "--no-wait", f"touch {marker}"])
    full = "max_connections|connection limit|closed by the server"
    assert done.returncode == 69, done.stderr
    assert re.search(full, done.stderr), done.stderr
    assert "certificate" not in done.stderr, done.stderr
    assert not marker.exists()
    creds = {"cacert": str(pki.ca), "cert": str(pki.cert("web1")), "key": str(pki.key("web1"))}
    with pytest.raises(ServerUnavailable, match=full) as raised:
        Client(f"https://localhost:{full_server.port}", **creds).acquire("p", wait=False)
    assert not isinstance(raised.value, TLSFailed)

    async def main() -> None:
        async with AsyncClient(f"https://localhost:{full_server.port}", **creds) as client:
            with pytest.raises(ServerUnavailable, match=full) as raised:
                await client.acquire("p", wait=False)
            assert not isinstance(raised.value, TLSFailed)

    asyncio.run(main())
