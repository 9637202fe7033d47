"""``distributex status``: who holds which pool, for how long, and who waits.

::

    distributex status [-H SERVER] [-p PORT] [POOL] [--json] [--watch]

Reads the server's ``GET /status`` (``--watch``: follows ``GET /status/events``,
printing again on every change until Ctrl-C). ``--json`` prints the
server's document as it came (with ``--watch``: one document per line).
Everything else the server sends (names, reasons) is shown with control
characters escaped, so a hostile server cannot drive the terminal.
Exit status: 0; 2 usage; 69 server unreachable or unavailable (503);
77 the server refused the request (unknown pool); 78 bad client config file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any, TextIO
from urllib.parse import quote

from distributex import __version__
from distributex.client.argv import Parser
from distributex.client.runner import EXIT_CONFIG
from distributex.client.sync import DEFAULT_PORT, one_line, parse_server

EXIT_UNAVAILABLE = 69
EXIT_REFUSED = 77
HTTP_TIMEOUT = 10.0
# The server sends a keep-alive every 15 s on a quiet stream.
STREAM_TIMEOUT = 45.0
# Longest text of a table cell or message line, once control characters are escaped.
MAX_SHOWN = 1000


class StatusError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="distributex status",
        description="Show who holds each pool of a distributex server, and who waits.",
        epilog="exit status: 0 ok; 2 usage; 69 server unreachable or unavailable; "
        "77 refused (unknown pool); 78 bad client config file",
    )
    parser.add_argument(
        "-H",
        "--server",
        metavar="SERVER",
        help="server host name or host:port (default: the client config's server, else localhost)",
    )
    parser.add_argument("-p", "--port", type=int, help=f"server port (default {DEFAULT_PORT})")
    parser.add_argument("pool", nargs="?", metavar="POOL", help="show this pool only")
    parser.add_argument("--json", action="store_true", help="print the server's JSON document")
    parser.add_argument(
        "--watch", action="store_true", help="print again on every change, until Ctrl-C"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def _default_server() -> str:
    from distributex.client.cli import ConfigProblem, config_files, read_config

    env = dict(os.environ)
    try:
        values = read_config(config_files(env), "DISTRIBUTEX_CONFIG" in env)
    except ConfigProblem as exc:
        raise StatusError(EXIT_CONFIG, str(exc)) from None
    return values.get("server", ("localhost", ""))[0]


def _url(args: argparse.Namespace, path: str) -> str:
    server = args.server or _default_server()
    try:
        host, port = parse_server(server, args.port)
    except ValueError as exc:
        raise StatusError(2, str(exc)) from None
    shown = f"[{host}]" if ":" in host else host
    query = f"?pool={quote(args.pool, safe='')}" if args.pool else ""
    return f"http://{shown}:{port}{path}{query}"


def _open(url: str, timeout: float) -> Any:
    try:
        return urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.HTTPError as err:
        try:
            reason = json.loads(err.read()).get("error") or err.reason
        except (ValueError, AttributeError, OSError):
            reason = err.reason
        code = EXIT_UNAVAILABLE if err.code >= 500 else EXIT_REFUSED
        raise StatusError(code, f"{url}: {err.code} {reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StatusError(EXIT_UNAVAILABLE, f"cannot reach {url}: {reason}") from None


def duration(seconds: float | None) -> str:
    """``4m58s``, ``2h05m``, ``3d04h``; ``never`` for a lease that never expires."""
    if seconds is None:
        return "never"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def shown(value: object) -> str:
    """A value of the server's, safe for a terminal: control characters (ESC, CR,
    LF, OSC...) escaped, so names cannot clear the screen or forge rows."""
    return one_line(str(value), MAX_SHOWN)


def table(doc: dict[str, Any]) -> str:
    """The document as a table: a row per holder, the queue in order on the pool's first row."""
    rows = [("POOL", "SLOTS", "HOLDER", "FENCE", "LEFT", "WAITERS")]
    for pool in doc.get("pools", []):
        name = shown(pool["name"]) + (" (draining)" if pool.get("draining") else "")
        slots = f"{len(pool['holders'])}/{shown(pool['maxlocks'])}"
        queue = pool["waiters"]
        waiting = ", ".join(shown(w["host"]) for w in queue) if queue else "-"
        if len(queue) > 1:
            waiting = f"{len(queue)}: {waiting}"
        holders = pool["holders"] or [None]
        for i, holder in enumerate(holders):
            first = i == 0
            rows.append(
                (
                    name if first else "",
                    slots if first else "",
                    shown(holder["host"]) if holder else "-",
                    shown(holder["fence"]) if holder else "",
                    duration(holder["ttl_left"]) if holder else "",
                    waiting if first else "",
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


def show_once(args: argparse.Namespace, out: TextIO) -> None:
    url = _url(args, "/status")
    with _open(url, HTTP_TIMEOUT) as response:
        body = response.read().decode()
    if args.json:
        out.write(body.rstrip("\n") + "\n")
    else:
        out.write(table(json.loads(body)) + "\n")


def watch(args: argparse.Namespace, out: TextIO) -> None:
    """Follow the server's status stream (server-sent events), printing on every event."""
    url = _url(args, "/status/events")
    clear = out.isatty() and not args.json
    with _open(url, STREAM_TIMEOUT) as response:
        kind, data = "message", []
        for raw in response:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip())
            elif not line and data:
                _print_event(kind, "\n".join(data), out, args.json, clear)
                kind, data = "message", []
    raise StatusError(EXIT_UNAVAILABLE, f"{url}: the server closed the stream")


def _print_event(kind: str, data: str, out: TextIO, as_json: bool, clear: bool) -> None:
    if as_json:
        out.write(data + "\n")
    elif kind == "unavailable":
        why = shown(json.loads(data)["error"])
        out.write(f"{time.strftime('%H:%M:%S')} backend unavailable: {why}\n")
    else:
        if clear:
            out.write("\x1b[H\x1b[2J")  # home, clear screen
        out.write(f"{time.strftime('%H:%M:%S')}\n{table(json.loads(data))}\n\n")
    out.flush()


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    try:
        if args.watch:
            watch(args, sys.stdout)
        else:
            show_once(args, sys.stdout)
    except StatusError as exc:
        print(f"distributex status: {shown(exc)}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 0  # the way to end --watch
    except BrokenPipeError:
        return 0  # | head
    return 0
