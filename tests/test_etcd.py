"""The etcd backend when things go wrong: members die, the quorum is lost, a server dies.

Real etcd (Debian's etcd-server) started by the fixtures on free loopback
ports, three members unless said otherwise, and real distributexd processes
sharing it.
"""

from __future__ import annotations

import base64
import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from distributex.config import ConfigError, load_config
from tests.conftest import EtcdCluster, EtcdMember, Server, start_etcd, wait_until
from tests.pki import make_pki
from tests.test_http import ParkedWait, q

pytestmark = pytest.mark.timeout(180)


def config(endpoints: str, pools: str = "", extra: str = "") -> str:
    head = f"backend: etcd\netcd_endpoints: {endpoints}\n{extra}"
    return head + "autocreate: true\npools:\n  - name: p\n    expire: 3\n" + pools


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def keys_under(cluster: EtcdCluster, prefix: str) -> list[str]:
    member = next(m for m in cluster.members if m.proc is not None)
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    found = member.post("/v3/kv/range", {"key": b64(prefix), "range_end": b64(end)})
    return [base64.b64decode(kv["key"]).decode() for kv in found.get("kvs", [])]


def hand_over(server: Server) -> None:
    """A lock taken, a waiter parked behind it, the release handing it on."""
    assert server.call(q("get", "a", "p")).body == "YES"
    waiter = ParkedWait(server, "b", "p")
    time.sleep(0.2)
    assert server.call(q("release", "a", "p")).body == "OK"
    assert waiter.answer(timeout=10)[2] == "YES"


def refused_at_start(config_path: Path) -> subprocess.CompletedProcess[str]:
    """A server started on ``config_path`` that is expected to stop at once."""
    return subprocess.run(
        [sys.executable, "-m", "distributex", "-p", "0", "-c", str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def txns_served(member: EtcdMember) -> float:
    """How many transactions ``member`` has answered (etcd's own metrics)."""
    with urllib.request.urlopen(member.url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    pattern = r'^grpc_server_handled_total\{grpc_code="OK",grpc_method="Txn".*\} (\S+)$'
    return sum(float(m.group(1)) for m in re.finditer(pattern, text, re.MULTILINE))


def test_requests_go_to_the_leader_and_follow_it(etcd3: EtcdCluster, server_factory) -> None:
    # Endpoints listed followers first: the server still sends its writes to the leader.
    leader = etcd3.leader()
    followers = [m for m in etcd3.members if m is not leader]
    endpoints = ",".join(m.url for m in [*followers, leader])
    server: Server = server_factory(config(endpoints))
    rounds = iter(range(1000))

    def all_on_the_leader() -> bool:
        # (Polled: on a loaded machine the first status round may time out, or the
        # young cluster may hold an election; the server finds the leader within 5 s.)
        current = etcd3.leader()
        before = {m.name: txns_served(m) for m in etcd3.members}
        n = next(rounds)
        for i in range(5):
            assert server.call(q("get", f"h{n}-{i}", f"pool{n}-{i}")).body == "YES"
        served = {m.name: txns_served(m) - before[m.name] for m in etcd3.members}
        others = [m for m in etcd3.members if m is not current]
        return served[current.name] >= 5 and all(served[m.name] == 0 for m in others)

    wait_until(all_on_the_leader, 30, "writes on the leader", every=0.5)
    leader = etcd3.leader()
    followers = [m for m in etcd3.members if m is not leader]
    # Leadership moved to a follower (the old leader lives on as a follower): the
    # server notices by itself and sends its writes to the new leader.
    new = followers[0]
    member_id = int(new.post("/v3/maintenance/status", {})["header"]["member_id"])
    subprocess.run(
        ["etcdctl", f"--endpoints={leader.url}", "move-leader", f"{member_id:x}"],
        check=True,
        capture_output=True,
        timeout=30,
        env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"},
    )
    wait_until(new.is_leader, 30, "the move")
    others = [m for m in etcd3.members if m is not new]

    def on_new_leader() -> bool:
        counts = {m.name: txns_served(m) for m in etcd3.members}
        if server.call(q("get", "again", "again")).body != "YES":
            return False
        server.call(q("release", "again", "again"))
        served = {m.name: txns_served(m) - counts[m.name] for m in etcd3.members}
        return served[new.name] >= 2 and all(served[m.name] == 0 for m in others)

    wait_until(on_new_leader, 30, "requests on the new leader", every=0.5)


@pytest.mark.parametrize("lost", ["leader", "follower"])
def test_one_member_down_the_servers_go_on(etcd3: EtcdCluster, server_factory, lost: str) -> None:
    # The leader (where the servers send requests) or a follower (listed first) is
    # killed: they go on through the others. With the leader gone, etcd answers
    # nothing until it has elected another (a second or two): until then a 503, never
    # a wrong answer.
    leader = etcd3.leader()
    first = leader if lost == "leader" else next(m for m in etcd3.members if m is not leader)
    order = [first] + [m for m in etcd3.members if m is not first]
    endpoints = ",".join(m.url for m in order)
    a: Server = server_factory(config(endpoints))
    b: Server = server_factory(config(endpoints))
    assert a.call(q("get", "x", "p")).body == "YES"
    first.stop()
    began = time.monotonic()
    answers = []

    def answered() -> bool:
        answers.append(b.call(q("get", "y", "p")))
        return answers[-1].body == "NO"

    wait_until(answered, 20, "service after the member's loss", every=0.1)
    if lost == "follower":
        assert len(answers) == 1, answers
    assert all((r.status, r.body) == (503, "UNAVAILABLE") for r in answers[:-1]), answers
    waiter = ParkedWait(b, "y", "p", "&timeout=20")
    time.sleep(0.2)
    assert a.call(q("release", "x", "p")).body == "OK"
    status, _headers, body = waiter.answer(timeout=30)
    assert (status, body) == (200, "YES")
    assert time.monotonic() - began < (5 if lost == "follower" else 25)
    for i in range(10):  # every request is served, none answered 503
        server = (a, b)[i % 2]
        answer = server.call(q("get", f"h{i}", f"free{i}"))
        assert (answer.status, answer.body) == (200, "YES"), answer
    first.start()  # back: it catches up and serves again
    etcd3.wait_ready()


def test_quorum_lost_is_a_bounded_503_and_service_resumes(
    etcd3: EtcdCluster, server_factory
) -> None:
    server: Server = server_factory(config(etcd3.endpoints))
    assert server.call(q("get", "a", "other")).body == "YES"
    held = server.call(q("get", "holder", "long", ""))
    assert held.body == "YES"
    lost = etcd3.members[:2]
    for member in lost:
        member.stop()
    answers = []
    for i in range(6):
        began = time.monotonic()
        answer = server.call(q("get", f"b{i}", f"pool{i % 2}"), timeout=30)
        answers.append((time.monotonic() - began, answer.status, answer.body, answer.headers))
    for took, status, body, headers in answers:
        assert (status, body) == (503, "UNAVAILABLE"), answers
        assert took < 5, answers
        assert "etcd" in headers["X-Distributex-Reason"]
    # A renewal cannot be confirmed either: no YES of any kind without the quorum.
    token = held.headers["X-Distributex-Lease"]
    renewal = server.call(q("renew", "holder", "long", f"&lease={token}"), timeout=30)
    assert renewal.status == 503
    for member in lost:
        member.start()
    took = wait_until(lambda: server.call(q("get", "c", "other2")).body == "YES", 60, "back")
    assert took < 30
    # Nothing was lost: the lease from before is still there.
    assert server.call(q("renew", "holder", "long", f"&lease={token}")).body == "OK"


def test_a_server_killed_while_holding_its_lease_ends_by_ttl(
    etcd: EtcdCluster, server_factory
) -> None:
    prefix = f"key_prefix: hold{uuid.uuid4().hex}/\n"
    doomed: Server = server_factory(config(etcd.endpoints, extra=prefix))
    other: Server = server_factory(config(etcd.endpoints, extra=prefix))
    granted = time.monotonic()
    assert doomed.call(q("get", "holder", "p")).body == "YES"  # expire: 3 s
    waiter = ParkedWait(other, "next", "p", "&timeout=30")
    doomed.stop(signal.SIGKILL)
    status, _headers, body = waiter.answer(timeout=30)
    waited = time.monotonic() - granted
    assert (status, body) == (200, "YES")
    assert 3 <= waited < 3 + 2.5  # not before the lease ran out; soon after it


def test_a_server_killed_while_waiting_leaves_the_queue(etcd: EtcdCluster, server_factory) -> None:
    pools = "  - name: long\n    expire: 300\n"
    prefix = f"wait{uuid.uuid4().hex}/"
    first: Server = server_factory(config(etcd.endpoints, pools, f"key_prefix: {prefix}\n"))
    doomed: Server = server_factory(config(etcd.endpoints, pools, f"key_prefix: {prefix}\n"))
    assert first.call(q("get", "holder", "long")).body == "YES"
    # Kept open (a socket closed here would cancel the wait): its server dies instead.
    lost = ParkedWait(doomed, "on-doomed", "long")
    time.sleep(0.3)
    survivor = ParkedWait(first, "survivor", "long")
    time.sleep(0.3)
    assert len(keys_under(etcd, f"{prefix}server/")) == 2
    doomed.stop(signal.SIGKILL)
    released = time.monotonic()
    assert first.call(q("release", "holder", "long")).body == "OK"
    status, _headers, body = survivor.answer(timeout=30)
    assert (status, body) == (200, "YES")
    # etcd ends the dead server's presence (its lease: 8 s), the next step drops its entry.
    took = time.monotonic() - released
    assert 4 < took < 12, took
    assert len(keys_under(etcd, f"{prefix}server/")) == 1
    lost.hang_up()


def test_a_broken_watch_comes_back_and_a_compacted_one_checks_everything(
    etcd3: EtcdCluster, server_factory
) -> None:
    pools = "  - name: long\n    expire: 300\n"
    leader = etcd3.leader()
    watched = next(m for m in etcd3.members if m is not leader)
    others = [m for m in etcd3.members if m is not watched]
    # The waiting server knows one member only (the one that will be down); the
    # granting server writes through the other two.
    waiting: Server = server_factory(config(watched.url, pools))
    granting: Server = server_factory(config(",".join(m.url for m in others), pools))
    assert granting.call(q("get", "holder", "long")).body == "YES"
    waiter = ParkedWait(waiting, "w", "long", "&timeout=60")
    time.sleep(0.3)
    watched.stop()
    wait_until(lambda: "watch at" in waiting.log.read_text(), 20, "the watch broke")
    # Writes and a compaction while the watch is down: the revision it goes on from is gone.
    for i in range(5):
        assert granting.call(q("get", f"x{i}", f"busy{i}")).body == "YES"
    status = leader.post("/v3/maintenance/status", {})
    leader.post("/v3/kv/compaction", {"revision": status["header"]["revision"], "physical": True})
    watched.start()
    wait_until(lambda: "compacted" in waiting.log.read_text(), 30, "the watch saw the compaction")
    wait_until(lambda: "works again" in waiting.log.read_text(), 30, "the watch is back")
    released = time.monotonic()
    assert granting.call(q("release", "holder", "long")).body == "OK"
    status_code, _headers, body = waiter.answer(timeout=30)
    assert (status_code, body) == (200, "YES")
    assert time.monotonic() - released < 5


def enable_auth(url: str, granted: tuple[str, ...] = ("auth/",)) -> str:
    """etcd auth on, a user ``dx`` with readwrite on the ``granted`` prefixes: its
    settings for a server (key prefix ``auth/``)."""
    grants = [["role", "grant-permission", "dx", "--prefix=true", "readwrite", g] for g in granted]
    for args in (
        ["user", "add", "root:secret-pw"],
        ["user", "add", "dx:dx-pw"],
        ["role", "add", "dx"],
        *grants,
        ["user", "grant-role", "dx", "dx"],
        ["auth", "enable"],
    ):
        subprocess.run(
            ["etcdctl", f"--endpoints={url}", *args],
            check=True,
            capture_output=True,
            env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"},
        )
    return "key_prefix: auth/\netcd_user: dx\netcd_password: dx-pw\n"


def test_auth_with_user_and_password(tmp_path, server_factory) -> None:
    cluster = start_etcd(tmp_path / "etcd-auth")
    try:
        url = cluster.members[0].url
        good = enable_auth(url)
        server: Server = server_factory(config(url, extra=good))
        hand_over(server)
        # A wrong password: the server does not start, and says why in one line.
        bad = tmp_path / "bad.yaml"
        bad.write_text(config(url, extra="key_prefix: auth/\netcd_user: dx\netcd_password: no\n"))
        run = refused_at_start(bad)
        assert run.returncode == 1
        assert "authentication failed" in run.stderr
        assert len(run.stderr.strip().splitlines()) == 1
    finally:
        cluster.stop()


def test_watches_come_back_with_a_new_token_after_etcd_restarts(tmp_path, server_factory) -> None:
    # etcd's simple tokens live in its memory: restarted, it refuses the old one,
    # also to a watch being made again. The servers authenticate again and their
    # watches work: a hand-off across servers takes milliseconds, not the 1 s poll.
    cluster = start_etcd(tmp_path / "etcd-auth")
    try:
        member = cluster.members[0]
        good = enable_auth(member.url)
        a: Server = server_factory(config(member.url, extra=good))
        b: Server = server_factory(config(member.url, extra=good))

        def across() -> float:
            assert a.call(q("get", "a", "p")).body == "YES"
            waiter = ParkedWait(b, "b", "p")
            wait_until(lambda: "b" in a.call("/status?pool=p").body, 10, "b queued")
            released = time.monotonic()
            assert a.call(q("release", "a", "p")).body == "OK"
            assert waiter.answer(timeout=10)[2] == "YES"
            took = time.monotonic() - released
            assert b.call(q("release", "b", "p")).body == "OK"
            return took

        assert across() < 5
        member.stop()
        member.start()  # (auth on: the fixture's readiness probe cannot read; the servers can)
        wait_until(lambda: a.call(q("get", "probe", "q")).body == "YES", 30, "a back")
        wait_until(lambda: b.call(q("get", "probe", "q2")).body == "YES", 30, "b back")
        # b's watch is made again after a backoff of up to 1 s: wait for it, not a guess.
        wait_until(lambda: "works again" in b.log.read_text(), 30, "b's watch back")
        times = [across() for _ in range(4)]
        # A dead watch leaves each hand-off to the poll (0-1 s): all four under
        # 0.3 s then happens about once in 120 runs.
        assert max(times) < 0.3, times
    finally:
        cluster.stop()


def test_a_watch_etcd_refuses_is_not_taken_for_a_working_one(tmp_path, server_factory) -> None:
    # The user may not read its nudge key: etcd answers the watch with "created"
    # and "canceled" at once. The server says so in its log (and tries again), never
    # that the watch works; its own locks are served meanwhile.
    cluster = start_etcd(tmp_path / "etcd-auth")
    try:
        url = cluster.members[0].url
        good = enable_auth(url, granted=("auth/epoch", "auth/pool/", "auth/server/"))
        server: Server = server_factory(config(url, extra=good))
        hand_over(server)
        wait_until(lambda: "permission denied" in server.log.read_text(), 30, "the refusal")
        log = server.log.read_text()
        assert "etcd watch at" in log and "broke" in log, log
        assert "works again" not in log, log
    finally:
        cluster.stop()


def test_tls_with_a_client_certificate(tmp_path, server_factory) -> None:
    # etcd serving https only and asking every client for a certificate of its CA.
    pki = make_pki(tmp_path / "pki")
    sans = ["DNS:localhost", "IP:127.0.0.1"]
    pki.issue("etcd", "localhost", sans, usage="serverAuth,clientAuth")
    cluster = start_etcd(tmp_path / "etcd-tls", tls=pki)
    try:
        url = cluster.members[0].url
        assert url.startswith("https://")
        files = (
            f"etcd_cacert: {pki.ca}\netcd_cert: {pki.cert('web1')}\netcd_key: {pki.key('web1')}\n"
        )
        server: Server = server_factory(config(url, extra=files))
        hand_over(server)
        assert keys_under(cluster, "distributex/pool/")  # the record, written over TLS
        # Without a client certificate, or trusting another CA: refused, in one line.
        for name, extra in (
            ("no-cert", f"etcd_cacert: {pki.ca}\n"),
            ("other-ca", f"etcd_cacert: {pki.path / 'foreign-ca.crt'}\n"),
        ):
            bad = tmp_path / f"{name}.yaml"
            bad.write_text(config(url, extra=extra))
            run = refused_at_start(bad)
            assert run.returncode == 1, (name, run.stderr)
            assert len(run.stderr.strip().splitlines()) == 1, (name, run.stderr)
            assert "etcd: no member answers" in run.stderr, (name, run.stderr)
    finally:
        cluster.stop()


def test_status_of_more_pools_than_an_etcd_transaction_may_read(
    etcd: EtcdCluster, server_factory
) -> None:
    # etcd allows 128 operations per transaction (--max-txn-ops): 150 pools are read
    # in two.
    pools = "".join(f"  - name: s{i}\n" for i in range(150))
    head = f"backend: etcd\netcd_endpoints: {etcd.endpoints}\nkey_prefix: t{uuid.uuid4().hex}/\n"
    server: Server = server_factory(head + "pools:\n" + pools)
    for i in range(0, 150, 7):
        assert server.call(q("get", "h", f"s{i}")).body == "YES"
    answer = server.call("/status")
    assert answer.status == 200, answer.body
    doc = json.loads(answer.body)
    held = {p["name"] for p in doc["pools"] if p["holders"]}
    assert len(doc["pools"]) == 150
    assert held == {f"s{i}" for i in range(0, 150, 7)}


@pytest.mark.parametrize(
    ("text", "endpoints"),
    [
        ("etcd_endpoints: http://10.0.0.1:2379", ("http://10.0.0.1:2379",)),
        (
            "etcd_endpoints: 'a:1, https://b, http://[::1]:7'",
            ("http://a:1", "https://b:2379", "http://[::1]:7"),
        ),
        ("etcd_endpoints:\n  - http://a:1\n  - http://b:2", ("http://a:1", "http://b:2")),
    ],
)
def test_endpoints_in_the_config(tmp_path, text: str, endpoints: tuple[str, ...]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"backend: etcd\n{text}\n")
    assert load_config(path).etcd_endpoints == endpoints


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("etcd_endpoints: ftp://a:1", "not an http(s)://host:port URL"),
        ("etcd_endpoints: http://a:1/v3", "not an http(s)://host:port URL"),
        ("etcd_endpoints: http://a:99999", "not an http(s)://host:port URL"),
        ("etcd_endpoints: []", "names no endpoint"),
        ("etcd_user: u", "etcd_user and etcd_password go together"),
        ("etcd_cert: /c.pem", "etcd_cert and etcd_key go together"),
        ("etcd_cacert: /ca.pem", "needs https://"),
    ],
)
def test_bad_etcd_config_is_one_line(tmp_path, text: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"backend: etcd\n{text}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value)
    assert "\n" not in str(err.value)
