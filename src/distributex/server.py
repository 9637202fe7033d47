"""``distributexd``: the lock server's entry point.

With no arguments it serves the built-in configuration (inmemory backend,
pools made on first use) on 127.0.0.1:9889. The listen address comes from,
highest first: ``--bind``/``-p``, the config file's ``bind``/``port``, the
defaults. SIGTERM and SIGINT stop it gracefully: it stops accepting, answers
parked waiters ``UNAVAILABLE`` (503), and exits 0.

Exit status: 0 after a graceful stop; 2 for a bad command line or a bad
configuration file (also TLS files that cannot be used); 1 if it cannot
listen or its backend cannot start.

With ``tls:`` every accepted connection is wrapped in TLS (the handshake must
end within ``header_timeout``); the context lives in a
:class:`~distributex.tls.TLSHolder` at ``app[TLS_KEY]`` that a reload swaps.
Authentication, request limits and the audit log are :mod:`distributex.auth`.

Connections are guarded so that holders' renewals get through however many
idle connections a client (or an attack) leaves open:

* a connection must send a complete request head within ``header_timeout``
  seconds of opening (or of starting a later request), and a kept-alive one
  is closed after ``idle_timeout`` seconds without a request;
* at most ``max_connections`` are open (0: the file descriptor limit less a
  reserve for the backend, logs and accepting), at most
  ``max_connections_per_peer`` from one address. One more closes an idle
  connection, a TLS handshake or a status stream, never one with a request in
  progress such as a parked ``/wait/``; with none of those the new one is
  closed at once (:mod:`distributex.fairness`);
* the server accepts by itself: running out of file descriptors closes an
  idle connection or pauses accepting briefly, and is logged once per
  ``REPORT_EVERY`` seconds with a count, never once per attempt;
* at start the soft ``RLIMIT_NOFILE`` is raised to the hard limit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import functools
import logging
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from distributex import __version__, auth, collector, fairness, reload, sdnotify
from distributex.backends import BackendUnavailable, LockBackend, make_backend
from distributex.config import DEFAULT_BIND, Config, ConfigError, default_config, load_config
from distributex.events import Events, JsonFormatter
from distributex.fairness import ConnectionTable
from distributex.httpapi import CONFIG_KEY, EVENTS_KEY, create_app
from distributex.statusfeed import FEEDS_KEY
from distributex.tls import TLS_KEY, TLSHolder

log = logging.getLogger("distributex")

# Parked /wait/ requests are answered by backend.close(); this only bounds
# how long the server waits for answers already being written.
SHUTDOWN_GRACE = 3.0
LISTEN_BACKLOG = 4096
# Connections taken from the listen queue per loop turn: others get their turn.
ACCEPT_BATCH = 64
# Pause in accepting when out of file descriptors with nothing idle to close.
ACCEPT_RETRY = 0.5
# Recurring trouble (no descriptors, connection cap) is logged this often.
REPORT_EVERY = 10.0
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class _QuietBadRequests(logging.Filter):
    """Malformed HTTP (a 400 aiohttp answers itself) logs one line, not a traceback.

    A client that hangs up mid-request (e.g. half-closes after ``Expect:
    100-continue``) is not the server's problem: a debug line at most.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg, record.args = "bad HTTP request: %s", (_without_content(exc),)
            record.exc_info = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        elif isinstance(exc, ConnectionResetError) and "closing transport" in str(exc):
            # aiohttp writing to a client that has gone (not a backend's reset).
            record.msg, record.args, record.exc_info = "client went away: %s", (exc,), None
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return log.isEnabledFor(logging.DEBUG)
        return True


# The bytes aiohttp quotes from a bad request line or header (an Authorization
# header too long, say) may be a secret: never logged.
_QUOTED_BYTES = re.compile(r"""b(['"]).*?(?<!\\)\1""")


def _without_content(exc: HttpProcessingError) -> str:
    if isinstance(exc, LineTooLong):
        return f"a request line or header longer than {exc.args[1]} bytes"
    return _QUOTED_BYTES.sub("(content not logged)", str(exc.message))


def quiet_bad_requests() -> None:
    """Install the filter on aiohttp's server logger (idempotent)."""
    logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _QuietBadRequests) for f in logger.filters):
        logger.addFilter(_QuietBadRequests())


def server_url(bind: str, port: int, tls: bool = False) -> str:
    """``http://HOST:PORT/`` (``https`` with TLS) with an IPv6 address in brackets."""
    host = f"[{bind}]" if ":" in bind else bind
    return f"{'https' if tls else 'http'}://{host}:{port}/"


def raise_fd_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; the soft limit now (0: unknown)."""
    try:
        import resource
    except ImportError:  # not on this platform
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        # Fails e.g. for an unlimited hard limit above what the kernel allows.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 0 if soft == resource.RLIM_INFINITY else soft


def connection_limit(max_connections: int, fd_limit: int) -> int:
    """The connection cap: ``max_connections``, or (0) the fd limit less a reserve."""
    if max_connections > 0:
        return max_connections
    if fd_limit <= 0:
        return 10000
    # Room for the listening sockets, the backend's connections, log files
    # and the accepts in flight.
    return max(16, fd_limit - max(64, fd_limit // 8))


class _Throttle:
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


class _Connections(ConnectionTable):
    """The connection table (:mod:`distributex.fairness`) with its deadlines and log lines."""

    def __init__(
        self, limit: int, header_timeout: float, per_peer: Callable[[], int] = lambda: 0
    ) -> None:
        super().__init__(limit, per_peer)
        self.header_timeout = header_timeout
        self._evicted = _Throttle(
            logging.INFO,
            f"connection limit reached ({limit}, or max_connections_per_peer): "
            "an idle, handshaking or streaming connection closed to make room",
        )
        self._refused = _Throttle(
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


class _Connection(RequestHandler):
    """aiohttp's connection with a deadline for each request head, known to the cap.

    aiohttp counts request heads as they are parsed (``_request_count``);
    ``finish_response`` runs once per head when its answer is written. A
    connection is idle when every head has been answered: a parked /wait/ is
    a head not answered yet.
    """

    def __init__(
        self, manager: web.Server, connections: _Connections, peer: str, **kwargs: Any
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


class _Site(web.BaseSite):
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
        connections: _Connections,
        backlog: int = LISTEN_BACKLOG,
        tls: TLSHolder | None = None,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._connections = connections
        # Read at each accept, so a reload's new certificate serves the next connection.
        self.tls = tls or TLSHolder(None)
        self._sockets: list[socket.socket] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._trouble = _Throttle(logging.WARNING, "cannot accept connections: %s")

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
        await super().stop()

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
        server = self._runner.server
        assert server is not None
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
            protocol = _Connection(server, connections, peer, loop=loop, **server._kwargs)
            protocol.reserved = reserved
            connections.add(protocol)
            context = self.tls.context

            def same(p: _Connection = protocol) -> _Connection:
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

    def _connected(self, task: asyncio.Task[Any], protocol: _Connection) -> None:
        self._tasks.discard(task)
        protocol.making = None
        if task.cancelled() or task.exception() is not None:
            self._connections.forget(protocol)  # never made: evicted, or its handshake failed
            if not task.cancelled():
                log.debug("connection failed at once: %s", task.exception())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distributexd",
        description="Distributex lock server: HTTP mutexes and semaphores for a cluster.",
    )
    parser.add_argument(
        "-c", "--config", metavar="FILE", help="YAML configuration (default: built-in)"
    )
    parser.add_argument("-p", "--port", type=int, help="port to listen on (default 9889)")
    parser.add_argument(
        "-b", "--bind", metavar="ADDR", help="address to listen on (default 127.0.0.1)"
    )
    parser.add_argument(
        "--start-delay",
        type=float,
        metavar="SECONDS",
        help="grant nothing for this long after start-up (default: the file's start_delay, else 0)",
    )
    parser.add_argument(
        "-n", "--nodaemon", action="store_true", help="accepted and ignored (as 'twistd -n')"
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="logging level (default info: a line per grant, release, expiry, lost lease and "
        "refusal; warning: problems only)",
    )
    parser.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="log lines as text (default) or as one JSON object each, for log shippers",
    )
    parser.add_argument(
        "--access-log", action="store_true", help="log every HTTP request (costs speed)"
    )
    parser.add_argument(
        "--event-loop",
        default="auto",
        choices=["auto", "uvloop", "asyncio"],
        help="uvloop if it is installed (auto, the default: up to 15%% more hand-offs a "
        "second on a busy lock), or asyncio's own loop",
    )
    parser.add_argument(
        "--cpus",
        metavar="LIST",
        type=cpu_list,
        help="run on these CPUs only (Linux), e.g. 1 or 0,2-3; default: wherever the system "
        "schedules it. On one CPU the sqlite backend's thread and the event loop hand work "
        "to each other without waking another CPU",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


# Linux numbers CPUs below its build limit, NR_CPUS (at most 8192).
MAX_CPU = 8191
_CPU_RANGE = re.compile(r"([0-9]{1,20})(?:-([0-9]{1,20}))?")


def cpu_list(text: str) -> set[int]:
    """A CPU list as taskset and systemd's CPUAffinity= take it: ``1``, ``0,2-3``
    (numbers and ranges; not taskset's strides)."""
    cpus: set[int] = set()
    for part in text.split(","):
        found = _CPU_RANGE.fullmatch(part.strip())
        if found is None:
            raise argparse.ArgumentTypeError(
                f"'{text}' is not a CPU list (numbers and ranges: 1 or 0,2-3)"
            )
        low = int(found[1])
        high = low if found[2] is None else int(found[2])
        if high < low:
            raise argparse.ArgumentTypeError(f"'{part.strip()}' is an empty range of CPUs")
        if high > MAX_CPU:
            raise argparse.ArgumentTypeError(f"CPU {high} is out of range (0-{MAX_CPU})")
        cpus.update(range(low, high + 1))
    return cpus


def pin_to_cpus(cpus: set[int]) -> None:
    """Keep this process (its threads, and those it starts later) on ``cpus``.

    Raises ValueError with the reason if that cannot be done here.
    """
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("this system cannot keep a process on given CPUs (Linux can)")
    allowed = os.sched_getaffinity(0)
    if not cpus <= allowed:
        raise ValueError(
            f"this process may not use CPU {_cpus_text(cpus - allowed)} "
            f"(it may use {_cpus_text(allowed)})"
        )
    os.sched_setaffinity(0, cpus)


def _cpus_text(cpus: set[int]) -> str:
    """``0-3,8``: runs of CPUs as ranges."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and runs[-1][1] == cpu - 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def resolve_config(args: argparse.Namespace, default_bind: str = DEFAULT_BIND) -> Config:
    """The configuration named on the command line, with its overrides applied.

    ``default_bind`` is the listen address when neither ``--bind`` nor the
    file names one.
    """
    config = load_config(args.config) if args.config else default_config()
    if args.port is not None:
        if not 0 <= args.port <= 65535:
            raise ConfigError(f"--port must be 0-65535, not {args.port}")
        config = replace(config, port=args.port)
    if getattr(args, "start_delay", None) is not None:
        if not (args.start_delay >= 0 and args.start_delay != float("inf")):
            raise ConfigError(f"--start-delay must be >= 0 seconds, not {args.start_delay}")
        config = replace(config, start_delay=args.start_delay)
    if args.bind:
        config = replace(config, bind=args.bind)
    elif config.bind is None:
        config = replace(config, bind=default_bind)
    return config


async def start_server(
    config: Config,
    backend: LockBackend | None = None,
    *,
    access_log: bool = False,
    tls: TLSHolder | None = None,
) -> tuple[web.AppRunner, LockBackend]:
    """Start serving ``config``; returns the runner and backend to stop later.

    ``tls`` holds the SSL context (default: built from ``config.tls``; a
    ConfigError if it cannot be). A reload swaps its context: see
    :meth:`distributex.tls.TLSHolder.swap`; the runner's site is ``runner.sites``.
    """
    if config.bind is None:
        config = replace(config, bind=DEFAULT_BIND)
    tls = tls or TLSHolder.from_settings(config.tls)
    backend = backend or make_backend(config)
    quiet_bad_requests()
    fd_limit = raise_fd_limit()
    events = Events(_metrics(config))
    backend.events = events
    await backend.start()
    app = create_app(config, backend, events)
    app[TLS_KEY] = tls  # a reload swaps its context: TLSHolder.swap
    connections = _Connections(
        connection_limit(config.max_connections, fd_limit),
        config.header_timeout,
        lambda: app[CONFIG_KEY].max_connections_per_peer,  # a reload changes it
    )
    fairness.install(app, lambda: connections.limit)
    if events.metrics is not None:
        streams = app[FEEDS_KEY]
        events.metrics.registry.register(
            fairness.ConnectionMetrics(connections, lambda: streams.viewers)
        )
    runner = web.AppRunner(
        app,
        handler_cancellation=True,  # a hung-up /wait/ must leave the queue
        access_log=log.getChild("access") if access_log else None,
        access_log_class=auth.AccessLog,  # lease and token values redacted
        shutdown_timeout=SHUTDOWN_GRACE,
        keepalive_timeout=config.idle_timeout,
        # Request line and each header line at most max_header_size bytes;
        # larger answer 400 (line) or 431 (header), from aiohttp's parser.
        max_line_size=config.max_header_size,
        max_field_size=config.max_header_size,
        max_headers=config.max_headers,
    )
    await runner.setup()
    site = _Site(runner, config.bind, config.port, connections, tls=tls)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        await backend.close()
        raise
    log.debug(
        "up to %d connections (file descriptor limit %s)",
        connections.limit,
        fd_limit or "unknown",
    )
    collector.tune_for_a_server()
    return runner, backend


def _metrics(config: Config) -> Any:
    if not config.metrics:
        return None
    from distributex.metrics import Metrics

    return Metrics(config.pools)


async def stop_server(runner: web.AppRunner, backend: LockBackend) -> None:
    """Answer parked waiters, end status streams, stop accepting, close the backend."""
    if runner.app is not None and EVENTS_KEY in runner.app:
        runner.app[EVENTS_KEY].close()
    await backend.close()
    await runner.cleanup()


def reload_config(app: web.Application, load: Callable[[], Config] | None) -> bool:
    """Reread the configuration (SIGHUP); a file that does not load changes nothing."""
    if load is None:
        log.warning("reload: no configuration file (-c) to reread")
        return False
    try:
        new = load()
        if TLS_KEY in app:
            app[TLS_KEY].swap(new.tls)  # a new certificate serves the next connection
    except ConfigError as exc:
        log.error("reload refused, the running configuration stays: %s", exc)
        return False
    summary = reload.apply(app, new)
    log.info("reloaded %s: %s", app[CONFIG_KEY].source or "configuration", summary)
    return True


async def serve(
    config: Config,
    backend: LockBackend | None = None,
    *,
    access_log: bool = False,
    tls: TLSHolder | None = None,
    load: Callable[[], Config] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT; SIGHUP rereads the configuration with ``load``."""
    # Signals are ours before the port opens: one sent the moment it does
    # must not find the default action (which ends the process).
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    early_hangups: list[int] = []  # a SIGHUP during start-up: reloaded once up
    loop.add_signal_handler(signal.SIGHUP, early_hangups.append, signal.SIGHUP)
    runner, backend = await start_server(config, backend, access_log=access_log, tls=tls)
    app = runner.app
    assert app is not None

    def on_hangup() -> None:
        sdnotify.reloading()
        try:
            reload_config(app, load)
        finally:
            sdnotify.ready()

    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    if early_hangups:
        reload_config(app, load)  # before READY: nothing to tell systemd yet
    source = config.source or "built-in configuration"
    log.info(
        "distributex %s serving %s on %s (%s backend, %s, %s loop%s)",
        __version__,
        served_pools(config),
        server_url(config.bind or DEFAULT_BIND, config.port, config.tls is not None),
        config.backend,
        source,
        type(loop).__module__.split(".")[0],
        _cpus_note(),
    )
    sdnotify.ready(f"serving on {server_url(config.bind or DEFAULT_BIND, config.port)}")
    await stop.wait()
    log.info("stopping")
    sdnotify.stopping()
    await stop_server(runner, backend)


def served_pools(config: Config) -> str:
    """The pools the start-up line names (and a warning when none can be served)."""
    if config.pools:
        return ", ".join(config.pools)
    if config.autocreate:
        return "pools made on first use"
    log.warning("no pools listed and autocreate is off: every lock request answers 404")
    return "no pools (none listed, autocreate off)"


def _cpus_note() -> str:
    """For the start-up line: the CPUs this process may use, if not all of them."""
    if not hasattr(os, "sched_getaffinity"):
        return ""
    mine = os.sched_getaffinity(0)
    if len(mine) >= (os.cpu_count() or 0):
        return ""
    return f", CPU{'s' if len(mine) > 1 else ''} {_cpus_text(mine)}"


def event_loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop to serve on: uvloop (``auto``: if installed) or asyncio's (None).

    uvloop (libuv, by the asyncio core developers' MagicStack) runs the same
    asyncio code with cheaper callbacks, timers and socket I/O; a hand-off on
    a busy lock is a chain of them (bench/README.md has the figures).
    ImportError if ``uvloop`` is asked for and not installed.
    """
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise
        return None
    return uvloop.new_event_loop


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.log_format == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())
    if args.cpus is not None:
        # Before any thread starts: threads take the process's CPUs when made.
        try:
            pin_to_cpus(args.cpus)
        except (ValueError, OSError) as exc:
            print(f"distributexd: error: --cpus: {exc}", file=sys.stderr)
            return 2
    try:
        config = resolve_config(args)
    except ConfigError as exc:
        print(f"distributexd: error: {exc}", file=sys.stderr)
        return 2
    try:
        tls = TLSHolder.from_settings(config.tls)
    except ConfigError as exc:
        print(f"distributexd: error: {config.source}: {exc}", file=sys.stderr)
        return 2
    try:
        backend = make_backend(config)
    except BackendUnavailable as exc:
        # A backend this installation cannot build is a configuration problem
        # (exit 2, as twistd); one that cannot start (unreachable) is 1.
        print(f"distributexd: error: {exc}", file=sys.stderr)
        return 2
    try:
        loop_factory = event_loop_factory(args.event_loop)
    except ImportError:
        print(
            "distributexd: error: --event-loop uvloop: uvloop is not installed "
            "(pip install 'distributex[uvloop]')",
            file=sys.stderr,
        )
        return 2
    try:
        load = (lambda: resolve_config(args)) if args.config else None
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(serve(config, backend, access_log=args.access_log, tls=tls, load=load))
    except BackendUnavailable as exc:
        print(f"distributexd: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(
            f"distributexd: error: cannot listen on {config.bind}:{config.port}: "
            f"{exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
