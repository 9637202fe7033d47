"""Settings that would silently break mutual exclusion are refused, not served.

A memcached that evicts items (started without ``-M``) stops the server at
start; a server whose clock is off (libfaketime) against memcached's or
against the other servers' (etcd: their heartbeats) steps no pool: ``503``
with the reason, ``/healthz`` unhealthy, a log line.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    EtcdCluster,
    Memcached,
    Server,
    free_port,
    start_memcached,
    wait_for_port,
    wait_until,
)
from tests.test_http import q

pytestmark = pytest.mark.timeout(120)

POOLS = "autocreate: true\npools:\n  - name: p\n    expire: 30\n"


@pytest.fixture
def evicting_memcached() -> Iterator[Memcached]:
    """A memcached as Debian starts it by default: evicts items when full (no -M)."""
    port = free_port()
    cmd = ["memcached", "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-m", "64"]
    if os.geteuid() == 0:
        cmd += ["-u", "nobody"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, proc)
    server = Memcached(proc, port)
    yield server
    server.stop()


@pytest.fixture
def mc() -> Iterator[Memcached]:
    server = start_memcached()
    yield server
    server.stop()


def memcache_config(mc: Memcached, extra: str = "") -> str:
    return f"backend: memcache\nmemcachehost: 127.0.0.1\nmemcacheport: {mc.port}\n{extra}{POOLS}"


def test_a_memcached_that_evicts_is_refused_at_start_in_one_line(
    evicting_memcached: Memcached, tmp_path: Path
) -> None:
    cfg = tmp_path / "evicting.yaml"
    cfg.write_text(memcache_config(evicting_memcached))
    done = subprocess.run(
        [sys.executable, "-m", "distributex", "-c", str(cfg), "-p", str(free_port())],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "-M" in lines[0] and "unsafe_store: warn" in lines[0]


def test_unsafe_store_warn_runs_on_a_memcached_that_evicts_and_says_so(
    evicting_memcached: Memcached, server_factory
) -> None:
    server: Server = server_factory(memcache_config(evicting_memcached, "unsafe_store: warn\n"))
    assert server.call(q("get", "a", "p")).body == "YES"
    assert "evicts items" in server.log.read_text()


def test_a_server_whose_clock_is_off_memcacheds_grants_nothing(
    mc: Memcached, server_factory, skewed_factory
) -> None:
    honest: Server = server_factory(memcache_config(mc))
    ahead: Server = skewed_factory(memcache_config(mc), 20)
    assert honest.call(q("get", "a", "p")).body == "YES"
    # On its clock a's lease ended long ago: it must not take the slot.
    answer = ahead.call(q("get", "b", "p"))
    assert answer.status == 503
    assert "clock" in answer.headers["X-Distributex-Reason"]
    health = ahead.call("/healthz")
    assert health.status == 503 and "clock" in health.headers["X-Distributex-Reason"]
    assert "clock is" in ahead.log.read_text()
    assert honest.call("/healthz").status == 200
    assert honest.call(q("get", "c", "other")).body == "YES"


def test_on_etcd_the_server_whose_clock_is_off_the_others_grants_nothing(
    etcd: EtcdCluster, server_factory, skewed_factory
) -> None:
    config = f"backend: etcd\netcd_endpoints: {etcd.endpoints}\nkey_prefix: t{uuid.uuid4().hex}/\n"
    config += POOLS
    honest = [server_factory(config), server_factory(config)]
    assert honest[0].call(q("get", "a", "p")).body == "YES"
    behind: Server = skewed_factory(config, -20)
    # Two clocks against one: the server behind is the one that refuses.
    answer = behind.call(q("release", "a", "p"))
    assert answer.status == 503
    assert "clock" in answer.headers["X-Distributex-Reason"]
    assert behind.call("/healthz").status == 503
    for server in honest:
        # They see the odd one too, but two clocks agree: they go on.
        assert server.call(q("get", "b", "other")).body in ("YES", "NO")
    assert honest[1].call(q("get", "b", "p")).body == "NO"
    assert honest[1].call(q("release", "a", "p")).body == "OK"
    wait_until(lambda: honest[1].call(q("get", "b", "p")).body == "YES", 10, "granted")


def test_two_servers_with_different_maxlocks_on_one_file_say_so(
    tmp_path: Path, server_factory
) -> None:
    head = f"backend: sqlite\nsqlite_path: {tmp_path / 'state.db'}\npools:\n  - name: p\n"
    one: Server = server_factory(head + "    maxlocks: 1\n")
    two: Server = server_factory(head + "    maxlocks: 2\n")
    assert one.call(q("get", "a", "p")).body == "YES"
    assert two.call(q("get", "b", "p")).body == "YES"  # two holders where one says 1
    assert one.call(q("get", "c", "p")).body == "NO"
    for server, theirs in ((two, "maxlocks 1"), (one, "maxlocks 2")):
        wait_until(
            lambda s=server, t=theirs: f"another server runs it with {t}" in s.log.read_text(),
            10,
            "the mismatch logged",
        )
