"""A /wait/ on a shared store: queued by a step, parked here until granted.

The waiter's entry goes in the pool's stored queue (the record's window, or
a page of its tail when the queue is long: ``pages.py``); the request waits
on this server for a step (ours, or a nudge's or a poll's) to wake it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from distributex.backends.base import BackendUnavailable
from distributex.backends.nudges import Wakeups
from distributex.backends.pages import PageQueue, Sealed, page_for_arrival
from distributex.backends.pool import Pools
from distributex.backends.steps import Steps
from distributex.backends.waiters import LocalWaiter
from distributex.engine import EXCLUSIVE, Lease, LockEngine, PoolSpec
from distributex.tokens import token_urlsafe

log = logging.getLogger("distributex.shared")

# A queue entry takes its place by when its request came (on the store's
# clock: Redis's own, else each server's), also when its write lingered or was
# redone on a record another server wrote meanwhile. Servers' clocks may
# disagree, so an arrival time is taken no earlier than this many seconds
# before the latest one already queued: a server whose clock is behind (by
# hours, say) moves its waits past at most that much of the queue.
ARRIVAL_TRUST = 1.0

# An enqueue that granted at once and was then undone (the client had gone).
_NOTHING: Any = object()


@dataclass(frozen=True)
class _Paged:
    """An arrival's step says: the queue is long, append to its pages from ``first`` on."""

    first: int


class Waits:
    """The /wait/ verb and what it takes: queueing, waiting, delivering, cancelling."""

    def __init__(
        self,
        steps: Steps,
        pools: Pools,
        pages: PageQueue,
        wakeups: Wakeups,
        release: Callable[[PoolSpec, str, str | None], Awaitable[Any]],
        background: Callable[[Any], None],
        check_open: Callable[[], None],
        closed: Callable[[], bool],
    ) -> None:
        self.steps = steps
        self.store = steps.store
        self.server_id = steps.server_id
        self.pools = pools
        self.pages = pages
        self.wakeups = wakeups
        self._release = release
        self._background = background
        self._check_open = check_open
        self._closed = closed

    async def wait(
        self,
        spec: PoolSpec,
        owner: str,
        ttl: float | None,
        timeout: float | None,
        still_wanted: Callable[[], bool],
        mode: str = EXCLUSIVE,
    ) -> Lease | None:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        room = self.pools.room(spec.name)
        while True:
            # Known to this server before its entry is written, so no step of
            # ours takes it for a stray entry.
            local = LocalWaiter(spec, token_urlsafe(9), still_wanted, mode=mode)
            room.waiters.add(local)
            local.came = self.store.now()

            def enqueue(engine: LockEngine, now: float, local: LocalWaiter = local) -> Any:
                # Its place: when it came, bounded by ARRIVAL_TRUST against each
                # record it runs on (a redo runs on a newer one), never lowered.
                last = engine.last_arrival(spec.name)
                since = local.came if last is None else max(local.came, last - ARRIVAL_TRUST)
                if local.since is None or since > local.since:
                    if local.since is not None:  # its encoded entry holds the old time
                        room.fragments.pop(local.id, None)
                    local.since = since
                marks = room.step_marks
                first = (
                    None
                    if marks is None
                    else page_for_arrival(engine, spec.name, owner, marks, mode)
                )
                if first is not None:
                    # Behind a long queue: to the pages, after this step.
                    local.queued = False  # (a redo of the step may come here after all)
                    return _Paged(first)
                waiter = engine.enqueue(
                    self.pools.in_force(spec),
                    owner,
                    now,
                    ttl,
                    server=self.server_id,
                    waiter_id=local.id,
                    since=local.since,
                    mode=mode,
                )
                if waiter.lease is None:
                    local.queued = True  # later steps of this batch may grant and deliver it
                    return None
                if still_wanted() and engine.deliver(waiter):
                    return waiter.lease  # granted at once: delivered in the same write
                engine.cancel(waiter, now)
                return _NOTHING

            clean = False  # True once the entry is known to be gone from the store
            try:
                lease = await self.steps.step(
                    spec,
                    enqueue,
                    undo=lambda lease: self.release_token(spec, owner, lease),
                    lazy=True,
                )
                while isinstance(lease, _Paged):
                    if await self._to_pages(spec, owner, ttl, local, lease.first):
                        lease = None
                        break
                    # The end of the pages was sealed (the pool may have left
                    # paging): ask the record again, in order.
                    lease = await self.steps.step(
                        spec, enqueue, undo=lambda lease: self.release_token(spec, owner, lease)
                    )
                if lease is not None:
                    clean = True
                    return None if lease is _NOTHING else lease
                outcome = await self._wait_for_grant(spec, owner, local, deadline, still_wanted)
                clean = True
            finally:
                room.waiters.forget(local.id)
                if not clean:
                    # Hung up, or the store failed: the entry (or a grant to it) may
                    # still be stored; take it off in the background, until it is.
                    self._background(
                        self.cancel_waiter(spec, local.id, persist=True, page=local.page)
                    )
                    if local.lease is not None:
                        self._background(self.release_token(spec, owner, local.lease))
            if outcome != "requeue":
                return outcome
            log.info(
                "a waiter on '%s' was dropped from the shared queue: queueing again", spec.name
            )

    async def _to_pages(
        self, spec: PoolSpec, owner: str, ttl: float | None, local: LocalWaiter, first: int
    ) -> bool:
        """Put a waiter's entry at the end of the queue's pages; False if that end is sealed."""
        assert local.since is not None
        entry = [local.id, self.server_id, owner, spec.lease_ttl(ttl), local.since]
        if local.mode != EXCLUSIVE:
            entry.append(local.mode)  # as in the record (queue_entry)
        try:
            page = await self.pages.append(self.steps.pool_key(spec.name), first, entry)
        except Sealed:
            return False
        self.pools.room(spec.name).waiters.to_page(local, page)
        local.queued = True
        return True

    async def _wait_for_grant(
        self,
        spec: PoolSpec,
        owner: str,
        local: LocalWaiter,
        deadline: float | None,
        still_wanted: Callable[[], bool],
    ) -> Any:
        """Wait until granted; returns the lease, None (timed out, hung up) or "requeue"."""
        loop = asyncio.get_running_loop()
        self.wakeups.watch(self.pools.room(spec.name), spec)
        try:
            while True:
                left = None if deadline is None else deadline - loop.time()
                if left is not None and left <= 0:
                    raise TimeoutError
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await local.wake.wait()
                self._check_open()
                local.wake.clear()
                if local.lease is not None:
                    return local.lease
                if local.missing:
                    return "requeue"
                if local.granted:
                    return await self._deliver(spec, owner, local, still_wanted)
        except TimeoutError:
            local.cancelling = True
            await self.cancel_waiter(spec, local.id, page=local.page)
            # A step may have delivered it just before the time ran out: then it is ours.
            return local.lease

    async def _deliver(
        self,
        spec: PoolSpec,
        owner: str,
        local: LocalWaiter,
        still_wanted: Callable[[], bool],
    ) -> Lease | None:
        def deliver(engine: LockEngine, now: float) -> Lease | None:
            waiter = engine.find_waiter(spec.name, local.id)
            if waiter is None or waiter.lease is None:
                return None
            if not still_wanted():
                engine.cancel(waiter, now)
                return None
            return waiter.lease if engine.deliver(waiter) else None

        return await self.steps.step(
            spec, deliver, undo=lambda lease: self.release_token(spec, owner, lease)
        )

    async def cancel_waiter(
        self, spec: PoolSpec, waiter_id: str, persist: bool = False, page: int | None = None
    ) -> None:
        """Take a waiter off the queue (or undo its undelivered grant).

        ``persist``: keep trying while the store does not answer, so that no
        entry of ours is left to be granted and never answered. ``page``: its
        entry was on that page of the queue's tail; taken off there if the
        page is not sealed (else it is in the record, or on its way there).
        """
        if page is not None:
            with contextlib.suppress(BackendUnavailable):
                if await self.pages.remove(self.steps.pool_key(spec.name), page, waiter_id):
                    return
        room = self.pools.room(spec.name)

        def cancel(engine: LockEngine, now: float) -> None:
            waiter = engine.find_waiter(spec.name, waiter_id)
            if waiter is not None and waiter_id not in room.waiters.answered:
                engine.cancel(waiter, now)

        delay = 0.1
        while not self._closed():
            try:
                await self.steps.step(spec, cancel)
                return
            except BackendUnavailable:
                if not persist:
                    # Not now: go on trying in the background (its caller is answered).
                    self._background(self.cancel_waiter(spec, waiter_id, persist=True))
                    return
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)

    async def release_token(self, spec: PoolSpec, owner: str, lease: Any) -> None:
        """Undo a grant whose answer may not have gone out."""
        if not isinstance(lease, Lease):
            return
        delay = 0.1
        while not self._closed():
            try:
                await self._release(spec, owner, lease.token)
                return
            except BackendUnavailable:
                await asyncio.sleep(delay)  # until the store answers, or the lease expires
                delay = min(5.0, delay * 2)
                if lease.ttl and self.store.now() > lease.expires_at:
                    return
