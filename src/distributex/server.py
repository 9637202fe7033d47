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
idle connections a client (or an attack) leaves open (:mod:`distributex.transport`):

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
import logging
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong

from distributex import __version__, audit, collector, fairness, logsetup, reload, sdnotify
from distributex.appkeys import CONFIG_KEY, EVENTS_KEY
from distributex.backends import BackendUnavailable, LockBackend, make_backend
from distributex.config import DEFAULT_BIND, Config, ConfigError, default_config, load_config
from distributex.events import Events
from distributex.httpapi import create_app
from distributex.limits import parser_limits
from distributex.statusfeed import FEEDS_KEY
from distributex.tls import TLS_KEY, TLSHolder
from distributex.transport import Connections, Site, connection_limit, server_url

log = logging.getLogger("distributex")

# Parked /wait/ requests are answered by backend.close(); this only bounds
# how long the server waits for answers already being written.
SHUTDOWN_GRACE = 3.0


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
    events = Events(_metrics(config), lines=logsetup.event_lines())
    backend.events = events
    await backend.start()
    app = create_app(config, backend, events)
    app[TLS_KEY] = tls  # a reload swaps its context: TLSHolder.swap
    connections = Connections(
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
        access_log_class=audit.AccessLog,  # lease and token values redacted
        shutdown_timeout=SHUTDOWN_GRACE,
        keepalive_timeout=config.idle_timeout,
        **parser_limits(config),  # larger heads answer 400 or 431, from aiohttp's parser
    )
    await runner.setup()
    # An access log is aiohttp's: with one on, aiohttp serves every request.
    lean = None if access_log else app
    site = Site(runner, config.bind, config.port, connections, tls=tls, lean=lean)
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
    logsetup.configure(args.log_level, json_lines=args.log_format == "json")
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
