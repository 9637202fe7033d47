"""GET /status, /metrics and /healthz on every backend (real servers, real stores)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import BACKEND_KEYS, Cluster, Server, start_memcached
from tests.test_http import ParkedWait, q

pytestmark = pytest.mark.timeout(120)

POOLS = """\
autocreate: true
pools:
  - name: sem2
    maxlocks: 2
    expire: 300
  - name: guarded
    servers: acme1, acme2
    expire: 0
  - name: short
    expire: 1
"""


def status(server: Server, query: str = "") -> dict[str, Any]:
    answer = server.call("/status" + query)
    assert answer.status == 200, answer.body
    assert answer.headers["Content-Type"].startswith("application/json")
    return json.loads(answer.body)


def pool_of(doc: dict[str, Any], name: str) -> dict[str, Any]:
    found = [p for p in doc["pools"] if p["name"] == name]
    assert len(found) == 1, doc
    return found[0]


def until(check: Callable[[], Any], timeout: float = 15, what: str = "condition") -> Any:
    """Wait for ``check()`` to return something true (a condition, never a guessed sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def hosts(entries: list[dict[str, Any]]) -> list[str]:
    return [entry["host"] for entry in entries]


@pytest.fixture
def cluster(cluster_factory) -> Cluster:
    return cluster_factory(POOLS)


def test_status_shows_holders_and_waiters_in_order(cluster: Cluster) -> None:
    before = time.time()
    fences = []
    for host in ("h1", "h2"):
        answer = cluster.call(q("get", host, "sem2"))
        assert answer.body == "YES"
        fences.append(int(answer.headers["X-Distributex-Fence"]))
    parked = []
    for i, host in enumerate(("w1", "w2", "w3")):
        parked.append(ParkedWait(cluster.next(), host, "sem2"))
        # The next one is sent once this one is seen queued, so the order is known.
        until(
            lambda n=i + 1: len(pool_of(status(cluster.servers[0]), "sem2")["waiters"]) == n,
            what=f"{host} queued",
        )
    for server in cluster.servers:  # every server of a shared store tells the same
        doc = status(server)
        assert doc["backend"] == cluster.backend
        assert abs(doc["time"] - time.time()) < 5
        names = [p["name"] for p in doc["pools"]]
        assert names[:3] == ["sem2", "guarded", "short"]  # configured pools, in file order
        sem2 = pool_of(doc, "sem2")
        assert (sem2["maxlocks"], sem2["expire"], sem2["servers"]) == (2, 300, None)
        assert sem2["configured"] is True and sem2["draining"] is False
        assert hosts(sem2["holders"]) == ["h1", "h2"]
        assert [h["fence"] for h in sem2["holders"]] == fences
        for holder in sem2["holders"]:
            assert holder["leases"] == 1
            assert before - 1 <= holder["granted_at"] <= time.time() + 1
            assert holder["expires_at"] == pytest.approx(holder["granted_at"] + 300, abs=0.01)
            assert 250 < holder["ttl_left"] <= 300
        assert hosts(sem2["waiters"]) == ["w1", "w2", "w3"]
        assert all(w["requests"] == 1 and w["waited"] >= 0 for w in sem2["waiters"])
        assert sem2["waiters"][0]["since"] <= sem2["waiters"][1]["since"]
        guarded = pool_of(doc, "guarded")
        assert guarded["servers"] == ["acme1", "acme2"]
        assert (guarded["holders"], guarded["waiters"]) == ([], [])

    # One pool only; a release moves the head of the queue to the holders.
    only = status(cluster.next(), "?pool=sem2")
    assert [p["name"] for p in only["pools"]] == ["sem2"]
    assert cluster.call(q("release", "h1", "sem2")).body == "OK"
    assert parked[0].answer()[2] == "YES"
    doc = until(
        lambda: (
            (d := status(cluster.next(), "?pool=sem2"))
            and hosts(d["pools"][0]["holders"]) == ["h2", "w1"]
            and d
        ),
        what="w1 holding",
    )
    assert hosts(doc["pools"][0]["waiters"]) == ["w2", "w3"]
    for wait in parked[1:]:
        wait.hang_up()


def test_status_of_pools_made_on_first_use_and_never_expiring(cluster: Cluster) -> None:
    server = cluster.servers[0]
    assert server.call(q("get", "acme1", "guarded")).body == "YES"
    assert server.call(q("get", "x", "made-on-use")).body == "YES"
    doc = status(server)
    guarded = pool_of(doc, "guarded")
    assert guarded["holders"][0]["expires_at"] is None
    assert guarded["holders"][0]["ttl_left"] is None
    made = pool_of(doc, "made-on-use")
    assert made["configured"] is False and made["expire"] == 1800
    assert hosts(made["holders"]) == ["x"]
    # Asked by name, any server reads it from the store.
    other = status(cluster.servers[-1], "?pool=made-on-use")
    assert hosts(other["pools"][0]["holders"]) == ["x"]
    # Idle again: a pool made on first use holds no state and is not listed.
    assert server.call(q("release", "x", "made-on-use")).body == "OK"
    assert "made-on-use" not in [p["name"] for p in status(server)["pools"]]


def test_status_leaves_out_an_expired_lease(cluster: Cluster) -> None:
    answer = cluster.call(q("get", "a", "short"))
    assert answer.body == "YES"
    assert hosts(pool_of(status(cluster.next()), "short")["holders"]) == ["a"]
    until(lambda: not pool_of(status(cluster.next()), "short")["holders"], what="expiry")


def test_status_refuses_bad_pool_names(cluster_factory) -> None:
    cluster = cluster_factory("pools:\n  - name: p\n", servers=1)
    server = cluster.servers[0]
    answer = server.call("/status?pool=nope")
    assert answer.status == 404
    assert json.loads(answer.body) == {"error": "unknown pool 'nope'"}
    assert server.call("/status?pool=").status == 400
    assert server.call("/status?pool=%ff").status == 400


# -- metrics ---------------------------------------------------------------------------------


def metric(server: Server, name: str, **labels: str) -> float:
    """One sample of /metrics (0 if absent)."""
    text = server.call("/metrics").body
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        sample, _, label_text = key.partition("{")
        if sample != name:
            continue
        got = ",".join(sorted(label_text.rstrip("}").split(","))) if label_text else ""
        if got == want:
            return float(value)
    return 0.0


def test_metrics_move_with_locks(cluster_factory) -> None:
    cluster = cluster_factory(POOLS, servers=1)
    server = cluster.servers[0]
    answer = server.call("/metrics")
    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("text/plain; version=")
    assert "# TYPE distributex_grants_total counter" in answer.body
    assert metric(server, "distributex_backend_up") == 1

    assert server.call(q("get", "a", "sem2")).body == "YES"
    assert server.call(q("get", "b", "sem2")).body == "YES"
    parked = ParkedWait(server, "c", "sem2")
    until(lambda: metric(server, "distributex_waiters", pool="sem2") == 1, what="waiter gauge")
    assert metric(server, "distributex_holders", pool="sem2") == 2
    assert metric(server, "distributex_maxlocks", pool="sem2") == 2
    assert metric(server, "distributex_grants_total", pool="sem2") == 2
    assert server.call(q("release", "a", "sem2")).body == "OK"
    assert parked.answer()[2] == "YES"
    until(lambda: metric(server, "distributex_grants_total", pool="sem2") == 3, what="grant")
    assert metric(server, "distributex_releases_total", pool="sem2") == 1
    assert metric(server, "distributex_wait_seconds_count", pool="sem2") == 3
    assert metric(server, "distributex_requests_total", verb="get", status="200") == 2

    # A wait that times out; refusals by reason.
    assert server.call(q("wait", "d", "sem2", "&timeout=0.2")).body == "NO"
    assert metric(server, "distributex_timeouts_total", pool="sem2") == 1
    assert server.call(q("get", "intruder", "guarded")).status == 403
    assert metric(server, "distributex_refusals_total", pool="guarded", reason="forbidden") == 1
    assert server.call("/get/?host=a").status == 400
    assert metric(server, "distributex_refusals_total", pool="", reason="bad_request") == 1
    assert metric(server, "distributex_requests_total", verb="get", status="403") == 1

    # An expiry, and a renewal of the lease it ended (lost).
    lease = server.call(q("get", "e", "short")).headers["X-Distributex-Lease"]
    # A shared store expires at its next step: another request makes one.
    until(
        lambda: server.call(q("get", "f", "short")).body == "YES",
        what="the short lease to expire",
    )
    assert metric(server, "distributex_expiries_total", pool="short") == 1
    renew = server.call(q("renew", "e", "short", f"&lease={lease}"))
    assert renew.status == 410
    assert metric(server, "distributex_lost_leases_total", pool="short") == 1


def test_metrics_off(server_factory) -> None:
    server = server_factory("metrics: false\npools:\n  - name: p\n")
    assert server.call(q("get", "a", "p")).body == "YES"
    answer = server.call("/metrics")
    assert answer.status == 404
    assert "metrics are off" in answer.body


def test_metrics_label_pools_made_on_first_use_up_to_a_bound(server_factory) -> None:
    server = server_factory()
    assert server.call(q("get", "a", "made")).body == "YES"
    assert metric(server, "distributex_grants_total", pool="made") == 1


# -- health ----------------------------------------------------------------------------------


def test_healthz_inmemory(server: Server) -> None:
    answer = server.call("/healthz")
    assert (answer.status, answer.body) == (200, "OK")


def test_healthz_follows_the_store(server_factory, tmp_path) -> None:
    mc = start_memcached()  # a memcached of its own: this test stops it
    try:
        config = (
            BACKEND_KEYS["memcache"].format(port=mc.port, prefix="health") + "pools:\n- name: p\n"
        )
        server = server_factory(config)
        assert server.call("/healthz").status == 200
        mc.stop()
        started = time.monotonic()
        answer = server.call("/healthz")
        assert time.monotonic() - started < 6
        assert answer.status == 503
        assert answer.body.startswith("UNAVAILABLE: memcached 127.0.0.1:")
        assert answer.headers["X-Distributex-Reason"] in answer.body
        assert metric(server, "distributex_backend_up") == 0
        mc.start()
        until(lambda: server.call("/healthz").status == 200, timeout=30, what="health back")
    finally:
        mc.stop()


def test_healthz_sqlite(cluster_factory) -> None:
    # Every backend answers /healthz (sqlite and memcache through the shared layer).
    cluster = cluster_factory("pools:\n  - name: p\n", servers=1)
    assert cluster.servers[0].call("/healthz").body == "OK"
