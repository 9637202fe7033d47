"""Wake-ups between servers: nudges, and the polls under them.

A server that grants a waiter of another server tells that server to look at
the pool now: a *nudge*, over UDP (the address is in the server's heartbeat),
or through the store itself when it carries messages (:attr:`Store.notifies`:
Redis pub/sub, etcd watches). A nudge is a hint only, so a server with local
waiters also polls their pools: every 50 ms, or (a store that notifies) every
second and at the record's next deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import socket
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import Any

from distributex.backends.base import BackendUnavailable
from distributex.backends.pool import Brought, PoolRoom, Pools
from distributex.backends.record import StaleRecord, decode_pool
from distributex.backends.store import Store, Stored
from distributex.backends.storelife import Call, StoreLife
from distributex.engine import PoolSpec

log = logging.getLogger("distributex.shared")

# How long a server's heartbeat, once read, counts as its being alive.
ALIVE_CACHE = 1.0
# How often a server with local waiters reads their pools: the safety net under
# nudges (another server that grants one of our waiters tells us at once).
POLL_INTERVAL = 0.05
POLL_BACKOFF_MAX = 1.0
# With a store that carries nudges, polling is only the net under them (a
# lease expiring or a block ending wakes the poller at its time anyway).
NOTIFIED_POLL_INTERVAL = 1.0


class Peers:
    """The other servers as this one knows them: alive (their heartbeat is
    there) and where they take nudges (their heartbeat says)."""

    def __init__(self, store: Store, call: Call, server_key: Callable[[str], str]) -> None:
        self.store = store
        self._call = call
        self._server_key = server_key
        self.alive: dict[str, tuple[bool, float]] = {}  # server -> alive?, when (loop clock)
        self.addresses: dict[str, tuple[str, int]] = {}  # server -> its nudge address

    async def dead(self, servers: Iterable[str]) -> set[str]:
        """Those of ``servers`` whose heartbeat is gone (read at most every ALIVE_CACHE)."""
        clock = asyncio.get_running_loop().time()
        dead: set[str] = set()
        unknown: list[str] = []
        for server in servers:
            alive, checked = self.alive.get(server, (True, -math.inf))
            if clock - checked > ALIVE_CACHE:
                unknown.append(server)
            elif not alive:
                dead.add(server)
        if len(self.alive) > 256:  # servers come and go (a new id per start)
            for server, (_alive, checked) in list(self.alive.items()):
                if clock - checked > 60:
                    del self.alive[server]
                    self.addresses.pop(server, None)
        if unknown:
            keys = {self._server_key(s): s for s in unknown}
            found = await self._call(self.store.get(list(keys)))
            for key, server in keys.items():
                alive = key in found
                if alive:
                    self.learn_address(server, found[key].value)
                # Not final: a store that lost its memory lost live servers' beats too.
                self.alive[server] = (alive, clock)
                if not alive:
                    dead.add(server)
        return dead

    def maybe_dead(self, servers: Iterable[str]) -> bool:
        """Has any of these servers stopped, or not been checked for ALIVE_CACHE?"""
        clock = asyncio.get_running_loop().time()
        for server in servers:
            alive, checked = self.alive.get(server, (True, -math.inf))
            if not alive or clock - checked > ALIVE_CACHE:
                return True
        return False

    def learn_address(self, server: str, beat: bytes) -> None:
        try:
            host, port = json.loads(beat)["nudge"]
            self.addresses[server] = (str(host), int(port))
        except (ValueError, KeyError, TypeError):
            self.addresses.pop(server, None)


class Wakeups:
    """Nudges sent and taken by this server, and the pollers of pools it waits on.

    ``step(spec)`` steps a pool with no request of its own (what is due, our
    waiters' grants); it raises :class:`BackendUnavailable` as a step does.
    """

    def __init__(
        self,
        store: Store,
        life: StoreLife,
        call: Call,
        pools: Pools,
        pool_key: Callable[[str], str],
        peers: Peers,
        step: Callable[[PoolSpec], Awaitable[None]],
        background: Callable[[Any], None],
        closed: Callable[[], bool],
    ) -> None:
        self.store = store
        self.life = life
        self._call = call
        self.pools = pools
        self._pool_key = pool_key
        self.peers = peers
        self._step = step
        self._background = background
        self._closed = closed
        self._transport: asyncio.DatagramTransport | None = None

    # -- nudges --------------------------------------------------------------------------

    async def open(self, advertise: str | None) -> None:
        """A UDP socket for nudges, on the advertised address; its address goes in our beat."""
        self.life.beat_value = b"{}"
        if not advertise:
            return
        loop = asyncio.get_running_loop()
        host = advertise
        if host in ("0.0.0.0", "::", ""):
            # Listening everywhere: tell the others this machine's own address.
            host = socket.gethostname()
        try:
            infos = await loop.getaddrinfo(host, 0, type=socket.SOCK_DGRAM)
            address = str(infos[0][4][0])
            transport, _ = await loop.create_datagram_endpoint(
                lambda: NudgeReceiver(self.nudged), local_addr=(address, 0)
            )
        except OSError as exc:
            log.warning("no nudges (other servers poll this one): %s", exc)
            return
        self._transport = transport
        host, port = transport.get_extra_info("sockname")[:2]
        self.life.beat_value = json.dumps({"nudge": [host, port]}).encode()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def send(self, pool: str, servers: set[str]) -> None:
        """Tell servers whose waiters a step granted to look now (polling is the net)."""
        if self._transport is None and not self.store.notifies:
            return
        if not servers:
            return
        if self.store.notifies:
            self._background(self._notify(servers, pool))
            return
        assert self._transport is not None
        for server in servers:
            address = self.peers.addresses.get(server)
            if address is not None:
                with contextlib.suppress(OSError):
                    self._transport.sendto(pool.encode(), address)

    async def _notify(self, servers: Collection[str], pool: str) -> None:
        with contextlib.suppress(BackendUnavailable):
            await self._call(self.store.notify(servers, pool), quiet=True)

    def nudged(self, pool: str | None, stored: Stored | None = None) -> None:
        """Another server granted one of our waiters on ``pool`` (None: maybe any pool).

        ``stored``: the record that other server wrote, if the nudge carried it.
        """
        if pool is None:
            for waited in self.pools:
                if waited.nudged is not None:
                    waited.nudged.set()
            return
        # Another server wrote the pool since our last write: the version we
        # kept is stale. The record it wrote, if the nudge brought it, is as
        # good as a read (a write on it fails if there was another since).
        epoch = self.life.epoch
        brought = None if stored is None or epoch is None else Brought(stored, epoch)
        room = self.pools.room(pool) if brought is not None else self.pools.get(pool)
        if room is None:
            return  # nothing kept or waited on here (anyone may send a UDP nudge)
        room.kept = brought
        if room.nudged is not None:
            room.nudged.set()
        elif room.spec is not None and room.runner is None and not self._closed():
            # Granted to an entry of ours that nobody here waits for any more (its
            # cancel did not get through): a step undoes it and passes it on now.
            self._background(self.quiet_step(room.spec))

    async def quiet_step(self, spec: PoolSpec) -> None:
        with contextlib.suppress(BackendUnavailable):
            await self._step(spec)

    # -- polling -------------------------------------------------------------------------

    def watch(self, room: PoolRoom, spec: PoolSpec) -> None:
        """Poll the pool while we have waiters on it."""
        if room.poller is None or room.poller.done():
            room.poller = asyncio.create_task(self._poll(room, spec))

    async def _poll(self, room: PoolRoom, spec: PoolSpec) -> None:
        """Step a pool with local waiters now and then: expiry, dead servers, grants."""
        interval = NOTIFIED_POLL_INTERVAL if self.store.notifies else POLL_INTERVAL
        pause = interval
        key = self._pool_key(spec.name)
        loop = asyncio.get_running_loop()
        last: bytes | None = None
        due_at, others = -math.inf, frozenset[str]()  # of ``last``: see _next_due
        if room.nudged is None:
            room.nudged = asyncio.Event()
        nudge = room.nudged
        reloads = self.pools.reloads  # stepped under the configuration of this many reloads
        while room.waiters:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, min(pause, due_at - loop.time()))):
                    await nudge.wait()
            nudged = nudge.is_set()
            nudge.clear()
            if not room.waiters:
                break
            try:
                if nudged:  # one of ours was granted: answer it (a step if it takes one)
                    if isinstance(room.kept, Brought):
                        stored = room.kept.stored  # brought by the nudge: no read
                    else:
                        stored = (await self._call(self.store.get([key]))).get(key)
                    if self._answer_granted(room, stored):
                        await self._step(spec)
                else:  # the safety net: a read, and a step only if something changed
                    got = await self._call(self.store.get([key]))
                    stored = got.get(key)
                    self._answer_granted(room, stored)
                    value = stored.value if stored is not None else None
                    if value is not None and value != last:
                        due_at, others = self._next_due(value)
                    reloaded = self.pools.reloads
                    if (
                        value is None
                        or value != last
                        or loop.time() >= due_at
                        or self.peers.maybe_dead(others)
                        or reloaded != reloads
                    ):
                        await self._step(spec)
                        last, reloads = value, reloaded
                        # A deadline the step did not see as due yet (clocks a hair
                        # apart): look again soon, not in a loop of reads.
                        due_at = max(due_at, loop.time() + POLL_INTERVAL)
                pause = interval
            except BackendUnavailable:
                pause = min(POLL_BACKOFF_MAX, pause * 2)
        room.poller = None
        room.nudged = None

    def _answer_granted(self, room: PoolRoom, stored: Stored | None) -> bool:
        """Answer our waiters that another server's write granted (see
        :meth:`LocalWaiters.answer_granted`); True if a step of ours is needed."""
        if stored is None or not room.waiters:
            return stored is None and bool(room.waiters)
        try:
            state, _epoch = decode_pool(stored.value, queue=False)  # grants are in the holds
        except StaleRecord:
            return True
        return room.waiters.answer_granted(state, self.store.now(), self.life.server_id)

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
        at = min([at, *(until for until, _mode in state.delays)])  # a lock-delay ends
        waiters = list(state.queue)
        for hold in state.holds:
            for lease in hold.leases.values():
                at = min(at, lease.expires_at)
                if lease.waiter is not None:
                    waiters.append(lease.waiter)
        server_id = self.life.server_id
        others = frozenset(w.server for w in waiters if w.server and w.server != server_id)
        if at == math.inf:
            return math.inf, others
        return asyncio.get_running_loop().time() + (at - self.store.now()), others


class NudgeReceiver(asyncio.DatagramProtocol):
    """Nudges from other servers over UDP: a pool name; its poller looks at once."""

    def __init__(self, nudged: Callable[[str], None]) -> None:
        self.nudged = nudged

    def datagram_received(self, data: bytes, addr: Any) -> None:
        # Anyone may send one: it only makes us read a pool we wait on anyway.
        self.nudged(data[:1024].decode("utf-8", "replace"))
