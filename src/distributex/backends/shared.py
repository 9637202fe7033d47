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

Around it, each in a file of its own: the :class:`~distributex.backends.store.Store`
interface (``store.py``), the records' layout (``record.py``), the store's
life as this server sees it, its epoch and losses, our heartbeat and the
safety checks (``storelife.py``), and the clock-skew rule (``clocks.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import itertools
import json
import logging
import math
import os
import random
import secrets
import socket
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from distributex.backends.base import BackendUnavailable, LockBackend
from distributex.backends.pages import (
    PageQueue,
    Sealed,
    count_waiting,
    move_into,
    page_for_arrival,
    pages_due,
)
from distributex.backends.record import (
    Epoch,
    PageMarks,
    StaleRecord,
    decode_pool,
    decode_record,
    encode_pool,
    settings_of,
)
from distributex.backends.store import Conflict, Store, Stored, StoreReplaced
from distributex.backends.storelife import StoreLife
from distributex.config import DEFAULT_EXPIRE
from distributex.engine import Hold, Lease, LockEngine, PoolSpec
from distributex.status import PoolStatus, pool_status

log = logging.getLogger("distributex.shared")

T = TypeVar("T")

ALIVE_CACHE = 1.0
# How often a server with local waiters reads their pools: the safety net under
# nudges (another server that grants one of our waiters tells us at once).
POLL_INTERVAL = 0.05
POLL_BACKOFF_MAX = 1.0
# With a store that carries nudges, polling is only the net under them (a
# lease expiring or a block ending wakes the poller at its time anyway).
NOTIFIED_POLL_INTERVAL = 1.0
# One store call, and one whole step, end within these (then 503). A request
# may wait for the step under way and then its own: two steps stay under 5 s.
CALL_TIMEOUT = 1.2
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
# A grant another server made to one of our waiters is answered as soon as we
# read it, without a write of ours, if its lease ends within this many seconds
# (the client's default lease is 60 s): one store write per hand-off across
# servers, not two. The price: if the waiter's server dies before it could
# answer, nobody can tell whether it did, so the grant holds until it
# expires. Longer leases (and leases that never expire) are delivered by a
# write first, so such a grant is undone within seconds of the death.
ANSWER_ON_READ_MAX_TTL = 60.0
# A queue entry takes its place by when its request came (on the store's
# clock: Redis's own, else each server's), also when its write lingered or was
# redone on a record another server wrote meanwhile. Servers' clocks may
# disagree, so an arrival time is taken no earlier than this many seconds
# before the latest one already queued: a server whose clock is behind (by
# hours, say) moves its waits past at most that much of the queue.
ARRIVAL_TRUST = 1.0
# A pool with nothing held or queued keeps a small record (its fence) this long.
IDLE_TTL = 24 * 3600
# After a store loss, pools that never expire leases are held back this long.
LOSS_HOLD_NEVER_EXPIRE = DEFAULT_EXPIRE
# A pool's record says the settings it was written with; a server compares
# them with its own this often per pool (a mismatch is logged).
SETTINGS_CHECK_EVERY = 60.0
# /status reads pool records this many keys at a time.
STATUS_BATCH = 200


# -- the backend ---------------------------------------------------------------------------

_NOTHING: Any = object()


@dataclass(eq=False)
class _Request:
    """A request waiting for the next step of its pool."""

    op: Callable[[LockEngine, float], Any]
    undo: Callable[[Any], Any] | None
    future: asyncio.Future[Any]
    # Its write may wait a moment for company (a /wait/ that queues): see LINGER.
    lazy: bool = False


@dataclass(eq=False)
class _LocalWaiter:
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


@dataclass(frozen=True)
class _Paged:
    """An arrival's step says: the queue is long, append to its pages from ``first`` on."""

    first: int


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
        self.life = StoreLife(
            store,
            key_prefix,
            self.server_id,
            self._call,
            unsafe_store,
            on_new_epoch=self._written_stale,
            on_beat=self._store_answers,
        )
        # Where other servers send nudges (None: take none, they poll us only).
        self.advertise = advertise
        self._nudge_transport: asyncio.DatagramTransport | None = None
        self._nudge_to: dict[str, tuple[str, int]] = {}  # server id -> its nudge address
        self._nudged: dict[str, asyncio.Event] = {}  # pool -> set when a nudge comes
        self._pending: dict[str, list[_Request]] = {}  # pool -> requests for its next step
        self._arrived: dict[str, asyncio.Event] = {}  # pool -> set by a request (lingering)
        self._runners: dict[str, asyncio.Task[None]] = {}
        self._local: dict[str, dict[str, _LocalWaiter]] = {}  # pool -> waiter id -> waiter
        # pool -> ids of our waiters answered YES on another server's grant,
        # without a write of ours: a later step of ours marks them delivered.
        self._answered: dict[str, set[str]] = {}
        self._pollers: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._fence_floor: dict[str, int] = {}
        self._specs: dict[str, PoolSpec] = {}  # the latest spec of each pool stepped here
        # Specs set by a reload: they win over the spec a request (or a poller
        # started before the reload) carries.
        self._reloaded: dict[str, PoolSpec] = {}
        self._reloads = 0  # reloads so far: a poller steps its pool after each
        # pool -> until when (store clock) leases granted here before a reload
        # shortened its expire may live: a loss of the store blocks grants until then.
        self._longer_leases: dict[str, float] = {}
        # pool -> the record this server wrote last (with its version), its epoch,
        # and the engine that holds its state (no decoding it back)
        # (None: decode it from the record)
        self._written: dict[str, tuple[Stored, Epoch, LockEngine | None]] = {}
        self._in_use: set[str] = set()
        self._fragments: dict[str, dict[str, str]] = {}  # pool -> queue entries' JSON
        self._alive: dict[str, tuple[bool, float]] = {}
        self._settings_checked: dict[str, float] = {}  # pool -> when (monotonic)
        # The queue's tail in pages (pages.py): pool -> the marks of the record
        # last read or written here, and of the step under way.
        self.pages = PageQueue(store, self._call)
        self._marks: dict[str, PageMarks] = {}
        self._step_marks: dict[str, PageMarks] = {}
        # Our waiters by where their entry is: pool -> id -> waiter in the record
        # (or not yet written), and pool -> page -> id -> waiter on a page. A step
        # looks at the first only: its cost does not grow with the queue.
        self._window_local: dict[str, dict[str, _LocalWaiter]] = {}
        self._paged_local: dict[str, dict[int, dict[str, _LocalWaiter]]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._closed = False
        self._last_error: str | None = None

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
            await self._open_nudges()
        await self.store.start()
        try:
            await self.life.start()
        except BackendUnavailable:
            await self.store.close()
            raise
        if self.store.notifies:
            self._listener = asyncio.create_task(self.store.listen(self.server_id, self.nudged))

    async def close(self) -> None:
        self._closed = True
        tasks = [*self._pollers.values(), *self._runners.values(), *self._tasks]
        await self.life.stop()
        if self._listener is not None:
            tasks.append(self._listener)
        for task in tasks:
            task.cancel()
        for waiters in self._local.values():
            for waiter in waiters.values():
                waiter.wake.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._nudge_transport is not None:
            self._nudge_transport.close()
        await self.store.close()

    def pools_in_use(self) -> set[str]:
        # The store is shared: this is what this server has seen holding state.
        return self._in_use

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
                self._block_after_loss(engine, spec, self.life.epoch, now)
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
        for name, until in list(self._longer_leases.items()):
            if until <= now:
                del self._longer_leases[name]
        for name, spec in specs.items():
            before = self._reloaded.get(name) or self._specs.get(name)
            if before is not None and _longest_lease(before) > _longest_lease(spec):
                until = now + _longest_lease(before)
                self._longer_leases[name] = max(self._longer_leases.get(name, until), until)
        self._reloaded = dict(specs)
        # A poller steps its pool after a reload, also if this step fails.
        self._reloads += 1
        for name, spec in specs.items():
            if name in self._specs:
                self._specs[name] = spec
                # A raised maxlocks hands free slots to the queue now, not at the next request.
                self._background(self._quiet_step(spec))

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

    def _store_answers(self) -> None:
        if self._last_error is not None:
            log.info("%s answers again", self.store.description)
            self._last_error = None

    def _written_stale(self) -> None:
        """The store's epoch changed: records kept from before are not in it."""
        self._written.clear()

    def _note_error(self, message: str) -> None:
        if message != self._last_error:
            log.warning("%s", message)
        self._last_error = message

    def _background(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- nudges: a hint to another server that one of its waiters was granted ----------

    async def _open_nudges(self) -> None:
        """A UDP socket for nudges, on the advertised address; its address goes in our beat."""
        self.life.beat_value = b"{}"
        if not self.advertise:
            return
        loop = asyncio.get_running_loop()
        host = self.advertise
        if host in ("0.0.0.0", "::", ""):
            # Listening everywhere: tell the others this machine's own address.
            host = socket.gethostname()
        try:
            infos = await loop.getaddrinfo(host, 0, type=socket.SOCK_DGRAM)
            address = infos[0][4][0]
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _NudgeReceiver(self), local_addr=(address, 0)
            )
        except OSError as exc:
            log.warning("no nudges (other servers poll this one): %s", exc)
            return
        self._nudge_transport = transport  # type: ignore[assignment]
        host, port = transport.get_extra_info("sockname")[:2]
        self.life.beat_value = json.dumps({"nudge": [host, port]}).encode()

    def _granted_elsewhere(self, spec: PoolSpec, engine: LockEngine) -> dict[str, str]:
        """Other servers' waiters that hold a grant not yet delivered: id -> server."""
        return {
            w.id: w.server
            for w in engine.granted_waiters(spec.name)
            if w.server and w.server != self.server_id
        }

    def _nudge_others(self, spec: PoolSpec, servers: set[str]) -> None:
        """Tell servers whose waiters this step granted to look now (polling is the net)."""
        if self._nudge_transport is None and not self.store.notifies:
            return
        if not servers:
            return
        if self.store.notifies:
            self._background(self._notify(servers, spec.name))
            return
        assert self._nudge_transport is not None
        for server in servers:
            address = self._nudge_to.get(server)
            if address is not None:
                with contextlib.suppress(OSError):
                    self._nudge_transport.sendto(spec.name.encode(), address)

    async def _notify(self, servers: Collection[str], pool: str) -> None:
        with contextlib.suppress(BackendUnavailable):
            await self._call(self.store.notify(servers, pool), quiet=True)

    def nudged(self, pool: str | None, stored: Stored | None = None) -> None:
        """Another server granted one of our waiters on ``pool`` (None: maybe any pool).

        ``stored``: the record that other server wrote, if the nudge carried it.
        """
        if pool is None:
            for event in self._nudged.values():
                event.set()
            return
        # Another server wrote the pool since our last write: the version we
        # kept is stale. The record it wrote, if the nudge brought it, is as
        # good as a read (a write on it fails if there was another since).
        self._written.pop(pool, None)
        if stored is not None and self.life.epoch is not None:
            self._written[pool] = (stored, self.life.epoch, None)
        event = self._nudged.get(pool)
        if event is not None:
            event.set()
        elif pool in self._specs and pool not in self._runners and not self._closed:
            # Granted to an entry of ours that nobody here waits for any more (its
            # cancel did not get through): a step undoes it and passes it on now.
            self._background(self._quiet_step(self._specs[pool]))

    async def _quiet_step(self, spec: PoolSpec) -> None:
        with contextlib.suppress(BackendUnavailable):
            await self._step(spec, _no_change)

    # -- one step ------------------------------------------------------------------------

    async def _step(
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
        spec = self._in_force(spec)
        self._specs[spec.name] = spec
        request = _Request(op, undo, asyncio.get_running_loop().create_future(), lazy)
        self._pending.setdefault(spec.name, []).append(request)
        arrived = self._arrived.get(spec.name)
        if arrived is not None:
            arrived.set()
        if spec.name not in self._runners:
            self._runners[spec.name] = asyncio.create_task(self._run_steps(spec))
        return await request.future

    async def _run_steps(self, spec: PoolSpec) -> None:
        """Serve the pool's pending requests, a batch per step, until none is left."""
        try:
            while pending := self._pending.get(spec.name):
                batch = [r for r in pending if not r.future.done()]
                pending.clear()
                if not batch:
                    continue
                doubt: list[Any] = []  # results of a write whose outcome is unknown
                try:
                    async with asyncio.timeout(STEP_TIMEOUT):
                        results = await self._step_once(spec, batch, doubt)
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
            self._runners.pop(spec.name, None)
            for request in self._pending.pop(spec.name, []):
                if not request.future.done():
                    request.future.set_exception(BackendUnavailable("server is shutting down"))

    async def _linger(self, spec: PoolSpec, until: float) -> list[_Request]:
        """Wait until ``until`` (loop clock) for more requests on the pool; take them."""
        pending = self._pending.setdefault(spec.name, [])
        if not pending:
            arrived = self._arrived[spec.name] = asyncio.Event()
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(until):
                        await arrived.wait()
            finally:
                self._arrived.pop(spec.name, None)
        more = [r for r in pending if not r.future.done()]
        pending.clear()
        return more

    async def _step_once(self, spec: PoolSpec, batch: list[_Request], doubt: list[Any]) -> Any:
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
            cached = self._written.pop(spec.name, None)
            # A reload may have come since the step began (or the engine was kept).
            spec = self._in_force(spec)
            engine: LockEngine | None = None
            if cached is not None:
                stored, epoch, engine = cached  # the engine holds that record's state
            elif seen is not None:
                # Read by the refused write, in this step: as good as a read now.
                # (A record gone is no Conflict: that takes a real read, epoch and all.)
                stored, seen = seen, None
            else:
                got = await self._call(self.store.get([key, self.epoch_key]))
                epoch = await self._call(self.life.current(got.get(self.epoch_key), read=False))
                stored = got.get(key)
            now = self.store.now()
            floor = self._fence_floor.get(spec.name, 0)
            if engine is not None:
                engine.configure(spec)  # the cached engine is the state of ``stored`` already
                marks = copy.copy(self._marks.get(spec.name) or PageMarks())
            elif stored is not None:
                try:
                    decoded = decode_record(stored.value)
                except StaleRecord as exc:
                    raise BackendUnavailable(f"pool '{spec.name}': {exc}") from None
                state, marks = decoded.state, decoded.pages
                engine = LockEngine(first_fence=max(state.fence, floor) + 1)
                if state.holds or state.queue or state.blocked_until != -math.inf:
                    engine.restore(spec, state)
                self._compare_settings(spec, decoded.settings)
            else:
                # A new record: above the wall clock in µs (as the inmemory backend
                # starts) and above anything seen here, so fences never go back.
                engine = LockEngine(first_fence=max(int(now * 1_000_000), floor) + 1)
                self._block_after_loss(engine, spec, epoch, now)
                marks = PageMarks()
            promised = _promises(engine, spec.name)
            granted_before = self._granted_elsewhere(spec, engine)
            await self._take_pages(spec, engine, marks, now)
            # The ops see (and an arrival may start) this step's pages: see wait().
            self._step_marks[spec.name] = marks
            await self._drop_stale(engine, spec, now)
            expired: list[Lease] = []
            engine.on_expire = expired.append
            engine.expire(now)
            engine.on_expire = None
            results = self._apply(engine, spec, ops, now)
            delivered = self._deliver_local(spec, engine, now)
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
                    and _promises(engine, spec.name) == promised
                    and (more := await self._linger(spec, until))
                ):
                    batch += more
                    ops += [r.op for r in more]
                    now = self.store.now()
                    engine.on_expire = expired.append
                    engine.expire(now)
                    engine.on_expire = None
                    spec = self._in_force(spec)
                    results += self._apply(engine, spec, [r.op for r in more], now)
                    delivered = self._deliver_local(spec, engine, now)
                    if not all(r.lazy for r in more):
                        break
                fresh = self._written.get(spec.name)
                if (
                    fresh is not None
                    and fresh[2] is None
                    and stored is not None
                    and fresh[0].version != stored.version
                ):
                    # A nudge brought what another server wrote while we lingered
                    # (it granted one of our waiters): redo the batch on that
                    # record rather than have the store refuse our write.
                    continue
            state = engine.state(spec.name)
            self._fence_floor[spec.name] = max(floor, engine.last_fence)
            if state is None:
                self._in_use.discard(spec.name)
                self._fragments.pop(spec.name, None)
            else:
                self._in_use.add(spec.name)
            record = encode_pool(
                spec.name,
                state,
                engine.last_fence,
                epoch.id,
                None if state is None else self._fragments.setdefault(spec.name, {}),
                self.store.compress,
                spec,
                marks,
            )
            if (stored is None and state is None) or (
                stored is not None and record == stored.value
            ):
                if cached is not None:
                    continue  # answers from a record that may be stale: read it and redo
                self._marks[spec.name] = marks
                self._after(spec, engine, delivered)
                self._report(expired, changed=False)
                return results  # nothing to write
            ttl = IDLE_TTL if state is None else 0
            # Only a change to what clients were told (a lease delivered, renewed or
            # ended; a fence) must be durable before the answer; queue entries
            # need not be (waiters do not outlive a crash of their server).
            durable = _promises(engine, spec.name) != promised
            doubt[:] = results
            # Servers whose waiters this step granted: told to look now.
            nudge = {
                server
                for waiter_id, server in self._granted_elsewhere(spec, engine).items()
                if waiter_id not in granted_before
            }
            extra: dict[str, Any] = {}
            if self.store.nudges_with_put:
                extra = {"nudge": nudge, "pool": spec.name}
            try:
                written = await self._call(
                    self.store.put(
                        key, record, stored.version if stored else None, ttl, durable, **extra
                    )
                )
            except BackendUnavailable as exc:
                self.life.write_failure = str(exc)
                raise
            self.life.write_failure = None
            doubt.clear()
            if written:
                if written is not True:
                    self._written[spec.name] = (Stored(record, written), epoch, engine)
                self._marks[spec.name] = marks
                self._after(spec, engine, delivered)
                if not extra:
                    self._nudge_others(spec, nudge)
                self._report(expired, changed=True)
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

    async def _take_pages(
        self, spec: PoolSpec, engine: LockEngine, marks: PageMarks, now: float
    ) -> None:
        """Move the first pages of the queue's tail into the window while it runs low."""
        key = self.pool_key(spec.name)
        for _ in range(4):  # a few at most (pages emptied by departures)
            if not pages_due(len(engine.waiter_ids(spec.name)), marks.first):
                return
            assert marks.first is not None
            waiters, more = await self.pages.take(spec.name, key, marks.first)
            marks.top = max(marks.top, marks.first)
            marks.first = marks.first + 1 if more else None
            move_into(engine, spec, waiters, now)

    def _compare_settings(self, spec: PoolSpec, theirs: list[Any] | None) -> None:
        """Warn (once a minute per pool) if another server writes the pool with
        other settings: each grants by its own maxlocks."""
        clock = time.monotonic()
        if clock < self._settings_checked.get(spec.name, -math.inf) + SETTINGS_CHECK_EVERY:
            return
        self._settings_checked[spec.name] = clock
        if theirs is not None and theirs != settings_of(spec):
            log.warning(
                "pool '%s': another server runs it with maxlocks %s, expire %s (here: maxlocks "
                "%s, expire %s); give every server the same configuration (each grants by its "
                "own maxlocks)",
                spec.name,
                *theirs,
                *settings_of(spec),
            )

    def _block_after_loss(
        self, engine: LockEngine, spec: PoolSpec, epoch: Epoch | None, now: float
    ) -> None:
        """A pool with no record in a store that lost its state: no grant while
        a lease granted before the loss could still be live."""
        if epoch is None or epoch.lost_at is None:
            return
        until = max(
            epoch.lost_at + _longest_lease(spec),
            self._longer_leases.get(spec.name, -math.inf),
        )
        if now < until:
            engine.block(spec, until)

    @staticmethod
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

    def _in_force(self, spec: PoolSpec) -> PoolSpec:
        """The pool's configuration now: a reload's, over the one a request
        (or a step begun before the reload) carries."""
        return self._reloaded.get(spec.name, spec)

    def _report(self, expired: list[Lease], changed: bool) -> None:
        """Tell the events of a step whose outcome is final."""
        for lease in expired:
            self.events.expired(lease.pool, lease.owner, lease.fence)
        if changed:
            self.events.changed()

    async def _drop_stale(self, engine: LockEngine, spec: PoolSpec, now: float) -> None:
        """Cancel waiters (and undelivered grants) that nobody will answer.

        Those of servers that stopped beating, and this server's own that no
        parked request knows (left by a step whose write was in doubt).
        """
        # Set operations first: on a long queue of this server's own waiters
        # (the usual case) nothing is looked at one by one.
        local = self._local.get(spec.name, {})
        unknown = engine.waiter_ids(spec.name) - local.keys()  # others', or strays of ours
        if not unknown:
            return
        suspects = [w for w in engine.waiters_of(spec.name) if w.id in unknown]
        others = {w.server for w in suspects if w.server and w.server != self.server_id}
        dead = await self._dead_servers(others) if others else set()
        answered = self._answered.get(spec.name, ())
        for waiter in suspects:
            if waiter.server in dead:
                if waiter.lease is not None and _answered_on_read(waiter.lease):
                    # It may have been answered YES (without a write): it holds
                    # until it expires, like any lease of a client that went away.
                    engine.deliver(waiter)
                else:
                    log.info(
                        "dropping a waiter of stopped server %s on '%s'", waiter.server, spec.name
                    )
                    engine.cancel(waiter, now)
            elif waiter.server == self.server_id:
                if waiter.id in answered and waiter.lease is not None:
                    engine.deliver(waiter)
                else:
                    engine.cancel(waiter, now)

    async def _dead_servers(self, servers: Iterable[str]) -> set[str]:
        clock = asyncio.get_running_loop().time()
        dead: set[str] = set()
        unknown: list[str] = []
        for server in servers:
            alive, checked = self._alive.get(server, (True, -math.inf))
            if clock - checked > ALIVE_CACHE:
                unknown.append(server)
            elif not alive:
                dead.add(server)
        if len(self._alive) > 256:  # servers come and go (a new id per start)
            for server, (_alive, checked) in list(self._alive.items()):
                if clock - checked > 60:
                    del self._alive[server]
                    self._nudge_to.pop(server, None)
        if unknown:
            keys = {self.server_key(s): s for s in unknown}
            found = await self._call(self.store.get(list(keys)))
            for key, server in keys.items():
                alive = key in found
                if alive:
                    self._learn_nudge_address(server, found[key].value)
                # Not final: a store that lost its memory lost live servers' beats too.
                self._alive[server] = (alive, clock)
                if not alive:
                    dead.add(server)
        return dead

    def _deliver_local(
        self, spec: PoolSpec, engine: LockEngine, now: float
    ) -> dict[_LocalWaiter, Lease]:
        """Deliver grants to this server's parked waiters in the step that sees them.

        A waiter whose client has gone is cancelled instead (which may grant
        the next one). Saves a step per hand-off; the leases count once the
        step's write succeeds.
        """
        local = self._local.get(spec.name)
        delivered: dict[_LocalWaiter, Lease] = {}
        while local:
            changed = False
            for waiter in engine.granted_waiters(spec.name):
                mine = local.get(waiter.id)
                if mine is None or not mine.queued or mine in delivered:
                    continue
                if mine.lease is not None:
                    engine.deliver(waiter)  # answered already (_answer_granted): mark it
                elif mine.still_wanted() and engine.deliver(waiter):
                    delivered[mine] = waiter.lease
                else:
                    engine.cancel(waiter, now)
                    changed = True
            if not changed:
                break
        return delivered

    def _learn_nudge_address(self, server: str, beat: bytes) -> None:
        try:
            host, port = json.loads(beat)["nudge"]
            self._nudge_to[server] = (str(host), int(port))
        except (ValueError, KeyError, TypeError):
            self._nudge_to.pop(server, None)

    def _after(
        self, spec: PoolSpec, engine: LockEngine, delivered: dict[_LocalWaiter, Lease]
    ) -> None:
        """Wake local waiters that the state now says were granted (or dropped)."""
        for waiter, lease in delivered.items():
            waiter.lease = lease
            waiter.wake.set()
        answered = self._answered.get(spec.name)
        self._promote_paged(spec.name)
        local = self._window_local.get(spec.name)
        if not local and not answered:
            return
        present = engine.waiter_ids(spec.name)
        if answered:
            # Written as delivered (or ended) by now: nothing left to mark.
            answered.intersection_update(present)
            if not answered:
                del self._answered[spec.name]
        if not local:
            return
        if local.keys() - present:
            # Woken in arrival order: each queues again as it wakes.
            for waiter in local.values():
                if waiter.id not in present and waiter.queued and waiter not in delivered:
                    waiter.missing = True
                    waiter.wake.set()
        for found in engine.granted_waiters(spec.name):
            waiter = local.get(found.id)
            if waiter is not None and waiter.queued and waiter not in delivered:
                waiter.granted = True
                waiter.wake.set()

    def _promote_paged(self, pool: str) -> None:
        """Our waiters on pages the record has moved past: in the record now (or dropped)."""
        pages = self._paged_local.get(pool)
        if not pages:
            return
        first = (self._marks.get(pool) or PageMarks()).first
        window = self._window_local.setdefault(pool, {})
        for number in sorted(n for n in pages if first is None or n < first):
            for waiter_id, waiter in pages.pop(number).items():
                waiter.page = None
                window[waiter_id] = waiter
        if not pages:
            del self._paged_local[pool]

    # -- polling -------------------------------------------------------------------------

    def _watch_pool(self, spec: PoolSpec) -> None:
        task = self._pollers.get(spec.name)
        if task is None or task.done():
            self._pollers[spec.name] = asyncio.create_task(self._poll(spec))

    async def _poll(self, spec: PoolSpec) -> None:
        """Step a pool with local waiters now and then: expiry, dead servers, grants."""
        interval = NOTIFIED_POLL_INTERVAL if self.store.notifies else POLL_INTERVAL
        pause = interval
        key = self.pool_key(spec.name)
        loop = asyncio.get_running_loop()
        last: bytes | None = None
        due_at, others = -math.inf, frozenset[str]()  # of ``last``: see _next_due
        nudge = self._nudged.setdefault(spec.name, asyncio.Event())
        reloads = self._reloads  # stepped under the configuration of this many reloads
        while self._local.get(spec.name):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, min(pause, due_at - loop.time()))):
                    await nudge.wait()
            nudged = nudge.is_set()
            nudge.clear()
            if not self._local.get(spec.name):
                break
            try:
                if nudged:  # one of ours was granted: answer it (a step if it takes one)
                    kept = self._written.get(spec.name)
                    if kept is not None and kept[2] is None:
                        stored = kept[0]  # brought by the nudge: no read
                    else:
                        stored = (await self._call(self.store.get([key]))).get(key)
                    if self._answer_granted(spec, stored):
                        await self._step(spec, _no_change)
                else:  # the safety net: a read, and a step only if something changed
                    got = await self._call(self.store.get([key]))
                    stored = got.get(key)
                    self._answer_granted(spec, stored)
                    value = stored.value if stored is not None else None
                    if value is not None and value != last:
                        due_at, others = self._next_due(value)
                    reloaded = self._reloads
                    if (
                        value is None
                        or value != last
                        or loop.time() >= due_at
                        or self._maybe_dead(others)
                        or reloaded != reloads
                    ):
                        await self._step(spec, _no_change)
                        last, reloads = value, reloaded
                        # A deadline the step did not see as due yet (clocks a hair
                        # apart): look again soon, not in a loop of reads.
                        due_at = max(due_at, loop.time() + POLL_INTERVAL)
                pause = interval
            except BackendUnavailable:
                pause = min(POLL_BACKOFF_MAX, pause * 2)
        self._pollers.pop(spec.name, None)
        self._nudged.pop(spec.name, None)

    def _answer_granted(self, spec: PoolSpec, stored: Stored | None) -> bool:
        """Answer our waiters that another server's write granted, without a write.

        The grant is in the store already (we read it), with a short lease
        (ANSWER_ON_READ_MAX_TTL): it holds until it is released or runs out,
        whatever becomes of this server, so the YES can go out now. (The
        record still names the waiter; our next step marks it delivered.) A
        longer lease, or one whose client has gone, takes a step of ours
        (deliver, or undo): returns True if one is needed.
        """
        local = self._local.get(spec.name)
        if stored is None or not local:
            return stored is None and bool(local)
        try:
            state, _epoch = decode_pool(stored.value, queue=False)  # grants are in the holds
        except StaleRecord:
            return True
        now = self.store.now()
        needed = False
        for hold in state.holds:
            for lease in hold.leases.values():
                waiter = lease.waiter
                if waiter is None or waiter.server != self.server_id:
                    continue
                mine = local.get(waiter.id)
                if mine is None or mine.lease is not None:
                    needed |= mine is None and waiter.id not in self._answered.get(spec.name, ())
                    continue
                if (
                    not _answered_on_read(lease)
                    or lease.expires_at <= now
                    or mine.cancelling
                    or not mine.still_wanted()
                ):
                    needed = True
                    continue
                lease.delivered, lease.waiter = True, None
                mine.lease = lease
                self._answered.setdefault(spec.name, set()).add(waiter.id)
                mine.wake.set()
        return needed

    def _next_due(self, value: bytes) -> tuple[float, frozenset[str]]:
        """When (loop clock) a step would change this record by itself: a lease
        expires or a block ends; and the other servers its waiters are on (one
        of them may stop). Decoded once per record value, not once per poll.
        """
        try:
            state, _ = decode_pool(value)
        except StaleRecord:
            return math.inf, frozenset()
        at = state.blocked_until if state.blocked_until != -math.inf else math.inf
        waiters = list(state.queue)
        for hold in state.holds:
            for lease in hold.leases.values():
                at = min(at, lease.expires_at)
                if lease.waiter is not None:
                    waiters.append(lease.waiter)
        others = frozenset(w.server for w in waiters if w.server and w.server != self.server_id)
        if at == math.inf:
            return math.inf, others
        return asyncio.get_running_loop().time() + (at - self.store.now()), others

    def _maybe_dead(self, servers: Iterable[str]) -> bool:
        """Has any of these servers stopped, or not been checked for ALIVE_CACHE?"""
        clock = asyncio.get_running_loop().time()
        for server in servers:
            alive, checked = self._alive.get(server, (True, -math.inf))
            if not alive or clock - checked > ALIVE_CACHE:
                return True
        return False

    # -- the verbs -----------------------------------------------------------------------

    async def acquire(self, spec: PoolSpec, owner: str, ttl: float | None) -> Lease | None:
        return await self._step(
            spec,
            lambda engine, now: engine.acquire(self._in_force(spec), owner, now, ttl),
            undo=lambda lease: self._release_token(spec, owner, lease),
        )

    async def wait(
        self,
        spec: PoolSpec,
        owner: str,
        ttl: float | None,
        timeout: float | None,
        still_wanted: Callable[[], bool],
    ) -> Lease | None:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            # Known to this server before its entry is written, so no step of
            # ours takes it for a stray entry.
            local = _LocalWaiter(spec, secrets.token_urlsafe(9), still_wanted)
            self._local.setdefault(spec.name, {})[local.id] = local
            self._window_local.setdefault(spec.name, {})[local.id] = local
            local.came = self.store.now()

            def enqueue(engine: LockEngine, now: float, local: _LocalWaiter = local) -> Any:
                # Its place: when it came, bounded by ARRIVAL_TRUST against each
                # record it runs on (a redo runs on a newer one), never lowered.
                last = engine.last_arrival(spec.name)
                since = local.came if last is None else max(local.came, last - ARRIVAL_TRUST)
                if local.since is None or since > local.since:
                    if local.since is not None:  # its encoded entry holds the old time
                        self._fragments.get(spec.name, {}).pop(local.id, None)
                    local.since = since
                marks = self._step_marks.get(spec.name)
                first = None if marks is None else page_for_arrival(engine, spec.name, owner, marks)
                if first is not None:
                    # Behind a long queue: to the pages, after this step.
                    local.queued = False  # (a redo of the step may come here after all)
                    return _Paged(first)
                waiter = engine.enqueue(
                    self._in_force(spec),
                    owner,
                    now,
                    ttl,
                    server=self.server_id,
                    waiter_id=local.id,
                    since=local.since,
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
                lease = await self._step(
                    spec,
                    enqueue,
                    undo=lambda lease: self._release_token(spec, owner, lease),
                    lazy=True,
                )
                while isinstance(lease, _Paged):
                    if await self._to_pages(spec, owner, ttl, local, lease.first):
                        lease = None
                        break
                    # The end of the pages was sealed (the pool may have left
                    # paging): ask the record again, in order.
                    lease = await self._step(
                        spec, enqueue, undo=lambda lease: self._release_token(spec, owner, lease)
                    )
                if lease is not None:
                    clean = True
                    return None if lease is _NOTHING else lease
                outcome = await self._wait_for_grant(spec, owner, local, deadline, still_wanted)
                clean = True
            finally:
                self._forget_local(spec.name, local.id)
                if not clean:
                    # Hung up, or the store failed: the entry (or a grant to it) may
                    # still be stored; take it off in the background, until it is.
                    self._background(
                        self._cancel_waiter(spec, local.id, persist=True, page=local.page)
                    )
                    if local.lease is not None:
                        self._background(self._release_token(spec, owner, local.lease))
            if outcome != "requeue":
                return outcome
            log.info(
                "a waiter on '%s' was dropped from the shared queue: queueing again", spec.name
            )

    async def _to_pages(
        self, spec: PoolSpec, owner: str, ttl: float | None, local: _LocalWaiter, first: int
    ) -> bool:
        """Put a waiter's entry at the end of the queue's pages; False if that end is sealed."""
        assert local.since is not None
        entry = [local.id, self.server_id, owner, spec.lease_ttl(ttl), local.since]
        try:
            page = await self.pages.append(self.pool_key(spec.name), first, entry)
        except Sealed:
            return False
        if self._local.get(spec.name, {}).get(local.id) is local:
            local.page = page
            self._window_local[spec.name].pop(local.id, None)
            self._paged_local.setdefault(spec.name, {}).setdefault(page, {})[local.id] = local
        local.queued = True
        return True

    async def _wait_for_grant(
        self,
        spec: PoolSpec,
        owner: str,
        local: _LocalWaiter,
        deadline: float | None,
        still_wanted: Callable[[], bool],
    ) -> Any:
        """Wait until granted; returns the lease, None (timed out, hung up) or "requeue"."""
        loop = asyncio.get_running_loop()
        self._watch_pool(spec)
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
            await self._cancel_waiter(spec, local.id, page=local.page)
            # A step may have delivered it just before the time ran out: then it is ours.
            return local.lease

    async def _deliver(
        self,
        spec: PoolSpec,
        owner: str,
        local: _LocalWaiter,
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

        return await self._step(
            spec, deliver, undo=lambda lease: self._release_token(spec, owner, lease)
        )

    async def _cancel_waiter(
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
                if await self.pages.remove(self.pool_key(spec.name), page, waiter_id):
                    return

        def cancel(engine: LockEngine, now: float) -> None:
            waiter = engine.find_waiter(spec.name, waiter_id)
            if waiter is not None and waiter_id not in self._answered.get(spec.name, ()):
                engine.cancel(waiter, now)

        delay = 0.1
        while not self._closed:
            try:
                await self._step(spec, cancel)
                return
            except BackendUnavailable:
                if not persist:
                    # Not now: go on trying in the background (its caller is answered).
                    self._background(self._cancel_waiter(spec, waiter_id, persist=True))
                    return
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)

    async def _release_token(self, spec: PoolSpec, owner: str, lease: Any) -> None:
        """Undo a grant whose answer may not have gone out."""
        if not isinstance(lease, Lease):
            return
        delay = 0.1
        while not self._closed:
            try:
                await self._release(spec, owner, lease.token)
                return
            except BackendUnavailable:
                await asyncio.sleep(delay)  # until the store answers, or the lease expires
                delay = min(5.0, delay * 2)
                if lease.ttl and self.store.now() > lease.expires_at:
                    return

    def _forget_local(self, pool: str, waiter_id: str) -> None:
        local = self._local.get(pool)
        if local is None:
            return
        waiter = local.pop(waiter_id, None)
        if not local:
            del self._local[pool]
        window = self._window_local.get(pool)
        if window is not None:
            window.pop(waiter_id, None)
            if not window:
                del self._window_local[pool]
        if waiter is not None and waiter.page is not None:
            pages = self._paged_local.get(pool, {})
            on_page = pages.get(waiter.page, {})
            on_page.pop(waiter_id, None)
            if not on_page:
                pages.pop(waiter.page, None)
            if not pages:
                self._paged_local.pop(pool, None)

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

        return await self._step(spec, release)

    async def renew(
        self, spec: PoolSpec, owner: str, token: str, ttl: float | None
    ) -> Lease | None:
        return await self._step(
            spec, lambda engine, now: engine.renew(spec.name, token, now, ttl, owner)
        )


def _answered_on_read(lease: Lease) -> bool:
    """May the waiter's server answer this grant on reading it (ANSWER_ON_READ_MAX_TTL)?"""
    return 0 < lease.ttl <= ANSWER_ON_READ_MAX_TTL


def _promises(engine: LockEngine, pool: str) -> set[tuple[str, float, int]]:
    """What clients may rely on: a pool's leases (token, expiry, fence) that are
    delivered, or granted with a lease the waiter's server answers on reading
    it (:meth:`SharedStateBackend._answer_granted`).
    """
    return {
        (lease.token, lease.expires_at, hold.fence)
        for hold in engine.holders(pool)
        for lease in hold.leases.values()
        if lease.delivered or _answered_on_read(lease)
    }


def _reason(exc: BaseException) -> str:
    """A network error in a few words ("connection refused")."""
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def _longest_lease(spec: PoolSpec) -> float:
    """How long a lease of the pool may live without a renewal (as a loss counts it)."""
    return spec.expire or LOSS_HOLD_NEVER_EXPIRE


def _no_change(engine: LockEngine, now: float) -> None:
    """A step that only does what is due (expiry, dropping dead servers' waiters)."""


class _NudgeReceiver(asyncio.DatagramProtocol):
    """Nudges from other servers: a pool name; its poller looks at once."""

    def __init__(self, backend: SharedStateBackend) -> None:
        self.backend = backend

    def datagram_received(self, data: bytes, addr: Any) -> None:
        # Anyone may send one: it only makes us read a pool we wait on anyway.
        self.backend.nudged(data[:1024].decode("utf-8", "replace"))
