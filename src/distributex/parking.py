"""A parked request carried on by the future it waits for, without a task.

A fleet parks thousands of ``/wait/`` requests on one server. As asyncio
tasks each would cost a task object (about 0.9 KB with its place in
asyncio's task registry) and two loop turns more per hand-off: one for the
task's first step, one for its wake-up. On a backend that answers in the
step that read the request (``answers_in_step``: in memory), a request can
only wait for its wake-up future, so the lean protocol drives its coroutine
itself: the future's done-callback sends the result in (or throws the
exception), as a task would.

What differs from a task: ``asyncio.current_task()`` is None while it runs,
so nothing on this path may need one (``asyncio.timeout`` does: the
in-memory backend times out with a timer instead). Cancelling cancels the
future waited for, so the coroutine sees ``CancelledError`` where it waits,
as under ``Task.cancel()``. A coroutine that waits for anything but a
future is handed to a task from there on (``to_task``): correct, only not
as cheap.
"""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import Coroutine, Generator
from typing import Any, Protocol

from distributex.call import Answer

log = logging.getLogger("distributex")

Serving = Coroutine[Any, Any, Answer]  # distributex.verbs.serve(...), started


class Answering(Protocol):
    """The connection a parked request answers on."""

    def answer(self, answer: Answer, keep_alive: bool) -> None:
        """Write ``answer``, then serve what was pipelined behind its request."""

    def carry_on(self, serving: Serving, waits_for: Any, keep_alive: bool) -> None:
        """Go on serving in a task, from where ``serving`` waits for ``waits_for``."""


class ParkedRequest:
    """``serving`` waiting for ``waits_for``; its answer goes to ``conn``."""

    __slots__ = ("_conn", "_done", "_keep_alive", "_serving", "_waits_for")

    def __init__(
        self, serving: Serving, waits_for: asyncio.Future[Any], conn: Answering, keep_alive: bool
    ) -> None:
        self._serving = serving
        self._conn = conn
        self._keep_alive = keep_alive
        self._done: asyncio.Future[None] | None = None
        self._waits_for: asyncio.Future[Any] | None = None
        self._wait_for(waits_for)

    def cancel(self) -> None:
        """End it as ``Task.cancel()`` would: the wait raises CancelledError."""
        if self._waits_for is not None:
            self._waits_for.cancel()

    def done(self) -> asyncio.Future[None]:
        """A future that is done when the request is (made on demand: a graceful stop)."""
        if self._done is None:
            self._done = asyncio.get_running_loop().create_future()
        return self._done

    def _wait_for(self, future: asyncio.Future[Any]) -> None:
        future._asyncio_future_blocking = False  # taken, as a task takes it
        self._waits_for = future
        future.add_done_callback(self._resume)

    def _resume(self, future: asyncio.Future[Any]) -> None:
        self._waits_for = None
        serving = self._serving
        try:
            try:
                value = future.result()
            except BaseException as exc:  # thrown in where it waits, as a task does
                step = serving.throw(exc)
            else:
                step = serving.send(value)
        except StopIteration as answered:
            self._finish()
            self._conn.answer(answered.value, self._keep_alive)
            return
        except asyncio.CancelledError:  # a hang-up or a stop: nobody to answer
            self._finish()
            return
        except Exception:
            log.exception("error serving a parked request")
            self._finish()
            self._conn.answer(Answer("ERROR", 500, close=True), self._keep_alive)
            return
        if parks_on(step):
            self._wait_for(step)
        else:
            self._finish()  # (a graceful stop waits for this part only)
            self._conn.carry_on(serving, step, self._keep_alive)

    def _finish(self) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(None)


def parks_on(step: Any) -> bool:
    """Whether a coroutine's step waits for a future (what a :class:`ParkedRequest` drives)."""
    return asyncio.isfuture(step) and bool(getattr(step, "_asyncio_future_blocking", False))


@types.coroutine
def carried_on(serving: Serving, waits_for: Any) -> Generator[Any, Any, Answer]:
    """``serving``, started outside a task, carried on in one from its wait for
    ``waits_for``, as if it had run in the task all along."""
    try:
        while True:
            try:
                sent = yield waits_for
            except GeneratorExit:
                serving.close()
                raise
            except BaseException as exc:  # a cancel: hang-up, stop, revocation
                waits_for = serving.throw(exc)
            else:
                waits_for = serving.send(sent)
    except StopIteration as answered:
        result: Answer = answered.value
        return result
