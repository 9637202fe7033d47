"""Who holds each pool, since when, until when, and who waits: the ``/status`` document.

Every backend answers :meth:`~distributex.backends.base.LockBackend.status`
with a :class:`PoolStatus` per pool asked for; the HTTP layer turns them into
JSON (schema in ``docs/operations.md``)::

    {"time": 1795735903.92, "backend": "sqlite",
     "pools": [{"name": "backup", "maxlocks": 1, "expire": 300, "servers": null,
                "max_shared": null, "lock_delay": 0,
                "configured": true, "draining": false, "blocked_until": null,
                "holders": [{"host": "web1", "mode": "exclusive", "fence": 17, "leases": 1,
                             "granted_at": 1795735890.1, "expires_at": 1795736190.1,
                             "ttl_left": 286.2}],
                "waiters": [{"host": "web2", "mode": "shared", "since": 1795735899.0,
                             "waited": 4.9, "requests": 1}],
                "lock_delays": []}]}

``lock_delays`` lists the slots kept taken after an expiry (``mode``, ``until``).

Times are seconds since the epoch (the server's wall clock); ``expires_at``
and ``ttl_left`` are null for a lease that never expires. Holders are in
grant order (fence), waiters in the order they will be served.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from distributex.engine import EXCLUSIVE, NEVER, SHARED, LockEngine, PoolSpec


@dataclass
class HolderStatus:
    host: str
    fence: int
    leases: int
    granted_at: float
    expires_at: float | None  # None: never
    mode: str = EXCLUSIVE


@dataclass
class WaiterStatus:
    host: str
    since: float
    requests: int = 1  # parked /wait/ requests of this host (they share one place)
    mode: str = SHARED  # exclusive if any of its requests is


@dataclass
class PoolStatus:
    name: str
    maxlocks: int
    expire: float
    servers: list[str] | None
    holders: list[HolderStatus] = field(default_factory=list)
    waiters: list[WaiterStatus] = field(default_factory=list)
    blocked_until: float | None = None  # no new grants before (store lost, start_delay)
    configured: bool = True
    draining: bool = False
    # Waits beyond those listed (a long queue on a shared store lists its head).
    more_waiting: int = 0
    max_shared: int | None = None
    lock_delay: float = 0.0
    lock_delays: list[tuple[float, str]] = field(default_factory=list)  # (until, mode)

    def to_json(self, now: float) -> dict[str, Any]:
        """The pool as the ``/status`` document shows it, times judged at ``now``."""

        def number(x: float) -> float | int:
            return int(x) if float(x).is_integer() else round(x, 3)

        return {
            "name": self.name,
            "maxlocks": self.maxlocks,
            "expire": number(self.expire),
            "servers": self.servers,
            "max_shared": self.max_shared,
            "lock_delay": number(self.lock_delay),
            "configured": self.configured,
            "draining": self.draining,
            "blocked_until": None if self.blocked_until is None else round(self.blocked_until, 3),
            "holders": [
                {
                    "host": h.host,
                    "mode": h.mode,
                    "fence": h.fence,
                    "leases": h.leases,
                    "granted_at": round(h.granted_at, 3),
                    "expires_at": None if h.expires_at is None else round(h.expires_at, 3),
                    "ttl_left": None
                    if h.expires_at is None
                    else round(max(0.0, h.expires_at - now), 3),
                }
                for h in self.holders
            ],
            "waiters": [
                {
                    "host": w.host,
                    "mode": w.mode,
                    "since": round(w.since, 3),
                    "waited": round(max(0.0, now - w.since), 3),
                    "requests": w.requests,
                }
                for w in self.waiters
            ],
            "more_waiting": self.more_waiting,
            "waiting": self.waiting,
            "lock_delays": [
                {"mode": mode, "until": round(until, 3)}
                for until, mode in self.lock_delays
                if until > now
            ],
        }

    @property
    def waiting(self) -> int:
        """Every parked wait of the pool: those listed and those beyond."""
        return sum(w.requests for w in self.waiters) + self.more_waiting


def pool_status(
    engine: LockEngine,
    spec: PoolSpec,
    to_wall: Callable[[float], float] = lambda t: t,
    now: float = -math.inf,
) -> PoolStatus:
    """A pool's status read from an engine; ``to_wall`` turns engine times into epoch seconds.

    Holds whose every lease ran out by ``now`` (engine time) are left out:
    the expiry due is only a moment away.
    """
    status = PoolStatus(
        name=spec.name,
        maxlocks=spec.maxlocks,
        expire=spec.expire,
        servers=sorted(spec.servers) if spec.servers is not None else None,
        max_shared=spec.max_shared,
        lock_delay=spec.lock_delay,
    )
    state = engine.state(spec.name)
    if state is None:
        return status
    for hold in state.holds:
        if not hold.leases:
            continue
        expires = hold.expires_at
        if expires <= now:
            continue
        status.holders.append(
            HolderStatus(
                host=hold.owner,
                fence=hold.fence,
                leases=len(hold.leases),
                granted_at=to_wall(hold.granted_at),
                expires_at=None if expires == NEVER else to_wall(expires),
                mode=hold.mode,
            )
        )
    by_host: dict[str, WaiterStatus] = {}
    for waiter in state.queue:  # grouped by host already, in queue order
        seen = by_host.get(waiter.owner)
        if seen is None:
            by_host[waiter.owner] = WaiterStatus(
                waiter.owner, to_wall(waiter.since), mode=waiter.mode
            )
        else:
            if waiter.mode != SHARED:
                seen.mode = EXCLUSIVE
            seen.requests += 1
            seen.since = min(seen.since, to_wall(waiter.since))
    status.waiters = list(by_host.values())
    if state.blocked_until != -math.inf:
        status.blocked_until = to_wall(state.blocked_until)
    status.lock_delays = [(to_wall(until), mode) for until, mode in state.delays]
    return status
