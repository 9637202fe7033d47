"""``distributexd``: the lock server's entry point.

With no arguments it serves the built-in configuration (inmemory backend,
pools made on first use) on 127.0.0.1:9889. The listen address comes from,
highest first: ``--bind``/``-p``, the config file's ``bind``/``port``, the
defaults. SIGTERM and SIGINT stop it gracefully: it stops accepting, answers
parked waiters ``UNAVAILABLE`` (503), and exits 0.

Exit status: 0 after a graceful stop; 2 for a bad command line or a bad
configuration file; 1 if it cannot listen or its backend cannot start.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from distributex import __version__
from distributex.backends import BackendUnavailable, LockBackend, make_backend
from distributex.config import DEFAULT_BIND, Config, ConfigError, default_config, load_config
from distributex.httpapi import create_app

log = logging.getLogger("distributex")

# Parked /wait/ requests are answered by backend.close(); this only bounds
# how long the server waits for answers already being written.
SHUTDOWN_GRACE = 3.0
LISTEN_BACKLOG = 4096


class _QuietBadRequests(logging.Filter):
    """Malformed HTTP (a 400 aiohttp answers itself) logs one line, not a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg, record.args, record.exc_info = "bad HTTP request: %s", (exc.message,), None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def quiet_bad_requests() -> None:
    """Install the filter on aiohttp's server logger (idempotent)."""
    logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _QuietBadRequests) for f in logger.filters):
        logger.addFilter(_QuietBadRequests())


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
        help="logging level (default info; debug logs every grant and release)",
    )
    parser.add_argument(
        "--access-log", action="store_true", help="log every HTTP request (costs speed)"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


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
    config: Config, backend: LockBackend | None = None, *, access_log: bool = False
) -> tuple[web.AppRunner, LockBackend]:
    """Start serving ``config``; returns the runner and backend to stop later."""
    if config.bind is None:
        config = replace(config, bind=DEFAULT_BIND)
    backend = backend or make_backend(config)
    quiet_bad_requests()
    await backend.start()
    app = create_app(config, backend)
    runner = web.AppRunner(
        app,
        handler_cancellation=True,  # a hung-up /wait/ must leave the queue
        access_log=log.getChild("access") if access_log else None,
        shutdown_timeout=SHUTDOWN_GRACE,
    )
    await runner.setup()
    site = web.TCPSite(runner, config.bind, config.port, backlog=LISTEN_BACKLOG)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        await backend.close()
        raise
    return runner, backend


async def stop_server(runner: web.AppRunner, backend: LockBackend) -> None:
    """Answer parked waiters, stop accepting, close the backend."""
    await backend.close()
    await runner.cleanup()


async def serve(config: Config, *, access_log: bool = False) -> None:
    """Serve until SIGTERM or SIGINT."""
    runner, backend = await start_server(config, access_log=access_log)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    source = config.source or "built-in configuration"
    log.info(
        "distributex %s serving %s on http://%s:%d/ (%s backend, %s)",
        __version__,
        ", ".join(config.pools) or "pools made on first use",
        config.bind,
        config.port,
        config.backend,
        source,
    )
    await stop.wait()
    log.info("stopping")
    await stop_server(runner, backend)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = resolve_config(args)
    except ConfigError as exc:
        print(f"distributexd: error: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(config, access_log=args.access_log))
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
