"""``distributex release -r POOL --host HOST``: free another host's lock (an operator's
forced release).

::

    distributex release -H https://dx:9889 --cacert ca.crt -r puppet --host web1

Sends the seed's ``/release/?host=HOST&pool=POOL`` with the operator's
credentials; the server does it for an ``admin`` token (logged at WARNING
and counted as a forced release) and refuses it (403) for anyone else. The
pool's holders are read first from ``/status``, so the command can say
what it freed. The slot goes to the next waiter at once; the old holder
learns it at its next renewal (GONE) and stops its command (exit 73 there).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from distributex import __version__
from distributex.client import config, exits, operator_cli
from distributex.client.argv import Parser
from distributex.client.errors import LockRefused
from distributex.client.operator_cli import shown
from distributex.client.status import duration
from distributex.client.sync import Client


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="distributex release",
        usage="%(prog)s -r POOL --host HOST [-H SERVER] [-p PORT] [TLS and token options]",
        description="Free the lock HOST holds on POOL (a forced release) and say what was\n"
        "freed. Needs a token marked admin: true in the server's configuration;\n"
        "anyone else is refused. The connection settings are those of distributex.",
        epilog=exits.help_text("release"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-r", "--pool", required=True, metavar="POOL", help="resource pool")
    parser.add_argument(
        "--host", required=True, metavar="HOST", help="the host whose lock is freed"
    )
    operator_cli.add_connection_options(parser)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def holders_of(doc: dict[str, Any], pool: str, host: str) -> list[dict[str, Any]]:
    """The holders of ``pool`` that are ``host``, as ``/status`` lists them."""
    return [
        holder
        for entry in doc.get("pools", [])
        if entry.get("name") == pool
        for holder in entry.get("holders", [])
        if holder.get("host") == host
    ]


def force(client: Client, pool: str, host: str) -> int:
    """Release ``host``'s lock on ``pool``; say what was freed."""
    _text, doc = operator_cli.document(client, "/status", pool)
    held = holders_of(doc, pool, host)
    try:
        client.release_host(pool)
    except LockRefused as exc:
        if exc.status != 403:
            raise
        raise LockRefused(
            f"release of {shown(host)}'s lock on pool {shown(pool)!r} refused: {exc.reason} "
            "(a forced release needs a token with admin: true)",
            403,
        ) from None
    if not held:
        print(f"{shown(host)} held no lock on pool {shown(pool)!r}: nothing released")
        return exits.EXIT_NOT_HELD
    for holder in held:
        left = holder.get("ttl_left")
        print(
            f"released {shown(host)}'s lock on pool {shown(pool)!r} (fence "
            f"{shown(holder.get('fence'))}, {duration(left)} of its lease were left)"
        )
    return exits.EXIT_OK


def main(argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv))
    for option, value in (("-r", args.pool), ("--host", args.host)):
        if not value.strip() or not config.encodable(value):
            parser.error(f"{option} {value!r}: must be a non-empty name in UTF-8")

    def body() -> int:
        client = operator_cli.connect(args, parser, host=args.host)
        return force(client, args.pool, args.host)

    try:
        return operator_cli.run("release", body)
    except KeyboardInterrupt:
        print("distributex release: interrupted", file=sys.stderr)
        return 128 + 2
