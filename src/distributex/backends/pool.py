"""What this server keeps of one pool between steps: a :class:`PoolRoom` per pool.

A room is made the first time the pool is stepped, waited on, reloaded or
nudged here. The parts that come and go (requests, their runner, waiters,
their poller) are empty or None between uses; a room left with nothing that
the store or the clock cannot give back is dropped (:meth:`Pools.prune`), so
what a server keeps grows with the pools in use, not with every pool name it
ever saw (a reload that removes pools, nudges about pools not served here).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from distributex.backends.record import Epoch, PageMarks, settings_of
from distributex.backends.store import Stored
from distributex.backends.waiters import LocalWaiters
from distributex.config import DEFAULT_EXPIRE
from distributex.engine import LockEngine, PoolSpec

log = logging.getLogger("distributex.shared")

# After a store loss, pools that never expire leases are held back this long.
LOSS_HOLD_NEVER_EXPIRE = DEFAULT_EXPIRE
# A pool's record says the settings it was written with; a server compares
# them with its own this often per pool (a mismatch is logged).
SETTINGS_CHECK_EVERY = 60.0


def longest_lease(spec: PoolSpec) -> float:
    """How long a lease of the pool may live without a renewal (as a loss counts it)."""
    return spec.expire or LOSS_HOLD_NEVER_EXPIRE


@dataclass(eq=False)
class Request:
    """A request waiting for the next step of its pool."""

    op: Callable[[LockEngine, float], Any]
    undo: Callable[[Any], Any] | None
    future: asyncio.Future[Any]
    # Its write may wait a moment for company (a /wait/ that queues): see LINGER.
    lazy: bool = False


@dataclass(frozen=True)
class Written:
    """The record this server wrote last, as the store's version of it, and
    the engine that holds its state (a step on it decodes nothing)."""

    stored: Stored
    epoch: Epoch
    engine: LockEngine


@dataclass(frozen=True)
class Brought:
    """The record another server wrote, brought by its nudge: as good as a read
    (a write on it fails if there was another write since)."""

    stored: Stored
    epoch: Epoch


@dataclass(eq=False)
class PoolRoom:
    """One pool as this server knows it."""

    name: str
    spec: PoolSpec | None = None  # the latest spec it was stepped with here
    # The step runner (steps.py): requests for the next step, the task that
    # runs them, and an event a lingering step waits on for more.
    pending: list[Request] = field(default_factory=list)
    runner: asyncio.Task[None] | None = None
    arrived: asyncio.Event | None = None
    # The stored record as last written here or brought by a nudge: a read saved.
    kept: Written | Brought | None = None
    fence_floor: int = 0  # above every fence seen here: a new record starts above it
    fragments: dict[str, str] = field(default_factory=dict)  # queue entries' JSON
    # The queue's tail in pages (pages.py): the marks of the record last read
    # or written here, and of the step under way.
    marks: PageMarks | None = None
    step_marks: PageMarks | None = None
    # Until when (store clock) leases granted here before a reload shortened
    # its expire may live: a loss of the store blocks grants until then.
    longer_leases_until: float = -math.inf
    settings_checked: float = -math.inf  # when (monotonic)
    # Our waiters, their poller, and the event a nudge sets for it.
    waiters: LocalWaiters = field(init=False)
    poller: asyncio.Task[None] | None = None
    nudged: asyncio.Event | None = None

    def __post_init__(self) -> None:
        self.waiters = LocalWaiters(self.name)

    def idle(self, now: float) -> bool:
        """Nothing here that a later step could not get back: the room may go.

        The fence floor is the one thing a step cannot read back when the
        store has lost the record; it may go once a new record would start
        above it anyway (new records start above the clock in µs). A record
        that exists carries its own last fence. ``now``: the store's clock.
        """
        return (
            not self.pending
            and self.runner is None
            and self.poller is None
            and self.nudged is None
            and not self.waiters
            and not self.waiters.answered
            and self.longer_leases_until <= now
            and self.fence_floor < int(now * 1_000_000)
        )

    def compare_settings(self, spec: PoolSpec, theirs: list[Any] | None) -> None:
        """Warn (once a minute per pool) if another server writes the pool with
        other settings: each grants by its own maxlocks."""
        clock = time.monotonic()
        if clock < self.settings_checked + SETTINGS_CHECK_EVERY:
            return
        self.settings_checked = clock
        if theirs is not None and theirs != settings_of(spec):
            log.warning(
                "pool '%s': another server runs it with maxlocks %s, expire %s (here: maxlocks "
                "%s, expire %s); give every server the same configuration (each grants by its "
                "own maxlocks)",
                spec.name,
                *theirs,
                *settings_of(spec),
            )


class Pools:
    """Every pool's room, the pools holding state, and the configuration in force."""

    def __init__(self) -> None:
        self._rooms: dict[str, PoolRoom] = {}
        # Pools this server has seen holding state (the store is shared).
        self.in_use: set[str] = set()
        # Specs set by a reload: they win over the spec a request (or a poller
        # started before the reload) carries.
        self.reloaded: dict[str, PoolSpec] = {}
        self.reloads = 0  # reloads so far: a poller steps its pool after each

    def __iter__(self) -> Iterator[PoolRoom]:
        return iter(list(self._rooms.values()))

    def get(self, name: str) -> PoolRoom | None:
        return self._rooms.get(name)

    def room(self, name: str) -> PoolRoom:
        """The pool's room, made on first use."""
        room = self._rooms.get(name)
        if room is None:
            room = self._rooms[name] = PoolRoom(name)
        return room

    def prune(self, now: float) -> list[str]:
        """Drop the rooms of pools idle here whose last record here held no state;
        their names (the caller drops what it keeps of them elsewhere).

        A pool holding state as last seen here keeps its room: a reload steps
        it (a raised maxlocks hands slots to its queue at once).
        """
        gone = [
            name for name, room in self._rooms.items() if name not in self.in_use and room.idle(now)
        ]
        for name in gone:
            del self._rooms[name]
        return gone

    def in_force(self, spec: PoolSpec) -> PoolSpec:
        """The pool's configuration now: a reload's, over the one a request
        (or a step begun before the reload) carries."""
        return self.reloaded.get(spec.name, spec)

    def reload(self, specs: Mapping[str, PoolSpec], now: float) -> list[PoolSpec]:
        """A reload's specs in force; those of the pools stepped here (to step now)."""
        for room in self:
            if room.longer_leases_until <= now:
                room.longer_leases_until = -math.inf
        for name, spec in specs.items():
            known = self.get(name)
            before = self.reloaded.get(name) or (known.spec if known else None)
            if before is not None and longest_lease(before) > longest_lease(spec):
                until = now + longest_lease(before)
                room = self.room(name)
                room.longer_leases_until = max(room.longer_leases_until, until)
        self.reloaded = dict(specs)
        self.reloads += 1
        stepped = []
        for name, spec in specs.items():
            known = self.get(name)
            if known is not None and known.spec is not None:
                known.spec = spec
                stepped.append(spec)
        return stepped

    def block_after_loss(
        self, engine: LockEngine, spec: PoolSpec, epoch: Epoch | None, now: float
    ) -> None:
        """A pool with no record in a store that lost its state: no grant while
        a lease granted before the loss could still be live."""
        if epoch is None or epoch.lost_at is None:
            return
        room = self.get(spec.name)
        until = max(
            epoch.lost_at + longest_lease(spec),
            -math.inf if room is None else room.longer_leases_until,
        )
        if now < until:
            engine.block(spec, until)
