"""What the lean connections of one server share, done once for all of them.

* :class:`Deadlines`: the head and idle deadlines, checked by one timer
  every :data:`SWEEP` seconds instead of a timer per request.
* :class:`Outbox`: the answers made while the loop reads its sockets:
  the first goes out at once, the others together once every ready socket
  has been read.

Why: a client is woken by the answer to its request. Written one by one
between reading one socket and the next, each answer wakes a client that
then competes for the CPU while the server still reads; written together, a
burst costs one wake-up. Measured with wrk, 32 connections
(bench/README.md, "Answers in the step that read them"): 34.5 µs of server
CPU per request against 55 µs written one by one. The first answer of a
turn goes at once because a lone request (a hand-off on a busy mutex) would
otherwise wait for the turn's end for nothing: 148 to 155 µs per grant in the
mutex fight against 161 to 167.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

# How often deadlines are checked (seconds): a head or idle deadline is kept to within this.
SWEEP = 0.25


class Watched(Protocol):
    """A connection with a deadline (a lean connection)."""

    def deadline_passed(self, now: float) -> bool:
        """Whether its deadline passed (it has closed itself if it had to)."""


class Deadlines:
    """The lean connections waiting for a head, checked by one timer every :data:`SWEEP`.

    Setting a deadline is a float and a dict entry, not a timer armed and
    cancelled on every request; a connection whose request is being answered
    (a parked ``/wait/``) is not in the table at all. A deadline is kept to
    within :data:`SWEEP` seconds.
    """

    def __init__(self) -> None:
        self._waiting: dict[Watched, None] = {}
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, conn: Watched) -> None:
        self._waiting[conn] = None
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(SWEEP, self._sweep)

    def forget(self, conn: Watched) -> None:
        self._waiting.pop(conn, None)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _sweep(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        for conn in [c for c in self._waiting if c.deadline_passed(now)]:
            del self._waiting[conn]
        if self._waiting:
            self._timer = loop.call_later(SWEEP, self._sweep)


class Outbox:
    """Answers made while the loop reads: the first of a loop turn written at
    once, the others together at the turn's end (see the module).

    The turn's end is a callback queued with its first answer: it runs before
    the loop next waits for sockets, so no answer waits for a socket. A
    connection that closes or hands itself over first writes what waits here
    (:meth:`flush`), so its answers keep their order.
    """

    def __init__(self) -> None:
        self._answers: list[tuple[Any, bytes]] = []
        self._turn = False  # an answer of this loop turn went out
        self._loop: asyncio.AbstractEventLoop | None = None

    def send(self, transport: Any, data: bytes) -> None:
        if self._turn:
            self._answers.append((transport, data))
            return
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._turn = True
        self._loop.call_soon(self.flush)  # the turn's end: before the loop next waits
        transport.write(data)

    def flush(self) -> None:
        self._turn = False
        answers, self._answers = self._answers, []
        for transport, data in answers:
            if not transport.is_closing():  # hung up meanwhile: nobody to tell
                transport.write(data)
