"""The frame of the operator commands (``status``, ``release``): their options, their
connection, the server's pages read as documents, and errors as exit statuses.

They talk to the server with the library's :class:`~distributex.client.sync.Client`,
so TLS, client certificates and tokens work as for the lock itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from distributex.client import config, connection, exits
from distributex.client.config import ConfigProblem
from distributex.client.connection import Connection
from distributex.client.errors import (
    AuthenticationFailed,
    DistributexError,
    LockRefused,
    ServerUnavailable,
)
from distributex.client.sync import Client, not_authenticated, one_line

# The server when none is set anywhere (an operator on the server's own machine).
LOCAL_SERVER = "localhost"
# Longest server text (a reason) in a message line, once control characters are escaped.
MAX_SHOWN = 1000


def shown(value: object) -> str:
    """A value of the server's, safe for a terminal: control characters (ESC, CR,
    LF, OSC...) escaped, so names cannot clear the screen or forge rows."""
    return one_line(str(value), MAX_SHOWN)


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    connection.add_options(
        parser,
        "server: host name, host:port, or http(s)://host[:port] (env DISTRIBUTEX_SERVER; "
        f"default: the client config's server, else {LOCAL_SERVER})",
    )


def connect(args: argparse.Namespace, parser: argparse.ArgumentParser, host: str = "") -> Client:
    """The client of the server the options, environment and config file name.

    No host identity is looked up: operator commands act as what their
    credentials prove; ``host`` is the host they act on, if any.
    """
    env = dict(os.environ)
    conn: Connection = connection.resolve(args, parser, env, config.load(env), LOCAL_SERVER)
    return conn.client(host=host)


def page_error(
    client: Client, path: str, status: int, body: bytes, headers: dict[str, str]
) -> DistributexError:
    """The error of a page that did not answer 200, as one line naming the server's reason."""
    reason = headers.get("x-distributex-reason", "")
    if not reason:
        try:
            reason = str(json.loads(body).get("error") or "")
        except (ValueError, AttributeError):
            reason = ""
    where = f"{client.url}{path}"
    if status == 401:
        return AuthenticationFailed(f"{where}: 401 {not_authenticated(reason, client.sent)}", 401)
    if 400 <= status < 500:
        return LockRefused(f"{where}: {status} {reason or 'refused'}", status)
    return ServerUnavailable(f"{where}: {status} {reason or 'server cannot answer now'}")


def document(client: Client, path: str, pool: str | None) -> tuple[str, dict[str, Any]]:
    """(the text, the parsed document) of a JSON page such as ``/status``."""
    status, body, headers = client.fetch(path, {"pool": pool})
    if status != 200:
        raise page_error(client, path, status, body, headers)
    text = body.decode("utf-8", "replace")
    try:
        doc = json.loads(text)
    except ValueError:
        raise ServerUnavailable(f"{client.url}{path}: not a JSON document") from None
    if not isinstance(doc, dict):
        raise ServerUnavailable(f"{client.url}{path}: not a status document")
    return text, doc


def run(name: str, body: Callable[[], int]) -> int:
    """``body``'s exit status; a client error or bad configuration is one line on stderr."""
    try:
        return body()
    except ConfigProblem as exc:
        print(f"distributex {name}: {shown(exc)}", file=sys.stderr)
        return exits.EXIT_CONFIG
    except DistributexError as exc:
        print(f"distributex {name}: {shown(exc)}", file=sys.stderr)
        return exits.code_for(exc)
