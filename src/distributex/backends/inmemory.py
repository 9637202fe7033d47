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

from distributex.backends.base import BackendUnavailable, LockBackend
from distributex.engine import EXCLUSIVE, Hold, Lease, LockEngine, PoolSpec, Waiter
from distributex.status import PoolStatus, pool_status


class InMemoryBackend(LockBackend):
    """Lock state in this process, served from one event loop."""

    answers_in_step = True

    def __init__(self, engine: LockEngine | None = None, start_delay: float = 0.0) -> None:
        self.engine = engine or LockEngine(first_fence=time.time_ns() // 1000)
        self.start_delay = start_delay
        self._resume_timer: asyncio.TimerHandle | None = None
        # Parked waiters' wake-ups: True granted, False timed out.
        self._wakeups: dict[Waiter, asyncio.Future[bool]] = {}
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
        for future in self._wakeups.values():
            if not future.done():
                future.set_exception(BackendUnavailable("server is shutting down"))
        self._wakeups.clear()

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
        self._check_open()
        engine = self.engine
        waiter = engine.enqueue(spec, owner, self.now(), ttl, mode=mode)
        self._reschedule()
        if waiter.lease is None:
            self.events.queued()
            wakeup = self.loop.create_future()
            self._wakeups[waiter] = wakeup
            # A timer, not asyncio.timeout(): the request may not have a task
            # yet (the lean protocol serves it in the step that read it).
            timer = None if timeout is None else self.loop.call_later(timeout, _time_out, wakeup)
            try:
                granted = await wakeup
            except BaseException:
                # Hung up or shutting down: leave the queue the same way.
                self._wake(engine.cancel(waiter, self.now()))
                self.events.queued()
                raise
            finally:
                self._wakeups.pop(waiter, None)
                if timer is not None:
                    timer.cancel()
            if not granted:
                # A grant that raced the timeout is undone and passed on.
                self._wake(engine.cancel(waiter, self.now()))
                return None
        if not still_wanted():
            self._wake(engine.cancel(waiter, self.now()))
            return None
        return waiter.lease if engine.deliver(waiter) else None

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
        for waiter in granted:
            future = self._wakeups.get(waiter)
            if future is not None and not future.done():
                future.set_result(True)
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


def _time_out(wakeup: asyncio.Future[bool]) -> None:
    if not wakeup.done():
        wakeup.set_result(False)
