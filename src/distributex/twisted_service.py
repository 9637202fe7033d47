"""The server as a ``twistd`` plugin, so 0.7 start-up lines keep working::

    twistd -n distributex -c distributex.yaml [-p PORT] [-b ADDR]

Only the plugin (``twisted/plugins/distributex_plugin.py``) imports this
module; the rest of the package never imports Twisted, which is an optional
extra (``pip install 'distributex[twisted]'``).

How it runs: the HTTP layer is aiohttp on asyncio, and Twisted's asyncio
reactor is a Twisted reactor driving an ordinary asyncio event loop. So on
that reactor the very same :func:`~distributex.server.start_server` and
:func:`~distributex.server.stop_server` coroutines run unchanged, with
twistd owning the process: ``-n``, ``-d``, ``--pidfile``, ``--logfile``,
``--uid`` behave as for any twistd plugin.

The 0.7 command line names no reactor, so the plugin installs the asyncio
reactor itself when its options are parsed (:meth:`Options.postOptions`).
That is the first moment it knows it was chosen: installing at import time
would switch the reactor of every other twistd plugin too, because twistd
imports all plugins to list its commands. twistd has installed no reactor
yet at that point; it imports the default one only when it runs it.
``twistd -r asyncio distributex`` works as well; any other ``-r`` is refused
with one line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, NoReturn

from twisted.application import service
from twisted.internet.defer import Deferred
from twisted.logger import Logger, LogLevel
from twisted.python import usage

from distributex import __version__
from distributex.backends import BackendUnavailable, LockBackend, make_backend
from distributex.config import Config, ConfigError
from distributex.server import (
    reload_config,
    resolve_config,
    served_pools,
    server_url,
    start_server,
    stop_server,
)
from distributex.tls import server_context

log = logging.getLogger("distributex")

LOG_LEVELS = ("debug", "info", "warning", "error")

# 0.7 listened on every interface; the drop-in keeps that (distributexd doesn't).
TWISTD_DEFAULT_BIND = "0.0.0.0"

# Exit status for a bad configuration, as distributexd uses.
EXIT_CONFIG = 2
# Could not listen, or the backend could not start (as distributexd).
EXIT_STARTUP = 1

_TWISTED_LEVELS = {
    logging.DEBUG: LogLevel.debug,
    logging.INFO: LogLevel.info,
    logging.WARNING: LogLevel.warn,
    logging.ERROR: LogLevel.error,
    logging.CRITICAL: LogLevel.critical,
}


class StartupError(Exception):
    """The server could not listen or its backend could not start."""


def _fail(message: str) -> NoReturn:
    """Stop twistd with one line and no traceback, before it daemonizes.

    A ``UsageError`` would make twistd print its whole help text in front
    of the line, which hides the one thing the operator needs to read.
    """
    print(f"twistd distributex: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_CONFIG)


def install_asyncio_reactor() -> None:
    """Make sure the process runs Twisted's asyncio reactor."""
    if "twisted.internet.reactor" not in sys.modules:
        from twisted.internet import asyncioreactor

        asyncioreactor.install()  # makes and sets a fresh asyncio event loop
        return
    from twisted.internet import reactor
    from twisted.internet.asyncioreactor import AsyncioSelectorReactor

    if not isinstance(reactor, AsyncioSelectorReactor):
        _fail(
            f"distributex runs on Twisted's asyncio reactor, not {type(reactor).__name__}; "
            "leave out -r/--reactor or use -r asyncio"
        )


class Options(usage.Options):
    """``twistd distributex`` options: those of 0.7 (-c, -p) and of distributexd."""

    synopsis = "[-c FILE] [-p PORT] [-b ADDR]"
    longdesc = (
        "Serve distributex lock pools over HTTP. Without -c: the built-in configuration "
        "(inmemory backend, any pool made on first use). Listens on every interface, port "
        "9889, as 0.7 did, unless the file's bind/port or -b/-p say otherwise (distributexd "
        "listens on 127.0.0.1 by default)."
    )
    optParameters: ClassVar[list[list[Any]]] = [
        ["config", "c", None, "YAML configuration file (default: built-in)"],
        ["port", "p", None, "port to listen on (default 9889)", int],
        ["bind", "b", None, "address to listen on (default: every interface, as 0.7)"],
        ["log-level", None, "info", f"logging level: {', '.join(LOG_LEVELS)}"],
    ]
    optFlags: ClassVar[list[list[str | None]]] = [
        ["access-log", None, "log every HTTP request (costs speed)"],
    ]

    config_obj: Config
    load: Callable[[], Config] | None = None
    backend: LockBackend

    def postOptions(self) -> None:
        if self["log-level"] not in LOG_LEVELS:
            raise usage.UsageError(f"--log-level must be one of {', '.join(LOG_LEVELS)}")
        # Check the file and build the backend now, while twistd still has the
        # terminal: after -d any message would only reach the log file.
        args = argparse.Namespace(config=self["config"], port=self["port"], bind=self["bind"])
        try:
            # 0.7 sites start the server with this very command line and their
            # clients are on other hosts: keep 0.7's listen address unless told.
            self.config_obj = resolve_config(args, default_bind=TWISTD_DEFAULT_BIND)
            server_context_check(self.config_obj)
            self.backend = make_backend(self.config_obj)
            # SIGHUP rereads the file with the same command-line overrides.
            self.load = (
                (lambda: resolve_config(args, default_bind=TWISTD_DEFAULT_BIND))
                if self["config"]
                else None
            )
        except (ConfigError, BackendUnavailable) as exc:
            _fail(str(exc))
        install_asyncio_reactor()


def server_context_check(config: Config) -> None:
    """Refuse certificate and key files that cannot be used now, while twistd has the terminal."""
    if config.tls is not None:
        try:
            server_context(config.tls)
        except ConfigError as exc:
            raise ConfigError(f"{config.source}: {exc}") from None


class _TwistedLogHandler(logging.Handler):
    """Sends Python ``logging`` records to Twisted's log (stdout, --logfile, twistd.log)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            level = _TWISTED_LEVELS.get(record.levelno, LogLevel.info)
            Logger(namespace=record.name).emit(level, "{text}", text=text)
        except Exception:
            self.handleError(record)


class DistributexService(service.Service):
    """The aiohttp server, started and stopped by twistd on its asyncio loop."""

    name = "distributex"  # type: ignore[assignment]  # twisted's stubs declare it None

    def __init__(
        self,
        config: Config,
        backend: LockBackend,
        *,
        access_log: bool = False,
        log_level: str = "info",
        pidfile: str | None = None,
        load: Callable[[], Config] | None = None,
    ) -> None:
        self.config = config
        self.load = load
        self.backend = backend
        self.access_log = access_log
        self.log_level = log_level
        self.pidfile = pidfile
        self._runner: Any = None
        self._start_task: asyncio.Future[None] | None = None
        self._handler: logging.Handler | None = None

    def _start_logging(self) -> None:
        if self._handler is not None:
            return
        self._handler = _TwistedLogHandler()
        root = logging.getLogger()
        root.addHandler(self._handler)
        if root.level == logging.NOTSET or root.level > logging.WARNING:
            root.setLevel(logging.WARNING)  # other libraries: problems only
        log.setLevel(self.log_level.upper())

    def _stop_logging(self) -> None:
        if self._handler is not None:
            logging.getLogger().removeHandler(self._handler)
            self._handler = None

    async def _start(self) -> None:
        config = self.config
        try:
            self._runner, self.backend = await start_server(
                config, self.backend, access_log=self.access_log
            )
        except BackendUnavailable as exc:
            log.error("cannot start: %s", exc)
            raise StartupError(str(exc)) from None
        except OSError as exc:
            # asyncio's own text repeats the address; the errno's words are enough
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            message = f"cannot listen on {config.bind}:{config.port}: {reason}"
            log.error("%s", message)
            raise StartupError(message) from None
        # SIGHUP rereads the configuration. A plain signal handler that hands over
        # to the loop: the reactor keeps its own handlers for SIGINT and SIGTERM.
        loop = asyncio.get_event_loop()
        signal.signal(signal.SIGHUP, lambda _sig, _frame: loop.call_soon_threadsafe(self.reload))
        log.info(
            "distributex %s serving %s on %s (%s backend, %s, under Twisted)",
            __version__,
            served_pools(config),
            server_url(config.bind or "0.0.0.0", config.port),
            config.backend,
            config.source or "built-in configuration",
        )

    def reload(self) -> None:
        """Reread the configuration file (SIGHUP), as distributexd does."""
        if self._runner is not None and self._runner.app is not None:
            reload_config(self._runner.app, self.load)

    def privilegedStartService(self) -> None:
        """Listen now, before twistd sheds privileges and reports a -d start.

        The reactor's asyncio loop is not running yet, so the start-up
        coroutine runs to completion on it here. A failure therefore reaches
        twistd before it says the daemon started: ``-d`` exits 1 with the
        reason instead of leaving a pidfile of a server that never listened.
        """
        super().privilegedStartService()
        self._start_logging()
        loop = asyncio.get_event_loop()  # the loop the asyncio reactor will run
        try:
            loop.run_until_complete(self._start())
        except StartupError:
            # Logged in one line already; no traceback, and no pidfile of a
            # server that never served (twistd wrote it just before).
            self._remove_pidfile()
            raise SystemExit(EXIT_STARTUP) from None

    def _remove_pidfile(self) -> None:
        if not self.pidfile:
            return
        with contextlib.suppress(OSError, ValueError):
            if int(Path(self.pidfile).read_text().strip()) == os.getpid():
                os.unlink(self.pidfile)

    def startService(self) -> None:
        super().startService()
        if self._runner is None and self._start_task is None:
            # Runners that skip privilegedStartService (``twist``): start on
            # the running loop, and stop the reactor if that fails.
            self._start_logging()
            self._start_task = asyncio.ensure_future(self._start())
            self._start_task.add_done_callback(_stop_reactor_on_failure)

    async def _stop(self) -> None:
        if self._start_task is not None and not self._start_task.done():
            await asyncio.wait([self._start_task])
        if self._runner is None:
            return
        runner, self._runner = self._runner, None
        log.info("stopping")
        await stop_server(runner, self.backend)

    def stopService(self) -> Deferred[None]:
        """Answer parked waiters, stop accepting; twistd waits for the Deferred."""
        super().stopService()
        _exit_zero_after_stop_signal()
        done: Deferred[None] = Deferred.fromFuture(asyncio.ensure_future(self._stop()))

        def finished(result: Any) -> Any:
            self._stop_logging()
            return result

        return done.addBoth(finished)


def _stop_reactor_on_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        from twisted.internet import reactor

        # twisted's stubs type the global reactor's stop() without self.
        reactor.stop()  # type: ignore[misc]  # the reason is logged already


def _exit_zero_after_stop_signal() -> None:
    """Exit 0 after SIGTERM/SIGINT, as distributexd and 0.7 under twistd did.

    Current twistd re-raises the stop signal on itself after a clean
    shutdown, so the exit status would read "killed by SIGTERM". A graceful
    stop is a success; supervisors and scripts written for 0.7 expect 0.
    """
    from twisted.internet import reactor

    if getattr(reactor, "_exitSignal", None) in (signal.SIGTERM, signal.SIGINT):
        reactor._exitSignal = None


def makeService(options: Options) -> DistributexService:  # twistd looks up this name
    """The service twistd runs for ``twistd distributex``."""
    parent = getattr(options, "parent", None)
    pidfile = parent.get("pidfile") if parent is not None else None
    return DistributexService(
        options.config_obj,
        options.backend,
        access_log=bool(options["access-log"]),
        log_level=options["log-level"],
        pidfile=os.path.abspath(pidfile) if pidfile else None,
        load=options.load,
    )
