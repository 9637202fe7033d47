"""The interface between the HTTP layer and a place that keeps lock state."""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence, Set
from typing import Protocol

from distributex.engine import EXCLUSIVE, Lease, PoolSpec, Waiter
from distributex.events import NULL_EVENTS, Events
from distributex.status import PoolStatus


class BackendUnavailable(Exception):
    """The backend cannot answer now (unreachable, not configured, shutting down)."""


class LockBackend(abc.ABC):
    """Lock operations as the HTTP verbs need them.

    ``owner`` is the legacy host identity. ``ttl`` is the lease time the
    client asked for (None: the pool's ``expire``). Methods answer within a
    bounded time or raise :class:`BackendUnavailable`.

    ``events`` receives what happens inside the backend that the HTTP layer
    cannot see: releases (with their fence), expiries, queue changes. The
    server sets it before :meth:`start`.
    """

    events: Events = NULL_EVENTS
    # True: the calls await nothing but a parked wait's wake-up (no store I/O,
    # no asyncio.timeout), so a request may be served in the loop step that
    # read it, outside any task until it parks (distributex.fastlane).
    answers_in_step: bool = False

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect to whatever the backend needs."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Stop timers, wake every waiter with a refusal, drop connections."""

    @abc.abstractmethod
    async def acquire(
        self, spec: PoolSpec, owner: str, ttl: float | None, mode: str = EXCLUSIVE
    ) -> Lease | None:
        """Try once; the owner's lease, or None if no slot of ``mode`` is free."""

    @abc.abstractmethod
    async def wait(
        self,
        spec: PoolSpec,
        owner: str,
        ttl: float | None,
        timeout: float | None,
        still_wanted: Callable[[], bool],
        mode: str = EXCLUSIVE,
    ) -> Lease | None:
        """Wait in the pool's queue until granted (a lease) or ``timeout`` (None).

        ``still_wanted()`` is asked right before a grant is handed over; if
        it says False the grant is undone and passed on. Cancelling the call
        (the client hung up) leaves the queue the same way.
        """

    @abc.abstractmethod
    async def release(self, spec: PoolSpec, owner: str, token: str | None) -> bool:
        """End exactly the lease ``token``, or (None) all of the owner's leases.

        True if something was released.
        """

    @abc.abstractmethod
    async def renew(
        self, spec: PoolSpec, owner: str, token: str, ttl: float | None
    ) -> Lease | None:
        """Restart a lease's time-to-live; None if the lease is gone."""

    @abc.abstractmethod
    def pools_in_use(self) -> Set[str]:
        """Names of the pools that hold state now (holders or waiters).

        The HTTP layer bounds how many pools made on first use hold state at
        once (``max_pools``) with it, so it must be cheap: a live view, or a
        local estimate for a backend whose state lives elsewhere.
        """

    # -- for operators: /status, /healthz, reload ---------------------------------------

    @abc.abstractmethod
    async def status(self, specs: Sequence[PoolSpec]) -> list[PoolStatus]:
        """The holders and waiters of each pool in ``specs``, in that order.

        Read-only: nothing is granted or written for it (a lease past its
        time is left out, as the next step would end it). A pool with no
        state shows with no holders and no waiters.
        """

    def known_pools(self) -> Set[str]:
        """Pools this server knows to hold state, beyond the configured ones.

        ``/status`` lists the configured pools and these. A backend whose
        state is shared may not know pools that only other servers used.
        """
        return self.pools_in_use()

    async def check(self) -> None:  # noqa: B027 - optional hook
        """Raise :class:`BackendUnavailable` (with the reason) if the backend cannot answer."""

    def reconfigure(self, specs: Mapping[str, PoolSpec]) -> None:  # noqa: B027 - optional hook
        """The configuration was reloaded: these are the new specs of pools in use.

        A raised ``maxlocks`` grants waiters at once; a lowered one ends no
        hold (new grants wait until the pool is under it).
        """


class WakeListener(Protocol):
    """Told once how a parked wait ended (:meth:`ParkingBackend.park`)."""

    def woken(self, outcome: bool | BaseException) -> None:
        """True granted, False timed out, or the error that ended it (shutting down)."""


class ParkingBackend(LockBackend):
    """A backend whose waits can park with no coroutine: ``wait()`` in three calls.

    A fleet parks thousands of ``/wait/`` requests on one server; a coroutine
    chain per request is most of what each would cost. Here the HTTP layer
    parks the request itself (:class:`distributex.verbs.ParkedWait`).
    """

    answers_in_step = True

    @abc.abstractmethod
    def park(
        self,
        spec: PoolSpec,
        owner: str,
        ttl: float | None,
        timeout: float | None,
        mode: str,
        listener: WakeListener,
    ) -> Waiter:
        """Queue a wait: the waiter, granted (``lease`` set) or parked until
        ``listener.woken()`` is called in a later loop turn."""

    @abc.abstractmethod
    def take(self, waiter: Waiter, still_wanted: Callable[[], bool]) -> Lease | None:
        """The lease of a waiter granted (at once, or woken with True); None if
        ``still_wanted()`` says the client is gone or the lease ended meanwhile."""

    @abc.abstractmethod
    def unpark(self, waiter: Waiter) -> None:
        """Give up before :meth:`take`: leave the queue, pass on a grant not handed over.

        A grant's wake-up already on its way (granted in this loop turn) may
        still reach the listener after this: it must ignore it."""
