"""Property-based tests of lock modes and lock-delay against a reference model.

Hypothesis drives the engine with gets and waits of both modes, hang-ups of
queued waits, releases by host and by lease, and clock advances, on pools
that mix ``maxlocks``, ``max_shared`` and ``lock_delay``; after every step
the engine must agree with a model kept in plain lists and dicts:

* exclusive holders keep the ``maxlocks`` rule, shared holders stay within
  ``max_shared``, and the two kinds never hold a pool at once (safety);
* one FIFO across modes: a request behind a waiting one is never granted
  first (a shared request does not pass a waiting exclusive one), and a run
  of shared requests at the head is granted together;
* a request joins its owner's hold only when the hold gives what it asks;
* a hold that ends by expiry keeps its slot taken for ``lock_delay`` after
  its lease's end; a release or a hang-up frees it at once;
* fencing tokens strictly increase.
"""

from __future__ import annotations

import json

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from distributex.engine import EXCLUSIVE, SHARED, LockEngine, PoolSpec, Waiter

POOLS = {
    "rw": PoolSpec("rw", maxlocks=1, expire=3.0),
    "capped": PoolSpec("capped", maxlocks=2, expire=2.0, max_shared=2, lock_delay=1.0),
    "delayed": PoolSpec("delayed", maxlocks=1, expire=1.5, max_shared=3, lock_delay=2.0),
}
POOL_NAMES = st.sampled_from(sorted(POOLS))
OWNERS = st.sampled_from(["a", "b", "c", "d", "e"])
MODES = st.sampled_from([EXCLUSIVE, SHARED, SHARED])
INF = float("inf")


class Model:
    """One pool: owner -> [mode, {token: end}], a FIFO of [owner, waits], lock-delays."""

    def __init__(self, spec: PoolSpec) -> None:
        self.spec = spec
        self.holders: dict[str, list] = {}
        self.queue: list[list] = []
        self.delays: list[tuple[float, str]] = []

    def end(self) -> float:
        return INF if not self.spec.expire else self.spec.expire

    def fits(self, mode: str) -> bool:
        kinds = [m for m, _ in self.holders.values()] + [m for _, m in self.delays]
        shared = kinds.count(SHARED)
        exclusive = len(kinds) - shared
        if mode == SHARED:
            cap = self.spec.max_shared
            return exclusive == 0 and (cap is None or shared < cap)
        return shared == 0 and exclusive < self.spec.maxlocks

    @staticmethod
    def place_mode(waits: list[Waiter]) -> str:
        return SHARED if all(w.mode == SHARED for w in waits) else EXCLUSIVE

    def grant_heads(self, now: float) -> list[Waiter]:
        granted: list[Waiter] = []
        while self.queue and all(self.fits(w.mode) for w in self.queue[0][1]):
            owner, waits = self.queue.pop(0)
            leases = {}
            for w in waits:
                assert w.lease is not None, f"{owner} should have been granted"
                leases[w.lease.token] = now + self.end()
                granted.append(w)
            self.holders[owner] = [self.place_mode(waits), leases]
        return granted

    def end_hold_if_empty(self, owner: str, ended_at: float, expired: bool, now: float) -> None:
        mode, leases = self.holders[owner]
        if leases:
            return
        del self.holders[owner]
        if expired and self.spec.lock_delay and ended_at + self.spec.lock_delay > now:
            self.delays.append((ended_at + self.spec.lock_delay, mode))


class ModesMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.engine = LockEngine()
        self.models = {name: Model(spec) for name, spec in POOLS.items()}
        self.parked: list[Waiter] = []
        self.last_fence = 0

    def _check_fence(self, fence: int) -> None:
        assert fence > self.last_fence, "fencing tokens must strictly increase"
        self.last_fence = fence

    def _delivered(self, granted: list[Waiter], new_holds: bool = True) -> None:
        fences = set()
        for w in granted:
            assert self.engine.deliver(w)
            assert w.lease is not None
            fences.add(w.lease.fence)
            self.parked.remove(w)
        for fence in sorted(fences) if new_holds else ():
            assert fence > self.last_fence, "fencing tokens must strictly increase"
            self.last_fence = fence

    @rule(pool=POOL_NAMES, owner=OWNERS, mode=MODES)
    def get(self, pool: str, owner: str, mode: str) -> None:
        model = self.models[pool]
        lease = self.engine.acquire(POOLS[pool], owner, self.now, mode=mode)
        held = model.holders.get(owner)
        if held is not None:
            if held[0] == EXCLUSIVE or mode == SHARED:
                assert lease is not None and lease.owner == owner
                held[1][lease.token] = self.now + model.end()
            else:
                assert lease is None, "a shared holder was given an exclusive lease"
            return
        if not model.queue and model.fits(mode):
            assert lease is not None, "a free slot of that mode was refused"
            model.holders[owner] = [mode, {lease.token: self.now + model.end()}]
            self._check_fence(lease.fence)
        else:
            assert lease is None, f"{owner} got {mode} past the queue or a taken slot"

    @rule(pool=POOL_NAMES, owner=OWNERS, mode=MODES)
    def wait(self, pool: str, owner: str, mode: str) -> None:
        model = self.models[pool]
        waiter = self.engine.enqueue(POOLS[pool], owner, self.now, mode=mode)
        self.parked.append(waiter)
        held = model.holders.get(owner)
        if held is not None and (held[0] == EXCLUSIVE or mode == SHARED):
            assert waiter.lease is not None
            held[1][waiter.lease.token] = self.now + model.end()
            self._delivered([waiter], new_holds=False)
            return
        place = next((p for p in model.queue if p[0] == owner), None)
        if place is not None:
            place[1].append(waiter)
        elif held is None and not model.queue and model.fits(mode):
            assert waiter.lease is not None, "a free slot of that mode was not granted"
            model.holders[owner] = [mode, {waiter.lease.token: self.now + model.end()}]
            self._delivered([waiter])
            return
        else:
            model.queue.append([owner, [waiter]])
        assert waiter.lease is None, f"{owner} ({mode}) was granted past the queue"

    @rule(pick=st.integers(0, 20))
    def hang_up(self, pick: int) -> None:
        queued = [w for w in self.parked if w.lease is None]
        if not queued:
            return
        waiter = queued[pick % len(queued)]
        model = self.models[waiter.pool]
        granted = self.engine.cancel(waiter, self.now)
        self.parked.remove(waiter)
        place = next(p for p in model.queue if p[0] == waiter.owner)
        place[1].remove(waiter)
        if not place[1]:
            model.queue.remove(place)
        # A waiting exclusive request that leaves can let shared ones behind it in.
        assert granted == model.grant_heads(self.now)
        self._delivered(granted)

    @rule(pool=POOL_NAMES, owner=OWNERS)
    def release(self, pool: str, owner: str) -> None:
        model = self.models[pool]
        hold, granted = self.engine.release(pool, owner, self.now)
        if owner not in model.holders:
            assert hold is None and granted == []
            return
        assert hold is not None
        model.holders[owner][1].clear()
        model.end_hold_if_empty(owner, self.now, False, self.now)
        assert granted == model.grant_heads(self.now)
        self._delivered(granted)

    @rule(pool=POOL_NAMES, owner=OWNERS, pick=st.integers(0, 3))
    def release_lease(self, pool: str, owner: str, pick: int) -> None:
        model = self.models[pool]
        if owner not in model.holders:
            return
        tokens = sorted(model.holders[owner][1])
        token = tokens[pick % len(tokens)]
        lease, granted = self.engine.release_lease(pool, token, self.now, owner)
        assert lease is not None
        del model.holders[owner][1][token]
        model.end_hold_if_empty(owner, self.now, False, self.now)
        assert granted == model.grant_heads(self.now)
        self._delivered(granted)

    @rule(dt=st.sampled_from([0.25, 0.5, 1.0, 1.5, 2.0, 3.0]))
    def advance(self, dt: float) -> None:
        self.now += dt
        granted = self.engine.expire(self.now)
        expected: list[Waiter] = []
        for model in self.models.values():
            for owner in list(model.holders):
                leases = model.holders[owner][1]
                ended = [t for t, end in leases.items() if end <= self.now]
                last_end = max((leases[t] for t in ended), default=None)
                for t in ended:
                    del leases[t]
                if last_end is not None:
                    model.end_hold_if_empty(owner, last_end, True, self.now)
            model.delays = [d for d in model.delays if d[0] > self.now]
            expected += model.grant_heads(self.now)
        assert sorted(w.id for w in granted) == sorted(w.id for w in expected)
        self._delivered(granted)

    @invariant()
    def agrees_with_model(self) -> None:
        for name, model in self.models.items():
            holds = {h.owner: (h.mode, set(h.leases)) for h in self.engine.holders(name)}
            assert holds == {o: (m, set(ls)) for o, (m, ls) in model.holders.items()}
            assert self.engine.waiting(name) == [p[0] for p in model.queue]
            state = self.engine.state(name)
            delays = [] if state is None else [d for d in state.delays if d[0] > self.now]
            assert sorted(delays) == sorted(model.delays)

    @invariant()
    def modes_never_mix(self) -> None:
        for name, spec in POOLS.items():
            modes = [h.mode for h in self.engine.holders(name)]
            shared = modes.count(SHARED)
            assert shared == 0 or shared == len(modes), f"{name}: shared beside exclusive"
            assert len(modes) - shared <= spec.maxlocks
            assert spec.max_shared is None or shared <= spec.max_shared

    @invariant()
    def deadline_is_next_event(self) -> None:
        when = self.engine.next_deadline()
        assert when is None or when > self.now


TestModes = ModesMachine.TestCase
TestModes.settings = settings(max_examples=400, stateful_step_count=60, deadline=None)


def test_shared_requests_at_the_head_are_granted_together() -> None:
    engine = LockEngine()
    spec = POOLS["rw"]
    writer = engine.acquire(spec, "w", 0.0)
    assert writer is not None
    readers = [engine.enqueue(spec, f"r{i}", 0.0, mode=SHARED) for i in range(3)]
    late_writer = engine.enqueue(spec, "w2", 0.0)
    late_reader = engine.enqueue(spec, "r9", 0.0, mode=SHARED)
    granted = engine.release_lease("rw", writer.token, 1.0)[1]
    assert granted == readers  # together; the reader behind the waiting writer waits
    assert late_writer.lease is None and late_reader.lease is None
    assert engine.acquire(spec, "r10", 1.0, mode=SHARED) is None  # no jumping the queue


def test_lock_delay_after_expiry_only() -> None:
    engine = LockEngine()
    spec = PoolSpec("p", maxlocks=1, expire=10.0, lock_delay=5.0)
    first = engine.acquire(spec, "a", 0.0)
    assert first is not None
    waiter = engine.enqueue(spec, "b", 1.0)
    assert engine.expire(10.0) == []  # expired: the slot stays taken until 15
    assert engine.next_deadline() == 15.0
    assert engine.acquire(spec, "c", 14.9) is None
    assert engine.expire(15.0) == [waiter]
    assert engine.deliver(waiter) and waiter.lease is not None
    # A release frees the slot at once.
    engine.release_lease("p", waiter.lease.token, 16.0)
    assert engine.acquire(spec, "c", 16.0) is not None


def test_modes_and_lock_delays_survive_the_stored_record_and_pages() -> None:
    """What the shared backends store: a hold's mode, a waiter's (in the record
    and in a page entry), and a lock-delay's end, read back into an engine."""
    from distributex.backends.record import decode_pool, encode_pool, queue_entry, waiter_of

    spec = PoolSpec("p", maxlocks=2, expire=10.0, lock_delay=5.0)
    engine = LockEngine()
    reader = engine.acquire(spec, "r", 0.0, mode=SHARED)
    lost = engine.acquire(PoolSpec("q", expire=1.0, lock_delay=5.0), "x", 0.0)
    assert reader is not None and lost is not None
    writer = engine.enqueue(spec, "w", 0.0)
    late = engine.enqueue(spec, "r2", 0.0, mode=SHARED)
    engine.expire(1.0)
    for name in ("p", "q"):
        state = engine.state(name)
        assert state is not None
        raw = encode_pool(name, state, engine.last_fence, "epoch")
        back, _epoch = decode_pool(raw)
        again = LockEngine()
        again.restore(POOLS["rw"] if name == "x" else PoolSpec(name, lock_delay=5.0), back)
        assert [h.mode for h in again.holders(name)] == [h.mode for h in state.holds]
        assert [w.mode for w in back.queue] == [w.mode for w in state.queue]
        assert back.delays == state.delays
    assert engine.state("q").delays == [(6.0, EXCLUSIVE)]  # type: ignore[union-attr]
    entry = waiter_of("p", json.loads(queue_entry(late)))
    assert (entry.mode, entry.id) == (SHARED, late.id)
    assert waiter_of("p", json.loads(queue_entry(writer))).mode == EXCLUSIVE
    # A 0.7-style record (no modes) reads as exclusive.
    assert b'"exclusive"' not in encode_pool("p", engine.state("p"), 9, "e")
