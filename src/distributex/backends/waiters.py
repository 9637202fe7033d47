"""This server's waiters on one pool: the /wait/ requests parked here.

A waiter's entry is in the pool's stored queue (in the record's window, or on
a page of its tail: ``pages.py``); the waiter itself, its client's request,
lives only here. A step delivers grants to our waiters as it sees them, and
wakes those the stored state says were granted elsewhere or dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from distributex.engine import EXCLUSIVE, Lease, LockEngine, PoolSpec, PoolState

log = logging.getLogger("distributex.shared")

# A grant another server made to one of our waiters is answered as soon as we
# read it, without a write of ours, if its lease ends within this many seconds
# (the client's default lease is 60 s): one store write per hand-off across
# servers, not two. The price: if the waiter's server dies before it could
# answer, nobody can tell whether it did, so the grant holds until it
# expires. Longer leases (and leases that never expire) are delivered by a
# write first, so such a grant is undone within seconds of the death.
ANSWER_ON_READ_MAX_TTL = 60.0


def answered_on_read(lease: Lease) -> bool:
    """May the waiter's server answer this grant on reading it (ANSWER_ON_READ_MAX_TTL)?"""
    return 0 < lease.ttl <= ANSWER_ON_READ_MAX_TTL


@dataclass(eq=False)
class LocalWaiter:
    """A /wait/ parked on this server; its entry (``id``) is in the pool's stored queue."""

    spec: PoolSpec
    id: str
    still_wanted: Callable[[], bool]
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    queued: bool = False  # its entry was written
    granted: bool = False  # granted, and not yet delivered by a step of ours
    lease: Lease | None = None  # granted and delivered by a step of ours
    missing: bool = False  # not in the stored state any more (dropped, or the store lost it)
    cancelling: bool = False  # timed out: a step takes it off (no answering it on a read)
    came: float = 0.0  # when the request came (store clock)
    since: float | None = None  # its place in the queue (see ARRIVAL_TRUST)
    page: int | None = None  # its entry is on this page of the queue's tail (pages.py)
    mode: str = EXCLUSIVE  # the mode it asks


class LocalWaiters:
    """Our waiters on one pool, by id and by where their entry is stored."""

    def __init__(self, pool: str) -> None:
        self.pool = pool
        self.all: dict[str, LocalWaiter] = {}
        # By where the entry is: in the record (or not yet written), or on a
        # page (page -> id -> waiter). A step looks at the first only: its
        # cost does not grow with the queue.
        self.window: dict[str, LocalWaiter] = {}
        self.paged: dict[int, dict[str, LocalWaiter]] = {}
        # Ids of our waiters answered YES on another server's grant, without
        # a write of ours: a later step of ours marks them delivered.
        self.answered: set[str] = set()

    def __bool__(self) -> bool:
        return bool(self.all)

    def add(self, waiter: LocalWaiter) -> None:
        """Known before its entry is written, so no step of ours takes it for a stray."""
        self.all[waiter.id] = waiter
        self.window[waiter.id] = waiter

    def to_page(self, waiter: LocalWaiter, page: int) -> None:
        """Its entry went to a page of the queue's tail (if it still waits here)."""
        if self.all.get(waiter.id) is waiter:
            waiter.page = page
            self.window.pop(waiter.id, None)
            self.paged.setdefault(page, {})[waiter.id] = waiter

    def forget(self, waiter_id: str) -> None:
        waiter = self.all.pop(waiter_id, None)
        self.window.pop(waiter_id, None)
        if waiter is not None and waiter.page is not None:
            on_page = self.paged.get(waiter.page, {})
            on_page.pop(waiter_id, None)
            if not on_page:
                self.paged.pop(waiter.page, None)

    def promote(self, first: int | None) -> None:
        """Our waiters on pages the record has moved past (before ``first``): in
        the record now (or dropped)."""
        for number in sorted(n for n in self.paged if first is None or n < first):
            for waiter_id, waiter in self.paged.pop(number).items():
                waiter.page = None
                self.window[waiter_id] = waiter

    def deliver_granted(self, engine: LockEngine, now: float) -> dict[LocalWaiter, Lease]:
        """Deliver grants to our waiters in the step that sees them.

        A waiter whose client has gone is cancelled instead (which may grant
        the next one). Saves a step per hand-off; the leases count once the
        step's write succeeds.
        """
        delivered: dict[LocalWaiter, Lease] = {}
        while self.all:
            changed = False
            for waiter in engine.granted_waiters(self.pool):
                mine = self.all.get(waiter.id)
                if mine is None or not mine.queued or mine in delivered:
                    continue
                if mine.lease is not None:
                    engine.deliver(waiter)  # answered already (answer_granted): mark it
                elif mine.still_wanted() and engine.deliver(waiter):
                    assert waiter.lease is not None  # delivered: it holds its lease
                    delivered[mine] = waiter.lease
                else:
                    engine.cancel(waiter, now)
                    changed = True
            if not changed:
                break
        return delivered

    def wake(
        self, engine: LockEngine, delivered: dict[LocalWaiter, Lease], first: int | None
    ) -> None:
        """After a step's outcome is final: wake the waiters the state now says
        were granted (or dropped). ``first``: the record's first page now."""
        for waiter, lease in delivered.items():
            waiter.lease = lease
            waiter.wake.set()
        self.promote(first)
        if not self.window and not self.answered:
            return
        present = engine.waiter_ids(self.pool)
        if self.answered:
            # Written as delivered (or ended) by now: nothing left to mark.
            self.answered.intersection_update(present)
        if not self.window:
            return
        if self.window.keys() - present:
            # Woken in arrival order: each queues again as it wakes.
            for waiter in self.window.values():
                if waiter.id not in present and waiter.queued and waiter not in delivered:
                    waiter.missing = True
                    waiter.wake.set()
        for found in engine.granted_waiters(self.pool):
            mine = self.window.get(found.id)
            if mine is not None and mine.queued and mine not in delivered:
                mine.granted = True
                mine.wake.set()

    async def drop_stale(
        self,
        engine: LockEngine,
        now: float,
        server_id: str,
        dead_servers: Callable[[set[str]], Awaitable[set[str]]],
    ) -> None:
        """Cancel waiters (and undelivered grants) that nobody will answer.

        Those of servers that stopped beating, and this server's own that no
        parked request knows (left by a step whose write was in doubt).
        """
        # The record's waiters not parked here (other servers', and strays):
        # the record's (at most a window) looked up in ours, not
        # ``ids - self.all.keys()``, which walks every waiter parked here, on
        # pages too (a sixth of a step's CPU with 15,000 parked).
        all_here = self.all
        suspects = [w for w in engine.waiters_of(self.pool) if w.id not in all_here]
        if not suspects:
            return
        others = {w.server for w in suspects if w.server and w.server != server_id}
        dead = await dead_servers(others) if others else set()
        for waiter in suspects:
            if waiter.server in dead:
                if waiter.lease is not None and answered_on_read(waiter.lease):
                    # It may have been answered YES (without a write): it holds
                    # until it expires, like any lease of a client that went away.
                    engine.deliver(waiter)
                else:
                    log.info(
                        "dropping a waiter of stopped server %s on '%s'", waiter.server, self.pool
                    )
                    engine.cancel(waiter, now)
            elif waiter.server == server_id:
                if waiter.id in self.answered and waiter.lease is not None:
                    engine.deliver(waiter)
                else:
                    engine.cancel(waiter, now)

    def answer_granted(self, state: PoolState, now: float, server_id: str) -> bool:
        """Answer our waiters that another server's write granted, without a write.

        The grant is in the store already (``state`` was read from it), with a
        short lease (ANSWER_ON_READ_MAX_TTL): it holds until it is released or
        runs out, whatever becomes of this server, so the YES can go out now.
        (The record still names the waiter; our next step marks it
        delivered.) A longer lease, or one whose client has gone, takes a
        step of ours (deliver, or undo): returns True if one is needed.
        """
        needed = False
        for hold in state.holds:
            for lease in hold.leases.values():
                waiter = lease.waiter
                if waiter is None or waiter.server != server_id:
                    continue
                mine = self.all.get(waiter.id)
                if mine is None or mine.lease is not None:
                    needed |= mine is None and waiter.id not in self.answered
                    continue
                if (
                    not answered_on_read(lease)
                    or lease.expires_at <= now
                    or mine.cancelling
                    or not mine.still_wanted()
                ):
                    needed = True
                    continue
                lease.delivered, lease.waiter = True, None
                mine.lease = lease
                self.answered.add(waiter.id)
                mine.wake.set()
        return needed
