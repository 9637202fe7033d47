"""Random clients of a lock service: gets, waits, holds, renewals, releases, give-ups and
hang-ups, each recorded in a :class:`~distributex.check.history.History` as the client saw it.

Each client is a thread with a seeded random generator; it asks any of the
servers it is given (the list may change while they run: a server replaced)
and acts as its own host, or, with a bearer token, as the identity the token
proves (one token per client: one identity is one holder). Calls that fail
are counted as uncertain (see :mod:`distributex.check.history`).
"""

from __future__ import annotations

import http.client
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from distributex.check.history import History, LeaseRecord, Refusal
from distributex.check.wire import Answer, Endpoint, call, hang_up_wait

Servers = Callable[[], Sequence[Endpoint | tuple[str, int]]]


@dataclass(frozen=True)
class Identity:
    """Who a client is: ``name`` in the history, the ``host`` it sends (None: the one its
    ``token`` proves), its bearer token (None: no authentication)."""

    name: str
    host: str | None
    token: str | None = None


class Client(threading.Thread):
    def __init__(
        self,
        who: Identity,
        servers: Servers,
        pools: list[str],
        history: History,
        seed: int,
        finished: Callable[[], bool],
        long_wait: float,
        shared: float = 0.0,
    ) -> None:
        super().__init__(name=who.name, daemon=True)
        self.shared = shared  # the share of grant requests that ask mode=shared
        self.who = who
        self.servers = servers
        self.pools = pools
        self.history = history
        self.rng = random.Random(seed)
        self.finished = finished
        self.long_wait = long_wait
        self.failure: BaseException | None = None
        self.released: list[tuple[str, str]] = []  # (pool, token) released with OK

    def server(self) -> Endpoint | tuple[str, int]:
        return self.rng.choice(list(self.servers()))

    def params(self, pool: str, **more: object) -> dict:
        mine = {"host": self.who.host} if self.who.host is not None else {}
        return {**mine, "pool": pool, **more}

    def request(self, verb: str, params: dict, timeout: float = 10) -> Answer | None:
        self.history.called(verb)
        try:
            answer = call(self.server(), verb, params, timeout, self.who.token)
        except (OSError, http.client.HTTPException):
            self.history.failed(self.name)
            return None
        if answer[0] == 503:
            self.history.failed(self.name, unavailable=True)
        elif 400 <= answer[0] < 500 and answer[0] != 410:
            reason = answer[2].get("x-distributex-reason", "") or answer[1]
            self.history.refusal(f"{answer[0]} {reason[:200]}")
        return answer

    def run(self) -> None:
        try:
            while not self.finished():
                self.once()
        except BaseException as exc:  # reported by the caller
            self.failure = exc

    def once(self) -> None:
        rng = self.rng
        if self.released and rng.random() < 0.1:
            # A lease released with OK must stay released (also across restarts).
            pool, token = self.released.pop(rng.randrange(len(self.released)))
            answer = self.request("renew", self.params(pool, lease=token))
            if answer is not None and answer[1] == "OK":
                with self.history.lock:
                    self.history.released_came_back.append((pool, token))
            return
        pool = rng.choice(self.pools)
        roll = rng.random()
        if roll < 0.1:
            if self.who.host is not None:  # a token's identity would hang up on itself
                self.hang_up(pool)
            return
        params = self.params(pool, ttl=rng.choice([1, 2]))
        if self.shared and rng.random() < self.shared:  # no draw without modes: seeds replay
            params["mode"] = "shared"
        sent = time.monotonic()
        if roll < 0.35:
            answer = self.request("get", params)
        else:
            timeout = self.long_wait if roll < 0.8 else rng.uniform(0.05, 0.5)
            params["timeout"] = timeout
            answer = self.request("wait", params, timeout + 15)
            if answer is not None and answer[1] == "NO" and timeout >= self.long_wait:
                refusal = Refusal(self.name, pool, timeout, sent, time.monotonic())
                with self.history.lock:
                    self.history.long_waits_refused.append(refusal)
        if answer is None or answer[1] != "YES" or answer[0] != 200:
            return
        got = time.monotonic()
        headers = answer[2]
        try:
            record = LeaseRecord(
                self.name,
                pool,
                int(headers["x-distributex-fence"]),
                headers["x-distributex-lease"],
                float(headers["x-distributex-ttl"]),
                sent,
                got,
                sent,
                mode=headers.get("x-distributex-mode", "exclusive"),
            )
        except (KeyError, ValueError):
            self.history.failed(self.name)  # a YES without a usable lease: not trusted
            return
        self.history.add(record)
        self.hold(record)

    def hang_up(self, pool: str) -> None:
        """A waiter that gives up by closing its connection (short ttl, in case it was granted)."""
        self.history.called("hang-up")
        params = {"host": f"{self.who.host}-ghost", "pool": pool, "ttl": 0.5}
        try:
            hang_up_wait(self.server(), params, self.rng.uniform(0, 0.03), self.who.token)
        except OSError:
            self.history.failed(self.name)

    def hold(self, record: LeaseRecord) -> None:
        rng = self.rng
        style = rng.random()
        if style < 0.05:
            # Stop renewing and walk away: a crashed or paused client. The slot
            # must not go to anyone before the lease has run out.
            self.history.called("abandon")
            record.end = record.confirmed + record.ttl
            return
        until = time.monotonic() + rng.uniform(0, 0.03 if style < 0.9 else record.ttl * 1.5)
        while time.monotonic() < until:
            time.sleep(min(record.ttl / 3, max(0.0, until - time.monotonic())))
            if time.monotonic() >= record.valid_until() - 0.05:
                record.end = record.valid_until()  # lost: stop trusting it
                return
            params = self.params(record.pool, lease=record.token)
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
        answer = self.request("release", self.params(record.pool, lease=record.token))
        if answer is not None and answer[1] == "OK" and len(self.released) < 20:
            self.released.append((record.pool, record.token))


def fifo_wait(clients: int) -> float:
    """A wait FIFO must serve: every other client may be ahead in the queue, each
    holding at most 1.5 TTLs (2 s) plus a renewal's time."""
    return clients * 4.0 + 5.0


def run(
    servers: Servers,
    pools: list[str],
    clients: int,
    seconds: float,
    seed: int,
    long_wait: float | None = None,
    identities: Sequence[Identity] | None = None,
    shared: float = 0.0,
    min_leases: int = 0,
) -> History:
    """Run ``clients`` random clients for ``seconds``; their history.

    ``min_leases``: go on past ``seconds`` (up to four times as long) until the
    history holds that many leases, so that a busy machine still checks enough.

    ``identities`` (default: hosts ``c0``, ``c1``...) says who each client is.
    ``long_wait`` (default :func:`fifo_wait`) is the timeout of the waits that
    must not be answered NO. ``shared``: the share of grant requests that ask
    ``mode=shared``.
    """
    if long_wait is None:
        long_wait = fifo_wait(clients)
    who = list(identities) if identities is not None else []
    who += [Identity(f"c{i}", f"c{i}") for i in range(len(who), clients)]
    history = History()
    started = time.monotonic()

    def finished() -> bool:
        ran = time.monotonic() - started
        return ran >= seconds and (len(history.leases) >= min_leases or ran >= seconds * 4)

    threads = [
        Client(who[i], servers, pools, history, seed * 1000 + i, finished, long_wait, shared)
        for i in range(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds * 4 + long_wait + 60)
        if thread.is_alive():
            raise RuntimeError(f"client {thread.name} is stuck")
        if thread.failure is not None:
            raise thread.failure
    return history
