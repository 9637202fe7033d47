"""The shared-state layer: the engine's rules over a store that several servers share.

Every store-backed backend (memcached now; SQLite, Redis and etcd on the same
layer) is this class plus a :class:`Store`: a small key-value interface with
compare-and-set. The rules stay in :class:`~distributex.engine.LockEngine`:
a request runs one *step* on its pool::

    read the pool's record (and the epoch record) from the store
    restore it into a fresh engine; expire what is due; drop dead servers' waiters
    run the request on the engine (acquire, enqueue, deliver, release, renew, ...)
    write the new record if it is still the version we read   (compare-and-set)
    on a conflict: read again and redo the step (with a short random pause)

So two servers can never both act on the same version of a pool: one write
wins, the other redoes its step on what the winner wrote. ``docs/backends.md``
has the diagram and the reasons.

Waiters live on one server, the queue in the store. A queue entry names its
server; every server keeps a heartbeat key alive. Entries (and grants not yet
delivered) of a server whose heartbeat is gone are dropped by whoever steps
the pool next. A server with local waiters polls their pools (a read, and a
write only when something is due); a grant made by another server to one of
its waiters is delivered by a step of its own, and undone if the client has
hung up. The granting server nudges the waiter's server to look at once:
over UDP, or through the store itself when it can carry messages
(:attr:`Store.notifies`: Redis pub/sub, etcd watches). Polling is the safety
net under nudges: every 50 ms, or (a store that notifies) every second and
at the record's next deadline.

Around it, each in a file of its own:

* ``store.py``: the :class:`~distributex.backends.store.Store` interface;
* ``record.py``: the records' layout; ``pages.py``: a long queue's tail;
* ``storelife.py``: the store's life as this server sees it, its epoch and
  losses, our heartbeat and the safety checks; ``clocks.py``: clock skew;
* ``pool.py``: what this server keeps of each pool (a :class:`PoolRoom`),
  dropped when the pool is idle here;
* ``steps.py``: the step above, a batch of requests per read and write;
* ``waiters.py``: this server's waiters on a pool; ``waiting.py``: the
  /wait/ verb that parks them;
* ``nudges.py``: wake-ups between servers (nudges) and the polls under them.

This file puts them together behind :class:`LockBackend`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from distributex.backends.base import BackendUnavailable, LockBackend
from distributex.backends.nudges import Peers, Wakeups
from distributex.backends.pages import PageQueue, count_waiting
from distributex.backends.pool import Pools
from distributex.backends.record import StaleRecord, decode_record
from distributex.backends.steps import Steps, no_change
from distributex.backends.store import Store, Stored, StoreReplaced
from distributex.backends.storelife import StoreLife
from distributex.backends.waiting import Waits
from distributex.engine import EXCLUSIVE, Hold, Lease, LockEngine, PoolSpec
from distributex.status import PoolStatus, pool_status

log = logging.getLogger("distributex.shared")

# One store call ends within this (then 503); a whole step within STEP_TIMEOUT.
CALL_TIMEOUT = 1.2
# /status reads pool records this many keys at a time.
STATUS_BATCH = 200


class SharedStateBackend(LockBackend):
    """Lock state in a :class:`Store` shared by any number of servers."""

    def __init__(
        self,
        store: Store,
        key_prefix: str = "distributex/",
        advertise: str | None = None,
        unsafe_store: str = "refuse",
    ) -> None:
        self.store = store
        self.prefix = key_prefix
        self.server_id = secrets.token_hex(8)
        self._tasks: set[asyncio.Task[Any]] = set()  # in the background (see _background)
        self._listener: asyncio.Task[None] | None = None  # nudges carried by the store
        self._closed = False
        self._last_error: str | None = None
        self.pools = Pools()
        self.life = StoreLife(
            store,
            key_prefix,
            self.server_id,
            self._call,
            unsafe_store,
            on_new_epoch=self._written_stale,
            on_beat=self._after_beat,
        )
        # Where other servers send nudges (None: take none, they poll us only).
        self.advertise = advertise
        self.pages = PageQueue(store, self._call)
        self.peers = Peers(store, self._call, self.server_key)
        self.wakeups = Wakeups(
            store,
            self.life,
            self._call,
            self.pools,
            self.pool_key,
            self.peers,
            self._step_due,
            self._background,
            lambda: self._closed,
        )
        self.steps = Steps(
            store,
            self.life,
            self._call,
            self.pools,
            self.pool_key,
            self.pages,
            self.peers,
            self.wakeups,
            self._check_open,
            self._note_error,
            self._background,
            self._report,
        )
        self.waits = Waits(
            self.steps,
            self.pools,
            self.pages,
            self.wakeups,
            self._release,
            self._background,
            self._check_open,
            lambda: self._closed,
        )

    # -- keys ----------------------------------------------------------------------------

    @property
    def epoch_key(self) -> str:
        return self.life.epoch_key

    def pool_key(self, pool: str) -> str:
        # Pool names may hold any printable text: the key is a digest of it.
        digest = hashlib.sha256(pool.encode()).hexdigest()[:40]
        return f"{self.prefix}pool/{digest}"

    def server_key(self, server_id: str) -> str:
        return self.life.server_key(server_id)

    # -- life ----------------------------------------------------------------------------

    async def start(self) -> None:
        if not self.store.notifies:
            await self.wakeups.open(self.advertise)
        await self.store.start()
        try:
            await self.life.start()
        except BackendUnavailable:
            await self.store.close()
            raise
        if self.store.notifies:
            self._listener = asyncio.create_task(
                self.store.listen(self.server_id, self.wakeups.nudged)
            )

    async def close(self) -> None:
        self._closed = True
        tasks: list[asyncio.Task[Any]] = [
            *(room.poller for room in self.pools if room.poller is not None),
            *(room.runner for room in self.pools if room.runner is not None),
            *self._tasks,
        ]
        await self.life.stop()
        if self._listener is not None:
            tasks.append(self._listener)
        for task in tasks:
            task.cancel()
        for room in self.pools:
            for waiter in room.waiters.all.values():
                waiter.wake.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.wakeups.close()
        await self.store.close()

    def pools_in_use(self) -> set[str]:
        # The store is shared: this is what this server has seen holding state.
        return self.pools.in_use

    # -- for operators -------------------------------------------------------------------

    async def status(self, specs: Sequence[PoolSpec]) -> list[PoolStatus]:
        """Each pool as its stored record says, with leases due to end left out.

        Reads only (a step would also write): a throwaway engine restores the
        record and ends what is due in memory.
        """
        self._check_open()
        found: dict[str, Stored] = {}
        keys = [self.pool_key(spec.name) for spec in specs]
        for start in range(0, len(keys), STATUS_BATCH):
            found.update(await self._call(self.store.get(keys[start : start + STATUS_BATCH])))
        now = self.store.now()
        result = []
        for spec, key in zip(specs, keys, strict=True):
            engine = LockEngine()
            stored = found.get(key)
            more = 0
            if stored is not None:
                try:
                    decoded = decode_record(stored.value)
                except StaleRecord as exc:
                    raise BackendUnavailable(f"pool '{spec.name}': {exc}") from None
                engine.restore(spec, decoded.state)
                engine.expire(now)
                if decoded.pages.first is not None:
                    more = await count_waiting(self.store, self._call, key, decoded.pages.first)
            else:
                self.pools.block_after_loss(engine, spec, self.life.epoch, now)
            result.append(pool_status(engine, spec, now=now))
            result[-1].more_waiting = more
        return result

    async def check(self) -> None:
        """Healthy if the store answers, and writes to it work.

        A store that reads but refuses writes (a full disk, a read-only file)
        grants nothing: after a failed write the server is unhealthy until a
        write succeeds, a request's or the probe made here.
        """
        self._check_open()
        await self._call(self.store.get([self.epoch_key]))
        await self.life.check()

    def reconfigure(self, specs: Mapping[str, PoolSpec]) -> None:
        now = self.store.now()
        # A poller steps its pool after a reload, also if this step fails.
        for spec in self.pools.reload(specs, now):
            # A raised maxlocks hands free slots to the queue now, not at the next request.
            self._background(self.wakeups.quiet_step(spec))
        self._prune()  # pools the reload removed, if idle here

    def _check_open(self) -> None:
        if self._closed:
            raise BackendUnavailable("server is shutting down")

    async def _call(self, coro: Any, timeout: float | None = None, quiet: bool = False) -> Any:
        """One store call, bounded in time (CALL_TIMEOUT); a failure becomes BackendUnavailable.

        The first failure of a kind is logged once (``quiet``: not at all).
        """
        try:
            async with asyncio.timeout(CALL_TIMEOUT if timeout is None else timeout):
                return await coro
        except BackendUnavailable as exc:
            if isinstance(exc, StoreReplaced):
                self.life.replaced()
            self.store.reset()
            if not quiet:
                self._note_error(str(exc))
            raise
        except (TimeoutError, OSError, EOFError, ConnectionError) as exc:
            self.store.reset()
            reason = "timed out" if isinstance(exc, TimeoutError) else _reason(exc)
            message = f"{self.store.description} unreachable: {reason}"
            if not quiet:
                self._note_error(message)
            raise BackendUnavailable(message) from None

    def _after_beat(self) -> None:
        self._store_answers()
        self._prune()

    def _prune(self) -> None:
        """Forget pools idle here (see :meth:`Pools.prune`), and their queue's tail."""
        for name in self.pools.prune(self.store.now()):
            self.pages.forget(self.pool_key(name))

    def _store_answers(self) -> None:
        if self._last_error is not None:
            log.info("%s answers again", self.store.description)
            self._last_error = None

    def _written_stale(self) -> None:
        """The store's epoch changed: records kept from before are not in it."""
        for room in self.pools:
            room.kept = None

    def _note_error(self, message: str) -> None:
        if message != self._last_error:
            log.warning("%s", message)
        self._last_error = message

    def _background(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _report(self, expired: list[Lease], changed: bool) -> None:
        """Tell the events of a step whose outcome is final."""
        for lease in expired:
            self.events.expired(lease.pool, lease.owner, lease.fence)
        if changed:
            self.events.changed()

    async def _step_due(self, spec: PoolSpec) -> None:
        """A step with no request of its own: what is due, our waiters' grants."""
        await self.steps.step(spec, no_change)

    # -- the verbs -----------------------------------------------------------------------

    async def acquire(
        self, spec: PoolSpec, owner: str, ttl: float | None, mode: str = EXCLUSIVE
    ) -> Lease | None:
        return await self.steps.step(
            spec,
            lambda engine, now: engine.acquire(self.pools.in_force(spec), owner, now, ttl, mode),
            undo=lambda lease: self.waits.release_token(spec, owner, lease),
        )

    async def wait(
        self,
        spec: PoolSpec,
        owner: str,
        ttl: float | None,
        timeout: float | None,
        still_wanted: Callable[[], bool],
        mode: str = EXCLUSIVE,
    ) -> Lease | None:
        return await self.waits.wait(spec, owner, ttl, timeout, still_wanted, mode)

    async def release(self, spec: PoolSpec, owner: str, token: str | None) -> bool:
        ended = await self._release(spec, owner, token)
        if ended is not None:
            self.events.released(spec.name, owner, ended.fence)
        return ended is not None

    async def _release(self, spec: PoolSpec, owner: str, token: str | None) -> Hold | Lease | None:
        def release(engine: LockEngine, now: float) -> Hold | Lease | None:
            if token is None:
                hold, _granted = engine.release(spec.name, owner, now)
                return hold
            lease, _granted = engine.release_lease(spec.name, token, now, owner)
            return lease

        return await self.steps.step(spec, release)

    async def renew(
        self, spec: PoolSpec, owner: str, token: str, ttl: float | None
    ) -> Lease | None:
        return await self.steps.step(
            spec, lambda engine, now: engine.renew(spec.name, token, now, ttl, owner)
        )


def _reason(exc: BaseException) -> str:
    """A network error in a few words ("connection refused")."""
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__
