"""Shared network helpers of both drivers: the TLS context, keepalive, the host
identity lookup, and network errors told apart and worded in one line."""

from __future__ import annotations

import http.client
import logging
import queue
import socket
import ssl
import threading

from distributex.client import core
from distributex.client.core import Sent, one_line
from distributex.client.errors import (
    CertificateMismatch,
    ConnectionLost,
    ServerUnavailable,
    TLSFailed,
)

log = logging.getLogger("distributex.client")

KEEPALIVE_IDLE = 10
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3
# How long the default host identity's name lookup may take.
HOST_LOOKUP_TIMEOUT = 5.0


def client_ssl_context(
    cacert: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    socket_class: type[ssl.SSLSocket] | None = None,
) -> ssl.SSLContext:
    """The client's SSL context: the server verified against ``cacert`` (None: the
    system's CAs) and its name checked; ``cert``/``key`` the client certificate for
    mutual TLS. ValueError (one line) if a file cannot be used."""
    if key is not None and cert is None:
        raise ValueError("--key needs --cert (the client certificate)")
    try:
        context = ssl.create_default_context(cafile=cacert)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot use CA file {cacert}: {_file_problem(exc)}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        # A server that refuses a client certificate closes the connection in
        # the handshake (asyncio servers send no alert). Under TLS 1.3 the
        # client's handshake is over by then, and the close would look like
        # a server gone away mid-request (which is retried); under TLS 1.2 it
        # ends the handshake itself, so it is told apart and reported at once.
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            files = f"{cert} and {key}" if key else cert
            raise ValueError(
                f"cannot use client certificate {files}: {_file_problem(exc)}"
            ) from None
    if socket_class is not None:
        context.sslsocket_class = socket_class
    return context


def _file_problem(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return (exc.reason or "not a certificate or key in PEM form").lower().replace("_", " ")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return one_line(str(exc), 100)


# OpenSSL's verify codes for a certificate that names another host or address.
_NAME_MISMATCH = (62, 64)


def tls_failure(exc: BaseException, address: str) -> TLSFailed | None:
    """The TLS failure behind a connection error, as one clear line (None: not TLS)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        inner = getattr(cause, "certificate_error", None)  # aiohttp's wrapper
        if isinstance(inner, BaseException):
            cause = inner
            continue
        if isinstance(cause, HandshakeClosed):
            return TLSFailed(
                f"server {address} closed the connection during the TLS handshake: it refused "
                "our client certificate (check --cert, --key and the server's client_ca), "
                "or it does not speak TLS"
            )
        if isinstance(cause, ssl.SSLCertVerificationError):
            why = cause.verify_message or cause.reason or "not verified"
            if cause.verify_code in _NAME_MISMATCH:
                return CertificateMismatch(
                    f"server {address}: its certificate is for another name ({why})"
                )
            return TLSFailed(
                f"server {address}: certificate not trusted ({why}); give its CA with --cacert"
            )
        if isinstance(cause, ssl.SSLEOFError | ssl.SSLZeroReturnError):
            return None  # the connection ended: not a TLS problem as such
        if isinstance(cause, ssl.SSLError):
            reason = (cause.reason or str(cause)).lower().replace("_", " ")
            if "certificate" in reason or "unknown ca" in reason:
                return TLSFailed(
                    f"server {address} refused our client certificate ({reason}); "
                    "check --cert and --key"
                )
            if "wrong version" in reason or "record layer" in reason or "packet length" in reason:
                return TLSFailed(f"server {address} does not speak TLS ({reason}); try http://")
            return TLSFailed(f"TLS with server {address} failed: {reason}")
        cause = cause.__cause__ or cause.__context__
    return None


class HandshakeClosed(ConnectionError):
    """The server closed the connection in the middle of our TLS handshake, after its hello."""


class ClosedBeforeAnswer(ConnectionError):
    """The server closed (or reset) the connection before sending anything, not even
    its TLS hello: what a server at its connection limit does. No TLS was spoken, so
    it says nothing about certificates."""


def describe(exc: BaseException) -> str:
    """A short human phrase for a network error."""
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(exc, ClosedBeforeAnswer):
        return (
            "connection closed by the server before it answered (it may be at its connection limit)"
        )
    if isinstance(getattr(exc, "os_error", None), ConnectionResetError | ssl.SSLEOFError):
        # aiohttp's connect failed so; it cannot tell when in the TLS handshake it came.
        return "connection closed by the server while connecting, before it answered"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve name ({exc.strerror})"
    if isinstance(exc, http.client.RemoteDisconnected | ConnectionResetError):
        return "connection closed by the server"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    if isinstance(exc, http.client.BadStatusLine):
        return f"not an HTTP answer: {one_line(str(exc), 60)}"
    return one_line(str(exc), 120) or type(exc).__name__


def set_keepalive(sock: socket.socket) -> None:
    """Turn on TCP keepalive so a long request notices a vanished server machine."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (
            ("TCP_KEEPIDLE", KEEPALIVE_IDLE),
            ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
            ("TCP_KEEPCNT", KEEPALIVE_COUNT),
        ):
            option = getattr(socket, name, None)
            if option is not None:
                sock.setsockopt(socket.IPPROTO_TCP, option, value)
    except OSError:  # not TCP (tests may use other sockets); keepalive is best effort
        pass


def default_host_id(timeout: float = HOST_LOOKUP_TIMEOUT) -> str:
    """This machine's identity as distributex 0.7 sent it: its name's primary DNS name.

    0.7 sent ``socket.gethostbyaddr(socket.gethostname())[0]`` (the first name
    of the host's entry in /etc/hosts or DNS), so both versions on one machine
    are one holder and one ``servers`` entry allows both. The lookup runs in a
    helper thread and is given up after ``timeout`` seconds; if it fails or
    times out, the identity is the plain host name (``socket.gethostname()``),
    where 0.7 stopped with a traceback.
    """
    name = socket.gethostname()
    answer: queue.SimpleQueue[str] = queue.SimpleQueue()

    def lookup() -> None:
        try:
            answer.put(socket.gethostbyaddr(name)[0])
        except (OSError, UnicodeError):
            answer.put(name)

    # A daemon thread: a resolver that hangs is abandoned, not waited for.
    threading.Thread(target=lookup, name="distributex-hostname", daemon=True).start()
    try:
        return answer.get(timeout=timeout) or name
    except queue.Empty:
        log.info("looking up %r took over %gs: using it as the host identity", name, timeout)
        return name


class Driver:
    """What both drivers share: the server, the credentials, the TLS context, the timeout."""

    def __init__(
        self,
        server: str,
        port: int | None,
        host: str | None,
        timeout: float,
        token: str | None,
        cacert: str | None,
        cert: str | None,
        key: str | None,
        socket_class: type[ssl.SSLSocket] | None = None,
    ) -> None:
        self.endpoint = core.endpoint(server, port, host, token, cacert, cert, default_host_id)
        self.server, self.port = self.endpoint.server, self.endpoint.port
        self.tls, self.host = self.endpoint.tls, self.endpoint.host
        self._token = self.endpoint.token
        self._ssl = client_ssl_context(cacert, cert, key, socket_class) if self.tls else None
        self.timeout = core.check_timeout(timeout)
        self.sent = Sent(token=self._token is not None, cert=cert is not None)

    @property
    def address(self) -> str:
        return self.endpoint.address

    @property
    def url(self) -> str:
        """``http(s)://host:port`` of the server."""
        return self.endpoint.url

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r}, host={self.host!r})"  # never the token

    def unreachable(self, exc: BaseException, lost: bool) -> ServerUnavailable:
        """A call that got no answer, as one line: a TLS failure, a connection the server
        closed mid-request (``lost``: :class:`ConnectionLost`), or no server at all."""
        failed = tls_failure(exc, self.address)
        if failed is not None:
            return failed
        line = f"cannot reach distributex server {self.address}: {describe(exc)}"
        if lost and not self.tls:
            # A TLS server hangs up on plain HTTP: the likeliest missing setting.
            line += " (if it speaks TLS, write the server as https://HOST[:PORT])"
        return (ConnectionLost if lost else ServerUnavailable)(one_line(line))
