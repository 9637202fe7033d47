"""The transport under aiohttp: accepting, the connection cap, request-head deadlines.

Why a module of its own: aiohttp has no public hook for "which connections
are idle now" nor for accepting sockets itself, and the cap
(:mod:`distributex.fairness`) needs both to close an idle connection rather
than one with a parked ``/wait/``. So :class:`Connection` subclasses
aiohttp's ``RequestHandler`` and reads two of its private parts
(``_request_count``, the ``Server._kwargs`` a protocol is made with), and
:class:`Site` makes the protocols itself. Everything that leans on aiohttp's
internals is here, in one place to check when aiohttp is upgraded
(``tests/test_fairness.py`` and ``tests/test_http_hostile.py`` exercise it).

* a connection must send a complete request head within ``header_timeout``
  seconds of opening (or of starting a later request), and a kept-alive one
  is closed after ``idle_timeout`` seconds without a request;
* at most ``max_connections`` are open (0: the file descriptor limit less a
  reserve), at most ``max_connections_per_peer`` from one address;
* running out of file descriptors closes an idle connection or pauses
  accepting briefly, logged once per ``REPORT_EVERY`` seconds with a count.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from distributex.appkeys import BACKEND_KEY, CONFIG_KEY
from distributex.fairness import ConnectionTable
from distributex.fastlane import LeanConnection
from distributex.lanework import Deadlines, Outbox
from distributex.tls import TLSHolder

log = logging.getLogger("distributex")

LISTEN_BACKLOG = 4096
# Connections taken from the listen queue per loop turn: others get their turn.
ACCEPT_BATCH = 64
# Pause in accepting when out of file descriptors with nothing idle to close.
ACCEPT_RETRY = 0.5
# Recurring trouble (no descriptors, connection cap) is logged this often.
REPORT_EVERY = 10.0
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def server_url(bind: str, port: int, tls: bool = False) -> str:
    """``http://HOST:PORT/`` (``https`` with TLS) with an IPv6 address in brackets."""
    host = f"[{bind}]" if ":" in bind else bind
    return f"{'https' if tls else 'http'}://{host}:{port}/"


def connection_limit(max_connections: int, fd_limit: int) -> int:
    """The connection cap: ``max_connections``, or (0) the fd limit less a reserve."""
    if max_connections > 0:
        return max_connections
    if fd_limit <= 0:
        return 10000
    # Room for the listening sockets, the backend's connections, log files
    # and the accepts in flight.
    return max(16, fd_limit - max(64, fd_limit // 8))


class Throttle:
    """Logs a recurring event at most once per ``REPORT_EVERY`` seconds, with a count."""

    def __init__(self, level: int, what: str) -> None:
        self.level = level
        self.what = what
        self.count = 0
        self.next_report = 0.0

    def note(self, *args: object) -> None:
        self.count += 1
        now = time.monotonic()
        if now >= self.next_report:
            log.log(self.level, f"{self.what} (count %d since the last report)", *args, self.count)
            self.count = 0
            self.next_report = now + REPORT_EVERY


class Connections(ConnectionTable):
    """The connection table (:mod:`distributex.fairness`) with its deadlines and log lines."""

    def __init__(
        self, limit: int, header_timeout: float, per_peer: Callable[[], int] = lambda: 0
    ) -> None:
        super().__init__(limit, per_peer)
        self.header_timeout = header_timeout
        self._evicted = Throttle(
            logging.INFO,
            f"connection limit reached ({limit}, or max_connections_per_peer): "
            "an idle, handshaking or streaming connection closed to make room",
        )
        self._refused = Throttle(
            logging.WARNING,
            f"connection limit reached ({limit}, or max_connections_per_peer), "
            "nothing to close: new ones refused",
        )

    def close_oldest_idle(self) -> bool:
        """Close the first connection that may be closed; False if there is none."""
        conn = self.victim()
        if conn is None:
            return False
        self.close(conn)
        return True

    def admit(self, conn: socket.socket, peer: str) -> tuple[bool, bool]:
        """Make room for ``conn`` from ``peer`` if a cap is reached, else give it a reserved
        place or refuse (close) it: whether it is admitted, and reserved."""
        allowed, victim = self.room_for(peer)
        if victim is not None:
            self.close(victim)
            self.evicted += 1
            self._evicted.note()
        elif not allowed:
            if self.may_reserve(peer):
                return True, True
            conn.close()
            self.refused += 1
            self._refused.note()
        return allowed, False


class Connection(RequestHandler):
    """aiohttp's connection with a deadline for each request head, known to the cap.

    aiohttp counts request heads as they are parsed (``_request_count``);
    ``finish_response`` runs once per head when its answer is written. A
    connection is idle when every head has been answered: a parked /wait/ is
    a head not answered yet.
    """

    def __init__(
        self, manager: web.Server, connections: Connections, peer: str, **kwargs: Any
    ) -> None:
        super().__init__(manager, **kwargs)
        self._connections = connections
        self._answered = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self.peer = peer
        self.pending = True  # until made: the TLS handshake runs
        self.streaming = False  # a /status/events stream (set by distributex.statusfeed)
        self.reserved = False  # beyond the cap: one renewal or release (fairness)
        self.making: asyncio.Task[Any] | None = None

    def idle(self) -> bool:
        return self._request_count == self._answered

    def evict(self) -> None:
        """Closed to make room: a handshake is abandoned, a made connection closed."""
        if self.pending and self.making is not None:
            self.making.cancel()
        else:
            self.force_close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.pending = False
        self._start_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_head_timer()
        self._connections.forget(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self.idle():
            self._stop_head_timer()
        elif data and self._head_timer is None:
            self._start_head_timer()  # a kept-alive connection began its next head

    async def finish_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().finish_response(*args, **kwargs)
        finally:
            self._answered += 1
            if self.reserved:
                self._connections.forget(self)  # its one answer is out: the place is free

    def _start_head_timer(self) -> None:
        self._head_timer = self._loop.call_later(
            self._connections.header_timeout, self._head_timed_out
        )

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.idle() and self.transport is not None:
            self._connections.forget(self)
            self.force_close()


async def _listen(host: str | None, port: int, backlog: int) -> list[socket.socket]:
    """Listening sockets for every address ``host`` names (as loop.create_server binds)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(
        host or None,
        port,
        family=socket.AF_UNSPEC,
        type=socket.SOCK_STREAM,
        flags=socket.AI_PASSIVE,
    )
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _name, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            if os.name == "posix":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise OSError(
                    exc.errno,
                    f"error while attempting to bind on address {address!r}: "
                    f"{(exc.strerror or str(exc)).lower()}",
                ) from None
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Site(web.BaseSite):
    """A TCP site that accepts connections itself, to enforce the cap and survive EMFILE.

    asyncio's own accept loop logs a traceback for every failed accept (up
    to the listen backlog per loop turn, each also scheduling a retry), which
    floods the log and burns CPU once file descriptors run out.
    """

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str | None,
        port: int,
        connections: Connections,
        backlog: int = LISTEN_BACKLOG,
        tls: TLSHolder | None = None,
        lean: web.Application | None = None,
        grace: float = 3.0,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        # Connections start on the lean protocol serving this app (distributex.fastlane),
        # or (None) on aiohttp.
        self._app = lean
        self._grace = grace  # how long a stop waits for answers being made
        self._deadlines = Deadlines()
        self._outbox = Outbox()
        self._host = host
        self._port = port
        self._connections = connections
        # Read at each accept, so a reload's new certificate serves the next connection.
        self.tls = tls or TLSHolder(None)
        self._sockets: list[socket.socket] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._trouble = Throttle(logging.WARNING, "cannot accept connections: %s")

    @property
    def name(self) -> str:
        return server_url(self._host or "0.0.0.0", self._port, self.tls.context is not None)

    async def start(self) -> None:
        await super().start()
        self._loop = asyncio.get_running_loop()
        self._sockets = await _listen(self._host, self._port, self._backlog)
        self._port = self._sockets[0].getsockname()[1]
        self._resume()

    async def stop(self) -> None:
        self._pause()
        for sock in self._sockets:
            sock.close()
        self._sockets = []
        for task in self._tasks:
            task.cancel()  # connections half made: closed, never served
        lean = [conn for conn in self._connections.open if isinstance(conn, LeanConnection)]
        answering = [busy for conn in lean if (busy := conn.busy()) is not None]
        for conn in lean:
            conn.close_when_answered()
        if answering:
            await asyncio.wait(answering, timeout=self._grace)
        self._deadlines.close()
        await super().stop()

    def _aiohttp_protocol(self, peer: str, reserved: bool) -> Connection:
        server = self._runner.server
        assert server is not None and self._loop is not None
        protocol = Connection(server, self._connections, peer, loop=self._loop, **server._kwargs)
        protocol.reserved = reserved
        return protocol

    def _hand_over(self, lean: LeanConnection) -> Connection:
        """The aiohttp protocol that takes over ``lean``'s connection, in the table instead."""
        protocol = self._aiohttp_protocol(lean.peer, lean.reserved)
        self._connections.forget(lean)
        self._connections.add(protocol)
        return protocol

    def _protocol(self, peer: str, reserved: bool) -> Connection | LeanConnection:
        if self._app is None:
            return self._aiohttp_protocol(peer, reserved)
        app = self._app
        config = app[CONFIG_KEY]
        protocol = LeanConnection(
            app,
            self._connections,
            peer,
            self._hand_over,
            self._deadlines,
            self._outbox,
            max_head=config.max_header_size,
            max_headers=config.max_headers,
            idle_timeout=config.idle_timeout,
            in_step=app[BACKEND_KEY].answers_in_step,
        )
        protocol.reserved = reserved
        return protocol

    def _resume(self) -> None:
        assert self._loop is not None
        self._retry = None
        for sock in self._sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _pause(self, seconds: float | None = None) -> None:
        """Stop accepting; again after ``seconds`` unless None."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._loop is None:
            return
        for sock in self._sockets:
            self._loop.remove_reader(sock.fileno())
        if seconds is not None and self._sockets:
            self._retry = self._loop.call_later(seconds, self._resume)

    def _accept(self, sock: socket.socket) -> None:
        loop = self._loop
        assert loop is not None
        connections = self._connections
        for _ in range(ACCEPT_BATCH):
            try:
                conn, address = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                self._trouble.note(os.strerror(exc.errno) if exc.errno else exc)
                # Out of descriptors: an idle connection's descriptor frees on
                # the next loop turn, which accepts again. Else wait a little.
                if exc.errno not in _OUT_OF_RESOURCES or not connections.close_oldest_idle():
                    self._pause(ACCEPT_RETRY)
                return
            peer = address[0] if isinstance(address, tuple) else ""
            admitted, reserved = connections.admit(conn, peer)
            if not admitted:
                continue
            conn.setblocking(False)
            protocol = self._protocol(peer, reserved)
            connections.add(protocol)
            context = self.tls.context

            def same(p: Connection | LeanConnection = protocol) -> Connection | LeanConnection:
                return p  # the protocol made above, with its reservation

            accepted = loop.connect_accepted_socket(
                same,
                conn,
                ssl=context,
                # A handshake counts against the time a request head may take.
                ssl_handshake_timeout=connections.header_timeout if context else None,
            )
            task = loop.create_task(accepted)
            protocol.making = task
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._connected, protocol=protocol))

    def _connected(self, task: asyncio.Task[Any], protocol: Connection | LeanConnection) -> None:
        self._tasks.discard(task)
        protocol.making = None
        if task.cancelled() or task.exception() is not None:
            self._connections.forget(protocol)  # never made: evicted, or its handshake failed
            if not task.cancelled():
                log.debug("connection failed at once: %s", task.exception())
