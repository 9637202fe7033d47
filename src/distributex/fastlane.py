"""The lean protocol: the lock verbs served straight off the socket.

A grant is two small requests (``/wait/`` then ``/release/``), and a fleet
sends them all day: aiohttp's request and response objects, middlewares and
writer cost several times the lock itself (bench/README.md, "The floor").
So every connection starts here. Request heads are cut at the blank line and
read by ``httptools`` (llhttp, the parser Node.js uses); a plain verb request
becomes a :class:`~distributex.call.Call` that :mod:`distributex.verbs`
answers, and the answer is written as one buffer.

Anything else is handed to aiohttp, with every byte the connection sent
from that request on, and the connection stays aiohttp's: the operator
pages, a request with a body, ``Expect:`` or ``Upgrade:``, HTTP/1.0, a
method other than GET or POST, a head near the size limits, bytes httptools
refuses. aiohttp answers them exactly as it always has (its 400, 405, 411,
413, 431), and serves a verb on such a connection through the same
:mod:`distributex.verbs`.

The connection keeps the transport's rules (:mod:`distributex.transport`):
a head must be complete within ``header_timeout``, a kept-alive connection
closes after ``idle_timeout`` without a request, and the connection table may
close it while it is idle. A client that hangs up while its ``/wait/`` is
parked cancels the request, which leaves the queue. Requests on one
connection are answered in order, one at a time.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httptools
from aiohttp import web

from distributex import verbs
from distributex.call import VERB_PATHS, Answer, Call
from distributex.lanework import Deadlines, Outbox
from distributex.parkedwait import ParkedWait
from distributex.parking import Serving, carried_on
from distributex.wire import encode

log = logging.getLogger("distributex")

_HEAD_END = b"\r\n\r\n"
# Bytes read ahead of the request being answered before reading pauses.
_READ_AHEAD = 65536
# The headers a verb reads (authentication, the 0.7 client's rewrite, keep-alive):
# a parked request keeps only these.
_READ = frozenset((b"authorization", b"user-agent", b"connection"))
# Headers that mean the request is not a plain verb (a body, a protocol switch).
_NOT_PLAIN = frozenset((b"content-length", b"transfer-encoding", b"expect", b"upgrade"))


_PLAIN_STARTS = (b"GET /", b"POST /")
_PATHS = {path.encode(): path for path in VERB_PATHS}


def _may_be_plain(buffer: bytes) -> bool:
    """Whether ``buffer`` may begin a GET or POST of a path (else aiohttp answers at once)."""
    return any(start.startswith(buffer[: len(start)]) for start in _PLAIN_STARTS)


class _Head:
    """What httptools found in one request head (its callbacks land here)."""

    __slots__ = ("complete", "count", "headers", "plain", "url")

    def __init__(self) -> None:
        self.url = b""
        self.headers: dict[str, str] = {}
        self.count = 0
        self.plain = True
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.count += 1
        name = name.lower()
        if name in _NOT_PLAIN and not (name == b"content-length" and value.strip() == b"0"):
            self.plain = False
        if name in _READ:  # the first of a repeated one counts, as aiohttp's headers.get()
            self.headers.setdefault(name.decode("latin-1"), value.decode("latin-1"))

    def on_message_complete(self) -> None:
        self.complete = True


class LeanConnection(asyncio.Protocol):
    """One client connection, served here until a request needs aiohttp (see the module)."""

    # A fleet parks thousands of these: no __dict__ per connection.
    __slots__ = (
        "_buffer",
        "_busy",
        "_cancel_busy",
        "_closing",
        "_connections",
        "_deadline",
        "_deadlines",
        "_hand_over",
        "_idle_timeout",
        "_in_step",
        "_loop",
        "_max_head",
        "_max_headers",
        "_outbox",
        "_paused",
        "_reading",
        "_reading_head",
        "app",
        "making",
        "peer",
        "pending",
        "reserved",
        "streaming",
        "transport",
    )

    def __init__(
        self,
        app: web.Application,
        connections: Any,  # transport.Connections (which imports this module)
        peer: str,
        hand_over: Any,  # the aiohttp protocol that takes this connection over
        deadlines: Deadlines,
        outbox: Outbox,
        max_head: int,
        max_headers: int,
        idle_timeout: float,
        in_step: bool = False,
    ) -> None:
        self.app = app
        # Serve a request in the step that read it (the backend's answers_in_step).
        self._in_step = in_step
        self._cancel_busy = self._cancel  # made once: every Call of the connection holds it
        self.peer = peer
        self.pending = True  # until made: the TLS handshake runs
        self.streaming = False  # never: status streams are aiohttp's
        self.reserved = False  # beyond the cap: one renewal or release (fairness)
        self.making: asyncio.Task[Any] | None = None
        self.transport: Any = None
        self._connections = connections
        self._hand_over = hand_over
        self._max_head = max_head
        self._max_headers = max_headers
        self._idle_timeout = idle_timeout
        self._buffer = b""
        # The request being answered, if it waits (parked, or on a store).
        self._busy: asyncio.Task[None] | ParkedWait | None = None
        self._paused = False
        self._closing = False  # answer the request in progress, then close
        # One deadline at a time: for the head being read, or for the next one
        # to begin; None while a request is answered (see Deadlines).
        self._deadline: float | None = None
        self._deadlines = deadlines
        self._outbox = outbox
        self._reading = False  # in data_received: answers go to the outbox
        self._reading_head = False  # the deadline is the head's (else the idle one's)
        self._loop = asyncio.get_running_loop()

    # -- what the connection table asks ------------------------------------------------------

    def idle(self) -> bool:
        return self._busy is None

    def evict(self) -> None:
        """Closed to make room: a handshake is abandoned, a made connection closed."""
        if self.pending and self.making is not None:
            self.making.cancel()
        elif self.transport is not None:
            self._close()

    def busy(self) -> asyncio.Future[Any] | None:
        """Done when the request being answered is (None: none is)."""
        busy = self._busy
        return busy.done() if isinstance(busy, ParkedWait) else busy

    def close_when_answered(self) -> None:
        """A graceful stop: close now if idle, else once the answer in progress is out."""
        self._closing = True
        if self._busy is None and self.transport is not None:
            self._close()

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.pending = False
        self._expect_head()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._deadlines.forget(self)
        self._connections.forget(self)
        self.transport = None
        if self._busy is not None:
            self._busy.cancel()  # a parked /wait/ leaves the queue

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._busy is not None:
            if len(self._buffer) > _READ_AHEAD and not self._paused:
                self._paused = True  # pipelined far ahead of the answers
                self.transport.pause_reading()
            return
        if not self._reading_head:  # a kept-alive connection began its next head
            self._expect_head()
        self._reading = True
        try:
            self._next()
        finally:
            self._reading = False

    # -- serving -----------------------------------------------------------------------------

    def _next(self) -> None:
        """Serve the complete heads in the buffer in turn, or hand the connection over.

        On a backend that answers in this step (``answers_in_step``) a
        request is answered here, with no task; a ``/wait/`` that parks comes
        back as a :class:`~distributex.parkedwait.ParkedWait`, answered when the
        backend wakes it. Otherwise each request is served in a task.
        """
        while True:
            buffer = self._buffer
            end = buffer.find(_HEAD_END)
            if end < 0:
                if len(buffer) > self._max_head or b"\n\n" in buffer or not _may_be_plain(buffer):
                    self._hand_off()  # too long, a bare LF, not a verb (a TLS hello): aiohttp's
                return
            found = self._read(buffer[: end + 4])
            if found is None:
                self._hand_off()
                return
            verb, call, keep_alive = found
            self._buffer = buffer[end + 4 :]
            self._deadline = None
            self._deadlines.forget(self)
            self._reading_head = False
            if not self._in_step:
                self._busy = self._loop.create_task(self._serve(verb, call, keep_alive))
                return
            serving = verbs.serve(self.app, verb, call)
            try:
                waits_for = serving.send(None)
            except StopIteration as answered:
                answer = answered.value
                if isinstance(answer, ParkedWait):
                    answer.answer_on(self, keep_alive)
                    self._busy = answer
                    return
                if self._send(answer, keep_alive):
                    continue  # the next head is in the buffer
                return
            except Exception:
                log.exception("error serving %s", verb)
                self._send(Answer("ERROR", 500, close=True), keep_alive)
                return
            # It awaited something after all: from there on, a task serves it.
            self.carry_on(serving, waits_for, keep_alive)
            return

    # -- what a parked request asks (distributex.parking) ----------------------------------

    def answer(self, answer: Answer, keep_alive: bool) -> None:
        if self._send(answer, keep_alive):
            self._next()

    def carry_on(self, serving: Serving, waits_for: Any, keep_alive: bool) -> None:
        self._busy = self._loop.create_task(self._serve(None, serving, keep_alive, waits_for))

    def _read(self, head: bytes) -> tuple[str, Call, bool] | None:
        """The verb, call and keep-alive of a plain verb request; None for anything else."""
        if len(head) > self._max_head or b"\n\n" in head:
            return None
        found = _Head()
        parser = httptools.HttpRequestParser(found)
        try:
            parser.feed_data(head)
        except httptools.HttpParserError:
            return None
        if not (found.complete and found.plain) or found.count > self._max_headers:
            return None
        method = parser.get_method()
        if method not in (b"GET", b"POST") or parser.get_http_version() != "1.1":
            return None
        url = found.url
        raw_path, _, query = url.partition(b"?")
        path = _PATHS.get(raw_path)
        if path is None or b"#" in query or not url.isascii():
            return None
        verb = VERB_PATHS[path]
        call = Call(
            "GET" if method == b"GET" else "POST",  # (shared strings: a parked request keeps them)
            path,
            query.decode(),
            found.headers,
            self.transport,
            self.peer,
            self.reserved,
            cancel=self._cancel_busy,
            parkable=self._in_step,
        )
        connection = found.headers.get("connection")
        keep_alive = connection is None or "close" not in (
            token.strip() for token in connection.lower().split(",")
        )
        return verb, call, keep_alive

    async def _serve(
        self, verb: str | None, call: Call | Serving, keep_alive: bool, waits_for: Any = None
    ) -> None:
        """Answer in a task: ``call`` (a ``verb``) from the start, or a request
        begun in a step (``serving``, waiting for ``waits_for``) from there."""
        answer: Answer | ParkedWait
        try:
            if isinstance(call, Call):
                assert verb is not None
                answer = await verbs.serve(self.app, verb, call)
            else:
                answer = await carried_on(call, waits_for)
        except Exception:
            log.exception("error serving %s", verb or "a request")
            answer = Answer("ERROR", 500, close=True)
        if isinstance(answer, ParkedWait):  # parked after all: answered when woken
            answer.answer_on(self, keep_alive)
            self._busy = answer
        elif self._send(answer, keep_alive):
            self._next()

    def _send(self, answer: Answer, keep_alive: bool) -> bool:
        """Write ``answer``; whether a head pipelined behind it is to be served next."""
        transport = self.transport
        if transport is None:
            return False  # the client went away
        keep_alive = keep_alive and not (answer.close or self._closing or self.reserved)
        self._busy = None
        if not keep_alive:
            if self.reserved:
                self._connections.forget(self)  # its one answer is out: the place is free
            self._outbox.flush()
            transport.write(encode(answer, keep_alive))
            transport.close()
            return False
        if self._reading:  # answered in the step that read it: written with the others
            self._outbox.send(transport, encode(answer, keep_alive))
        else:
            transport.write(encode(answer, keep_alive))
        if self._paused:
            self._paused = False
            transport.resume_reading()
        if self._buffer:
            self._expect_head()
            return True
        self._set_deadline(self._idle_timeout)
        return False

    def _close(self) -> None:
        self._outbox.flush()  # an answer made this loop turn is not lost
        self.transport.close()

    def _cancel(self) -> None:
        """End the request being answered, as a hang-up does (a revoked token)."""
        if self._busy is not None:
            self._busy.cancel()

    def _hand_off(self) -> None:
        """Give the connection, and every byte not yet served, to aiohttp."""
        self._deadlines.forget(self)
        self._outbox.flush()  # answers already made go first
        transport, data = self.transport, self._buffer
        self._buffer = b""
        protocol = self._hand_over(self)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self._paused:
            transport.resume_reading()
        if data:
            protocol.data_received(data)

    # -- deadlines ---------------------------------------------------------------------------

    def _expect_head(self) -> None:
        self._reading_head = True
        self._set_deadline(self._connections.header_timeout)

    def _set_deadline(self, seconds: float) -> None:
        self._deadline = self._loop.time() + seconds
        self._deadlines.watch(self)

    def deadline_passed(self, now: float) -> bool:
        """Close if the head did not come in time or the connection idled too long."""
        deadline = self._deadline
        if deadline is None or now < deadline:
            return False
        if self._busy is None and self.transport is not None:
            self._connections.forget(self)
            self._close()
        return True
