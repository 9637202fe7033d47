"""``distributex check``: run random clients on a pool of your own deployment and prove
from what they saw that it kept the lock rules.

::

    distributex check -H https://dx1:9889,https://dx2:9889 --cacert ca.crt \\
        -r check --duration 60 --clients 8

The clients (:mod:`distributex.check.clients`) get, wait, hold, renew,
release, give up and hang up at random for ``--duration`` seconds, each
call sent to one of the servers at random; the history they recorded is
then checked (:mod:`distributex.check.rules`): never more than the pool's
``maxlocks`` holders (read from ``/status``), fences in grant order, no
wait starved. Calls that got no answer (a server or the store restarted,
a 503) are counted and reported, never taken for violations: their effect
is unknown, and every effect they can have only shortens what a client
believes it holds. Each client is a holder of its own: a host named
``check-TAG-N`` without authentication, one identity per token
(``--tokens-file``) with it. The report goes to stdout; the exit status
says whether the rules held.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import secrets
import sys
from collections.abc import Sequence
from typing import Any

from distributex import __version__
from distributex.check import clients as random_clients
from distributex.check import report, rules
from distributex.check.wire import Endpoint
from distributex.client import config, connection, exits, operator_cli
from distributex.client.argv import Parser
from distributex.client.config import ConfigProblem, arg
from distributex.client.connection import Connection
from distributex.client.core import check_token
from distributex.client.errors import LockRefused, ServerUnavailable
from distributex.client.operator_cli import shown
from distributex.client.sync import Client
from distributex.client.transport import client_ssl_context

DEFAULT_CLIENTS = 4
MAX_CLIENTS = 200


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="distributex check",
        usage="%(prog)s -H SERVER[,SERVER...] [-p PORT] -r POOL --duration SECONDS "
        "[--clients N] [TLS and token options]",
        description="Run random clients on POOL for SECONDS, spread over the servers, and\n"
        "check what they saw: never more than the pool's maxlocks holders at once,\n"
        "fences in grant order, no wait starved. Use a pool nobody else uses: the\n"
        "check holds it. Errors while servers or the store restart are counted,\n"
        "not taken for violations. The connection settings are those of distributex.",
        epilog=exits.help_text("check"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-r", "--pool", required=True, metavar="POOL", help="resource pool")
    parser.add_argument(
        "--duration", required=True, type=arg(config.positive), metavar="SECONDS",
        help="how long the clients run (the last calls may end up to a wait's time later)",
    )  # fmt: skip
    parser.add_argument(
        "--clients", type=arg(whole), metavar="N",
        help=f"number of clients (default {DEFAULT_CLIENTS}; with tokens: one per token)",
    )  # fmt: skip
    parser.add_argument(
        "--tokens-file", metavar="FILE",
        help="one bearer token per line, each of its own identity: a client per token "
        "(a single token makes every client the same holder)",
    )  # fmt: skip
    parser.add_argument(
        "--seed", type=arg(whole), metavar="N", help="seed of the clients' choices (printed)"
    )
    operator_cli.add_connection_options(parser)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def whole(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise ValueError(f"{text!r} must be at least 1")
    return value


def connections(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[Connection]:
    """One connection per server of ``-H a,b,c`` (or of DISTRIBUTEX_SERVER / the config's)."""
    env = dict(os.environ)
    values = config.load(env)
    given = args.server
    args.server = given.split(",")[0] if given else None
    first = connection.resolve(args, parser, env, values, operator_cli.LOCAL_SERVER)
    assert first.server is not None
    names = (given or first.server).split(",")
    found = []
    for name in names:
        if not name.strip():
            parser.error(f"-H {given or first.server!r}: an empty server name in the list")
        args.server = name.strip()
        found.append(connection.resolve(args, parser, env, values, operator_cli.LOCAL_SERVER))
    return found


def read_tokens(path: str) -> list[str]:
    """The tokens of ``--tokens-file``: one per line, blank lines and # comments skipped."""
    try:
        with open(path, "rb") as file:
            lines = file.read(1 << 20).decode("ascii").splitlines()
    except OSError as exc:
        raise ConfigProblem(f"--tokens-file {path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigProblem(f"--tokens-file {path}: tokens must be printable ASCII") from None
    tokens = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            tokens.append(check_token(line.strip()))
        except ValueError as exc:
            raise ConfigProblem(f"--tokens-file {path}, line {number}: {exc}") from None
    if not tokens:
        raise ConfigProblem(f"--tokens-file {path}: no token in it")
    return tokens


def identities(
    count: int | None, tokens: list[str], parser: argparse.ArgumentParser
) -> list[random_clients.Identity]:
    """Who each client is: a host of its own, or the identity of a token of its own."""
    if not tokens:
        tag = secrets.token_hex(3)
        n = count or DEFAULT_CLIENTS
        return [random_clients.Identity(f"check-{tag}-{i}", f"check-{tag}-{i}") for i in range(n)]
    if count is not None and count > len(tokens):
        parser.error(
            f"--clients {count}: only {len(tokens)} token(s); each client needs an identity of "
            "its own (one token per line in --tokens-file)"
        )
    n = count or len(tokens)
    # The token's identity is the host: none is sent. The name is the token's place.
    return [random_clients.Identity(f"token{i + 1}", None, tokens[i]) for i in range(n)]


def maxlocks_of(client: Client, pool: str) -> int:
    """The pool's ``maxlocks`` as the server's ``/status`` shows it."""
    _text, doc = operator_cli.document(client, "/status", pool)
    for entry in doc.get("pools", []):
        if isinstance(entry, dict) and entry.get("name") == pool:
            value = entry.get("maxlocks")
            if isinstance(value, int) and value >= 1:
                return value
            raise ServerUnavailable(f"{client.url}/status: no maxlocks for pool {shown(pool)!r}")
    raise LockRefused(f"{client.url}: no pool {shown(pool)!r} in /status (unknown pool?)", 404)


def endpoint_of(conn: Connection, client: Client) -> Endpoint:
    tls = client_ssl_context(conn.cacert, conn.cert, conn.key) if client.tls else None
    return Endpoint(client.server, client.port, tls)


def run_check(conns: list[Connection], args: argparse.Namespace, who: list[Any]) -> int:
    servers = [conn.client(host="") for conn in conns]
    endpoints = [endpoint_of(conn, client) for conn, client in zip(conns, servers, strict=True)]
    seen: dict[str, int] = {}
    problems: list[Exception] = []
    for client in servers:
        try:
            seen[client.url] = maxlocks_of(client, args.pool)
        except ServerUnavailable as exc:
            problems.append(exc)  # down now: it may come back while the check runs
    if not seen:
        raise problems[0]
    for problem in problems:
        print(f"distributex check: {shown(problem)} (its calls count as errors)", file=sys.stderr)
    maxlocks = min(seen.values())
    if len(set(seen.values())) > 1:
        print(
            "distributex check: the servers disagree on maxlocks "
            f"({', '.join(f'{url}: {n}' for url, n in seen.items())}); checking {maxlocks}",
            file=sys.stderr,
        )
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    print(
        f"distributex check: {len(who)} clients on pool {shown(args.pool)!r} (maxlocks "
        f"{maxlocks}) over {len(endpoints)} server(s) for {args.duration:g}s, seed {seed}",
        file=sys.stderr,
    )
    try:
        history = random_clients.run(
            lambda: endpoints, [args.pool], len(who), args.duration, seed, identities=who
        )
    except RuntimeError as exc:  # a client that never came back: no verdict
        print(f"distributex check: {shown(exc)}", file=sys.stderr)
        return exits.EXIT_SOFTWARE
    findings = rules.check(history, {args.pool: maxlocks}, durable=False)
    sys.stdout.write(report.text(history, findings, args.pool, maxlocks, seed))
    if findings:
        return exits.EXIT_VIOLATION
    if not history.leases:
        if history.refused:
            reason, _n = history.refused.most_common(1)[0]
            raise LockRefused(f"every grant refused: {reason}", 403)
        print("distributex check: no lease was granted: nothing was proven", file=sys.stderr)
        return exits.EXIT_INCONCLUSIVE
    return exits.EXIT_OK


def main(argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv))
    if not args.pool.strip() or not config.encodable(args.pool):
        parser.error(f"-r {args.pool!r}: must be a non-empty name in UTF-8")
    if args.clients is not None and args.clients > MAX_CLIENTS:
        parser.error(f"--clients {args.clients}: at most {MAX_CLIENTS}")

    def body() -> int:
        conns = connections(args, parser)
        tokens = read_tokens(args.tokens_file) if args.tokens_file else []
        if not tokens and conns[0].token is not None:
            tokens = [conns[0].token]
        conns = [dataclasses.replace(c, token=tokens[0] if tokens else None) for c in conns]
        return run_check(conns, args, identities(args.clients, tokens, parser))

    try:
        return operator_cli.run("check", body)
    except KeyboardInterrupt:
        print("distributex check: interrupted", file=sys.stderr)
        return 128 + 2
