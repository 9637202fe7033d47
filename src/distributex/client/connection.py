"""The connection settings every command takes, from the same places, and the client they make.

``-H http(s)://host[:port]``, ``-p``, ``--http-timeout``, ``--cacert``,
``--cert``, ``--key``, ``DISTRIBUTEX_TOKEN`` / ``--token-file``: each from
the option, else its environment variable, else the client config file
(see :mod:`distributex.client.config`). ``distributex``, ``distributex
status`` and ``distributex release`` all resolve them here.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from distributex.client import config
from distributex.client.config import ConfigProblem, Values, arg
from distributex.client.sync import DEFAULT_PORT, DEFAULT_TIMEOUT, Client, split_server


@dataclass(frozen=True)
class Connection:
    """Where the server is and how to prove who we are (the token is never shown)."""

    server: str | None
    port: int | None
    http_timeout: float
    cacert: str | None
    cert: str | None
    key: str | None
    token: str | None
    token_from: str  # where the token came from, for messages ("" without a token)

    def __repr__(self) -> str:
        return f"Connection(server={self.server!r}, port={self.port!r})"  # never the token

    def client(self, host: str | None = None) -> Client:
        """A :class:`Client` of this server. ``host`` None: the default identity (none
        is looked up for ``""``). ConfigProblem if a certificate file cannot be used."""
        assert self.server is not None
        try:
            return Client(
                self.server,
                self.port,
                host=host,
                timeout=self.http_timeout,
                token=self.token,
                cacert=self.cacert,
                cert=self.cert,
                key=self.key,
            )
        except ValueError as exc:
            raise ConfigProblem(str(exc)) from None


def add_options(parser: argparse.ArgumentParser, server_help: str) -> None:
    """The connection options, the same for every command."""
    parser.add_argument("-H", "--server", metavar="SERVER", help=server_help)
    parser.add_argument(
        "-p", "--port", type=arg(config.port), metavar="PORT",
        help=f"server port (env DISTRIBUTEX_PORT; default {DEFAULT_PORT})",
    )  # fmt: skip
    parser.add_argument(
        "--http-timeout", type=arg(config.positive), metavar="SECONDS",
        help=f"timeout of each HTTP call (env DISTRIBUTEX_HTTP_TIMEOUT; default "
        f"{DEFAULT_TIMEOUT:g})",
    )  # fmt: skip
    parser.add_argument(
        "--cacert", metavar="FILE",
        help="CA certificate(s) to check the server's certificate with (env DISTRIBUTEX_CACERT; "
        "default: the system's); implies TLS",
    )  # fmt: skip
    parser.add_argument(
        "--cert", metavar="FILE",
        help="client certificate for mutual TLS (env DISTRIBUTEX_CERT); implies TLS",
    )  # fmt: skip
    parser.add_argument(
        "--key", metavar="FILE",
        help="the client certificate's private key, if not in --cert (env DISTRIBUTEX_KEY)",
    )  # fmt: skip
    parser.add_argument(
        "--token-file", metavar="FILE",
        help="file whose first line is the bearer token (env DISTRIBUTEX_TOKEN holds the token "
        "itself); never give a token on the command line",
    )  # fmt: skip


def resolve(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    env: dict[str, str],
    values: Values,
    default_server: str | None = None,
) -> Connection:
    """The connection settings from options, environment and config file.

    Usage errors go through ``parser.error``; a bad file or variable raises
    :class:`ConfigProblem`. ``default_server`` is used when none is set anywhere.
    """

    def pick(name: str, convert: object, builtin: object) -> object:
        assert callable(convert)
        return config.pick(name, getattr(args, name), env, values, convert, builtin)

    server = pick("server", config.text, None) or None
    if "DISTRIBUTEX_SERVER" in env and not env["DISTRIBUTEX_SERVER"] and args.server is None:
        server = None  # DISTRIBUTEX_SERVER= (empty) turns a configured server off
    server = server or default_server
    port = pick("port", config.port, None)
    http_timeout = pick("http_timeout", config.positive, DEFAULT_TIMEOUT)
    cacert = pick("cacert", config.text, None) or None
    cert = pick("cert", config.text, None) or None
    key = pick("key", config.text, None) or None
    token, token_from = config.read_token(args.token_file, env, values)
    assert port is None or isinstance(port, int)
    assert isinstance(http_timeout, float)
    if server is not None:
        try:
            scheme, _host, _chosen = split_server(str(server), port)
        except ValueError as exc:
            parser.error(f"bad server: {exc}")
        if scheme == "http" and (cacert or cert):
            parser.error("--cacert and --cert need TLS: write the server as https://HOST[:PORT]")
    if key and not cert:
        parser.error("--key needs --cert (the client certificate)")
    return Connection(
        server=str(server) if server else None,
        port=port,
        http_timeout=http_timeout,
        cacert=str(cacert) if cacert else None,
        cert=str(cert) if cert else None,
        key=str(key) if key else None,
        token=token,
        token_from=token_from,
    )
