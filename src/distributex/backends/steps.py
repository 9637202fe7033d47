"""Steps: the engine's rules run on a pool's stored record, one batch of requests at a time.

A step reads the record (or takes the one kept from our last write), restores
it into a fresh engine, ends what is due, drops waiters nobody will answer,
runs its requests, and writes the result if it is still the version read
(compare-and-set); on a conflict it reads again and redoes the step.
Requests that come while a step of their pool is under way wait for the next
one, which applies them all in one read and one write.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import logging
import math
import random
from collections.abc import Callable
from typing import Any, TypeVar

from distributex.backends.base import BackendUnavailable
from distributex.backends.nudges import Peers, Wakeups
from distributex.backends.pages import PageQueue, take_due
from distributex.backends.pool import Brought, PoolRoom, Pools, Request, Written
from distributex.backends.record import PageMarks, StaleRecord, decode_record, encode_pool
from distributex.backends.store import Conflict, Store, Stored
from distributex.backends.storelife import Call, StoreLife
from distributex.backends.waiters import answered_on_read
from distributex.engine import Lease, LockEngine, PoolSpec

log = logging.getLogger("distributex.shared")

T = TypeVar("T")

# One whole step ends within this (then 503). A request may wait for the step
# under way and then its own: two steps stay under 5 s (with CALL_TIMEOUT 1.2 s
# for each store call).
STEP_TIMEOUT = 2.4
MAX_ATTEMPTS = 50
# A step that only queues waiters (nobody is answered, nothing durable) waits
# for company before it writes: under load the next release on this server
# comes soon after a client's new /wait/, and the two then make one write
# instead of two in a row (the second waiting for the first). It waits
# LINGER, or LINGER_PER_WAITER for each waiter queued ahead (up to
# LINGER_MAX): those are served first anyway, so the entry is in the store
# long before its turn, and on a store with slow commits (etcd) most queue
# entries ride on a release's write. Waits that come meanwhile and only queue
# linger along; any other request ends the wait.
LINGER = 0.002
LINGER_PER_WAITER = 0.001
LINGER_MAX = 0.05
# A pool with nothing held or queued keeps a small record (its fence) this long.
IDLE_TTL = 24 * 3600

_NOTHING: Any = object()


def no_change(engine: LockEngine, now: float) -> None:
    """A step that only does what is due (expiry, dropping dead servers' waiters)."""


class Steps:
    """Runs requests on pools' records for one server."""

    def __init__(
        self,
        store: Store,
        life: StoreLife,
        call: Call,
        pools: Pools,
        pool_key: Callable[[str], str],
        pages: PageQueue,
        peers: Peers,
        wakeups: Wakeups,
        check_open: Callable[[], None],
        note_error: Callable[[str], None],
        background: Callable[[Any], None],
        report: Callable[[list[Lease], bool], None],
    ) -> None:
        self.store = store
        self.life = life
        self._call = call
        self.pools = pools
        self.pool_key = pool_key
        self.pages = pages
        self.peers = peers
        self.wakeups = wakeups
        self._check_open = check_open
        self._note_error = note_error
        self._background = background
        self._report = report
        self.server_id = life.server_id

    async def step(
        self,
        spec: PoolSpec,
        op: Callable[[LockEngine, float], T],
        undo: Callable[[T], Any] | None = None,
        lazy: bool = False,
    ) -> T:
        """Run ``op`` on the pool's current state and write the result back atomically.

        Requests that arrive while a step of the pool is under way wait for
        the next one, and that one applies them all, in arrival order, in one
        read and one write: under load a server makes one step per round trip,
        not one per request. If the caller goes away (cancelled) after its
        request was taken into a step, or the step's write is in doubt (the
        store did not answer), ``undo(result)`` runs in the background: a grant
        nobody will answer must not stay held.
        """
        self._check_open()
        refusal = self.life.refusal()
        if refusal is not None:
            raise BackendUnavailable(refusal)
        spec = self.pools.in_force(spec)
        room = self.pools.room(spec.name)
        room.spec = spec
        request = Request(op, undo, asyncio.get_running_loop().create_future(), lazy)
        room.pending.append(request)
        if room.arrived is not None:
            room.arrived.set()
        if room.runner is None:
            room.runner = asyncio.create_task(self._run_steps(room, spec))
        result: T = await request.future
        return result

    async def _run_steps(self, room: PoolRoom, spec: PoolSpec) -> None:
        """Serve the pool's pending requests, a batch per step, until none is left."""
        try:
            while pending := room.pending:
                batch = [r for r in pending if not r.future.done()]
                pending.clear()
                if not batch:
                    continue
                doubt: list[Any] = []  # results of a write whose outcome is unknown
                try:
                    async with asyncio.timeout(STEP_TIMEOUT):
                        results = await self._step_once(room, spec, batch, doubt)
                except Exception as exc:
                    if not isinstance(exc, BackendUnavailable | TimeoutError):
                        log.exception("step on pool '%s' failed", spec.name)
                        exc = BackendUnavailable(f"internal error: {exc!r}")
                    if isinstance(exc, TimeoutError):
                        self.store.reset()
                        exc = BackendUnavailable(f"{self.store.description} did not answer in time")
                        self._note_error(str(exc))
                    for request, result in itertools.zip_longest(batch, doubt, fillvalue=_NOTHING):
                        if result is not _NOTHING and request.undo is not None:
                            self._background(request.undo(result))
                        if not request.future.done():
                            request.future.set_exception(exc)
                    # Those that came meanwhile get the same answer now, not after
                    # another step's timeout: every request is answered within 5 s.
                    for request in pending:
                        if not request.future.done():
                            request.future.set_exception(exc)
                    pending.clear()
                    continue
                for request, result in zip(batch, results, strict=True):
                    if not request.future.done():
                        request.future.set_result(result)
                    elif request.undo is not None:  # nobody will see this answer
                        self._background(request.undo(result))
        finally:
            room.runner = None
            left, room.pending = room.pending, []
            for request in left:
                if not request.future.done():
                    request.future.set_exception(BackendUnavailable("server is shutting down"))

    async def _linger(self, room: PoolRoom, until: float) -> list[Request]:
        """Wait until ``until`` (loop clock) for more requests on the pool; take them."""
        pending = room.pending
        if not pending:
            arrived = room.arrived = asyncio.Event()
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(until):
                        await arrived.wait()
            finally:
                room.arrived = None
        more = [r for r in pending if not r.future.done()]
        pending.clear()
        return more

    async def _step_once(
        self, room: PoolRoom, spec: PoolSpec, batch: list[Request], doubt: list[Any]
    ) -> Any:
        """One step for ``batch``: the results of its requests, in order.

        A batch of waits that only queue (nothing to answer, nothing durable)
        lingers for company first: requests that come meanwhile join the
        batch (``batch`` grows) and run on the same engine.
        """
        key = self.pool_key(spec.name)
        ops = [r.op for r in batch]
        lazy = all(r.lazy for r in batch)
        seen: Stored | None = None  # what a refused write said is stored now
        for attempt in range(MAX_ATTEMPTS):
            # The record this server wrote last, if the store told its version: a
            # read saved. If another server wrote since, the compare-and-set
            # fails and the step is redone from a real read.
            cached, room.kept = room.kept, None
            # A reload may have come since the step began (or the engine was kept).
            spec = self.pools.in_force(spec)
            engine: LockEngine | None = None
            if cached is not None:
                stored, epoch = cached.stored, cached.epoch
                if isinstance(cached, Written):
                    engine = cached.engine  # it holds that record's state
            elif seen is not None:
                # Read by the refused write, in this step: as good as a read now.
                # (A record gone is no Conflict: that takes a real read, epoch and all.)
                stored, seen = seen, None
            else:
                got = await self._call(self.store.get([key, self.life.epoch_key]))
                epoch = await self._call(
                    self.life.current(got.get(self.life.epoch_key), read=False)
                )
                stored = got.get(key)
            now = self.store.now()
            floor = room.fence_floor
            if engine is not None:
                engine.configure(spec)  # the cached engine is the state of ``stored`` already
                marks = copy.copy(room.marks or PageMarks())
            elif stored is not None:
                try:
                    decoded = decode_record(stored.value)
                except StaleRecord as exc:
                    raise BackendUnavailable(f"pool '{spec.name}': {exc}") from None
                restored, marks = decoded.state, decoded.pages
                engine = LockEngine(first_fence=max(restored.fence, floor) + 1)
                if (
                    restored.holds
                    or restored.queue
                    or restored.blocked_until != -math.inf
                    or restored.delays
                ):
                    engine.restore(spec, restored)
                room.compare_settings(spec, decoded.settings)
            else:
                # A new record: above the wall clock in µs (as the inmemory backend
                # starts) and above anything seen here, so fences never go back.
                engine = LockEngine(first_fence=max(int(now * 1_000_000), floor) + 1)
                self.pools.block_after_loss(engine, spec, epoch, now)
                marks = PageMarks()
            promised = promises(engine, spec.name)
            granted_before = self._granted_elsewhere(spec, engine)
            await take_due(self.pages, engine, spec, key, marks, now)
            # The ops see (and an arrival may start) this step's pages: see wait().
            room.step_marks = marks
            await room.waiters.drop_stale(engine, now, self.server_id, self.peers.dead)
            expired: list[Lease] = []
            engine.on_expire = expired.append
            engine.expire(now)
            engine.on_expire = None
            results = _apply(engine, spec, ops, now)
            # A run of shared grants can empty the window: the page behind it
            # comes in now, its head granted with them (not at the next step).
            await take_due(self.pages, engine, spec, key, marks, now)
            delivered = room.waiters.deliver_granted(engine, now)
            if lazy:
                # Waits that only queue: wait for company (LINGER) and run it on
                # this engine (nothing is written yet). Once per step: a redo
                # after a refused write runs the whole batch at once.
                lazy = False
                ahead = len(engine.waiters_of(spec.name)) - len(batch)
                pause = min(LINGER_MAX, max(LINGER, ahead * LINGER_PER_WAITER))
                until = asyncio.get_running_loop().time() + pause
                while (
                    not delivered
                    and all(r is None for r in results)
                    and promises(engine, spec.name) == promised
                    and (more := await self._linger(room, until))
                ):
                    batch += more
                    ops += [r.op for r in more]
                    now = self.store.now()
                    engine.on_expire = expired.append
                    engine.expire(now)
                    engine.on_expire = None
                    spec = self.pools.in_force(spec)
                    results += _apply(engine, spec, [r.op for r in more], now)
                    delivered = room.waiters.deliver_granted(engine, now)
                    if not all(r.lazy for r in more):
                        break
                fresh = room.kept
                if (
                    isinstance(fresh, Brought)
                    and stored is not None
                    and fresh.stored.version != stored.version
                ):
                    # A nudge brought what another server wrote while we lingered
                    # (it granted one of our waiters): redo the batch on that
                    # record rather than have the store refuse our write.
                    continue
            state = engine.state(spec.name)
            room.fence_floor = max(floor, engine.last_fence)
            if state is None:
                self.pools.in_use.discard(spec.name)
                room.fragments = {}
            else:
                self.pools.in_use.add(spec.name)
            record = encode_pool(
                spec.name,
                state,
                engine.last_fence,
                epoch.id,
                None if state is None else room.fragments,
                self.store.compress,
                spec,
                marks,
            )
            if (stored is None and state is None) or (
                stored is not None and record == stored.value
            ):
                if cached is not None:
                    continue  # answers from a record that may be stale: read it and redo
                room.marks = marks
                room.waiters.wake(engine, delivered, marks.first)
                self._report(expired, False)
                return results  # nothing to write
            ttl = IDLE_TTL if state is None else 0
            # Only a change to what clients were told (a lease delivered, renewed or
            # ended; a fence) must be durable before the answer; queue entries
            # need not be (waiters do not outlive a crash of their server).
            durable = promises(engine, spec.name) != promised
            doubt[:] = results
            # Servers whose waiters this step granted: told to look now.
            nudge = {
                server
                for waiter_id, server in self._granted_elsewhere(spec, engine).items()
                if waiter_id not in granted_before
            }
            # A store that nudges with its write tells them in the same round trip.
            with_put = self.store.nudges_with_put
            version = stored.version if stored else None
            try:
                if with_put:
                    put = self.store.put(
                        key, record, version, ttl, durable, nudge=nudge, pool=spec.name
                    )
                else:
                    put = self.store.put(key, record, version, ttl, durable)
                written = await self._call(put)
            except BackendUnavailable as exc:
                self.life.write_failure = str(exc)
                raise
            self.life.write_failure = None
            doubt.clear()
            if written:
                if written is not True:
                    room.kept = Written(Stored(record, written), epoch, engine)
                room.marks = marks
                room.waiters.wake(engine, delivered, marks.first)
                if not with_put:
                    self.wakeups.send(spec.name, nudge)
                self._report(expired, True)
                return results
            # Another server wrote first: redo the step on what it wrote. A write
            # from the kept version that failed is no fight (another server wrote
            # since, maybe long ago): redo it at once, on what the store said it
            # holds if it did. Real conflicts pause a little, then read afresh (a
            # value from before the pause would be stale on a busy pool).
            if cached is None:
                await asyncio.sleep(random.uniform(0, min(0.05, 0.001 * 2**attempt)))
            elif isinstance(written, Conflict):
                seen = written.current
        raise BackendUnavailable(f"pool '{spec.name}': too many conflicting writes, try again")

    def _granted_elsewhere(self, spec: PoolSpec, engine: LockEngine) -> dict[str, str]:
        """Other servers' waiters that hold a grant not yet delivered: id -> server."""
        return {
            w.id: w.server
            for w in engine.granted_waiters(spec.name)
            if w.server and w.server != self.server_id
        }


def _apply(
    engine: LockEngine,
    spec: PoolSpec,
    ops: list[Callable[[LockEngine, float], Any]],
    now: float,
) -> list[Any]:
    """Run ``ops`` on the engine under ``spec``, the pool's configuration in force.

    A reload may come while a step lingers: the slots of a raised
    ``maxlocks`` go to the queue in this step. (Free slots are filled
    here also when a block ended.) The ops look the spec up themselves.
    """
    engine.reconfigure(spec, now)
    return [op(engine, now) for op in ops]


def promises(engine: LockEngine, pool: str) -> set[tuple[str, float, int]]:
    """What clients may rely on: a pool's leases (token, expiry, fence) that are
    delivered, or granted with a lease the waiter's server answers on reading
    it (:meth:`LocalWaiters.answer_granted`).
    """
    return {
        (lease.token, lease.expires_at, hold.fence)
        for hold in engine.holders(pool)
        for lease in hold.leases.values()
        if lease.delivered or answered_on_read(lease)
    }
