"""What random clients saw of a lock service: leases as each client saw them, and its failures.

Clients do random gets, waits, holds, renewals, releases, give-ups and
hang-ups (see :mod:`distributex.check.clients`) and record each lease *as the
client saw it*: the moment its YES arrived, its fence and TTL, the moments
renewals were sent and confirmed, and the moment it was released (or
abandoned). From the client's view a lease is valid from its YES until the
earlier of its release and (last confirmed send + TTL): an interval inside
the server's own, whatever the server did. The rules are then proven from
the history alone by :mod:`distributex.check.rules`.

A call that got no answer (an error, a timeout, a server or store restarted
under it) is *uncertain*: it may or may not have acted. It is counted, with
its time, and never recorded as a lease; every way it can have acted only
shortens what the client believes it holds (a lost YES is a slot the client
never uses, a lost renewal is not a confirmation, a release counts from the
moment it is sent), so an uncertain call can hide a violation but never
make one up.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field


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
    mode: str = "exclusive"  # as the answer said (X-Distributex-Mode when a mode was asked)

    def valid_until(self) -> float:
        limit = self.confirmed + self.ttl if self.ttl else float("inf")
        return min(limit, self.end if self.end is not None else limit)

    def describe(self, origin: float = 0.0) -> str:
        """``c3 fence 17 (1.204s-2.911s)``: who held it, its fence, when (from ``origin``)."""
        until = self.valid_until()
        end = "open" if until == float("inf") else f"{until - origin:.3f}s"
        kind = " shared" if self.mode == "shared" else ""
        return f"{self.client}{kind} fence {self.fence} ({self.got - origin:.3f}s-{end})"


@dataclass(frozen=True)
class Refusal:
    """A wait long enough for FIFO to serve it, answered NO."""

    client: str
    pool: str
    timeout: float
    sent: float
    answered: float


@dataclass
class History:
    leases: list[LeaseRecord] = field(default_factory=list)
    long_waits_refused: list[Refusal] = field(default_factory=list)
    gone_while_valid: list[tuple[str, str, int]] = field(default_factory=list)
    released_came_back: list[tuple[str, str]] = field(default_factory=list)
    errors: int = 0  # calls that got no answer (uncertain)
    calls: int = 0
    unavailable: int = 0  # answers 503 (the store could not answer)
    faults: list[tuple[float, str]] = field(default_factory=list)  # (when, client) of failures
    operations: Counter[str] = field(default_factory=Counter)  # calls per verb / kind
    refused: Counter[str] = field(default_factory=Counter)  # 4xx answers, by reason
    started: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, record: LeaseRecord) -> None:
        with self.lock:
            self.leases.append(record)

    def called(self, kind: str) -> None:
        with self.lock:
            self.calls += 1
            self.operations[kind] += 1

    def failed(self, client: str, unavailable: bool = False) -> None:
        """A call that got no answer, or a 503: uncertain, counted, never a violation."""
        with self.lock:
            if unavailable:
                self.unavailable += 1
            else:
                self.errors += 1
            self.faults.append((time.monotonic(), client))

    def refusal(self, reason: str) -> None:
        with self.lock:
            self.refused[reason] += 1
