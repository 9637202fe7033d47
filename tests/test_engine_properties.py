"""Property-based tests: random interleavings against a simple reference model.

Hypothesis drives the engine with get / wait / deliver / hang-up / release by
host / release by lease / renew / clock advance on three pools (a mutex with
expiry, a semaphore without, a short-lived semaphore), and checks after every
step that:

* a pool never has more than ``maxlocks`` holders (safety);
* no slot is free while someone waits, and waiters are served in arrival
  order (FIFO, no lost wake-up; a request written late, with an earlier
  arrival time, takes its place by arrival) — by comparing with a model that
  keeps plain lists and dicts;
* a lease ends exactly when its time is up, not before and not later, and a
  holder keeps its slot while any of its leases lives;
* one grant answers every parked request of its owner;
* fencing tokens strictly increase and are never reused.
"""

from __future__ import annotations

import itertools

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    rule,
)

from distributex.engine import LockEngine, PoolSpec, Waiter

POOLS = {
    "mutex": PoolSpec("mutex", maxlocks=1, expire=3.0),
    "sem": PoolSpec("sem", maxlocks=3, expire=0.0),
    "short": PoolSpec("short", maxlocks=2, expire=1.5),
}
OWNERS = st.sampled_from(["a", "b", "c", "d", "e"])
TTLS = st.sampled_from([None, None, 0.5, 2.0, 10.0])  # None: the pool's expire
POOL_NAMES = st.sampled_from(sorted(POOLS))
# How long before it is written a wait came (a step that lingered, or was redone).
LATE = st.sampled_from([0.0, 0.0, 0.0, 0.1, 0.25, 1.0])
INF = float("inf")


class ModelPool:
    """The reference: per owner a dict of its leases' tokens -> expiry; a list queue."""

    def __init__(self, spec: PoolSpec) -> None:
        self.spec = spec
        self.holders: dict[str, dict[str, float]] = {}
        self.fences: dict[str, int] = {}
        self.queue: list[str] = []

    def expiry(self, now: float, ttl: float | None = None) -> float:
        """A lease's end: the client's ttl can only shorten a non-zero expire."""
        if ttl is None:
            ttl = self.spec.expire
        elif self.spec.expire:
            ttl = min(ttl, self.spec.expire)
        return now + ttl if ttl else INF

    def free(self, paused: bool) -> bool:
        return not paused and not self.queue and len(self.holders) < self.spec.maxlocks

    def end_lease(self, owner: str, token: str) -> bool:
        """Drop one lease; True if that freed the owner's slot."""
        del self.holders[owner][token]
        if self.holders[owner]:
            return False
        del self.holders[owner], self.fences[owner]
        return True

    def next_owners(self, paused: bool) -> list[str]:
        """Owners the free slots go to, in queue order."""
        granted = []
        while not paused and self.queue and len(self.holders) < self.spec.maxlocks:
            owner = self.queue.pop(0)
            self.holders[owner] = {}
            granted.append(owner)
        return granted


class EngineMachine(RuleBasedStateMachine):
    waiters = Bundle("waiters")

    def __init__(self) -> None:
        super().__init__()
        tokens = itertools.count()
        self.engine = LockEngine(new_token=lambda: f"t{next(tokens)}")
        self.now = 0.0
        self.model = {name: ModelPool(spec) for name, spec in POOLS.items()}
        self.fences: list[int] = []
        # Requests parked in the engine's queues, by (pool, owner).
        self.parked: dict[tuple[str, str], set[Waiter]] = {}
        # Leases granted to waiters whose answer has not gone out yet.
        self.undelivered: set[str] = set()
        # The ttl each parked request asked for.
        self.asked: dict[Waiter, float | None] = {}
        self.paused = False

    # -- helpers -------------------------------------------------------------

    def new_lease(
        self, pool: str, owner: str, lease, delivered: bool, ttl: float | None = None
    ) -> None:
        model = self.model[pool]
        assert lease.owner == owner and lease.pool == pool
        assert lease.token not in model.holders[owner]
        if owner in model.fences:
            assert lease.fence == model.fences[owner]  # one hold, one fencing token
        else:
            model.fences[owner] = lease.fence
            self.fences.append(lease.fence)
        model.holders[owner][lease.token] = model.expiry(self.now, ttl)
        if not delivered:
            self.undelivered.add(lease.token)

    def check_granted(self, pool: str, granted: list[Waiter]) -> None:
        """The engine's grants in ``pool`` are the model's next owners, each fully answered."""
        expected = self.model[pool].next_owners(self.paused)
        owners = list(dict.fromkeys(w.owner for w in granted if w.pool == pool))
        assert owners == expected, (owners, expected)
        for owner in owners:
            answered = {w for w in granted if w.pool == pool and w.owner == owner}
            assert answered == self.parked.pop((pool, owner))
            for waiter in answered:
                self.new_lease(pool, owner, waiter.lease, False, self.asked.pop(waiter))

    def end_lease(self, pool: str, owner: str, token: str) -> None:
        self.model[pool].end_lease(owner, token)
        self.undelivered.discard(token)

    # -- rules ---------------------------------------------------------------

    @rule(pool=POOL_NAMES, owner=OWNERS, ttl=TTLS)
    def get(self, pool: str, owner: str, ttl: float | None) -> None:
        model = self.model[pool]
        lease = self.engine.acquire(POOLS[pool], owner, self.now, ttl)
        if owner in model.holders or model.free(self.paused):
            assert lease is not None
            model.holders.setdefault(owner, {})
            self.new_lease(pool, owner, lease, True, ttl)
        else:
            assert lease is None

    def came(self, pool: str, owner: str) -> float:
        """When a queued owner came: when the earliest of its parked requests came."""
        return min(w.since for w in self.parked[(pool, owner)])

    @rule(target=waiters, pool=POOL_NAMES, owner=OWNERS, ttl=TTLS, late=LATE)
    def wait(self, pool: str, owner: str, ttl: float | None, late: float) -> Waiter:
        model = self.model[pool]
        since = self.now - late
        waiter = self.engine.enqueue(POOLS[pool], owner, self.now, ttl, since=since)
        assert waiter.since == since
        if owner in model.holders or model.free(self.paused):
            assert waiter.lease is not None
            model.holders.setdefault(owner, {})
            self.new_lease(pool, owner, waiter.lease, False, ttl)
        else:
            assert waiter.lease is None
            if owner not in model.queue:
                # Behind the nearest owner (from the tail) that came no later.
                place = len(model.queue)
                while place and self.came(pool, model.queue[place - 1]) > since:
                    place -= 1
                model.queue.insert(place, owner)
            self.parked.setdefault((pool, owner), set()).add(waiter)
            self.asked[waiter] = ttl
        return waiter

    @rule(waiter=waiters)  # not consumed: a hang-up after delivery must change nothing
    def deliver(self, waiter: Waiter) -> None:
        if waiter.lease is None:
            return  # still queued; the request stays parked
        token = waiter.lease.token
        current = token in self.model[waiter.pool].holders.get(waiter.owner, {})
        assert self.engine.deliver(waiter) == current
        self.undelivered.discard(token)

    @rule(waiter=consumes(waiters))
    def hang_up(self, waiter: Waiter) -> None:
        model = self.model[waiter.pool]
        lease = waiter.lease
        granted = self.engine.cancel(waiter, self.now)
        if lease is None:
            # Its owner leaves the queue only with its last parked request.
            parked = self.parked[(waiter.pool, waiter.owner)]
            parked.remove(waiter)
            del self.asked[waiter]
            if not parked:
                del self.parked[(waiter.pool, waiter.owner)]
                model.queue.remove(waiter.owner)
            assert granted == []
        elif lease.token in self.undelivered:
            self.end_lease(waiter.pool, waiter.owner, lease.token)  # undone
            self.check_granted(waiter.pool, granted)
        else:
            assert granted == []

    @rule(pool=POOL_NAMES, owner=OWNERS)
    def release_host(self, pool: str, owner: str) -> None:
        model = self.model[pool]
        hold, granted = self.engine.release(pool, owner, self.now)
        if owner in model.holders:
            assert hold is not None and hold.owner == owner
            for token in list(model.holders[owner]):
                self.end_lease(pool, owner, token)
            self.check_granted(pool, granted)
        else:
            assert hold is None and granted == []

    @rule(pool=POOL_NAMES, owner=OWNERS, pick=st.integers(0, 3), forge=st.booleans())
    def release_lease(self, pool: str, owner: str, pick: int, forge: bool) -> None:
        tokens = sorted(self.model[pool].holders.get(owner, {}))
        if forge or not tokens:
            assert self.engine.release_lease(pool, "forged", self.now) == (None, [])
            return
        token = tokens[pick % len(tokens)]
        # Right token, wrong owner: releases nothing.
        assert self.engine.release_lease(pool, token, self.now, owner="x") == (None, [])
        lease, granted = self.engine.release_lease(pool, token, self.now, owner=owner)
        assert lease is not None and lease.token == token
        self.end_lease(pool, owner, token)
        self.check_granted(pool, granted)

    @rule(pool=POOL_NAMES, owner=OWNERS, pick=st.integers(0, 3), ttl=TTLS)
    def renew(self, pool: str, owner: str, pick: int, ttl: float | None) -> None:
        tokens = sorted(self.model[pool].holders.get(owner, {}))
        if not tokens:
            assert self.engine.renew(pool, "no-such-token", self.now) is None
            return
        token = tokens[pick % len(tokens)]
        lease = self.engine.renew(pool, token, self.now, ttl)
        assert lease is not None and lease.token == token
        # Without a ttl, a renewal keeps the lease's own time-to-live.
        self.model[pool].holders[owner][token] = self.now + lease.ttl if lease.ttl else INF
        if ttl is not None:
            assert self.model[pool].holders[owner][token] == self.model[pool].expiry(self.now, ttl)

    @rule()
    def pause(self) -> None:
        self.engine.pause()
        self.paused = True

    @rule()
    def resume(self) -> None:
        granted = self.engine.resume(self.now)
        self.paused = False
        # Pools are filled one after another; check them in that order (fences).
        for name in dict.fromkeys([w.pool for w in granted] + list(POOLS)):
            self.check_granted(name, granted)

    @rule(dt=st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.5]))
    def advance(self, dt: float) -> None:
        # Step to every model deadline in order, so a slot handed on by one
        # expiry can itself expire later in the same advance.
        target = self.now + dt
        while True:
            due = [
                (expires_at, name, owner, token)
                for name, model in self.model.items()
                for owner, leases in model.holders.items()
                for token, expires_at in leases.items()
                if expires_at <= target
            ]
            if not due:
                break
            self.now = min(d[0] for d in due)
            granted = self.engine.expire(self.now)
            for expires_at, name, owner, token in due:
                if expires_at == self.now:
                    self.end_lease(name, owner, token)
            for name in POOLS:
                self.check_granted(name, granted)
        self.now = target
        assert self.engine.expire(self.now) == []

    # -- invariants ----------------------------------------------------------

    @invariant()
    def matches_model(self) -> None:
        for name, spec in POOLS.items():
            model = self.model[name]
            holds = self.engine.holders(name)
            assert len(holds) <= spec.maxlocks
            assert {hold.owner for hold in holds} == set(model.holders)
            for hold in holds:
                assert {t: lease.expires_at for t, lease in hold.leases.items()} == (
                    model.holders[hold.owner]
                )
                assert hold.expires_at > self.now  # nothing outlives its time
            assert self.engine.waiting(name) == model.queue
            waiters = self.engine.waiters_of(name)
            assert self.engine.waiter_ids(name) == {w.id for w in waiters}
            assert len(waiters) == len({w.id for w in waiters})  # ids are unique
            assert self.engine.waiter_count(name) == len(waiters)
            last = self.came(name, model.queue[-1]) if model.queue else None
            assert self.engine.last_arrival(name) == last
            if model.queue and not self.paused:
                assert len(holds) == spec.maxlocks  # no free slot while someone waits

    @invariant()
    def fences_increase(self) -> None:
        assert all(a < b for a, b in itertools.pairwise(self.fences))

    @invariant()
    def deadline_is_earliest_expiry(self) -> None:
        expiries = [
            e
            for model in self.model.values()
            for leases in model.holders.values()
            for e in leases.values()
            if e != INF
        ]
        assert self.engine.next_deadline() == (min(expiries) if expiries else None)

    @invariant()
    def idle_pools_hold_no_state(self) -> None:
        for name in self.engine.pool_names():
            assert self.engine.holders(name) or self.engine.waiting(name)


TestEngineModel = EngineMachine.TestCase
TestEngineModel.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
