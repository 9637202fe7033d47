"""The lock engine: pools of slots, a FIFO queue of waiters, leases, fencing.

The engine is pure: no I/O, no clock and no tasks of its own. Every call that
depends on time takes ``now`` (seconds on any monotonic scale) and the driver
calls :meth:`LockEngine.expire` when :meth:`LockEngine.next_deadline` comes.
Calls that can hand slots on return the waiters that were just granted, so the
driver knows whom to wake. Tests drive the engine directly with a fake clock.

Rules kept here, whoever drives the engine:

* A pool never has more than ``maxlocks`` holders.
* Waiters are served first come, first served, by arrival time (a request
  written into the queue late, after it waited for company, still takes its
  place by when it came); a free slot is never left free while someone waits,
  and :meth:`acquire` never jumps the queue.
* A holder is identified by its *owner* (the legacy ``host``). An owner holds
  at most one slot of a pool: its :class:`Hold`. Every YES is a
  :class:`Lease` of its own (own token, own time-to-live); asking again while
  holding adds a lease to the same hold. The owner keeps the slot while any
  of its leases lives, so one run releasing its lease cannot end the lock of
  another run under the same host name. Several waits by one owner share one
  place in the queue and are all answered when the owner is granted.
* A lease ends ``ttl`` seconds after its grant or latest renewal (``ttl == 0``:
  never), or when released by its token; a legacy release by owner ends the
  whole hold. When a hold's last lease ends, the slot goes to the next waiter.
* A grant to a waiter counts once it is *delivered*. If the request gives up
  first, its lease is undone (and the slot passed on if that was the last).
* Every hold gets a fencing token from one engine-wide counter, so tokens
  strictly increase within each pool and are never reused. The leases of one
  hold share its token.
* Modes: a hold is ``exclusive`` (the default, the 0.7 behaviour) or
  ``shared``. Exclusive holds keep the ``maxlocks`` rule; shared holds
  coexist with each other, up to ``max_shared`` (None: no limit), and never
  with an exclusive hold. The queue is one FIFO across modes: its head is
  granted when its mode fits, and nobody behind it is granted before it, so
  a shared request behind a waiting exclusive one waits (no starvation of
  either kind), and a run of shared requests at the head is granted together.
  An owner's request joins its hold when the hold gives at least what it
  asks (any request joins an exclusive hold, a shared one a shared hold); an
  exclusive request of a shared holder is not an upgrade: ``acquire`` says
  no and ``enqueue`` queues it, to be granted once its shared hold has ended.
  An owner's queued waits share one place; if they ask both modes, the place
  is granted (exclusive) only when there is room for each mode.
* Lock-delay: when a hold ends because its last lease *expired* (never on a
  release or a hang-up), its slot stays taken for the pool's ``lock_delay``
  seconds after the lease's end, by a *delay* of the hold's mode, so that a
  holder that was only slow or cut off can notice before anyone else starts.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterator, KeysView
from dataclasses import dataclass, field

from distributex.tokens import token_urlsafe

NEVER = math.inf

#: The default mode: a slot of the ``maxlocks`` rule, alone with other exclusive holds.
EXCLUSIVE = "exclusive"
#: Shared holds coexist with each other (up to ``max_shared``), never with exclusive ones.
SHARED = "shared"
MODES = (EXCLUSIVE, SHARED)

# More leases than this in one hold means a client re-asks in a loop without
# releasing; the lease closest to its end is then dropped to bound memory.
MAX_LEASES_PER_HOLD = 256


def _new_token() -> str:
    return token_urlsafe(18)


@dataclass(frozen=True)
class PoolSpec:
    """What configuration says about a pool.

    ``expire`` is the lease time in seconds (0: leases never expire).
    ``servers`` is the allow-list of hosts, or None for any host.
    ``max_shared`` bounds the shared holds at once (None: no limit);
    ``lock_delay`` is how long a slot stays taken after its lease expired.
    """

    name: str
    maxlocks: int = 1
    expire: float = 1800.0
    servers: frozenset[str] | None = None
    max_shared: int | None = None
    lock_delay: float = 0.0

    def lease_ttl(self, requested: float | None) -> float:
        """The time-to-live a lease gets when a client asks for ``requested``.

        A client may ask for a shorter lease than the pool's ``expire`` (and
        keep it alive by renewing), never a longer one: ``expire`` is the
        operator's bound on how long a crashed holder can block a pool.
        """
        if requested is None:
            return self.expire
        if self.expire == 0:
            return requested
        return min(requested, self.expire)


@dataclass(eq=False)
class Hold:
    """One owner's occupancy of one slot of a pool, while any of its leases lives."""

    pool: str
    owner: str
    fence: int
    granted_at: float
    leases: dict[str, Lease] = field(default_factory=dict, repr=False)
    mode: str = EXCLUSIVE

    @property
    def expires_at(self) -> float:
        """When the hold ends unless a lease is renewed or released."""
        return max(lease.expires_at for lease in self.leases.values())


@dataclass(eq=False)
class Lease:
    """One YES: a claim on its hold's slot, with its own token and time-to-live."""

    hold: Hold = field(repr=False)
    token: str
    ttl: float
    granted_at: float
    expires_at: float = NEVER
    # A lease granted to a waiting request counts once the answer goes out.
    delivered: bool = False
    # The waiting request it was granted to (None for a /get/), until delivered.
    waiter: Waiter | None = field(default=None, repr=False)

    @property
    def pool(self) -> str:
        return self.hold.pool

    @property
    def owner(self) -> str:
        return self.hold.owner

    @property
    def fence(self) -> int:
        return self.hold.fence

    def remaining(self, now: float) -> float:
        """Seconds until the lease ends (``inf`` if it never does)."""
        return max(0.0, self.expires_at - now)


@dataclass(eq=False)
class Waiter:
    """One request waiting for a slot. ``lease`` is set once it is granted.

    ``id`` names it in stored state; ``server`` is the server it waits on
    (empty for a single server), so that other servers sharing the state can
    tell whose waiters they are.
    """

    pool: str
    owner: str
    ttl: float
    since: float
    lease: Lease | None = None
    id: str = field(default_factory=lambda: token_urlsafe(9))
    server: str = ""
    mode: str = EXCLUSIVE


@dataclass(eq=False)
class _Pool:
    spec: PoolSpec
    holders: dict[str, Hold] = field(default_factory=dict)
    # owner -> that owner's waiting requests; dict order is the FIFO order.
    queue: dict[str, list[Waiter]] = field(default_factory=dict)
    # Grant no new hold before this time (state lost: old leases may be live).
    blocked_until: float = -math.inf
    # Lock-delays: (until, mode) of holds that expired, each still taking its slot.
    delays: list[tuple[float, str]] = field(default_factory=list)
    # How many of ``holders`` are shared (kept, so a grant costs no count of the holders).
    shared_holds: int = 0

    def idle(self) -> bool:
        return (
            not self.holders
            and not self.queue
            and self.blocked_until == -math.inf
            and not self.delays
        )

    def taken(self, now: float) -> tuple[int, int]:
        """Slots taken now: (exclusive, shared), holds and lock-delays alike."""
        shared = self.shared_holds
        if self.delays:
            self.delays = [d for d in self.delays if d[0] > now]
            shared += sum(1 for d in self.delays if d[1] == SHARED)
        return len(self.holders) + len(self.delays) - shared, shared


@dataclass
class PoolState:
    """One pool's whole state, for backends that keep it outside the engine.

    The objects are the engine's own: ``holds`` with their leases (a lease
    granted to a waiter but not yet delivered keeps its ``waiter``), and the
    ``queue`` of waiting requests in FIFO order. ``fence`` is the last
    fencing token handed out in the pool.
    """

    fence: int
    holds: list[Hold] = field(default_factory=list)
    queue: list[Waiter] = field(default_factory=list)
    blocked_until: float = -math.inf
    delays: list[tuple[float, str]] = field(default_factory=list)


def _bounded(spec: PoolSpec, ttl: float) -> float:
    """A time-to-live given under an earlier ``expire``, bounded by the pool's
    current one (0, never ending, is the longest of all)."""
    return spec.lease_ttl(ttl or None)


def _fits(spec: PoolSpec, mode: str, exclusive: int, shared: int) -> bool:
    """May a hold of ``mode`` start while these slots are taken?"""
    if mode == SHARED:
        return exclusive == 0 and (spec.max_shared is None or shared < spec.max_shared)
    return shared == 0 and exclusive < spec.maxlocks


def _joins(hold: Hold, mode: str) -> bool:
    """Does a request of ``mode`` join its owner's hold (the hold gives what it asks)?"""
    return hold.mode == EXCLUSIVE or mode == SHARED


def _mode_of(waiters: list[Waiter]) -> str:
    """The mode an owner's place in the queue is granted: exclusive if any of its waits asks it."""
    return EXCLUSIVE if any(w.mode != SHARED for w in waiters) else SHARED


def _place_fits(spec: PoolSpec, waiters: list[Waiter], exclusive: int, shared: int) -> bool:
    """May an owner's place be granted? Waits of both modes in one place need
    room for each (so a wait joining a place never makes it grantable: no
    grant is missed while nobody looks)."""
    return all(_fits(spec, mode, exclusive, shared) for mode in {w.mode for w in waiters})


def _came(waiters: list[Waiter]) -> float:
    """When an owner in the queue came: when the earliest of its waits came."""
    return min(w.since for w in waiters)


def _queue_by_arrival(queue: dict[str, list[Waiter]], owner: str, waiter: Waiter) -> None:
    """Put a new owner in the queue behind everyone who came no later than ``waiter``.

    Usually that is the end. A late-written request passes only the few
    owners at the tail that came after it: they are taken off and put back
    behind it (dict order is the queue order), not the whole queue rebuilt.
    """
    passed: list[str] = []
    for ahead in reversed(queue):
        if _came(queue[ahead]) <= waiter.since:
            break
        passed.append(ahead)
    moved = [queue.popitem() for _ in passed]
    queue[owner] = [waiter]
    for ahead, waiters in reversed(moved):
        queue[ahead] = waiters


class LockEngine:
    """Lock state of every pool, and the rules that change it."""

    def __init__(
        self,
        *,
        first_fence: int = 1,
        new_token: Callable[[], str] = _new_token,
    ) -> None:
        self._pools: dict[str, _Pool] = {}
        self._leases: dict[str, Lease] = {}
        # (expires_at, seq, token); entries go stale on renew and release
        # and are dropped lazily, or all at once by _compact().
        self._deadlines: list[tuple[float, int, str]] = []
        # (until, pool) of lock-delays; an entry of a pool gone is a harmless wake-up.
        self._delay_ends: list[tuple[float, str]] = []
        self._seq = 0
        self._last_fence = first_fence - 1
        self._new_token = new_token
        self._paused = False
        # Told of each delivered lease that :meth:`expire` ends (logs, metrics).
        self.on_expire: Callable[[Lease], None] | None = None

    # -- queries -----------------------------------------------------------

    @property
    def last_fence(self) -> int:
        """The fencing token of the latest grant (``first_fence - 1`` if none)."""
        return self._last_fence

    def lease(self, token: str) -> Lease | None:
        """The current lease with this token, if there is one."""
        return self._leases.get(token)

    def holders(self, pool: str) -> list[Hold]:
        """Current holds of a pool, oldest grant first."""
        state = self._pools.get(pool)
        return sorted(state.holders.values(), key=lambda x: x.fence) if state else []

    def waiting(self, pool: str) -> list[str]:
        """Owners waiting on a pool, in the order they will be served."""
        state = self._pools.get(pool)
        return list(state.queue) if state else []

    def last_arrival(self, pool: str) -> float | None:
        """When the owner at the end of the queue came (None: nobody waits).

        A wait that says it came no earlier (``enqueue``'s ``since``) goes
        behind everyone queued now.
        """
        state = self._pools.get(pool)
        if state is None or not state.queue:
            return None
        return _came(state.queue[next(reversed(state.queue))])

    @property
    def paused(self) -> bool:
        """True while new holds are not granted (see :meth:`pause`)."""
        return self._paused

    def pause(self) -> None:
        """Stop granting new holds: gets answer None, waits queue up.

        For a start-up delay: after a restart that lost its state, holders of
        leases granted before it must learn that their lease is gone (at their
        next renewal) before anyone else is granted the slot. Existing holds
        keep getting leases and renewals.
        """
        self._paused = True

    def resume(self, now: float) -> list[Waiter]:
        """Grant again; returns the waiters granted from the queues."""
        self._paused = False
        granted: list[Waiter] = []
        for state in list(self._pools.values()):
            granted += self._fill(state, now)
        return granted

    def pool_names(self) -> list[str]:
        """Pools that have holders or waiters (idle pools hold no state)."""
        return list(self._pools)

    def pools_in_use(self) -> KeysView[str]:
        """A live view of :meth:`pool_names`, without copying it."""
        return self._pools.keys()

    def next_deadline(self) -> float | None:
        """When the earliest lease or lock-delay ends, or None if none can end."""
        lease_end = self._next_lease_end()
        if self._delay_ends and (lease_end is None or self._delay_ends[0][0] < lease_end):
            return self._delay_ends[0][0]
        return lease_end

    def _next_lease_end(self) -> float | None:
        heap = self._deadlines
        while heap:
            when, _seq, token = heap[0]
            lease = self._leases.get(token)
            if lease is not None and lease.expires_at == when:
                return when
            heapq.heappop(heap)
        return None

    # -- requests ----------------------------------------------------------

    def acquire(
        self,
        spec: PoolSpec,
        owner: str,
        now: float,
        ttl: float | None = None,
        mode: str = EXCLUSIVE,
    ) -> Lease | None:
        """Try once for a slot (the ``/get/`` verb); never waits.

        Returns a new lease if the owner already holds the pool in a mode
        that gives ``mode`` (a lease of its hold) or a slot of ``mode`` is
        free and nobody is waiting, else None.
        """
        state = self._pool(spec)
        hold = state.holders.get(owner)
        if hold is not None and not _joins(hold, mode):
            return None
        if hold is None:
            if (
                not self._may_grant(state, now)
                or state.queue
                or not _fits(spec, mode, *state.taken(now))
            ):
                self._forget_if_idle(state)
                return None
            hold = self._hold(state, owner, now, mode)
        lease = self._lease(hold, spec.lease_ttl(ttl), now)
        lease.delivered = True
        return lease

    def enqueue(
        self,
        spec: PoolSpec,
        owner: str,
        now: float,
        ttl: float | None = None,
        server: str = "",
        waiter_id: str | None = None,
        since: float | None = None,
        mode: str = EXCLUSIVE,
    ) -> Waiter:
        """Ask for a slot and wait for it (the ``/wait/`` verb).

        The returned waiter is granted at once (``waiter.lease`` set) when the
        owner already holds a slot or one is free with nobody queued; else it
        joins the queue and comes back from a later call's list of granted
        waiters. Either way the driver must end it with :meth:`deliver` or
        :meth:`cancel`.

        ``since`` is when the request came (default ``now``): a new owner in
        the queue goes behind every owner that came no later, ahead of those
        that came after it. An owner already queued keeps its place.
        """
        state = self._pool(spec)
        arrived = now if since is None else since
        waiter = Waiter(spec.name, owner, spec.lease_ttl(ttl), arrived, server=server, mode=mode)
        if waiter_id is not None:
            waiter.id = waiter_id
        hold = state.holders.get(owner)
        if hold is not None and not _joins(hold, mode):
            hold = None  # queued: granted once its shared hold has ended
        elif (
            hold is None
            and self._may_grant(state, now)
            and not state.queue
            and _fits(spec, mode, *state.taken(now))
        ):
            hold = self._hold(state, owner, now, mode)
        if hold is not None:
            waiter.lease = self._lease(hold, waiter.ttl, now)
            waiter.lease.waiter = waiter
        elif owner in state.queue:
            state.queue[owner].append(waiter)
        else:
            _queue_by_arrival(state.queue, owner, waiter)
        return waiter

    def holds_or_waits(self, pool: str, owner: str, mode: str | None = None) -> bool:
        """Is ``owner`` holding a slot of the pool, or in its queue? With a
        ``mode``: holding in a mode that a request of ``mode`` joins."""
        state = self._pools.get(pool)
        if state is None:
            return False
        hold = state.holders.get(owner)
        if hold is not None and (mode is None or _joins(hold, mode)):
            return True
        return owner in state.queue

    def deliver(self, waiter: Waiter) -> bool:
        """Record that a granted waiter's answer is going out.

        Returns False if its lease has ended in between (the answer must then
        not be YES).
        """
        lease = waiter.lease
        if lease is None:
            raise ValueError("deliver() on a waiter that has not been granted")
        if self._leases.get(lease.token) is not lease:
            return False
        lease.delivered = True
        lease.waiter = None
        return True

    def cancel(self, waiter: Waiter, now: float) -> list[Waiter]:
        """A waiter gives up (timeout, or its client hung up).

        A queued waiter leaves the queue. A granted waiter whose answer has
        not gone out undoes its lease (and the slot is passed on if that was
        its hold's last lease). Returns the waiters granted as a result.
        """
        lease = waiter.lease
        if lease is None:
            state = self._pools.get(waiter.pool)
            if state is None:
                return []
            waiters = state.queue.get(waiter.owner)
            granted: list[Waiter] = []
            if waiters and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del state.queue[waiter.owner]
                # An exclusive wait that stopped shared ones behind it (or in
                # its owner's place) has gone: they may fit now.
                granted = list(self._fill(state, now))
            self._forget_if_idle(state)
            return granted
        if lease.delivered or self._leases.get(lease.token) is not lease:
            return []
        return self._end(lease, now)

    def release(self, pool: str, owner: str, now: float) -> tuple[Hold | None, list[Waiter]]:
        """End the owner's hold on a pool, all its leases (the legacy release).

        Returns the hold that ended (or None) and the waiters granted.
        """
        state = self._pools.get(pool)
        hold = state.holders.get(owner) if state is not None else None
        if state is None or hold is None:
            return None, []
        for token in hold.leases:
            del self._leases[token]
        hold.leases.clear()
        return hold, self._vacate(state, hold, now)

    def release_lease(
        self, pool: str, token: str, now: float, owner: str | None = None
    ) -> tuple[Lease | None, list[Waiter]]:
        """End exactly the lease with this token.

        A token that is not a current lease of ``pool`` (and of ``owner``, if
        given) releases nothing: the result is ``(None, [])``.
        """
        lease = self._leases.get(token)
        if lease is None or lease.pool != pool or (owner is not None and lease.owner != owner):
            return None, []
        return lease, self._end(lease, now)

    def renew(
        self,
        pool: str,
        token: str,
        now: float,
        ttl: float | None = None,
        owner: str | None = None,
    ) -> Lease | None:
        """Restart a lease's time-to-live from ``now``.

        ``ttl`` replaces the lease's time-to-live (bounded by the pool's
        ``expire``). Returns None if the token is not a current lease of
        ``pool`` (and of ``owner``, if given): the lease is gone.
        """
        lease = self._leases.get(token)
        if lease is None or lease.pool != pool or (owner is not None and lease.owner != owner):
            return None
        # Also without a ttl: a pool's expire lowered by a reload bounds the renewal.
        lease.ttl = _bounded(self._pools[pool].spec, lease.ttl if ttl is None else ttl)
        self._schedule(lease, now)
        return lease

    def expire(self, now: float) -> list[Waiter]:
        """End every lease and lock-delay whose time is up at ``now``; returns waiters granted."""
        granted: list[Waiter] = []
        while True:
            when = self._next_lease_end()
            delay_end = self._delay_ends[0][0] if self._delay_ends else NEVER
            if delay_end <= now and (when is None or delay_end < when):
                _until, pool = heapq.heappop(self._delay_ends)
                granted += self.fill(pool, now)
                continue
            if when is None or when > now:
                return granted
            _when, _seq, token = heapq.heappop(self._deadlines)
            lease = self._leases[token]
            if self.on_expire is not None and lease.delivered:
                self.on_expire(lease)
            granted += self._end(lease, now, expired=True)

    def reconfigure(self, spec: PoolSpec, now: float) -> list[Waiter]:
        """A pool's configuration changed; returns the waiters a raised ``maxlocks`` granted.

        Holds never end for it: with a lowered ``maxlocks`` new grants wait
        until the pool is under it. Leases keep the time they were given.
        """
        self.configure(spec)
        return self.fill(spec.name, now)

    def configure(self, spec: PoolSpec) -> None:
        """Put a pool's configuration in force without handing out slots (see
        :meth:`reconfigure`): for a caller that ends what is due first."""
        state = self._pools.get(spec.name)
        if state is not None:
            state.spec = spec

    # -- state kept outside the engine (shared-state backends) ---------------

    def restore(self, spec: PoolSpec, stored: PoolState) -> None:
        """Take a pool's stored state into the engine (replacing what it had).

        The engine's fence counter moves up to the pool's, never down.
        """
        self._pools.pop(spec.name, None)
        state = _Pool(spec, blocked_until=stored.blocked_until, delays=list(stored.delays))
        for until, _mode in stored.delays:
            heapq.heappush(self._delay_ends, (until, spec.name))
        for hold in stored.holds:
            state.holders[hold.owner] = hold
            state.shared_holds += hold.mode == SHARED
            for lease in hold.leases.values():
                self._leases[lease.token] = lease
                if lease.expires_at != NEVER:
                    self._seq += 1
                    heapq.heappush(self._deadlines, (lease.expires_at, self._seq, lease.token))
        for waiter in stored.queue:
            state.queue.setdefault(waiter.owner, []).append(waiter)
        self._last_fence = max(self._last_fence, stored.fence)
        self._pools[spec.name] = state

    def state(self, pool: str) -> PoolState | None:
        """A pool's whole state (None: idle, nothing to keep but its fence)."""
        state = self._pools.get(pool)
        if state is None:
            return None
        return PoolState(
            fence=self._last_fence,
            holds=self.holders(pool),
            queue=[w for waiters in state.queue.values() for w in waiters],
            blocked_until=state.blocked_until,
            delays=list(state.delays),
        )

    def block(self, spec: PoolSpec, until: float) -> None:
        """Grant no new hold of the pool before ``until`` (existing holds go on)."""
        state = self._pool(spec)
        state.blocked_until = max(state.blocked_until, until)

    def find_waiter(self, pool: str, waiter_id: str) -> Waiter | None:
        """The waiting request ``waiter_id``: queued, or granted and not yet delivered."""
        state = self._pools.get(pool)
        if state is None:
            return None
        for waiters in state.queue.values():
            for waiter in waiters:
                if waiter.id == waiter_id:
                    return waiter
        for hold in state.holders.values():
            for lease in hold.leases.values():
                if lease.waiter is not None and lease.waiter.id == waiter_id:
                    return lease.waiter
        return None

    def waiters_of(self, pool: str) -> list[Waiter]:
        """Every waiting request of a pool: queued, or granted and not yet delivered."""
        state = self._pools.get(pool)
        if state is None:
            return []
        queued = [w for waiters in state.queue.values() for w in waiters]
        return queued + self.granted_waiters(pool)

    def waiter_ids(self, pool: str) -> set[str]:
        """The ids of :meth:`waiters_of` (a long queue is compared by set operations)."""
        state = self._pools.get(pool)
        if state is None:
            return set()
        ids = {w.id for waiters in state.queue.values() for w in waiters}
        ids.update(w.id for w in self.granted_waiters(pool))
        return ids

    def waiter_count(self, pool: str) -> int:
        """How many :meth:`waiters_of` there are (without making the list)."""
        state = self._pools.get(pool)
        if state is None:
            return 0
        return sum(map(len, state.queue.values())) + len(self.granted_waiters(pool))

    def granted_waiters(self, pool: str) -> list[Waiter]:
        """The waiting requests of a pool that are granted and not yet delivered."""
        state = self._pools.get(pool)
        if state is None:
            return []
        return [
            lease.waiter
            for hold in state.holders.values()
            for lease in hold.leases.values()
            if lease.waiter is not None
        ]

    def fill(self, pool: str, now: float) -> list[Waiter]:
        """Hand free slots to waiters (after a block ended); returns those granted."""
        state = self._pools.get(pool)
        if state is None:
            return []
        state.taken(now)  # lock-delays that are over are dropped
        granted = list(self._fill(state, now))
        self._forget_if_idle(state)
        return granted

    # -- internals ---------------------------------------------------------

    def _pool(self, spec: PoolSpec) -> _Pool:
        state = self._pools.get(spec.name)
        if state is None:
            state = self._pools[spec.name] = _Pool(spec)
        else:
            # Configuration is the source of truth for limits; it may change.
            state.spec = spec
        return state

    def _forget_if_idle(self, state: _Pool) -> None:
        # Idle pools keep no state: fences come from the engine-wide counter,
        # so a pool dropped and made again never reuses a token.
        if state.idle():
            self._pools.pop(state.spec.name, None)

    def _hold(self, state: _Pool, owner: str, now: float, mode: str = EXCLUSIVE) -> Hold:
        self._last_fence += 1
        hold = Hold(
            pool=state.spec.name, owner=owner, fence=self._last_fence, granted_at=now, mode=mode
        )
        state.holders[owner] = hold
        state.shared_holds += mode == SHARED
        return hold

    def _lease(self, hold: Hold, ttl: float, now: float) -> Lease:
        if len(hold.leases) >= MAX_LEASES_PER_HOLD:
            oldest = min(hold.leases.values(), key=lambda x: x.expires_at)
            del self._leases[oldest.token], hold.leases[oldest.token]
        lease = Lease(hold=hold, token=self._new_token(), ttl=ttl, granted_at=now)
        hold.leases[lease.token] = lease
        self._leases[lease.token] = lease
        self._schedule(lease, now)
        return lease

    def _schedule(self, lease: Lease, now: float) -> None:
        lease.expires_at = now + lease.ttl if lease.ttl > 0 else NEVER
        if lease.expires_at != NEVER:
            self._seq += 1
            heapq.heappush(self._deadlines, (lease.expires_at, self._seq, lease.token))
            if len(self._deadlines) > 64 and len(self._deadlines) > 4 * len(self._leases):
                self._compact()

    def _compact(self) -> None:
        # Stale entries pile up when leases are released long before they
        # would expire; rebuild the heap from live leases only.
        self._deadlines = [
            (lease.expires_at, i, lease.token)
            for i, lease in enumerate(self._leases.values())
            if lease.expires_at != NEVER
        ]
        heapq.heapify(self._deadlines)

    def _end(self, lease: Lease, now: float, expired: bool = False) -> list[Waiter]:
        """End one lease; the hold ends with its last lease (and, if that
        expired, its slot stays taken for the pool's lock-delay)."""
        hold = lease.hold
        del self._leases[lease.token]
        del hold.leases[lease.token]
        if hold.leases:
            return []
        state = self._pools[hold.pool]
        if expired and state.spec.lock_delay > 0:
            until = lease.expires_at + state.spec.lock_delay
            if until > now:
                state.delays.append((until, hold.mode))
                heapq.heappush(self._delay_ends, (until, hold.pool))
        return self._vacate(state, hold, now)

    def _vacate(self, state: _Pool, hold: Hold, now: float) -> list[Waiter]:
        del state.holders[hold.owner]
        state.shared_holds -= hold.mode == SHARED
        granted = list(self._fill(state, now))
        self._forget_if_idle(state)
        return granted

    def _may_grant(self, state: _Pool, now: float) -> bool:
        if now >= state.blocked_until:
            state.blocked_until = -math.inf  # the block is over; nothing left to keep
        return not self._paused and now >= state.blocked_until

    def _fill(self, state: _Pool, now: float) -> Iterator[Waiter]:
        # Hand free slots to the head of the queue while its mode fits; the
        # head that does not fit stops everyone behind it (FIFO across modes).
        # An owner's waits share its place, so one grant answers all of them.
        if not self._may_grant(state, now) or not state.queue:
            return
        exclusive, shared = state.taken(now)
        while state.queue:
            owner = next(iter(state.queue))
            if not _place_fits(state.spec, state.queue[owner], exclusive, shared):
                return
            mode = _mode_of(state.queue[owner])
            waiters = state.queue.pop(owner)
            hold = self._hold(state, owner, now, mode)
            if mode == SHARED:
                shared += 1
            else:
                exclusive += 1
            for waiter in waiters:
                # Queued before a reload lowered ``expire``: the grant gets the new bound.
                waiter.lease = self._lease(hold, _bounded(state.spec, waiter.ttl), now)
                waiter.lease.waiter = waiter
                yield waiter
