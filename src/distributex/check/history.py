"""A history checker for every backend: clients record what they saw; the rules are proven.

Clients (threads) do random gets, waits, holds, renewals, releases, give-ups
and hang-ups against any of the servers they are given, and record each lease
*as the client saw it*: the moment its YES arrived, its fence and TTL, the
moments renewals were sent and confirmed, and the moment it was released (or
abandoned). From the client's view a lease is valid from its YES until the
earlier of its release and (last confirmed send + TTL): an interval inside
the server's own, whatever the server did. So, from the history alone:

* **safety**: at no instant are more than ``maxlocks`` such intervals open
  in a pool (a violation is a real double grant, not a race in the check);
* **fencing**: intervals that follow each other in a mutex carry strictly
  increasing fences, and no fence is shared by two owners;
* **liveness**: no wait with a long timeout was answered NO (nobody starved
  in the FIFO queue) and each client was granted something;
* **durability** (for backends that keep state through the faults): no
  renewal was answered GONE before the lease could have run out, and no
  lease released with an OK answer could be renewed again.

Faults (a server killed and restarted, the store stopped and started) are the
caller's: requests that fail are recorded as failed and prove nothing either
way; a lease whose answer was lost is simply not in the history.
"""

from __future__ import annotations

import http.client
import itertools
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlencode


@dataclass
class LeaseRecord:
    client: str
    pool: str
    fence: int
    token: str
    ttl: float
    sent: float  # the grant request was sent (the server's TTL starts no earlier)
    got: float  # the YES arrived
    confirmed: float  # send time of the latest confirmed renewal (or the grant)
    end: float | None = None  # release sent, or when the client stopped trusting it

    def valid_until(self) -> float:
        limit = self.confirmed + self.ttl if self.ttl else float("inf")
        return min(limit, self.end if self.end is not None else limit)


@dataclass
class History:
    leases: list[LeaseRecord] = field(default_factory=list)
    long_waits_refused: list[tuple[str, str, float]] = field(default_factory=list)
    gone_while_valid: list[tuple[str, str, int]] = field(default_factory=list)
    released_came_back: list[tuple[str, str]] = field(default_factory=list)
    errors: int = 0
    calls: int = 0
    unavailable: int = 0  # answers 503 (the store could not answer)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, record: LeaseRecord) -> None:
        with self.lock:
            self.leases.append(record)


def call(
    address: tuple[str, int], verb: str, params: dict, timeout: float
) -> tuple[int, str, dict]:
    conn = http.client.HTTPConnection(*address, timeout=timeout)
    try:
        conn.request("GET", f"/{verb}/?{urlencode(params)}")
        resp = conn.getresponse()
        return resp.status, resp.read().decode(), {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def hang_up_wait(address: tuple[str, int], pool: str, owner: str, rng: random.Random) -> None:
    """A waiter that gives up by closing its connection (short ttl, in case it was granted)."""
    with socket.create_connection(address, timeout=5) as sock:
        path = f"/wait/?{urlencode({'host': owner, 'pool': pool, 'ttl': 0.5})}"
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: h\r\n\r\n".encode())
        time.sleep(rng.uniform(0, 0.03))


class Client(threading.Thread):
    def __init__(
        self,
        name: str,
        servers: Callable[[], list[tuple[str, int]]],
        pools: list[str],
        history: History,
        seed: int,
        stop_at: float,
        long_wait: float,
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.servers = servers
        self.pools = pools
        self.history = history
        self.rng = random.Random(seed)
        self.stop_at = stop_at
        self.long_wait = long_wait
        self.failure: BaseException | None = None
        self.released: list[tuple[str, str]] = []  # (pool, token) released with OK

    def server(self) -> tuple[str, int]:
        return self.rng.choice(self.servers())

    def request(self, verb: str, params: dict, timeout: float = 10) -> tuple[int, str, dict] | None:
        self.history.calls += 1
        try:
            answer = call(self.server(), verb, params, timeout)
            if answer[0] == 503:
                self.history.unavailable += 1
            return answer
        except (OSError, http.client.HTTPException):
            self.history.errors += 1
            return None

    def run(self) -> None:
        try:
            while time.monotonic() < self.stop_at:
                self.once()
        except BaseException as exc:  # reported by the caller
            self.failure = exc

    def once(self) -> None:
        rng = self.rng
        if self.released and rng.random() < 0.1:
            # A lease released with OK must stay released (also across restarts).
            pool, token = self.released.pop(rng.randrange(len(self.released)))
            answer = self.request("renew", {"host": self.name, "pool": pool, "lease": token})
            if answer is not None and answer[1] == "OK":
                with self.history.lock:
                    self.history.released_came_back.append((pool, token))
            return
        pool = rng.choice(self.pools)
        roll = rng.random()
        if roll < 0.1:
            try:
                hang_up_wait(self.server(), pool, f"{self.name}-ghost", rng)
            except OSError:
                self.history.errors += 1
            return
        params = {"host": self.name, "pool": pool, "ttl": rng.choice([1, 2])}
        sent = time.monotonic()
        if roll < 0.35:
            answer = self.request("get", params)
        else:
            timeout = self.long_wait if roll < 0.8 else rng.uniform(0.05, 0.5)
            params["timeout"] = timeout
            answer = self.request("wait", params, timeout + 15)
            if answer is not None and answer[1] == "NO" and timeout >= self.long_wait:
                with self.history.lock:
                    self.history.long_waits_refused.append((self.name, pool, timeout))
        if answer is None or answer[1] != "YES":
            return
        got = time.monotonic()
        status, _body, headers = answer
        assert status == 200
        record = LeaseRecord(
            self.name,
            pool,
            int(headers["x-distributex-fence"]),
            headers["x-distributex-lease"],
            float(headers["x-distributex-ttl"]),
            sent,
            got,
            sent,
        )
        self.history.add(record)
        self.hold(record)

    def hold(self, record: LeaseRecord) -> None:
        rng = self.rng
        style = rng.random()
        if style < 0.05:
            # Stop renewing and walk away: a crashed or paused client. The slot
            # must not go to anyone before the lease has run out.
            record.end = record.confirmed + record.ttl
            return
        until = time.monotonic() + rng.uniform(0, 0.03 if style < 0.9 else record.ttl * 1.5)
        while time.monotonic() < until:
            time.sleep(min(record.ttl / 3, max(0.0, until - time.monotonic())))
            if time.monotonic() >= record.valid_until() - 0.05:
                record.end = record.valid_until()  # lost: stop trusting it
                return
            params = {"host": self.name, "pool": record.pool, "lease": record.token}
            sent = time.monotonic()
            answer = self.request("renew", params)
            if answer is not None and answer[1] == "OK":
                record.confirmed = sent
            elif answer is not None and answer[0] == 410:
                if time.monotonic() < record.valid_until() - 0.01:
                    # The server said GONE before the lease could have run out.
                    with self.history.lock:
                        self.history.gone_while_valid.append((self.name, record.pool, record.fence))
                record.end = min(sent, record.valid_until())  # gone: known at this moment
                return
        record.end = min(time.monotonic(), record.valid_until())
        params = {"host": self.name, "pool": record.pool, "lease": record.token}
        answer = self.request("release", params)
        if answer is not None and answer[1] == "OK" and len(self.released) < 20:
            self.released.append((record.pool, record.token))


def run(
    servers: Callable[[], list[tuple[str, int]]],
    pools: list[str],
    clients: int,
    seconds: float,
    seed: int,
    long_wait: float | None = None,
) -> History:
    """Run ``clients`` random clients for ``seconds``; their history.

    ``long_wait`` (default: what FIFO guarantees) is the timeout of the
    waits that must not be answered NO: every other client may be ahead in
    the queue, each holding at most 1.5 TTLs (2 s) plus a renewal's time.
    """
    if long_wait is None:
        long_wait = clients * 4.0 + 5.0
    history = History()
    stop_at = time.monotonic() + seconds
    threads = [
        Client(f"c{i}", servers, pools, history, seed * 1000 + i, stop_at, long_wait)
        for i in range(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + long_wait + 60)
        assert not thread.is_alive(), f"{thread.name} is stuck"
        if thread.failure is not None:
            raise thread.failure
    return history


def check(history: History, maxlocks: dict[str, int], clients: int, durable: bool = True) -> None:
    """Prove the rules from the history alone (see the module doc).

    ``durable``: the lock state was kept through whatever happened (not a
    store that lost its memory), so no lease may vanish before its time.
    """
    assert not history.released_came_back, f"released, then renewed: {history.released_came_back}"
    if durable:
        assert not history.gone_while_valid, f"lost while valid: {history.gone_while_valid[:3]}"
    for pool, limit in maxlocks.items():
        leases = [r for r in history.leases if r.pool == pool]
        events = sorted(
            [(r.got, 1, r) for r in leases] + [(r.valid_until(), -1, r) for r in leases],
            key=lambda e: (e[0], e[1]),  # an end at the same instant comes first
        )
        # Leases of one client may overlap (asking again while holding is one hold).
        open_: dict[str, int] = {}
        for _when, step, record in events:
            open_[record.client] = open_.get(record.client, 0) + step
            holders = sum(1 for n in open_.values() if n > 0)
            assert holders <= limit, f"pool {pool}: {holders} holders > {limit}"
        owners: dict[int, str] = {}
        for record in leases:
            assert owners.setdefault(record.fence, record.client) == record.client, (
                f"pool {pool}: fence {record.fence} given to two owners"
            )
        if limit == 1:
            ordered = sorted(leases, key=lambda r: r.got)
            for before, after in itertools.pairwise(ordered):
                if before.client != after.client:
                    assert before.fence < after.fence, f"pool {pool}: fence went back"
    assert not history.long_waits_refused, f"starved: {history.long_waits_refused[:3]}"
    granted = {r.client for r in history.leases}
    assert len(granted) == clients, (
        f"never granted: {sorted(set(f'c{i}' for i in range(clients)) - granted)}"
    )
