"""The shared-state path keeps the engine's rules: property tests without a store.

A store-backed backend never keeps an engine: every step restores the pool
from its stored record into a fresh engine, runs one request and encodes the
result again. Hypothesis drives random requests through that path and
through one long-lived engine side by side, and checks that both give the
very same answers (grants, fences, tokens, expiries, queue order, who was
woken) after every request, also for waits written after they came (placed
by arrival). So the record format and ``restore``/``state``
lose nothing the rules depend on.
"""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from distributex.backends.record import decode_pool, encode_pool
from distributex.engine import LockEngine, PoolSpec, PoolState

SPECS = [
    PoolSpec("mutex", maxlocks=1, expire=3.0),
    PoolSpec("sem", maxlocks=3, expire=0.0),
    PoolSpec("short", maxlocks=2, expire=1.5),
]
OWNERS = st.sampled_from(["a", "b", "c", "d"])
TTLS = st.sampled_from([None, None, 0.5, 2.0, 10.0])
OPS = st.tuples(
    st.sampled_from(
        ["get", "wait", "wait", "deliver", "cancel", "release", "release_lease", "renew", "advance"]
    ),
    OWNERS,
    TTLS,
    st.integers(0, 7),
    st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.5, 3.0]),
)


def describe(engine: LockEngine, pool: str) -> tuple:
    """Everything the rules depend on, in comparable form."""
    holds = tuple(
        (
            h.owner,
            h.fence,
            tuple(
                (t, lease.ttl, lease.expires_at, lease.delivered, lease.waiter and lease.waiter.id)
                for t, lease in sorted(h.leases.items())
            ),
        )
        for h in engine.holders(pool)
    )
    waiters = tuple((w.id, w.owner, w.ttl, w.since) for w in engine.waiters_of(pool))
    return holds, tuple(engine.waiting(pool)), waiters


def lease_view(lease) -> tuple | None:
    return None if lease is None else (lease.token, lease.fence, lease.ttl, lease.expires_at)


class Direct:
    """One engine for the whole run (the inmemory backend's way)."""

    def __init__(self, spec: PoolSpec) -> None:
        tokens = itertools.count()
        self.spec = spec
        self.engine = LockEngine(new_token=lambda: f"t{next(tokens)}")

    def step(self, op, now: float):
        woken = [w.id for w in self.engine.expire(now)]
        return woken, op(self.engine), self.engine


class Shared:
    """A fresh engine per request, restored from the encoded record (the shared layer's way)."""

    def __init__(self, spec: PoolSpec, compress: bool = False) -> None:
        self.tokens = itertools.count()
        self.spec = spec
        self.compress = compress  # as stores that keep records zlib-compressed (etcd)
        self.record = encode_pool(spec.name, None, 0, "e", compress=compress)

    def step(self, op, now: float):
        state, _epoch = decode_pool(self.record)
        engine = LockEngine(first_fence=state.fence + 1, new_token=lambda: f"t{next(self.tokens)}")
        if state.holds or state.queue:
            engine.restore(self.spec, state)
        woken = [w.id for w in engine.expire(now)]
        result = op(engine)
        self.record = encode_pool(
            self.spec.name,
            engine.state(self.spec.name),
            engine.last_fence,
            "e",
            compress=self.compress,
        )
        assert self.record.startswith(b"{") != self.compress
        # The record reads back to the very same record.
        again, _ = decode_pool(self.record)
        assert encode_pool(self.spec.name, again, again.fence, "e", compress=self.compress) == (
            self.record
        )
        # A look at the grants only (a nudged read) finds the same holds and no queue.
        holds, _ = decode_pool(self.record, queue=False)
        assert holds.queue == [] and holds.fence == again.fence
        assert encode_pool(self.spec.name, holds, holds.fence, "e") == encode_pool(
            self.spec.name,
            PoolState(again.fence, again.holds, [], again.blocked_until),
            again.fence,
            "e",
        )
        return woken, result, engine


@settings(max_examples=300, deadline=None)
@given(spec=st.sampled_from(SPECS), ops=st.lists(OPS, max_size=60), compress=st.booleans())
def test_restoring_from_the_record_at_every_step_changes_no_answer(
    spec: PoolSpec, ops, compress: bool
) -> None:
    direct, shared = Direct(spec), Shared(spec, compress)
    now = 0.0
    waiter_ids: list[str] = []
    tokens: list[str] = []
    pool = spec.name
    for n, (kind, owner, ttl, pick, dt) in enumerate(ops):
        if kind == "advance":
            now += dt
            op = None
        elif kind == "get":

            def op(e, owner=owner, ttl=ttl, now=now):
                return lease_view(e.acquire(spec, owner, now, ttl))
        elif kind == "wait":
            wid = f"w{n}"
            waiter_ids.append(wid)

            # Half of them came ``dt`` before they are written (a step that lingered).
            since = now - dt if pick % 2 else None

            def op(e, owner=owner, ttl=ttl, wid=wid, now=now, since=since):
                w = e.enqueue(spec, owner, now, ttl, server="s", waiter_id=wid, since=since)
                return lease_view(w.lease)
        elif kind in ("deliver", "cancel"):
            if not waiter_ids:
                continue
            wid = waiter_ids[pick % len(waiter_ids)]

            def op(e, wid=wid, kind=kind, now=now):
                w = e.find_waiter(pool, wid)
                if w is None:
                    return "none"
                if kind == "deliver":
                    return e.deliver(w) if w.lease is not None else "queued"
                return [g.id for g in e.cancel(w, now)]
        elif kind == "release":

            def op(e, owner=owner, now=now):
                hold, granted = e.release(pool, owner, now)
                return (hold and hold.fence, [g.id for g in granted])
        else:  # release_lease, renew: a token seen before, or a forged one
            token = tokens[pick % len(tokens)] if tokens and pick < 6 else "forged"

            def op(e, token=token, owner=owner, ttl=ttl, kind=kind, now=now):
                if kind == "renew":
                    return lease_view(e.renew(pool, token, now, ttl, owner))
                lease, granted = e.release_lease(pool, token, now, owner)
                return (lease_view(lease), [g.id for g in granted])

        a = direct.step(op or (lambda e: None), now)
        b = shared.step(op or (lambda e: None), now)
        assert a[:2] == b[:2], (kind, a[:2], b[:2])
        assert describe(a[2], pool) == describe(b[2], pool)
        holders = a[2].holders(pool)
        assert len(holders) <= spec.maxlocks
        tokens = sorted({t for h in holders for t in h.leases} | set(tokens))
