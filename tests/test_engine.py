"""The lock engine on a fake clock: the rules, one readable case each."""

from __future__ import annotations

from distributex.engine import MAX_LEASES_PER_HOLD, LockEngine, PoolSpec

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


def test_holder_asking_again_gets_a_lease_of_its_hold_and_no_new_slot() -> None:
    engine = LockEngine()
    first = engine.acquire(SEM, "a", 0)
    again = engine.acquire(SEM, "a", 1)
    assert first is not None and again is not None
    assert again.token != first.token and again.fence == first.fence
    waiter = engine.enqueue(SEM, "a", 2)
    assert waiter.lease is not None and waiter.lease.hold is first.hold
    assert engine.acquire(SEM, "b", 3) is not None  # the second slot is still free


def test_one_run_releasing_its_lease_keeps_the_other_runs_slot() -> None:
    """Two runs under one host name: the first one's release must not free the pool."""
    engine = LockEngine()
    run1 = engine.acquire(MUTEX, "host-a", 0, ttl=6)
    run2 = engine.acquire(MUTEX, "host-a", 1, ttl=6)
    assert run1 is not None and run2 is not None
    other = engine.enqueue(MUTEX, "host-b", 2)
    assert engine.release_lease("m", run1.token, 3) == (run1, [])
    assert other.lease is None
    assert engine.renew("m", run2.token, 4) is run2
    assert engine.expire(9.5) == []  # run1's lease would have ended at 6, run2's is at 10
    assert engine.release_lease("m", run2.token, 9.5) == (run2, [other])


def test_legacy_release_by_host_ends_every_lease_of_the_hold() -> None:
    engine = LockEngine()
    a = engine.acquire(MUTEX, "h", 0)
    b = engine.acquire(MUTEX, "h", 1)
    waiter = engine.enqueue(MUTEX, "next", 2)
    hold, granted = engine.release("m", "h", 3)
    assert hold is not None and granted == [waiter]
    assert engine.lease(a.token) is None and engine.lease(b.token) is None


def test_hold_ends_when_its_last_lease_expires() -> None:
    engine = LockEngine()
    engine.acquire(MUTEX, "h", 0, ttl=2)
    engine.acquire(MUTEX, "h", 1, ttl=5)
    waiter = engine.enqueue(MUTEX, "next", 1)
    assert engine.expire(2) == []
    assert engine.next_deadline() == 6
    assert engine.expire(6) == [waiter]


def test_leases_per_hold_are_bounded() -> None:
    engine = LockEngine()
    tokens = [engine.acquire(MUTEX, "looping", i).token for i in range(MAX_LEASES_PER_HOLD + 10)]
    (hold,) = engine.holders("m")
    assert len(hold.leases) == MAX_LEASES_PER_HOLD
    assert engine.lease(tokens[0]) is None and engine.lease(tokens[-1]) is not None


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


def test_paused_engine_grants_nothing_until_resumed() -> None:
    engine = LockEngine()
    engine.pause()
    assert engine.acquire(SEM, "a", 0) is None
    first = engine.enqueue(SEM, "a", 1)
    second = engine.enqueue(SEM, "b", 2)
    third = engine.enqueue(SEM, "c", 3)
    assert first.lease is None and engine.waiting("s") == ["a", "b", "c"]
    assert engine.resume(4) == [first, second]  # two slots, in arrival order
    assert engine.waiting("s") == ["c"] and third.lease is None


def test_a_waiter_queued_before_expire_was_lowered_is_granted_the_new_bound() -> None:
    engine = LockEngine()
    engine.acquire(MUTEX, "a", 0)
    default, asked = engine.enqueue(MUTEX, "b", 1), engine.enqueue(MUTEX, "b", 1, ttl=8)
    engine.reconfigure(PoolSpec("m", maxlocks=1, expire=4), 2)
    engine.release("m", "a", 3)
    assert default.lease is not None and default.lease.expires_at == 7
    assert asked.lease is not None and asked.lease.expires_at == 7


def test_leases_that_never_ended_get_a_new_expire_at_their_renewal_or_grant() -> None:
    engine = LockEngine()
    lease = engine.acquire(SEM, "a", 0)
    engine.acquire(SEM, "b", 0)
    waiter = engine.enqueue(SEM, "c", 1)
    engine.reconfigure(PoolSpec("s", maxlocks=2, expire=5), 2)
    assert lease is not None and engine.renew("s", lease.token, 3) is lease
    assert lease.expires_at == 8
    engine.release("s", "b", 4)
    assert waiter.lease is not None and waiter.lease.expires_at == 9
