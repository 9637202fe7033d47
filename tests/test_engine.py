"""The lock engine on a fake clock: the rules, one readable case each."""

from __future__ import annotations

from distributex.engine import LockEngine, PoolSpec

MUTEX = PoolSpec("m", maxlocks=1, expire=10)
SEM = PoolSpec("s", maxlocks=2, expire=0)


def test_grant_that_cannot_be_delivered_is_undone_and_passed_on() -> None:
    engine = LockEngine()
    engine.acquire(MUTEX, "holder", 0)
    gone = engine.enqueue(MUTEX, "gone", 1)
    stays = engine.enqueue(MUTEX, "stays", 2)
    _lease, granted = engine.release("m", "holder", 3)
    assert granted == [gone]  # granted, but its client hung up before the answer went out
    assert engine.cancel(gone, 3) == [stays]
    assert engine.deliver(stays)
    assert [lease.owner for lease in engine.holders("m")] == ["stays"]
    assert not engine.deliver(gone)  # its lease is no longer current


def test_delivered_grant_survives_a_later_hang_up() -> None:
    engine = LockEngine()
    waiter = engine.enqueue(MUTEX, "a", 0)
    assert engine.deliver(waiter)
    assert engine.cancel(waiter, 1) == []
    assert [lease.owner for lease in engine.holders("m")] == ["a"]


def test_expiry_is_exact_and_hands_the_slot_on() -> None:
    engine = LockEngine()
    lease = engine.acquire(MUTEX, "a", 5)
    assert lease is not None and lease.expires_at == 15
    waiter = engine.enqueue(MUTEX, "b", 6)
    assert engine.next_deadline() == 15
    assert engine.expire(14.999) == []
    assert engine.expire(15) == [waiter]
    assert waiter.lease is not None and waiter.lease.expires_at == 25


def test_renewal_moves_the_deadline() -> None:
    engine = LockEngine()
    lease = engine.acquire(MUTEX, "a", 0, ttl=4)
    assert lease is not None
    assert engine.renew("m", lease.token, 3) is lease
    assert engine.next_deadline() == 7
    assert engine.expire(4) == [] and engine.lease(lease.token) is lease
    assert engine.renew("m", lease.token, 5, owner="someone-else") is None
    engine.expire(7)
    assert engine.lease(lease.token) is None
    assert engine.renew("m", lease.token, 8) is None


def test_ttl_is_bounded_by_expire() -> None:
    assert MUTEX.lease_ttl(None) == 10
    assert MUTEX.lease_ttl(3) == 3
    assert MUTEX.lease_ttl(30) == 10
    assert SEM.lease_ttl(30) == 30  # expire 0: the client's ttl is the only bound
    assert SEM.lease_ttl(None) == 0


def test_holder_asking_again_gets_the_same_lease_and_no_new_slot() -> None:
    engine = LockEngine()
    first = engine.acquire(SEM, "a", 0)
    assert engine.acquire(SEM, "a", 1) is first
    waiter = engine.enqueue(SEM, "a", 2)
    assert waiter.lease is first
    assert engine.acquire(SEM, "b", 3) is not None  # the second slot is still free


def test_idle_pools_are_forgotten_and_fences_never_reused() -> None:
    engine = LockEngine(first_fence=100)
    fences = []
    for i in range(3):
        lease = engine.acquire(MUTEX, f"h{i}", i)
        assert lease is not None
        fences.append(lease.fence)
        engine.release("m", f"h{i}", i)
        assert engine.pool_names() == []
    assert fences == [100, 101, 102]


def test_stale_deadlines_do_not_pile_up() -> None:
    engine = LockEngine()
    for i in range(10_000):
        engine.acquire(MUTEX, "a", i)
        engine.release("m", "a", i)
    assert len(engine._deadlines) <= 64
    assert engine.next_deadline() is None
