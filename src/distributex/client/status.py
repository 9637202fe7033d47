"""``distributex status``: who holds which pool, for how long, and who waits.

::

    distributex status [-H SERVER] [-p PORT] [POOL] [--json] [--watch] [TLS and token options]

Reads the server's ``GET /status`` (``--watch``: follows ``GET /status/events``,
printing again on every change until Ctrl-C). ``--json`` prints the
server's document as it came (with ``--watch``: one document per line).
Everything else the server sends (names, reasons) is shown with control
characters escaped, so a hostile server cannot drive the terminal. The
connection settings, TLS and the token are those of every client command.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from distributex import __version__
from distributex.client import exits, operator_cli
from distributex.client.argv import Parser
from distributex.client.errors import ServerUnavailable
from distributex.client.operator_cli import shown
from distributex.client.sync import Client


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="distributex status",
        description="Show who holds each pool of a distributex server, and who waits.",
        epilog=exits.help_text("status"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("pool", nargs="?", metavar="POOL", help="show this pool only")
    parser.add_argument("--json", action="store_true", help="print the server's JSON document")
    parser.add_argument(
        "--watch", action="store_true", help="print again on every change, until Ctrl-C"
    )
    operator_cli.add_connection_options(parser)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


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


def table(doc: dict[str, Any]) -> str:
    """The document as a table: a row per holder, the queue in order on the pool's first row."""
    rows = [("POOL", "SLOTS", "HOLDER", "MODE", "FENCE", "LEFT", "WAITERS")]
    for pool in doc.get("pools", []):
        name = shown(pool["name"]) + (" (draining)" if pool.get("draining") else "")
        # Older servers say no mode: every holder is exclusive there.
        shared = [h for h in pool["holders"] if h.get("mode") == "shared"]
        if shared:
            cap = pool.get("max_shared")
            slots = f"{len(shared)}{'' if cap is None else '/' + shown(cap)} shared"
        else:
            slots = f"{len(pool['holders'])}/{shown(pool['maxlocks'])}"
        queue = pool["waiters"]
        waiting = (
            ", ".join(
                shown(w["host"]) + (" (shared)" if w.get("mode") == "shared" else "") for w in queue
            )
            if queue
            else "-"
        )
        # A long queue on a shared store lists its head; older servers send no count.
        beyond = pool.get("more_waiting")
        beyond = beyond if isinstance(beyond, int) and beyond > 0 else 0
        if beyond:
            waiting = f"{waiting}, and {beyond} more"
        if len(queue) + beyond > 1:
            waiting = f"{len(queue) + beyond}: {waiting}"
        holders = pool["holders"] or [None]
        for i, holder in enumerate(holders):
            first = i == 0
            rows.append(
                (
                    name if first else "",
                    slots if first else "",
                    shown(holder["host"]) if holder else "-",
                    shown(holder.get("mode", "exclusive")) if holder else "",
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


def show_once(client: Client, args: argparse.Namespace, out: TextIO) -> None:
    text, doc = operator_cli.document(client, "/status", args.pool)
    out.write(text.rstrip("\n") + "\n" if args.json else table(doc) + "\n")


def watch(client: Client, args: argparse.Namespace, out: TextIO) -> None:
    """Follow the server's status stream (server-sent events), printing on every event."""
    path = "/status/events"
    clear = out.isatty() and not args.json
    with client.stream(path, {"pool": args.pool}) as (status, headers, lines):
        if status != 200:
            body = b"".join(lines)
            raise operator_cli.page_error(client, path, status, body, headers)
        kind, data = "message", []
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip())
            elif not line and data:
                _print_event(kind, "\n".join(data), out, args.json, clear)
                kind, data = "message", []
    raise ServerUnavailable(f"{client.url}{path}: the server closed the stream")


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
    parser = build_parser()
    args = parser.parse_args(list(argv))

    def body() -> int:
        client = operator_cli.connect(args, parser)
        if args.watch:
            watch(client, args, sys.stdout)
        else:
            show_once(client, args, sys.stdout)
        return exits.EXIT_OK

    try:
        return operator_cli.run("status", body)
    except KeyboardInterrupt:
        return exits.EXIT_OK  # the way to end --watch
    except BrokenPipeError:
        return exits.EXIT_OK  # | head
