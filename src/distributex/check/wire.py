"""The check's HTTP: one short connection per call, over TLS and with a token when given.

Kept apart from the clients' choices (:mod:`distributex.check.clients`) and
the rules (:mod:`distributex.check.rules`). Plain ``(host, port)`` pairs are
servers without TLS, as the tests start them.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urlencode

Answer = tuple[int, str, dict[str, str]]  # status, body, lower-case headers


@dataclass(frozen=True)
class Endpoint:
    """One server: where it is and the TLS context to speak to it (None: plain HTTP)."""

    host: str
    port: int
    tls: ssl.SSLContext | None = None

    def __str__(self) -> str:
        scheme = "https" if self.tls else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"


def endpoint(server: Endpoint | tuple[str, int]) -> Endpoint:
    return server if isinstance(server, Endpoint) else Endpoint(*server)


def _headers(token: str | None) -> dict[str, str]:
    headers = {"Connection": "close"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def _connection(server: Endpoint, timeout: float) -> http.client.HTTPConnection:
    if server.tls is not None:
        return http.client.HTTPSConnection(
            server.host, server.port, timeout=timeout, context=server.tls
        )
    return http.client.HTTPConnection(server.host, server.port, timeout=timeout)


def call(
    server: Endpoint | tuple[str, int],
    verb: str,
    params: dict,
    timeout: float,
    token: str | None = None,
) -> Answer:
    """``GET /verb/?params``; OSError or HTTPException if no answer came."""
    conn = _connection(endpoint(server), timeout)
    try:
        conn.request("GET", f"/{verb}/?{urlencode(params)}", headers=_headers(token))
        resp = conn.getresponse()
        body = resp.read(64 * 1024).decode("utf-8", "replace")
        return resp.status, body, {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def hang_up_wait(
    server: Endpoint | tuple[str, int], params: dict, linger: float, token: str | None = None
) -> None:
    """A ``/wait/`` given up by closing its connection after ``linger`` seconds."""
    target = endpoint(server)
    with socket.create_connection((target.host, target.port), timeout=5) as raw:
        sock: socket.socket = raw
        if target.tls is not None:
            sock = target.tls.wrap_socket(raw, server_hostname=target.host)
        lines = [f"GET /wait/?{urlencode(params)} HTTP/1.1", f"Host: {target.host}"]
        lines += [f"{k}: {v}" for k, v in _headers(token).items() if k != "Connection"]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        time.sleep(linger)
