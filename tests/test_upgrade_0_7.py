"""Upgrading from 0.7: its config files load unchanged and its client's HTTP calls still work."""

from __future__ import annotations

import http.client
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from distributex.config import DEFAULT_EXPIRE, ConfigError, parse_config

# The seed README's example, verbatim (memcache backend).
SEED_EXAMPLE = """\
backend: memcache
pools:
    - name: pool1
      expire: 300

    - name: pool2
      expire: 300
      servers: acme1, acme2
"""


def test_seed_example_loads() -> None:
    config = parse_config(SEED_EXAMPLE, "distributex.yaml")
    assert config.backend == "memcache"
    assert config.memcachehost == "localhost" and config.memcacheport == 11211
    assert set(config.pools) == {"pool1", "pool2"}
    assert config.pools["pool1"].expire == 300
    assert config.pools["pool1"].servers is None
    assert config.pools["pool2"].servers == frozenset({"acme1", "acme2"})
    assert config.pool("elsewhere") is None  # only the file's pools exist


def test_memcachehost_without_port() -> None:
    config = parse_config(
        "backend: memcache\nmemcachehost: mc1.example.com\npools:\n    - name: pool1\n"
    )
    assert config.memcachehost == "mc1.example.com"
    assert config.memcacheport == 11211


def test_pool_without_expire_gets_30_minutes() -> None:
    config = parse_config("backend: inmemory\npools:\n    - name: pool1\n")
    assert config.pools["pool1"].expire == DEFAULT_EXPIRE == 1800
    assert config.pools["pool1"].maxlocks == 1


@pytest.mark.parametrize(
    "servers",
    ["acme1, acme2", "acme1,acme2", " acme1 ,  acme2 ", "acme1, acme2,", "[acme1, acme2]"],
)
def test_servers_with_spaces(servers: str) -> None:
    config = parse_config(f"pools:\n    - name: pool2\n      servers: {servers}\n")
    assert config.pools["pool2"].servers == frozenset({"acme1", "acme2"})


def test_maxlocks_and_expire_zero() -> None:
    text = textwrap.dedent(
        """\
        backend: inmemory
        pools:
            - name: sem
              expire: 300
              maxlocks: 5
            - name: forever
              expire: 0
        """
    )
    config = parse_config(text)
    assert config.pools["sem"].maxlocks == 5
    assert config.pools["forever"].expire == 0


def test_typo_in_a_0_7_file_is_now_an_error() -> None:
    # 0.7 ignored unknown keys; a misspelt 'expire' silently meant 30 minutes.
    with pytest.raises(ConfigError, match=r"x\.yaml:3:7: .*unknown key 'expires'"):
        parse_config("pools:\n    - name: pool1\n      expires: 300\n", "x.yaml")


# --- the 0.7 client's HTTP calls -------------------------------------------------


def legacy_body(port: int, path: str) -> str:
    """GET and return the body, as 0.7 did: the status is never looked at."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def legacy_client(port: int, pool: str, host: str, command: str) -> tuple[str, int | None, str]:
    """What the 0.7 client does: wait, run the command on YES, release.

    Host and pool go into the URL unescaped, as 0.7 sent them. Returns the
    /wait/ body, the command's exit status (None if it did not run) and the
    /release/ body.
    """
    answer = legacy_body(port, f"/wait/?host={host}&pool={pool}")
    status = None
    if answer == "YES":
        status = subprocess.call(command, shell=True)
    released = legacy_body(port, f"/release/?host={host}&pool={pool}")
    return answer, status, released


POOL_CONFIG = """\
pools:
    - name: pool1
      expire: 300
"""


def python_command(code: str) -> str:
    """A shell command running ``code`` with the test's interpreter."""
    return f"{sys.executable} -c {_shell_quote(code)}"


def _shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def test_legacy_client_runs_command_under_the_lock(server_factory, tmp_path: Path) -> None:
    server = server_factory(POOL_CONFIG)
    seen = tmp_path / "seen"
    # While the command runs, another host must be refused the pool.
    probe = (
        "import urllib.request, sys;"
        f"b = urllib.request.urlopen('{server.url}/get/?host=other&pool=pool1').read();"
        f"open({str(seen)!r}, 'wb').write(b)"
    )
    result = legacy_client(server.port, "pool1", "node1.example.com", python_command(probe))
    assert result == ("YES", 0, "OK")
    assert seen.read_text() == "NO"
    # Released: the other host gets it now.
    assert server.call("/get/?host=other&pool=pool1").body == "YES"


def test_legacy_client_does_not_run_on_invalid(server_factory, tmp_path: Path) -> None:
    server = server_factory(POOL_CONFIG)
    marker = tmp_path / "ran"
    result = legacy_client(server.port, "nosuchpool", "node1", f"touch {marker}")
    # The 4xx status is invisible to 0.7; the body is still exactly INVALID.
    assert result == ("INVALID", None, "INVALID")
    assert not marker.exists()


def test_two_legacy_clients_never_overlap(server_factory, tmp_path: Path) -> None:
    server = server_factory(POOL_CONFIG)
    inside = tmp_path / "inside"  # exists only while a command runs
    journal = tmp_path / "journal"
    code = (
        "import os, sys, time;"
        f"os.mkdir({str(inside)!r});"  # fails if the other command is running
        "time.sleep(0.2);"
        f"os.rmdir({str(inside)!r});"
        f"open({str(journal)!r}, 'a').write(sys.argv[1] + chr(10))"
    )
    results: list[tuple[str, int | None, str]] = []
    lock = threading.Lock()

    def node(name: str) -> None:
        for _ in range(3):
            result = legacy_client(server.port, "pool1", name, f"{python_command(code)} {name}")
            with lock:
                results.append(result)

    threads = [threading.Thread(target=node, args=(f"acme{i}.example.com",)) for i in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == [("YES", 0, "OK")] * 6
    lines = journal.read_text().split()
    assert sorted(lines) == ["acme1.example.com"] * 3 + ["acme2.example.com"] * 3
