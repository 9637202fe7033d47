"""``distributex status`` and ``distributex release`` against a server with TLS, client
certificates and tokens: the connection settings of every command, from every place."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from distributex.client import exits
from tests.conftest import Server
from tests.pki import Pki, make_pki
from tests.test_auth import (
    ADMIN_TOKEN,
    DB1_TOKEN,
    POOLS,
    TOKENS,
    WEB1_TOKEN,
    WRONG_TOKEN,
    call,
    tls_keys,
    wait_for_log,
)
from tests.test_status_cli import Watch

pytestmark = pytest.mark.timeout(120)
DOCS = Path(__file__).resolve().parent.parent / "docs" / "client.md"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    pki.issue("root", "root")  # the admin token's identity
    return pki


@pytest.fixture
def srv(server_factory, pki: Pki) -> Server:
    """TLS, client certificates and tokens: every credential there is."""
    return server_factory(tls_keys(pki, client_ca=True) + TOKENS + POOLS)


def dx(
    args: list[str], token: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DISTRIBUTEX_")}
    clean["DISTRIBUTEX_CONFIG"] = ""
    if token is not None:
        clean["DISTRIBUTEX_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "distributex.client.cli", *args],
        env=clean | (env or {}),
        capture_output=True,
        text=True,
        timeout=60,
    )


def creds(srv: Server, pki: Pki, cert: str | None, cacert: bool = True) -> list[str]:
    args = ["-H", f"https://localhost:{srv.port}"]
    if cacert:
        args += ["--cacert", str(pki.ca)]
    if cert is not None:
        args += ["--cert", str(pki.cert(cert)), "--key", str(pki.key(cert))]
    return args


def grant(srv: Server, pki: Pki, pool: str = "pool1") -> None:
    assert call(srv, f"/get/?pool={pool}", WEB1_TOKEN, tls=pki, cert="web1").body == "YES"


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    assert len(done.stderr.splitlines()) == 1, done.stderr
    return done.stderr.strip()


# -- status --------------------------------------------------------------------------------


def test_status_table_and_json_over_mutual_tls_and_a_token(srv: Server, pki: Pki) -> None:
    grant(srv, pki)
    table = dx(["status", *creds(srv, pki, "db1")], DB1_TOKEN)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["POOL", "SLOTS", "HOLDER", "MODE", "FENCE", "LEFT", "WAITERS"]
    assert [line.split()[:3] for line in lines if line.startswith("pool1")] == [
        ["pool1", "1/1", "web1"]
    ]
    one = dx(["status", *creds(srv, pki, "db1"), "pool1", "--json"], DB1_TOKEN)
    assert one.returncode == 0, one.stderr
    doc = json.loads(one.stdout)
    assert [p["name"] for p in doc["pools"]] == ["pool1"]
    assert [h["host"] for h in doc["pools"][0]["holders"]] == ["web1"]


def test_status_takes_its_settings_from_the_client_config_file(
    srv: Server, pki: Pki, tmp_path: Path
) -> None:
    grant(srv, pki)
    token_file = tmp_path / "db1.token"
    token_file.write_text(DB1_TOKEN + "\n")
    conf = tmp_path / "client.conf"
    conf.write_text(
        f"server = https://localhost:{srv.port}\ncacert = {pki.ca}\n"
        f"cert = {pki.cert('db1')}\nkey = {pki.key('db1')}\ntoken_file = {token_file}\n"
    )
    done = dx(["status", "pool1", "--json"], env={"DISTRIBUTEX_CONFIG": str(conf)})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["pools"][0]["holders"][0]["host"] == "web1"
    assert DB1_TOKEN not in done.stdout + done.stderr


def test_status_watch_sees_a_change(srv: Server, pki: Pki) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTRIBUTEX_")}
    env |= {"DISTRIBUTEX_CONFIG": "", "DISTRIBUTEX_TOKEN": DB1_TOKEN}
    watch = Watch([*creds(srv, pki, "db1"), "pool1"], env)
    try:
        assert watch.doc(0)["pools"][0]["holders"] == []
        grant(srv, pki)
        assert [h["host"] for h in watch.doc(1)["pools"][0]["holders"]] == ["web1"]
    finally:
        watch.stop()


@pytest.mark.parametrize(
    ("token", "cert", "cacert", "code", "named"),
    [
        (DB1_TOKEN, "db1", False, exits.EXIT_TLS, "--cacert"),
        (DB1_TOKEN, None, True, exits.EXIT_NOT_AUTHENTICATED, "no client certificate was given"),
        (None, "db1", True, exits.EXIT_NOT_AUTHENTICATED, "no token was given"),
        (WRONG_TOKEN, "db1", True, exits.EXIT_NOT_AUTHENTICATED, "not one the server knows"),
    ],
    ids=["no-cacert", "no-cert", "no-token", "wrong-token"],
)
def test_status_names_the_missing_credential_in_one_line(
    srv: Server, pki: Pki, token: str | None, cert: str | None, cacert: bool, code: int, named: str
) -> None:
    done = dx(["status", *creds(srv, pki, cert, cacert)], token)
    assert done.returncode == code, done.stderr
    line = one_line(done)
    assert line.startswith("distributex status: ") and named in line, line
    if token is not None:
        assert token not in line


def test_plain_http_to_a_tls_server_names_https(srv: Server) -> None:
    done = dx(["status", "-H", f"localhost:{srv.port}"], DB1_TOKEN)
    assert done.returncode == exits.EXIT_UNAVAILABLE, done.stderr
    assert "write the server as https://" in one_line(done)


def test_a_plain_http_status_of_a_token_server_names_the_token(server_factory) -> None:
    srv = server_factory(TOKENS + POOLS)
    done = dx(["status", "-H", f"127.0.0.1:{srv.port}"])
    assert done.returncode == exits.EXIT_NOT_AUTHENTICATED, done.stderr
    assert "DISTRIBUTEX_TOKEN or --token-file" in one_line(done)
    assert dx(["status", "-H", f"127.0.0.1:{srv.port}"], DB1_TOKEN).returncode == 0


# -- release -------------------------------------------------------------------------------


def test_an_admin_forces_a_release_and_is_told_what_was_freed(srv: Server, pki: Pki) -> None:
    grant(srv, pki)
    fence = json.loads(call(srv, "/status?pool=pool1", DB1_TOKEN, tls=pki, cert="db1").body)[
        "pools"
    ][0]["holders"][0]["fence"]
    args = ["release", *creds(srv, pki, "root"), "-r", "pool1", "--host", "web1"]
    done = dx(args, ADMIN_TOKEN)
    assert done.returncode == exits.EXIT_OK, done.stderr
    assert re.fullmatch(
        rf"released web1's lock on pool 'pool1' \(fence {fence}, \S+ of its lease were left\)\n",
        done.stdout,
    ), done.stdout
    # The slot is free for another host, and web1's lease is gone.
    assert call(srv, "/get/?pool=pool1", DB1_TOKEN, tls=pki, cert="db1").body == "YES"
    again = dx(args, ADMIN_TOKEN)
    assert again.returncode == exits.EXIT_NOT_HELD, again.stderr
    assert again.stdout == "web1 held no lock on pool 'pool1': nothing released\n"
    wait_for_log(srv, "forced")  # the server's audit line of it


def test_a_forced_release_by_another_identity_is_refused_in_one_line(srv: Server, pki: Pki) -> None:
    grant(srv, pki)
    args = ["release", *creds(srv, pki, "db1"), "-r", "pool1", "--host", "web1"]
    done = dx(args, DB1_TOKEN)
    assert done.returncode == exits.EXIT_REFUSED, done.stderr
    line = one_line(done)
    assert line.startswith("distributex release: release of web1's lock on pool 'pool1' refused")
    assert "admin" in line and DB1_TOKEN not in line
    assert done.stdout == ""
    # web1 still holds it.
    assert call(srv, "/get/?pool=pool1", DB1_TOKEN, tls=pki, cert="db1").body == "NO"


def test_release_without_a_token_names_it(srv: Server, pki: Pki) -> None:
    done = dx(["release", *creds(srv, pki, "root"), "-r", "pool1", "--host", "web1"])
    assert done.returncode == exits.EXIT_NOT_AUTHENTICATED, done.stderr
    assert "no token was given" in one_line(done)


def test_release_usage() -> None:
    for args in (["-r", "pool1"], ["--host", "web1"], ["-r", "", "--host", "web1"]):
        done = dx(["release", *args])
        assert done.returncode == exits.EXIT_USAGE, done.stderr
    # No abbreviations (argv.Parser), in every command.
    assert dx(["release", "-r", "p", "--ho", "web1"]).returncode == exits.EXIT_USAGE


# -- the exit statuses, in one place -----------------------------------------------------------


def test_every_exit_status_is_documented_once() -> None:
    text = DOCS.read_text()
    section = text[text.index("### Exit status") :]
    section = section[: section.index("\n### ", 1)]
    for row in exits.TABLE:
        assert re.search(rf"^\| (\d+ / )?{row.code}( / \d+)? \|", section, re.M), row
    for command in ("status", "release"):
        shown = dx([command, "--help"]).stdout
        for row in exits.TABLE:
            if row.commands in ("all", command):
                assert f"  {row.code} " in shown, (command, row.code)
