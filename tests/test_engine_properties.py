"""Property-based tests: random interleavings against a simple reference model.

Hypothesis drives the engine with get / wait / deliver / hang-up / release /
renew / clock advance on two pools (a mutex and a semaphore, with and without
expiry), and checks after every step that:

* a pool never has more than ``maxlocks`` holders (safety);
* no slot is free while someone waits, and waiters are served in arrival
  order (FIFO, no lost wake-up) — by comparing with a model that keeps a plain
  list of waiting owners;
* a lease ends exactly when its time is up, not before and not later;
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
POOL_NAMES = st.sampled_from(sorted(POOLS))


class ModelPool:
    """The reference: lists and dicts, no cleverness."""

    def __init__(self, spec: PoolSpec) -> None:
        self.spec = spec
        self.holders: dict[str, float] = {}  # owner -> expires_at
        self.queue: list[str] = []  # owners in arrival order

    def grant_free_slots(self, now: float) -> list[str]:
        granted = []
        while self.queue and len(self.holders) < self.spec.maxlocks:
            owner = self.queue.pop(0)
            self.holders[owner] = now + self.spec.expire if self.spec.expire else float("inf")
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

    # -- helpers -------------------------------------------------------------

    def check_granted(self, pool: str, granted: list[Waiter], expected_owners: list[str]) -> None:
        owners = []
        for waiter in granted:
            assert waiter.pool == pool and waiter.lease is not None
            if waiter.owner not in owners:
                owners.append(waiter.owner)
                self.fences.append(waiter.lease.fence)
        assert owners == expected_owners, (owners, expected_owners)
        # One grant answers every parked request of its owner, and no other.
        for owner in owners:
            answered = {w for w in granted if w.owner == owner}
            assert answered == self.parked.pop((pool, owner))
            assert len({w.lease.token for w in answered if w.lease}) == 1

    def model_release(self, pool: str, owner: str) -> list[str]:
        model = self.model[pool]
        del model.holders[owner]
        return model.grant_free_slots(self.now)

    def wake(self, granted: list[Waiter]) -> None:
        """The engine's grants across pools must match the model's, pool by pool."""
        for name in POOLS:
            mine = [w for w in granted if w.pool == name]
            expected = self.model[name].grant_free_slots(self.now)
            self.check_granted(name, mine, expected)

    # -- rules ---------------------------------------------------------------

    @rule(pool=POOL_NAMES, owner=OWNERS)
    def get(self, pool: str, owner: str) -> None:
        model = self.model[pool]
        lease = self.engine.acquire(POOLS[pool], owner, self.now)
        if owner in model.holders:
            assert lease is not None and lease.owner == owner
        elif not model.queue and len(model.holders) < POOLS[pool].maxlocks:
            assert lease is not None
            model.holders[owner] = lease.expires_at
            self.fences.append(lease.fence)
        else:
            assert lease is None

    @rule(target=waiters, pool=POOL_NAMES, owner=OWNERS)
    def wait(self, pool: str, owner: str) -> Waiter:
        model = self.model[pool]
        waiter = self.engine.enqueue(POOLS[pool], owner, self.now)
        if owner in model.holders:
            assert waiter.lease is not None
        elif not model.queue and len(model.holders) < POOLS[pool].maxlocks:
            assert waiter.lease is not None
            model.holders[owner] = waiter.lease.expires_at
            self.fences.append(waiter.lease.fence)
        else:
            assert waiter.lease is None
            if owner not in model.queue:
                model.queue.append(owner)
            self.parked.setdefault((pool, owner), set()).add(waiter)
        return waiter

    @rule(waiter=consumes(waiters))
    def deliver(self, waiter: Waiter) -> None:
        if waiter.lease is None:
            return  # still queued; the request stays parked
        current = self.engine.lease(waiter.lease.token) is waiter.lease
        assert self.engine.deliver(waiter) == current

    @rule(waiter=consumes(waiters))
    def hang_up(self, waiter: Waiter) -> None:
        model = self.model[waiter.pool]
        lease = waiter.lease
        undo = (
            lease is not None
            and not lease.delivered
            and lease.pending == {waiter}
            and self.engine.lease(lease.token) is lease
        )
        granted = self.engine.cancel(waiter, self.now)
        if lease is None:
            # Its owner leaves the queue only if this was its last parked request.
            parked = self.parked[(waiter.pool, waiter.owner)]
            parked.remove(waiter)
            if not parked:
                del self.parked[(waiter.pool, waiter.owner)]
                model.queue.remove(waiter.owner)
            assert granted == []
        elif undo:
            expected = self.model_release(waiter.pool, waiter.owner)
            self.check_granted(waiter.pool, granted, expected)
        else:
            assert granted == []

    @rule(pool=POOL_NAMES, owner=OWNERS)
    def release(self, pool: str, owner: str) -> None:
        lease, granted = self.engine.release(pool, owner, self.now)
        if owner in self.model[pool].holders:
            assert lease is not None and lease.owner == owner
            self.check_granted(pool, granted, self.model_release(pool, owner))
        else:
            assert lease is None and granted == []

    @rule(pool=POOL_NAMES, owner=OWNERS)
    def renew(self, pool: str, owner: str) -> None:
        holders = {lease.owner: lease for lease in self.engine.holders(pool)}
        if owner not in holders:
            assert self.engine.renew(pool, "no-such-token", self.now) is None
            return
        lease = self.engine.renew(pool, holders[owner].token, self.now)
        assert lease is holders[owner]
        spec = POOLS[pool]
        self.model[pool].holders[owner] = self.now + spec.expire if spec.expire else float("inf")

    @rule(dt=st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.5]))
    def advance(self, dt: float) -> None:
        # Step to every model deadline in order, so a slot handed on by one
        # expiry can itself expire later in the same advance.
        target = self.now + dt
        while True:
            due = [
                (expires_at, name, owner)
                for name, model in self.model.items()
                for owner, expires_at in model.holders.items()
                if expires_at <= target
            ]
            if not due:
                break
            when = min(d[0] for d in due)
            self.now = when
            granted = self.engine.expire(self.now)
            for expires_at, name, owner in due:
                if expires_at == when:
                    del self.model[name].holders[owner]
            self.wake(granted)
        self.now = target
        assert self.engine.expire(self.now) == []

    # -- invariants ----------------------------------------------------------

    @invariant()
    def matches_model(self) -> None:
        for name, spec in POOLS.items():
            model = self.model[name]
            holders = self.engine.holders(name)
            assert len(holders) <= spec.maxlocks
            assert {lease.owner for lease in holders} == set(model.holders)
            for lease in holders:
                assert lease.expires_at == model.holders[lease.owner]
                assert lease.expires_at > self.now  # nothing outlives its time
            assert self.engine.waiting(name) == model.queue
            if model.queue:
                assert len(holders) == spec.maxlocks  # no free slot while someone waits

    @invariant()
    def fences_increase(self) -> None:
        assert all(a < b for a, b in itertools.pairwise(self.fences))

    @invariant()
    def deadline_is_earliest_expiry(self) -> None:
        expiries = [
            e for model in self.model.values() for e in model.holders.values() if e != float("inf")
        ]
        assert self.engine.next_deadline() == (min(expiries) if expiries else None)

    @invariant()
    def idle_pools_hold_no_state(self) -> None:
        for name in self.engine.pool_names():
            assert self.engine.holders(name) or self.engine.waiting(name)


TestEngineModel = EngineMachine.TestCase
TestEngineModel.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
