"""The in-memory backend: the engine driven by the asyncio event loop.

State lives in this process only; a restart forgets every lock. Waiting is
event-driven: a release, an expiry or a hang-up wakes exactly the waiters the
engine granted, in the same loop iteration. Expiry runs on one timer set for
the engine's next deadline, so it is exact whatever the traffic.

With ``start_delay`` (config ``start_delay``), a fresh server grants nothing
for that many seconds: requests queue up and ``/get/`` answers NO, so that
holders of leases granted before a restart notice the loss first.

Fencing tokens start from the wall clock in microseconds, so tokens handed
out after a restart are still larger than those handed out before it (as
long as the server grants fewer than a million locks a second on average and
the clock does not go back).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping, Sequence, Set

from distributex.backends.base import BackendUnavailable, ParkingBackend, WakeListener
from distributex.engine import EXCLUSIVE, Hold, Lease, LockEngine, PoolSpec, Waiter
from distributex.status import PoolStatus, pool_status


class InMemoryBackend(ParkingBackend):
    """Lock state in this process, served from one event loop."""

    def __init__(self, engine: LockEngine | None = None, start_delay: float = 0.0) -> None:
        self.engine = engine or LockEngine(first_fence=time.time_ns() // 1000)
        self.start_delay = start_delay
        self._resume_timer: asyncio.TimerHandle | None = None
        # Who to tell when a parked waiter is granted, and its timeout's timer.
        self._parked: dict[Waiter, WakeListener] = {}
        self._timeouts: dict[Waiter, asyncio.TimerHandle] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._resume_at: float | None = None
        self.engine.on_expire = self._expired

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def now(self) -> float:
        return self.loop.time()

    async def start(self) -> None:
        # A restart forgot every lease. Hold grants back so that clients
        # still running under a lease from before it hit GONE at their next
        # renewal, and stop, before anyone else is given their slot.
        if self.start_delay > 0:
            self.engine.pause()
            self._resume_timer = self.loop.call_later(self.start_delay, self._resume)
            self._resume_at = self.now() + self.start_delay

    def _resume(self) -> None:
        self._resume_timer = None
        self._resume_at = None
        self._wake(self.engine.resume(self.now()))

    async def close(self) -> None:
        self._closed = True
        if self._resume_timer is not None:
            self._resume_timer.cancel()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for timer in self._timeouts.values():
            timer.cancel()
        self._timeouts.clear()
        parked, self._parked = self._parked, {}
        for listener in parked.values():
            self.loop.call_soon(listener.woken, BackendUnavailable("server is shutting down"))

    def _check_open(self) -> None:
        if self._closed:
            raise BackendUnavailable("server is shutting down")

    async def acquire(
        self, spec: PoolSpec, owner: str, ttl: float | None, mode: str = EXCLUSIVE
    ) -> Lease | None:
        self._check_open()
        lease = self.engine.acquire(spec, owner, self.now(), ttl, mode)
        self._reschedule()
        return lease

    async def wait(
        self,
        spec: PoolSpec,
        owner: str,
        ttl: float | None,
        timeout: float | None,
        still_wanted: Callable[[], bool],
        mode: str = EXCLUSIVE,
    ) -> Lease | None:
        woken = _Woken(self.loop.create_future())
        waiter = self.park(spec, owner, ttl, timeout, mode, woken)
        if waiter.lease is None:
            try:
                if not await woken.future:
                    return None  # timed out: it has left the queue
            except BaseException:
                self.unpark(waiter)  # hung up or shutting down
                raise
        return self.take(waiter, still_wanted)

    def park(
        self,
        spec: PoolSpec,
        owner: str,
        ttl: float | None,
        timeout: float | None,
        mode: str,
        listener: WakeListener,
    ) -> Waiter:
        """``listener.woken()`` is called once, in a later loop turn: True
        granted (:meth:`take` it), False timed out (it has left the queue), or
        a :class:`BackendUnavailable` (shutting down). Until then
        :meth:`unpark` takes it out (a hang-up)."""
        self._check_open()
        waiter = self.engine.enqueue(spec, owner, self.now(), ttl, mode=mode)
        self._reschedule()
        if waiter.lease is None:
            self.events.queued()
            self._parked[waiter] = listener
            if timeout is not None:
                self._timeouts[waiter] = self.loop.call_later(timeout, self._time_out, waiter)
        return waiter

    def take(self, waiter: Waiter, still_wanted: Callable[[], bool]) -> Lease | None:
        """A granted waiter's lease, unless its client is gone (the grant passes on)."""
        if not still_wanted():
            self._wake(self.engine.cancel(waiter, self.now()))
            return None
        return waiter.lease if self.engine.deliver(waiter) else None

    def unpark(self, waiter: Waiter) -> None:
        """A parked or granted waiter gives up before :meth:`take`: it leaves the queue
        (a grant not handed over is undone and passed on)."""
        self._parked.pop(waiter, None)
        self._stop_timer(waiter)
        self._wake(self.engine.cancel(waiter, self.now()))
        self.events.queued()

    def _time_out(self, waiter: Waiter) -> None:
        # Still queued: a grant or an unpark would have stopped this timer.
        del self._timeouts[waiter]
        listener = self._parked.pop(waiter)
        self._wake(self.engine.cancel(waiter, self.now()))
        listener.woken(False)

    def _stop_timer(self, waiter: Waiter) -> None:
        timer = self._timeouts.pop(waiter, None)
        if timer is not None:
            timer.cancel()

    async def release(self, spec: PoolSpec, owner: str, token: str | None) -> bool:
        self._check_open()
        now = self.now()
        ended: object
        if token is None:
            ended, granted = self.engine.release(spec.name, owner, now)
        else:
            ended, granted = self.engine.release_lease(spec.name, token, now, owner)
        if isinstance(ended, Hold | Lease):
            self.events.released(spec.name, owner, ended.fence)
        self._wake(granted)
        return ended is not None

    async def renew(
        self, spec: PoolSpec, owner: str, token: str, ttl: float | None
    ) -> Lease | None:
        self._check_open()
        lease = self.engine.renew(spec.name, token, self.now(), ttl, owner)
        self._reschedule()
        return lease

    def pools_in_use(self) -> Set[str]:
        return self.engine.pools_in_use()

    async def status(self, specs: Sequence[PoolSpec]) -> list[PoolStatus]:
        now = self.now()
        offset = time.time() - now  # loop time -> epoch seconds

        def to_wall(t: float) -> float:
            return t + offset

        result = []
        for spec in specs:
            status = pool_status(self.engine, spec, to_wall, now)
            if self._resume_at is not None:
                status.blocked_until = to_wall(self._resume_at)
            result.append(status)
        return result

    async def check(self) -> None:
        self._check_open()

    def reconfigure(self, specs: Mapping[str, PoolSpec]) -> None:
        now = self.now()
        for name in list(self.engine.pool_names()):
            spec = specs.get(name)
            if spec is not None:
                self._wake(self.engine.reconfigure(spec, now))

    def _wake(self, granted: Iterable[Waiter]) -> None:
        parked = self._parked
        for waiter in granted:
            listener = parked.pop(waiter, None)
            if listener is not None:
                self._stop_timer(waiter)
                # A later turn: the grant does not run the waiter's request inside this one.
                self.loop.call_soon(listener.woken, True)
        self._reschedule()

    def _reschedule(self) -> None:
        """Have the timer fire by the engine's next deadline.

        Only an earlier deadline re-arms it: a timer armed for a lease that
        was released since fires early, expires nothing and re-arms itself
        for the next deadline. So a grant and release of a long lease, over
        and over, arms no timer each time (a timer handle made and
        cancelled per request cost several percent of one).
        """
        when = self.engine.next_deadline()
        if when is None or self._closed:
            return
        if self._timer_at is not None and self._timer_at <= when:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self._wake(self.engine.expire(self.now()))

    def _expired(self, lease: Lease) -> None:
        self.events.expired(lease.pool, lease.owner, lease.fence)


class _Woken:
    """A parked waiter's outcome as a future (what ``wait()`` awaits)."""

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[bool]) -> None:
        self.future = future

    def woken(self, outcome: bool | BaseException) -> None:
        if self.future.done():
            return  # cancelled: the waiter has left already
        if isinstance(outcome, BaseException):
            self.future.set_exception(outcome)
        else:
            self.future.set_result(outcome)
