"""The client's rules in time, without I/O: asking for a lock again, renewing a lease,
and when a lease counts as lost. Every decision takes ``now`` (the lease clock,
:func:`distributex.client.core.clock`, read by the driver), so tests drive them
with any clock they like.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from distributex.client.core import (
    Lease,
    Request,
    Sent,
    check_answer,
    check_durations,
    fmt_seconds,
    grant_fields,
    held_as,
)
from distributex.client.errors import (
    ConnectionLost,
    LockLost,
    LockRefused,
    LockTimeout,
    ServerUnavailable,
)

# A lease with no expiry cannot be lost by silence, only by a GONE answer
# (released by someone else, server restarted); check for that this often.
NO_EXPIRY_CHECK = 30.0
# After a /wait/ that took longer than this share of the TTL, renew at once:
# the grant time is only known to lie between the request and the answer.
PIN_AFTER_WAIT = 0.1
# A renewal loop sleeps at most this long at a time: sleeps stand still while
# the machine is suspended, and the lease clock does not.
KEEPER_TICK = 0.5
# A /wait/ answered NO with less than this left of its timeout has timed out.
MIN_REWAIT = 0.05
# A /wait/ whose server went away is asked again for at most this long (see Requeue).
REQUEUE_FOR = 60.0
# Pause between re-asked untimed /wait/s answered NO (doubling up to the maximum).
REWAIT_PAUSE = 0.1
REWAIT_PAUSE_MAX = 2.0
# The shortest time a renewal request is given.
MIN_RENEW_BUDGET = 0.05


class Requeue:
    """When a ``/wait/`` whose server went away is asked again, and for how long.

    A wait whose connection broke after it reached the server (the server
    crashed or restarted: its queue is gone, a server with durable state
    keeps only the leases) is sent again, and connection failures after
    that are retried, with a pause doubling up to 2 s, for at most
    :data:`REQUEUE_FOR` seconds of trying and never past the wait's deadline.
    A server that cannot be reached at all on the first try is an error at
    once.
    """

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline
        self.since: float | None = None
        self.pause = REWAIT_PAUSE

    def again(self, exc: ServerUnavailable, now: float) -> bool:
        if self.since is None:
            if not isinstance(exc, ConnectionLost):
                return False
            self.since, self.pause = now, REWAIT_PAUSE
        else:
            self.pause = min(REWAIT_PAUSE_MAX, self.pause * 2)
        if now - self.since > REQUEUE_FOR:
            return False
        return self.deadline is None or now + self.pause < self.deadline

    def answered(self) -> None:
        self.since = None

    def timed_out(self, now: float) -> bool:
        """Retrying, and the wait's deadline comes before the next try could."""
        if self.since is None or self.deadline is None:
            return False
        return now + self.pause >= self.deadline


@dataclass(frozen=True)
class Again:
    """Ask again after ``pause`` seconds; ``note`` says why (for the log)."""

    pause: float
    note: str


class Acquisition:
    """One :meth:`acquire`: the requests to send, and what each answer means.

    ``wait=False``: one ``/get/``. Otherwise ``/wait/`` in the server's FIFO
    queue for at most ``timeout`` seconds (None: as long as it takes); a
    ``/wait/`` answered ``NO`` before that (the server could not hand a grant
    over) is asked again for the time that is left (untimed: after a pause
    that doubles up to 2 s, never a hot loop); a server gone mid-wait is
    asked again as :class:`Requeue` says.
    """

    def __init__(
        self,
        pool: str,
        host: str | None,
        timeout: float | None,
        ttl: float | None,
        wait: bool,
        call_timeout: float,
        now: float,
        shared: bool = False,
    ) -> None:
        check_durations(timeout, ttl)
        self.pool, self.host, self.timeout, self.wait = pool, host, timeout, wait
        self.call_timeout = call_timeout
        self.params: dict[str, str | None] = {"host": host, "pool": pool, "ttl": fmt_seconds(ttl)}
        if shared:  # only then: a default request is the one 0.7 sent
            self.params["mode"] = "shared"
        self.deadline = None if timeout is None else now + timeout
        self.requeue = Requeue(self.deadline)
        self.pause = REWAIT_PAUSE
        self.sent = now

    def request(self, now: float) -> Request:
        """The next request, sent at ``now``."""
        self.sent = now
        if not self.wait:
            return Request("get", dict(self.params), self.call_timeout, self.call_timeout)
        left = None if self.deadline is None else max(0.0, self.deadline - now)
        self.params["timeout"] = fmt_seconds(left)
        read = None if left is None else left + self.call_timeout
        return Request("wait", dict(self.params), read, self.call_timeout)

    def _timed_out(self) -> LockTimeout:
        return LockTimeout(f"pool '{self.pool}' not obtained within {self.timeout:g}s")

    def unreachable(self, exc: ServerUnavailable, now: float) -> Again:
        """The request failed on the way: ask again (:class:`Again`), or raise."""
        if not self.wait or not self.requeue.again(exc, now):
            if self.requeue.timed_out(now):
                raise self._timed_out() from exc
            raise exc
        return Again(self.requeue.pause, f"{exc}; queueing again in {self.requeue.pause:.1f}s")

    def answered(
        self, status: int, body: str, headers: Mapping[str, str], sent: Sent | None, now: float
    ) -> Again | None:
        """None: granted (YES). :class:`Again`: ask again. Else the error is raised."""
        self.requeue.answered()
        verb = "wait" if self.wait else "get"
        word = check_answer(verb, status, body, headers, sent)
        if word == "YES":
            return None
        if word != "NO":
            raise ServerUnavailable(f"unexpected answer to /{verb}/: {word!r}")
        if not self.wait:
            raise LockTimeout(f"pool '{self.pool}' is busy")
        if self.deadline is not None and self.deadline - now < MIN_REWAIT:
            raise self._timed_out()
        note = f"/wait/ for pool '{self.pool}' answered NO early; asking again"
        if self.deadline is not None:
            return Again(0.0, note)
        pause, self.pause = self.pause, min(REWAIT_PAUSE_MAX, self.pause * 2)
        return Again(pause, note)

    def lease(self, headers: Mapping[str, str], make: type[Lease] = Lease) -> Lease:
        """The lease a YES granted; :class:`ServerUnavailable` if its headers are
        malformed (then :meth:`unusable` is what to give back)."""
        fence, token, ttl = grant_fields(headers)
        lease = make(self.pool, held_as(headers, self.host), fence, token, ttl, self.sent)
        # A server that knows no modes (0.7) ignored mode=shared: the lock is exclusive.
        lease.mode = "shared" if headers.get("x-distributex-mode") == "shared" else "exclusive"
        return lease

    def unusable(self, headers: Mapping[str, str], make: type[Lease] = Lease) -> Lease | None:
        """A YES we cannot use (bad lease headers): exactly what was granted, to release."""
        token = headers.get("x-distributex-lease")
        if not token:
            return None
        return make(self.pool, held_as(headers, self.host), None, token, None, self.sent)

    @staticmethod
    def needs_pin(lease: Lease, now: float) -> bool:
        """Renew right after a long wait, so :attr:`Lease.confirmed_until` is tight."""
        return bool(
            lease.token and lease.ttl and now - lease.renewed_at > PIN_AFTER_WAIT * lease.ttl
        )


def margin(lease: Lease, lost_margin: float | None) -> float:
    """How long before the lease's earliest expiry silence counts as loss (default
    ``min(1, ttl/10)``; a caller that must stop work first passes what it needs)."""
    if lost_margin is not None:
        return lost_margin
    return min(1.0, (lease.ttl or 0) / 10)


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Renew:
    budget: float  # the whole renewal request's time


@dataclass(frozen=True)
class Lost:
    reason: str


class Renewal:
    """The renewal schedule of one lease, and what counts as losing it.

    A renewal is due ``ttl/3`` after the last confirmed one; a failed one
    (server unreachable, 503, timeout) is retried every ``min(1, ttl/10)``
    seconds. The lease is lost when the server answers GONE or refuses the
    renewal, or when no renewal was confirmed until :func:`margin` seconds
    before :attr:`Lease.confirmed_until`. A lease without TTL (0, or a 0.7
    server) cannot run out: it is checked every :data:`NO_EXPIRY_CHECK`
    seconds for a GONE answer, and silence never loses it.
    """

    def __init__(self, lease: Lease, lost_margin: float | None = None) -> None:
        self.lease = lease
        self.lost_margin = lost_margin
        self.retry_at: float | None = None
        self.last_error: BaseException | None = None

    def lost_at(self) -> float:
        """The lease-clock time from which silence is loss (inf: never)."""
        if not self.lease.ttl:
            return math.inf
        return self.lease.confirmed_until - margin(self.lease, self.lost_margin)

    def expired(self, now: float) -> Lost | None:
        """Lost by silence at ``now`` (a suspend, a stalled client), else None."""
        if now >= self.lost_at():
            return Lost(self.silence(now))
        return None

    def step(self, now: float, call_timeout: float) -> Sleep | Renew | Lost:
        """What to do at ``now``: sleep (at most :data:`KEEPER_TICK`), renew, or give up."""
        ttl = self.lease.ttl
        due = self.lease.renewed_at + (ttl / 3 if ttl else NO_EXPIRY_CHECK)
        if self.retry_at is not None:
            due = self.retry_at
        lost_at = self.lost_at()
        if now >= lost_at:
            return Lost(self.silence(now))
        if now < due:
            return Sleep(min(due - now, lost_at - now, KEEPER_TICK))
        return Renew(max(MIN_RENEW_BUDGET, min(call_timeout, lost_at - now)))

    def renewed(self) -> None:
        self.retry_at, self.last_error = None, None

    def failed(self, exc: ServerUnavailable, now: float) -> None:
        """A renewal that did not get through: retry soon."""
        ttl = self.lease.ttl
        self.last_error = exc
        self.retry_at = now + (min(1.0, ttl / 10) if ttl else NO_EXPIRY_CHECK)

    def refused(self, exc: LockLost | LockRefused) -> Lost:
        """The server's word that the lease is over (GONE, or the renewal refused)."""
        if isinstance(exc, LockRefused):
            return Lost(f"renewal refused: {exc.reason}")
        return Lost(str(exc))

    def silence(self, now: float) -> str:
        """The one wording of a lease lost because no renewal got through in time."""
        if self.last_error is not None:
            why = f"server unreachable: {self.last_error}"
        else:
            why = "no answer in time, or this client was not running"
        return (
            f"no renewal confirmed for {now - self.lease.renewed_at:.1f}s of a "
            f"{self.lease.ttl or 0:g}s lease ({why})"
        )
