"""A ``/wait/`` parked with no coroutine and no task, answered when the backend wakes it.

A fleet parks thousands of ``/wait/`` requests on one server. Awaited, each
would keep a chain of coroutine frames (serve, the checks, the verb, the
backend's wait: about 1.4 KB) and a future with its callback. On a backend
that parks waits itself (:class:`~distributex.backends.base.ParkingBackend`:
in memory), the lean protocol's requests (``Call.parkable``) come back from
:func:`distributex.verbs.serve` as a :class:`ParkedWait` instead: the
backend calls its :meth:`~ParkedWait.woken` when the wait ends, and it
answers on the connection (:class:`Answering`). Every other path awaits
``backend.wait()`` as before.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from aiohttp import web

from distributex import auth, fairness, outcomes
from distributex.appkeys import EVENTS_KEY
from distributex.backends.base import BackendUnavailable, ParkingBackend
from distributex.call import IDENTITY_KEY, REVOKED_KEY, Answer, Call
from distributex.engine import EXCLUSIVE, Lease, PoolSpec, Waiter
from distributex.refusal import Refused, wording_headers

log = logging.getLogger("distributex")


class Answering(Protocol):
    """The connection a parked request answers on."""

    def answer(self, answer: Answer, keep_alive: bool) -> None:
        """Write ``answer``, then serve what was pipelined behind its request."""


class _HungUp:
    """How a parked wait ends when its client hangs up: no answer."""


_HUNG_UP = _HungUp()


class ParkedWait:
    """A ``/wait/`` parked on a :class:`ParkingBackend`, with no coroutine and no task.

    :func:`distributex.verbs.serve` gives it back instead of an answer; the connection then
    says where the answer goes (:meth:`answer_on`). The backend wakes it
    (:meth:`woken`); a hang-up or a revoked token ends it (:meth:`cancel`).
    Either way it is answered once, through the same steps as a wait
    answered at once: :func:`~distributex.outcomes.waited` or
    :func:`~distributex.outcomes.failed`, the request count,
    :func:`~distributex.outcomes.noted`. What a parked fleet costs is these
    slots, the call and the engine's waiter (bench/README.md, "Parked
    without a coroutine").
    """

    __slots__ = (
        "_app",
        "_backend",
        "_call",
        "_conn",
        "_done",
        "_host",
        "_keep_alive",
        "_mode",
        "_spec",
        "_started",
        "_waiter",
    )

    def __init__(
        self,
        app: web.Application,
        call: Call,
        spec: PoolSpec,
        host: str,
        mode: str | None,
        started: float,
    ) -> None:
        self._app = app
        self._call = call
        self._spec = spec
        self._host = host
        self._mode = mode
        self._started = started
        self._waiter: Waiter | None = None  # None once answered
        self._backend: ParkingBackend | None = None
        self._conn: Answering | None = None
        self._keep_alive = False
        self._done: asyncio.Future[None] | None = None

    def park(
        self, backend: ParkingBackend, ttl: float | None, timeout: float | None
    ) -> Answer | ParkedWait:
        """Join the queue: the answer if granted at once, else this request, parked."""
        security = self._app[auth.SECURITY_KEY]
        spec, host = self._spec, self._host
        try:
            waiter = backend.park(spec, host, ttl, timeout, self._mode or EXCLUSIVE, self)
        except BaseException:
            security.waiters.leave(spec.name, host)
            raise
        if waiter.lease is not None:
            security.waiters.leave(spec.name, host)
            lease = backend.take(waiter, self._call.still_wanted)
            return outcomes.waited(
                self._app, self._call, spec, host, self._mode, self._started, lease
            )
        self._waiter = waiter
        self._backend = backend
        security.track(self._call)
        # Read and checked: what it waits with is only what words its answer.
        self._call.headers = wording_headers(self._call.headers)
        self._call.raw_query = ""
        return self

    def answer_on(self, conn: Answering, keep_alive: bool) -> None:
        self._conn = conn
        self._keep_alive = keep_alive

    def woken(self, outcome: bool | BaseException) -> None:
        """The backend's word (:class:`~distributex.backends.base.WakeListener`)."""
        if self._waiter is None or self._backend is None:
            return  # ended already (a hang-up before this turn)
        if isinstance(outcome, BaseException):
            self._end(outcome)
        else:
            self._end(
                self._backend.take(self._waiter, self._call.still_wanted) if outcome else None
            )

    def cancel(self) -> None:
        """A hang-up, or a reload that revoked the token: leave the queue."""
        if self._waiter is None or self._backend is None:
            return
        self._backend.unpark(self._waiter)
        revoked = self._call.get(REVOKED_KEY)
        self._end(_HUNG_UP if revoked is None else Refused(403, revoked))

    def done(self) -> asyncio.Future[None]:
        """Done once answered (made on demand: a graceful stop waits for it)."""
        if self._done is None:
            self._done = asyncio.get_running_loop().create_future()
            if self._waiter is None:
                self._done.set_result(None)
        return self._done

    def _end(self, outcome: Lease | BaseException | _HungUp | None) -> None:
        app, call, spec, host = self._app, self._call, self._spec, self._host
        self._waiter = None
        security = app[auth.SECURITY_KEY]
        security.untrack(call)
        security.waiters.leave(spec.name, host)
        identity = call.get(IDENTITY_KEY)
        if identity is not None:  # it waited within the identity's share
            app[fairness.IDENTITY_REQUESTS_KEY].leave(identity.name)
        events = app[EVENTS_KEY]
        answer: Answer | None = None
        if isinstance(outcome, _HungUp):
            events.request("wait", 499)
        else:
            if isinstance(outcome, Refused | BackendUnavailable):
                answer = outcomes.failed(app, call, spec.name, host, outcome)
            elif isinstance(outcome, BaseException):
                log.error("a parked wait ended with %r", outcome)
                answer = Answer("ERROR", 500, close=True)
            else:
                answer = outcomes.waited(app, call, spec, host, self._mode, self._started, outcome)
            events.request("wait", answer.status)
            answer = outcomes.noted(app, "wait", call, answer)
        if self._done is not None and not self._done.done():
            self._done.set_result(None)
        if answer is not None and self._conn is not None:
            self._conn.answer(answer, self._keep_alive)
