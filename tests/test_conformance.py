"""The contract, written once and run on every backend.

Each test runs against one inmemory server and against two servers sharing one
real memcached, with requests spread over both servers in turn, so that every
rule (maxlocks, FIFO, expiry, leases, fencing) is checked across servers too.
A new backend joins by adding its name to the ``backend_name`` fixture.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import Cluster, wait_until
from tests.test_http import ParkedWait, q

pytestmark = pytest.mark.timeout(120)

POOLS = """\
autocreate: true
pools:
  - name: pool1
    expire: 300
  - name: guarded
    servers: acme1, acme2
  - name: sem5
    maxlocks: 5
  - name: short
    expire: 1
  - name: forever
    expire: 0
"""


@pytest.fixture
def cluster(cluster_factory) -> Cluster:
    return cluster_factory(POOLS)


def test_seed_transcript(cluster: Cluster) -> None:
    steps = [
        ("get", "me", "YES"),
        ("get", "them", "NO"),
        ("release", "me", "OK"),
        ("get", "them", "YES"),
        ("release", "them", "OK"),
    ]
    for verb, host, body in steps:
        answer = cluster.call(q(verb, host, "pool1"))
        assert (answer.status, answer.body) == (200, body), (verb, host)
        assert answer.headers["Content-Type"] == "text/plain"
        assert ("X-Distributex-Fence" in answer.headers) == (body == "YES")


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/get/?pool=pool1", 400),
        ("/get/?host=a", 400),
        ("/get/?host=&pool=pool1", 400),
        ("/frobnicate/?host=a&pool=pool1", 404),
        ("/get/?host=stranger&pool=guarded", 403),
    ],
)
def test_invalid_requests(cluster_factory, path: str, status: int) -> None:
    cluster = cluster_factory(POOLS.replace("autocreate: true\n", ""), servers=1)
    answer = cluster.call(path)
    assert (answer.status, answer.body) == (status, "INVALID")
    assert answer.headers.get("X-Distributex-Reason")


def test_unknown_pool_without_autocreate(cluster_factory) -> None:
    cluster = cluster_factory(POOLS.replace("autocreate: true\n", ""), servers=1)
    assert cluster.call(q("get", "a", "nope")).status == 404


def test_servers_allow_list(cluster: Cluster) -> None:
    assert cluster.call(q("get", "acme1", "guarded")).body == "YES"
    assert cluster.call(q("get", "acme2", "guarded")).body == "NO"
    assert cluster.call(q("release", "acme1", "guarded")).body == "OK"
    assert cluster.call(q("get", "acme2", "guarded")).body == "YES"


def test_thirty_simultaneous_gets_on_a_free_semaphore_give_exactly_five(cluster: Cluster) -> None:
    barrier = threading.Barrier(30)
    targets = [cluster.next() for _ in range(30)]

    def one(i: int) -> str:
        barrier.wait()
        return targets[i].call(q("get", f"host{i}", "sem5")).body

    with ThreadPoolExecutor(30) as pool:
        bodies = list(pool.map(one, range(30)))
    assert bodies.count("YES") == 5
    assert bodies.count("NO") == 25


def test_fifo_order_of_eight_waiters(cluster: Cluster) -> None:
    assert cluster.call(q("get", "holder", "pool1")).body == "YES"
    waiters = []
    for i in range(8):
        waiters.append(ParkedWait(cluster.next(), f"w{i}", "pool1"))
        time.sleep(0.1)  # arrival order is the order the servers read them
    time.sleep(0.2)
    assert cluster.call(q("release", "holder", "pool1")).body == "OK"
    for i, waiter in enumerate(waiters):
        status, _headers, body = waiter.answer()
        assert (status, body) == (200, "YES"), i
        # Nobody behind the head has been answered yet.
        assert not any(w.answered() for w in waiters[i + 1 :])
        assert cluster.call(q("release", f"w{i}", "pool1")).body == "OK"


def test_get_does_not_jump_the_queue(cluster: Cluster) -> None:
    for i in range(5):
        assert cluster.call(q("get", f"b{i}", "sem5")).body == "YES"
    waiter = ParkedWait(cluster.next(), "queued", "sem5")
    time.sleep(0.3)
    assert cluster.call(q("get", "latecomer", "sem5")).body == "NO"
    cluster.call(q("release", "b0", "sem5"))
    assert waiter.answer()[2] == "YES"
    assert cluster.call(q("get", "latecomer", "sem5")).body == "NO"


def test_hung_up_waiter_is_skipped(cluster: Cluster) -> None:
    cluster.call(q("get", "holder", "pool1"))
    gone = ParkedWait(cluster.next(), "gone", "pool1")
    time.sleep(0.1)
    stays = ParkedWait(cluster.next(), "stays", "pool1")
    time.sleep(0.1)
    gone.hang_up()
    time.sleep(0.5)
    cluster.call(q("release", "holder", "pool1"))
    assert stays.answer()[2] == "YES"
    # "gone" holds nothing: after "stays" releases, the pool is free.
    cluster.call(q("release", "stays", "pool1"))
    assert cluster.call(q("get", "third", "pool1")).body == "YES"


def test_release_on_one_server_wakes_a_waiter_on_another(cluster: Cluster) -> None:
    first, second = cluster.servers[0], cluster.servers[-1]
    first.call(q("get", "holder", "pool1"))
    waiter = ParkedWait(second, "next", "pool1")
    time.sleep(0.3)
    assert not waiter.answered()
    started = time.monotonic()
    first.call(q("release", "holder", "pool1"))
    status, headers, body = waiter.answer()
    assert (status, body) == (200, "YES")
    assert time.monotonic() - started < 1.0
    assert int(headers["X-Distributex-Fence"]) > 0


def test_two_waits_by_one_host_both_answer_yes(cluster: Cluster) -> None:
    cluster.call(q("get", "holder", "pool1"))
    first = ParkedWait(cluster.next(), "twin", "pool1")
    second = ParkedWait(cluster.next(), "twin", "pool1")
    time.sleep(0.3)
    cluster.call(q("release", "holder", "pool1"))
    a, b = first.answer(), second.answer()
    assert a[2] == b[2] == "YES"
    assert a[1]["X-Distributex-Fence"] == b[1]["X-Distributex-Fence"]


def test_expiry_hands_the_slot_on(cluster: Cluster) -> None:
    granted = time.monotonic()
    assert cluster.call(q("get", "crashed", "short")).body == "YES"
    waiter = ParkedWait(cluster.next(), "next", "short")
    assert waiter.answer()[2] == "YES"
    elapsed = time.monotonic() - granted
    assert 0.8 <= elapsed <= 2.5, elapsed
    assert cluster.call(q("get", "crashed", "short")).body == "NO"


def test_expire_zero_never_expires(cluster: Cluster) -> None:
    assert cluster.call(q("get", "a", "forever")).body == "YES"
    assert cluster.call(q("wait", "b", "forever", "&timeout=1.5")).body == "NO"
    assert cluster.call(q("get", "a", "forever")).headers["X-Distributex-TTL"] == "0"


def test_wait_timeout_answers_no_and_leaves_the_queue(cluster: Cluster) -> None:
    cluster.call(q("get", "holder", "pool1"))
    started = time.monotonic()
    answer = cluster.call(q("wait", "impatient", "pool1", "&timeout=0.5"))
    assert answer.body == "NO" and answer.status == 200
    assert 0.4 <= time.monotonic() - started < 3
    cluster.call(q("release", "holder", "pool1"))
    assert cluster.call(q("get", "other", "pool1")).body == "YES"


def test_fencing_tokens_strictly_increase(cluster: Cluster) -> None:
    fences = []
    for i in range(20):
        answer = cluster.call(q("get", f"h{i}", "pool1"))
        fences.append(int(answer.headers["X-Distributex-Fence"]))
        cluster.call(q("release", f"h{i}", "pool1"))
    assert all(a < b for a, b in itertools.pairwise(fences))
    held = cluster.call(q("get", "x", "sem5"))
    again = cluster.call(q("get", "x", "sem5"))
    assert again.headers["X-Distributex-Fence"] == held.headers["X-Distributex-Fence"]


def test_leases_renew_and_release_through_any_server(cluster: Cluster) -> None:
    answer = cluster.call(q("get", "a", "short", "&ttl=0.6"))
    token = answer.headers["X-Distributex-Lease"]
    assert answer.headers["X-Distributex-TTL"] == "0.6"
    for _ in range(5):  # 1.5 s in all, well past the 0.6 s TTL
        time.sleep(0.3)
        renewed = cluster.call(q("renew", "a", "short", f"&lease={token}"))
        assert (renewed.status, renewed.body) == (200, "OK")
    assert cluster.call(q("get", "b", "short")).body == "NO"
    assert cluster.call(q("release", "b", "short", f"&lease={token}")).status == 410
    assert cluster.call(q("release", "a", "short", "&lease=forged")).body == "GONE"
    assert cluster.call(q("release", "a", "short", f"&lease={token}")).body == "OK"
    assert cluster.call(q("renew", "a", "short", f"&lease={token}")).status == 410
    assert cluster.call(q("get", "b", "short")).body == "YES"


def test_two_runs_under_one_host_keep_the_slot_until_both_release(cluster: Cluster) -> None:
    run1 = cluster.call(q("get", "hostA", "pool1"))
    run2 = cluster.call(q("get", "hostA", "pool1"))
    token1, token2 = run1.headers["X-Distributex-Lease"], run2.headers["X-Distributex-Lease"]
    assert token1 != token2
    assert cluster.call(q("release", "hostA", "pool1", f"&lease={token1}")).body == "OK"
    assert cluster.call(q("get", "hostB", "pool1")).body == "NO"
    assert cluster.call(q("release", "hostA", "pool1", f"&lease={token2}")).body == "OK"
    assert cluster.call(q("get", "hostB", "pool1")).body == "YES"


def test_lease_gone_after_expiry(cluster: Cluster) -> None:
    token = cluster.call(q("get", "a", "short", "&ttl=0.3")).headers["X-Distributex-Lease"]
    time.sleep(0.6)
    assert cluster.call(q("renew", "a", "short", f"&lease={token}")).status == 410


# -- lock modes and lock-delay (every backend) -------------------------------------------

MODE_POOLS = """\
pools:
  - name: rw
    expire: 300
  - name: rsem
    maxlocks: 2
    max_shared: 2
  - name: delayed
    expire: 1
    lock_delay: 1.5
"""


def _pool_status(cluster: Cluster, pool: str) -> dict:
    answer = cluster.servers[0].call("/status")
    assert answer.status == 200, answer.body
    return next(p for p in json.loads(answer.body)["pools"] if p["name"] == pool)


def _until_waiting(cluster: Cluster, pool: str, hosts: list[str]) -> None:
    wait_until(
        lambda: [w["host"] for w in _pool_status(cluster, pool)["waiters"]] == hosts,
        what=f"{hosts} waiting on {pool}",
    )


@pytest.fixture
def modes(cluster_factory) -> Cluster:
    return cluster_factory(MODE_POOLS)


def test_shared_holders_coexist_and_never_with_the_default_mode(modes: Cluster) -> None:
    shared = "&mode=shared"
    for reader in ("r1", "r2", "r3"):
        answer = modes.call(q("get", reader, "rw", shared))
        assert answer.body == "YES", reader
        assert answer.headers["X-Distributex-Mode"] == "shared"
    assert modes.call(q("get", "writer", "rw")).body == "NO"
    assert modes.call(q("get", "writer", "rw", "&mode=exclusive")).body == "NO"
    pool = _pool_status(modes, "rw")
    assert [(h["host"], h["mode"]) for h in pool["holders"]] == [
        ("r1", "shared"),
        ("r2", "shared"),
        ("r3", "shared"),
    ]
    assert pool["max_shared"] is None and pool["lock_delay"] == 0
    # A shared holder asking exclusive is not upgraded.
    assert modes.call(q("get", "r1", "rw", "&mode=exclusive")).body == "NO"
    for reader in ("r1", "r2", "r3"):
        assert modes.call(q("release", reader, "rw")).body == "OK"
    writer = modes.call(q("get", "writer", "rw"))
    assert writer.body == "YES" and "X-Distributex-Mode" not in writer.headers  # 0.7 answer
    assert modes.call(q("get", "r1", "rw", shared)).body == "NO"
    # The exclusive holder asking shared gets a lease of its exclusive hold.
    again = modes.call(q("get", "writer", "rw", shared))
    assert again.headers["X-Distributex-Mode"] == "exclusive"
    assert modes.call(q("get", "w", "rw", "&mode=read")).status == 400


def test_shared_waits_behind_a_waiting_exclusive_and_runs_are_granted_together(
    modes: Cluster,
) -> None:
    shared = "&mode=shared"
    assert modes.call(q("get", "r1", "rw", shared)).body == "YES"
    writer = ParkedWait(modes.next(), "writer", "rw")
    _until_waiting(modes, "rw", ["writer"])
    # No starvation of the writer: a shared request behind it waits.
    assert modes.call(q("get", "r2", "rw", shared)).body == "NO"
    r2 = ParkedWait(modes.next(), "r2", "rw", shared)
    _until_waiting(modes, "rw", ["writer", "r2"])
    r3 = ParkedWait(modes.next(), "r3", "rw", shared)
    _until_waiting(modes, "rw", ["writer", "r2", "r3"])
    waiters = _pool_status(modes, "rw")["waiters"]
    assert [w["mode"] for w in waiters] == ["exclusive", "shared", "shared"]
    assert modes.call(q("release", "r1", "rw")).body == "OK"
    status, headers, body = writer.answer()
    assert (status, body) == (200, "YES")
    assert not r2.answered() and not r3.answered()
    writer_fence = int(headers["X-Distributex-Fence"])
    assert modes.call(q("release", "writer", "rw")).body == "OK"
    # Both readers at the head are granted together, with later fences.
    fences = []
    for reader in (r2, r3):
        status, headers, body = reader.answer()
        assert (status, body, headers["X-Distributex-Mode"]) == (200, "YES", "shared")
        fences.append(int(headers["X-Distributex-Fence"]))
    assert writer_fence < fences[0] < fences[1]


def test_max_shared_bounds_shared_holders_and_maxlocks_the_others(modes: Cluster) -> None:
    shared = "&mode=shared"
    assert modes.call(q("get", "r1", "rsem", shared)).body == "YES"
    assert modes.call(q("get", "r2", "rsem", shared)).body == "YES"
    assert modes.call(q("get", "r3", "rsem", shared)).body == "NO"
    assert _pool_status(modes, "rsem")["max_shared"] == 2
    r3 = ParkedWait(modes.next(), "r3", "rsem", shared)
    _until_waiting(modes, "rsem", ["r3"])
    assert modes.call(q("release", "r1", "rsem")).body == "OK"
    assert r3.answer()[2] == "YES"
    for reader in ("r2", "r3"):
        modes.call(q("release", reader, "rsem"))
    # Default-mode holders keep maxlocks (2), as a semaphore.
    assert modes.call(q("get", "w1", "rsem")).body == "YES"
    assert modes.call(q("get", "w2", "rsem")).body == "YES"
    assert modes.call(q("get", "w3", "rsem")).body == "NO"
    assert modes.call(q("get", "r1", "rsem", shared)).body == "NO"


def test_lock_delay_after_an_expiry_and_never_after_a_release(modes: Cluster) -> None:
    granted = time.monotonic()
    assert modes.call(q("get", "lost", "delayed")).body == "YES"
    waiter = ParkedWait(modes.next(), "next", "delayed")
    # The lease ends after 1 s; the slot stays taken 1.5 s more.
    wait_until(
        lambda: _pool_status(modes, "delayed")["lock_delays"], what="a lock-delay", every=0.02
    )
    assert time.monotonic() - granted >= 0.9
    assert modes.call(q("get", "other", "delayed")).body == "NO"
    pool = _pool_status(modes, "delayed")
    assert pool["lock_delay"] == 1.5 and pool["holders"] == []
    assert [d["mode"] for d in pool["lock_delays"]] == ["exclusive"]
    assert waiter.answer()[2] == "YES"
    elapsed = time.monotonic() - granted
    assert 2.3 <= elapsed <= 4.5, elapsed
    # A release frees the slot at once.
    assert modes.call(q("release", "next", "delayed")).body == "OK"
    assert modes.call(q("get", "other", "delayed")).body == "YES"
    assert _pool_status(modes, "delayed")["lock_delays"] == []
