"""When a command running under a lease is stopped: the grace it gets between
SIGTERM and SIGKILL, and the margin kept before the lease can end at the server.

Pure arithmetic on the lease's clock; :mod:`distributex.client.supervisor`
acts on it and feeds the watchdog's deadlines from it.
"""

from __future__ import annotations

import math

from distributex.client.core import Lease

# A healthy client stops the command itself: the watchdog's SIGTERM comes this much later.
WATCHDOG_SLACK = 0.25


def kill_margin(ttl: float) -> float:
    """Seconds kept between the SIGKILL and the earliest possible lease expiry."""
    return min(1.0, ttl / 10)


def min_ttl_for_grace(grace: float) -> float:
    """The shortest TTL that leaves renewal room with this grace (grace + margin <= ttl/2)."""
    return 2 * grace + 2 if grace >= 4 else 2.5 * grace


def effective_grace(grace: float, ttl: float | None) -> float:
    """``grace``, shortened if the granted TTL is too short for it (pool expire < --ttl)."""
    if not ttl:
        return grace
    return max(0.0, min(grace, ttl / 2 - kill_margin(ttl)))


def kill_deadline(now: float, grace: float, lease: Lease | None) -> float:
    """When to SIGKILL after a SIGTERM now: after ``grace``, and before the lease can end."""
    at = now + grace
    if lease is not None and lease.ttl:
        at = min(at, lease.confirmed_until - kill_margin(lease.ttl))
    return at


def watchdog_deadlines(lease: Lease | None, grace: float) -> tuple[float, float]:
    """When the watchdog stops the command if we have not: (SIGTERM, SIGKILL)."""
    if lease is None or not lease.ttl or not lease.token:
        return math.inf, math.inf
    margin = kill_margin(lease.ttl)
    kill_at = lease.confirmed_until - margin
    return min(kill_at, kill_at - grace + WATCHDOG_SLACK), kill_at
