"""Clock skew between servers that judge leases by their own wall clocks.

On memcached and etcd every server expires leases by its own clock: a server
whose clock runs ahead ends other servers' leases early and grants their
slots while the holders still run. (Redis lends its clock, ``TIME``, to every
server; the servers on one SQLite file share their host's clock.) So each
server compares its clock with the others it can see, and refuses to step
any pool while it is the one that is off: a ``503`` and a log line rather
than a wrong grant.

Readings are intervals: what can be known of another clock from one round
trip. The store's own clock (memcached's ``stats`` time, whole seconds) is
the authority where there is one; otherwise the servers' heartbeats carry
their clocks, and a server refuses when at least as many clocks (itself
counted as agreeing) say it is off as say it is not. With two servers that
disagree, both refuse: nobody can tell which one is right.

No I/O here: the layer takes the readings and asks :func:`clock_problem`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Beyond this many seconds between two servers' clocks, leases are not safe
# (the client's renewal and kill margins absorb less). Readings are only as
# precise as a second (memcached) or a heartbeat's age, so smaller offsets
# go unseen: keep clocks in sync with NTP.
MAX_CLOCK_SKEW = 2.0


@dataclass(frozen=True)
class ClockReading:
    """Another clock against ours: it reads between ``low`` and ``high`` seconds more."""

    source: str
    low: float
    high: float
    authority: bool = False  # the store's own clock

    def off(self, tolerance: float) -> bool:
        """Certainly more than ``tolerance`` seconds apart."""
        return self.low > tolerance or self.high < -tolerance

    def offset(self) -> float:
        """The offset to quote: the nearer end of the interval to zero."""
        if self.low > 0:
            return self.low
        return self.high if self.high < 0 else 0.0


def store_reading(
    source: str, store_time: float, resolution: float, before: float, after: float
) -> ClockReading:
    """The store's clock read between our ``before`` and ``after``; it shows
    ``store_time`` truncated to ``resolution``."""
    return ClockReading(source, store_time - after, store_time + resolution - before, True)


def beat_reading(
    source: str, beat_time: float, max_age: float, before: float, after: float
) -> ClockReading:
    """A heartbeat written at the peer's ``beat_time``, at most ``max_age`` seconds
    before we read it (between ``before`` and ``after``)."""
    return ClockReading(source, beat_time - after, beat_time - before + max_age)


def clock_problem(
    readings: Sequence[ClockReading], tolerance: float = MAX_CLOCK_SKEW
) -> str | None:
    """Why this server must not step pools now (its clock is off), or None."""
    for reading in readings:
        if reading.authority and reading.off(tolerance):
            return (
                f"this server's clock is {-reading.offset():+.1f} s off {reading.source}'s "
                f"(more than {tolerance:.0f} s): no grants until clocks agree (NTP)"
            )
    peers = [r for r in readings if not r.authority]
    off = [r for r in peers if r.off(tolerance)]
    if off and len(off) >= 1 + len(peers) - len(off):
        worst = max(off, key=lambda r: abs(r.offset()))
        return (
            f"this server's clock disagrees with {len(off)} of {len(peers)} other servers' "
            f"(by {-worst.offset():+.1f} s against {worst.source}; more than {tolerance:.0f} s): "
            "no grants until clocks agree (NTP)"
        )
    return None
