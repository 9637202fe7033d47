"""The store's life as one server sees it: its epoch, our heartbeat, and whether steps are safe.

* **Epoch.** The store's first user writes an epoch record (``add``: one
  wins). A missing or different one means the store lost its state (restarted,
  flushed, evicted, its file replaced): the server that notices records the
  moment of the loss, and pools without a record grant nothing until every
  lease granted before could have ended. Every server reads the epoch every
  EPOCH_CHECK_INTERVAL, requests or not, so a loss is recorded while idle
  servers' clients still hold leases; a server that starts on an empty store
  waits NEW_STORE_SETTLE (before its port opens) for them to say so.
* **Heartbeat.** A key per server, refreshed every HEARTBEAT_INTERVAL, that
  lives HEARTBEAT_TTL: other servers drop the waiters of a server whose beat
  is gone. It carries our clock (and where to send nudges).
* **Safe to step?** Not while this server's clock is off the others'
  (:mod:`~distributex.backends.clocks`) or the store is set up to lose locks
  (:meth:`Store.unsafe_setting`); unhealthy after a failed write until one
  succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from distributex.backends import clocks
from distributex.backends.base import BackendUnavailable
from distributex.backends.record import Epoch
from distributex.backends.store import Store, Stored
from distributex.config import DEFAULT_EXPIRE

log = logging.getLogger("distributex.shared")

# A server refreshes its heartbeat this often; the key lives HEARTBEAT_TTL seconds,
# so a dead server's waiters are dropped HEARTBEAT_TTL + ALIVE_CACHE seconds after it died.
HEARTBEAT_INTERVAL = 2.0
HEARTBEAT_TTL = 8
# A running server reads the epoch record this often, so that a store that
# lost its state (restarted empty, flushed, a replaced file) has its loss
# recorded within about this long, whether or not any request comes.
EPOCH_CHECK_INTERVAL = 0.5
# A server that starts on a store with no epoch record cannot tell a new store
# from one that lost its state while other servers' clients hold leases. It
# waits this long (several of their epoch checks) before calling the store
# new: a live server records the loss meanwhile, and this one then holds
# grants as the loss rule says. Spent before the port opens.
NEW_STORE_SETTLE = 4 * EPOCH_CHECK_INTERVAL
# Settling the epoch record takes at most this many compare-and-set attempts.
MAX_ATTEMPTS = 50

#: One bounded store call: the backend's ``_call`` (a timeout, errors noted).
Call = Callable[..., Awaitable[Any]]


class StoreLife:
    """The epoch, the heartbeat and the safety checks of one server on one store."""

    def __init__(
        self,
        store: Store,
        prefix: str,
        server_id: str,
        call: Call,
        unsafe_store: str = "refuse",
        on_new_epoch: Callable[[], None] = lambda: None,
        on_beat: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.prefix = prefix
        self.server_id = server_id
        self._call = call
        # "refuse" (the default) or "warn": a store setting that breaks mutual
        # exclusion stops the server, or is only logged.
        self.unsafe_store = unsafe_store
        self._on_new_epoch = on_new_epoch  # records kept from the old store are stale
        self._on_beat = on_beat  # a beat was written: the store answers
        self.epoch: Epoch | None = None
        self.beat_value = b"{}"  # JSON; the nudge address goes in it
        # Why the last write of a pool record failed (None: it succeeded).
        self.write_failure: str | None = None
        # The store said it was replaced under us (a new SQLite file at the
        # path): whatever epoch it holds, its state is not the one we served.
        self._replaced = False
        # Why no pool may be stepped here now: every step is refused with it.
        self._unsafe: str | None = None
        self._clock_problem: str | None = None
        self._loops: list[asyncio.Task[None]] = []

    @property
    def epoch_key(self) -> str:
        return f"{self.prefix}epoch"

    def server_key(self, server_id: str) -> str:
        return f"{self.prefix}server/{server_id}"

    async def start(self) -> None:
        """Before the port opens: our beat, the store's settings, its epoch, our clock."""
        await self._call(self.beat(), quiet=True)
        await self.check_settings(at_start=True)
        await self.settle()
        with contextlib.suppress(BackendUnavailable):  # checked again every beat
            await self.check_clock()
        self._loops = [
            asyncio.create_task(self._heartbeat_loop()),
            asyncio.create_task(self._epoch_watch_loop()),
        ]

    async def stop(self) -> None:
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)

    async def check(self) -> None:
        """For /healthz: refused steps, and writes that failed (then a probe write)."""
        refusal = self.refusal()
        if refusal is not None:
            raise BackendUnavailable(refusal)
        if self.write_failure is not None:
            probe = f"{self.prefix}probe/{self.server_id}/{secrets.token_hex(4)}"
            try:
                await self._call(self.store.put(probe, b"{}", None, 60, True), quiet=True)
            except BackendUnavailable as exc:
                raise BackendUnavailable(f"writes fail: {exc}") from None
            self.write_failure = None

    async def beat(self) -> None:
        # Our clock goes with the beat: servers that judge leases by their own
        # clocks compare them (backends/clocks.py).
        beat = self.beat_value[:-1] + (b"," if len(self.beat_value) > 2 else b"")
        beat += b'"t":%.3f}' % time.time()
        await self.store.set(self.server_key(self.server_id), beat, HEARTBEAT_TTL)

    def refusal(self) -> str | None:
        """Why this server steps no pool now, or None."""
        return self._unsafe or self._clock_problem

    async def check_settings(self, at_start: bool = False) -> None:
        """Refuse (or only log, ``unsafe_store: warn``) a store set up to lose locks."""
        problem = await self._call(self.store.unsafe_setting(), quiet=at_start)
        if problem is None or self.unsafe_store == "warn":
            if problem is not None and problem != self._unsafe:
                log.warning("%s (allowed by unsafe_store: warn)", problem)
            if self._unsafe is not None and problem is None:
                log.info("%s: its settings are safe again", self.store.description)
            self._unsafe = None
            return
        message = f"{problem}; or set unsafe_store: warn to run anyway"
        if at_start:
            raise BackendUnavailable(message)
        if message != self._unsafe:
            log.error("%s: no grants until it is fixed", message)
        self._unsafe = message

    async def check_clock(self) -> None:
        """Compare our clock with the store's or the other servers' (clocks.py)."""
        before = time.time()
        store_clock = await self._call(self.store.own_clock(), quiet=True)
        beats = await self._call(self.store.beats(self.server_key("")), quiet=True)
        after = time.time()
        readings = []
        if store_clock is not None:
            store_time, resolution = store_clock
            readings.append(
                clocks.store_reading(self.store.description, store_time, resolution, before, after)
            )
        for key, value in (beats or {}).items():
            server = key.rsplit("/", 1)[-1]
            try:
                beat_time = float(json.loads(value)["t"])
            except (ValueError, KeyError, TypeError):
                continue  # a server of an earlier version: no clock in its beat
            if server != self.server_id:
                readings.append(
                    clocks.beat_reading(f"server {server}", beat_time, HEARTBEAT_TTL, before, after)
                )
        problem = clocks.clock_problem(readings)
        if problem != self._clock_problem:
            if problem is not None:
                log.error("%s", problem)
            else:
                log.info("this server's clock agrees with the others' again")
        self._clock_problem = problem

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL)
            with contextlib.suppress(BackendUnavailable):
                await self._call(self.beat())
                self._on_beat()
                await self.check_clock()

    async def settle(self) -> None:
        """At start: the store's epoch, waiting NEW_STORE_SETTLE before calling a store new.

        An empty store may be new, or may have lost its state while other
        servers' clients hold leases; those servers record the loss within an
        epoch check of noticing it, so a store still without an epoch after
        the wait had nobody left to tell.
        """
        got = await self._call(self.store.get([self.epoch_key]), quiet=True)
        if self.epoch_key not in got:
            log.info(
                "%s holds no distributex state: waiting %.1f s for other servers to "
                "record a loss before taking it as new",
                self.store.description,
                NEW_STORE_SETTLE,
            )
            await asyncio.sleep(NEW_STORE_SETTLE)
        epoch = await self._call(self.current(), quiet=True)
        if epoch.lost_at is not None and self.store.now() < epoch.lost_at + DEFAULT_EXPIRE:
            log.warning(
                "%s lost its state %.0f s ago: pools without a record grant nothing until "
                "leases granted before could have ended",
                self.store.description,
                self.store.now() - epoch.lost_at,
            )

    async def _epoch_watch_loop(self) -> None:
        """Notice a store that lost its state (and record the loss) while no request comes."""
        while True:
            await asyncio.sleep(EPOCH_CHECK_INTERVAL)
            known = self.epoch
            with contextlib.suppress(BackendUnavailable):
                epoch = await self._call(self.current(), quiet=True)
                if known is not None and epoch.id != known.id:
                    # Announce ourselves in the new store at once (our beat is gone
                    # with the rest), so no step drops our waiters as a dead server's.
                    await self._call(self.beat(), quiet=True)
                    # A store that restarted may have restarted with other settings.
                    await self.check_settings()

    def replaced(self) -> None:
        """The store told us it is not the one we served from: record a loss in it."""
        self._replaced = True
        self._on_new_epoch()

    async def current(self, stored: Stored | None = None, read: bool = True) -> Epoch:
        """The store's epoch; makes a new one (recording a loss if we knew an old one)."""
        for _ in range(MAX_ATTEMPTS):
            if stored is None and read:
                stored = (await self.store.get([self.epoch_key])).get(self.epoch_key)
            read = True
            if self._replaced and stored is not None:
                # A file put in place of ours may hold an epoch (a copy of an old
                # one): its records are not what our clients were told. A new epoch.
                lost = Epoch(secrets.token_hex(8), self.store.now(), self.store.now())
                if not await self.store.put(self.epoch_key, lost.encode(), stored.version):
                    stored = None
                    continue
                self._replaced = False
                self._log_loss()
                self.epoch = lost
                return lost
            self._replaced = False
            if stored is None:
                lost_at = self.store.now() if self.epoch is not None else None
                epoch = Epoch(secrets.token_hex(8), self.store.now(), lost_at)
                if await self.store.put(self.epoch_key, epoch.encode(), None):
                    if lost_at is not None:
                        self._log_loss()
                    self.epoch = epoch
                    return epoch
                continue
            epoch = Epoch.decode(stored.value)
            if self.epoch is not None and epoch.id != self.epoch.id:
                self._on_new_epoch()  # records kept from the old epoch's store
                if epoch.lost_at is None:
                    # A server that never knew the old epoch made this one: record the loss.
                    epoch.lost_at = self.store.now()
                    if not await self.store.put(self.epoch_key, epoch.encode(), stored.version):
                        stored = None
                        continue
                    self._log_loss()
            self.epoch = epoch
            return epoch
        raise BackendUnavailable(f"{self.store.description}: cannot settle the epoch record")

    def _log_loss(self) -> None:
        log.warning(
            "%s lost its state (restarted, flushed, evicted or replaced): pools without "
            "a record grant nothing until leases granted before could have ended",
            self.store.description,
        )
