"""The blocking distributex client: :class:`Client`, :class:`Lease`, :class:`LeaseKeeper`.

::

    from distributex.client import Client, LockLost

    client = Client("dx.example.com")
    with client.lock("pool1", timeout=60, ttl=30) as lease:
        do_work(fence=lease.fence)        # renewed in the background every ttl/3
        if lease.lost.is_set():           # or pass on_lost=callback
            ...
    # leaving the block releases by lease token; LockLost if the lease was lost

HTTP: the standard library's :mod:`http.client`, one short connection per call,
and every call has a timeout. Connecting (name lookup included) is bounded by
``Client.timeout`` and can be aborted at once through a :class:`CancelToken`.
A ``/wait/`` with a timeout reads for (wait timeout + ``Client.timeout``). An
unbounded ``/wait/`` is *one* long request with no read timeout, because
re-issuing a ``/wait/`` would lose the place in the server's FIFO queue. A
dead server process resets the connection at once; a dead or unreachable
server *machine* is noticed by TCP keepalive (probes after 10 s idle, every
5 s, 3 misses: about 25 s). A ``/wait/`` answered ``NO`` before its timeout
ran out (the server could not hand the grant over) is simply asked again,
for the time that is left (an unbounded wait: for as long as it takes).

Times are taken from ``CLOCK_BOOTTIME`` where the OS has it (a monotonic clock
that keeps counting while *this* machine is suspended), else
:func:`time.monotonic`. The server's lease clock is its event loop's
monotonic clock, which does *not* count a suspend of the server machine: a
suspended server's leases then last longer in wall time, which is safe. A
suspend of the *client* machine, on the other hand, counts fully against its
leases, as it must: after resuming, a lease whose time ran out meanwhile is
lost. The renewal thread never sleeps longer than
:data:`KEEPER_TICK` at a time, so it notices such a jump promptly (sleeps use
the monotonic clock, which stands still during a suspend).

Identity: a client identifies itself by ``host`` (default: what distributex
0.7 sent, see :func:`default_host_id`). The server treats one host as one holder: two clients with
the same ``host`` asking for the same pool *share* the slot. Give concurrent
holders on one machine distinct ``host`` names (or use a local lock as well).
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import logging
import math
import os
import queue
import re
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

from distributex.client.errors import (
    AuthenticationFailed,
    Cancelled,
    CertificateMismatch,
    ConnectionLost,
    LockLost,
    LockRefused,
    LockTimeout,
    ServerUnavailable,
    TLSFailed,
)

log = logging.getLogger("distributex.client")

DEFAULT_PORT = 9889
DEFAULT_TIMEOUT = 10.0
KEEPALIVE_IDLE = 10
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3
# A lease with no expiry cannot be lost by silence, only by a GONE answer
# (released by someone else, server restarted); check for that this often.
NO_EXPIRY_CHECK = 30.0
# After a /wait/ that took longer than this share of the TTL, renew at once:
# the grant time is only known to lie between the request and the answer.
PIN_AFTER_WAIT = 0.1
MAX_BODY = 64 * 1024
# The operator pages (``/status`` of many pools) are larger than a verb's answer.
MAX_PAGE = 64 * 1024 * 1024
# A status stream sends a keep-alive every 15 s; this much silence is a dead server.
STREAM_IDLE = 45.0
# The renewal thread sleeps at most this long at a time (see the module docstring).
KEEPER_TICK = 0.5
# Granularity of a cancellable connect.
CONNECT_SLICE = 0.1
# A /wait/ answered NO with less than this left of its timeout has timed out.
MIN_REWAIT = 0.05
# A /wait/ whose server went away is asked again for at most this long (see Requeue).
REQUEUE_FOR = 60.0
# Pause between re-asked untimed /wait/s answered NO (doubling up to the maximum).
REWAIT_PAUSE = 0.1
REWAIT_PAUSE_MAX = 2.0
_USER_AGENT = "distributex-client/1"
# How long the default host identity's name lookup may take.
HOST_LOOKUP_TIMEOUT = 5.0
# The longest time any option or argument may give, in seconds (about 3 years):
# larger values overflow socket and thread timeouts.
MAX_SECONDS = 1e8

_CLOCK_ID = getattr(time, "CLOCK_BOOTTIME", None)


def clock() -> float:
    """Seconds on the client's lease clock (monotonic, counts suspend where possible)."""
    if _CLOCK_ID is not None:
        try:
            return time.clock_gettime(_CLOCK_ID)
        except OSError:
            pass
    return time.monotonic()


def parse_server(server: str, port: int | None = None) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6addr]:port`` or ``http(s)://host:port/`` -> (host, port).

    An explicit ``port`` argument wins over a port written in ``server``.
    """
    _scheme, host, chosen = split_server(server, port)
    return host, chosen


def split_server(server: str, port: int | None = None) -> tuple[str, str, int]:
    """(scheme, host, port) of a server as :func:`parse_server` takes it.

    The scheme is ``http`` or ``https`` as written, or ``""`` when none is.
    """
    text = server.strip()
    if not text:
        raise ValueError("empty server name")
    if text.count(":") > 1 and "[" not in text and "://" not in text:
        text = f"[{text}]"  # a bare IPv6 address such as ::1 (no port can be written)
    written_scheme = "://" in text
    if not written_scheme:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise ValueError(
            f"unsupported scheme {parts.scheme!r} in server {server!r} (use http or https)"
        )
    if "@" in parts.netloc:
        raise ValueError(f"user names are not supported in server {server!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or text.endswith(("?", "#")):
        raise ValueError(f"server {server!r} has a path; give only host[:port]")
    try:
        written = parts.port
    except ValueError:
        raise ValueError(f"bad port in server {server!r}") from None
    host = parts.hostname
    if not host:
        raise ValueError(f"no host name in server {server!r}")
    if _BAD_HOST_CHAR.search(host):
        raise ValueError(f"bad host name {host!r} in server {server!r}")
    try:
        host.encode("ascii")
    except UnicodeEncodeError:
        try:
            host.encode("idna")
        except UnicodeError:
            raise ValueError(f"bad host name {host!r} in server {server!r}") from None
    chosen = port if port is not None else (written if written is not None else DEFAULT_PORT)
    if not 0 < chosen < 65536:
        raise ValueError(f"port {chosen} out of range")
    return (parts.scheme if written_scheme else ""), host, chosen


def client_ssl_context(
    cacert: str | None = None, cert: str | None = None, key: str | None = None
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
    context.sslsocket_class = DeadlineSSLSocket
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


def _client_setup(
    server: str,
    port: int | None,
    host: str | None,
    token: str | None,
    cacert: str | None,
    cert: str | None,
) -> tuple[str, int, bool, str | None, str | None]:
    """(server, port, tls, host, token) of a client, shared by the sync and asyncio ones.

    TLS when the server is written ``https://``, or with no scheme when a CA
    or a client certificate is given. ``host`` None: the machine's identity
    as 0.7 sent it, unless a token or client certificate proves one (then
    no ``host`` is sent and the server takes the proven one).
    """
    scheme, name, chosen = split_server(server, port)
    tls = scheme == "https" or (scheme == "" and (cacert is not None or cert is not None))
    if not tls and (cacert is not None or cert is not None):
        raise ValueError(f"server {server!r} is http://: a CA or certificate needs https://")
    if token is not None:
        token = check_token(token)
    if host is None and token is None and cert is None:
        host = default_host_id()
    return name, chosen, tls, host or None, token


def held_as(headers: Mapping[str, str], host: str | None) -> str:
    """The host a grant is held under: the server's word for it (it may be the
    identity a token or certificate proved), else the one we sent."""
    named = headers.get("x-distributex-host", "")
    if named and named.isprintable() and len(named) <= 255:
        return named
    return host or ""


def check_token(token: str) -> str:
    """A bearer token as sent: printable ASCII without spaces (never shown in the error)."""
    token = token.strip()
    if not token:
        raise ValueError("the token is empty")
    if not all("!" <= ch <= "~" for ch in token):
        raise ValueError("the token must be printable ASCII without spaces")
    return token


_BAD_HOST_CHAR = re.compile(r"[\x00-\x20\x7f/\\?#@]")
_LEASE_TOKEN = re.compile(r"[!-~]{1,255}")


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


def check_durations(timeout: float | None, ttl: float | None) -> None:
    """Raise ValueError for a wait ``timeout`` or lease ``ttl`` the client cannot use."""
    if ttl is not None and not 0 < ttl <= MAX_SECONDS:
        raise ValueError(f"ttl must be > 0 and at most {MAX_SECONDS:.0f} s (None: the pool's)")
    if timeout is not None and not 0 <= timeout <= MAX_SECONDS:
        raise ValueError(f"timeout must be >= 0 and at most {MAX_SECONDS:.0f} s")


def one_line(text: str, limit: int = 300) -> str:
    """``text`` with control characters escaped (one line), at most ``limit`` characters."""
    out = "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape", "backslashreplace").decode("ascii")
        for ch in text
    )
    return out if len(out) <= limit else out[: limit - 3] + "..."


def _fmt(seconds: float | None) -> str | None:
    """Seconds for a query parameter, exactly (``:g`` would round 1234567.5 up)."""
    if seconds is None:
        return None
    seconds = float(seconds)
    return str(int(seconds)) if seconds.is_integer() else repr(seconds)


def _lower(headers: Mapping[str, str] | Any) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


@dataclass(frozen=True)
class Sent:
    """Which credentials a client sends, to name the missing one when the server wants it."""

    token: bool
    cert: bool


def not_authenticated(reason: str, sent: Sent | None) -> str:
    """The one line of a 401: the server's reason, and what we did not send."""
    line = f"not authenticated: {reason or 'token missing or not accepted'}"
    if sent is None:
        return line
    said = reason.lower()
    if "certificate" in said and not sent.cert:
        return f"{line}; no client certificate was given (--cert and --key)"
    if "token" in said and not sent.token:
        return f"{line}; no token was given (DISTRIBUTEX_TOKEN or --token-file)"
    if "not recognised" in said and sent.token:
        return f"{line}; the token given is not one the server knows"
    return line


def check_answer(
    verb: str, status: int, body: str, headers: Mapping[str, str], sent: Sent | None = None
) -> str:
    """The answer word (YES, NO, OK, GONE) or the matching exception.

    ``headers`` must have lower-case keys; ``sent`` lets a 401 name what was missing.
    """
    word = body.strip()
    reason = one_line(headers.get("x-distributex-reason", ""), 200)
    if status == 200 and word in ("YES", "NO", "OK"):
        return word
    if status == 401:
        raise AuthenticationFailed(not_authenticated(reason, sent), status)
    if status == 410 and verb in ("release", "renew"):
        return "GONE"
    if 400 <= status < 500:
        raise LockRefused(reason or f"HTTP {status} {word[:40]!r}", status)
    if status == 503:
        raise ServerUnavailable(f"server cannot answer now ({reason or 'HTTP 503'})")
    raise ServerUnavailable(
        f"unexpected answer to /{verb}/: HTTP {status} {word[:40]!r} (not a distributex server?)"
    )


def grant_fields(headers: Mapping[str, str]) -> tuple[int | None, str | None, float | None]:
    """(fence, token, ttl) from a YES or renewal answer's lower-case headers.

    A 0.7 server sends none of them: all three are then None (no renewal, and
    release is by host only).
    """
    fence = headers.get("x-distributex-fence")
    token = headers.get("x-distributex-lease")
    ttl = headers.get("x-distributex-ttl")
    try:
        granted = float(ttl) if ttl else None
        if granted is not None and (not math.isfinite(granted) or granted < 0):
            raise ValueError(ttl)
        # The token goes into the command's environment and into URLs: printable ASCII only.
        if token and not _LEASE_TOKEN.fullmatch(token):
            raise ValueError(token)
        return (int(fence) if fence else None, token or None, granted)
    except ValueError:
        shown = {k: v for k, v in headers.items() if k.startswith("x-distributex")}
        raise ServerUnavailable(
            one_line(f"malformed lease headers from server: {shown!r}")
        ) from None


def apply_renewal(
    lease: Lease,
    sent: float,
    status: int,
    body: str,
    headers: Mapping[str, str],
    credentials: Sent | None = None,
) -> None:
    """Take the server's answer to a ``/renew/`` sent at ``sent`` into ``lease``.

    Raises :class:`LockLost` on GONE; any answer but OK is a confused server,
    :class:`ServerUnavailable` (the caller retries until the lease's deadline).
    """
    word = check_answer("renew", status, body, headers, credentials)
    if word == "GONE":
        raise LockLost(
            f"lease on pool '{lease.pool}' is gone (expired, or released by someone else)"
        )
    if word != "OK":
        raise ServerUnavailable(f"unexpected answer to /renew/: {word!r} (expected OK)")
    fence, _token, granted_ttl = grant_fields(headers)
    lease.renewed_at = sent
    if granted_ttl is not None:
        lease.ttl = granted_ttl
    if fence is not None:
        lease.fence = fence


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


@dataclass(eq=False)
class Lease:
    """A held slot of a pool.

    ``fence`` and ``token`` come from the server (None from a 0.7 server);
    ``ttl`` is the lease time the server granted (0: never expires).
    ``renewed_at`` is the :func:`clock` time at which the request that granted
    or last renewed the lease was *sent*: the server restarted the TTL no
    earlier than that, so ``confirmed_until`` is the earliest moment the
    server may let the lease run out.
    ``lost`` is set (and ``lost_reason`` filled) once the lease is known or
    presumed gone.
    """

    pool: str
    host: str
    fence: int | None
    token: str | None
    ttl: float | None
    renewed_at: float
    lost: Any = field(default_factory=threading.Event)
    lost_reason: str | None = None
    lost_at: float | None = None
    released: bool = False

    @property
    def confirmed_until(self) -> float:
        """The earliest :func:`clock` time the server may end this lease (inf: no expiry)."""
        if not self.ttl:
            return math.inf
        return self.renewed_at + self.ttl

    def mark_lost(self, reason: str) -> bool:
        """Record the loss; False if it was already recorded. Safe from any thread."""
        with _LOST_LOCK:
            if self.lost.is_set():
                return False
            self.lost_reason = reason
            self.lost_at = clock()
            self.lost.set()
            return True


_LOST_LOCK = threading.Lock()


class CancelToken:
    """Aborts a blocking client call from another thread (e.g. a long ``/wait/``).

    The aborted call raises :class:`Cancelled`; the server sees the
    connection close and drops the waiter from its queue.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._event = threading.Event()
        self.cancelled = False

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            self._event.set()
            socks = list(self._socks)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _attach(self, sock: socket.socket) -> None:
        with self._lock:
            if self.cancelled:
                raise Cancelled("cancelled")
            self._socks.add(sock)

    def _detach(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.discard(sock)

    def _check(self) -> None:
        if self.cancelled:
            raise Cancelled("cancelled")


def _resolve(
    host: str, port: int, deadline: float, cancel: CancelToken | None
) -> list[tuple[Any, ...]]:
    """getaddrinfo, bounded by ``deadline`` and abortable (it has no timeout of its own)."""
    kind = (socket.AF_UNSPEC, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        return socket.getaddrinfo(host, port, *kind, socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError):
        pass
    answer: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def lookup() -> None:
        try:
            answer.put(socket.getaddrinfo(host, port, *kind))
        except BaseException as exc:
            answer.put(exc)

    # A daemon thread: a lookup that hangs is abandoned, not waited for.
    threading.Thread(target=lookup, name="distributex-resolve", daemon=True).start()
    while True:
        if cancel is not None:
            cancel._check()
        left = deadline - clock()
        if left <= 0:
            raise socket.gaierror(errno.ETIMEDOUT, "name lookup timed out")
        try:
            result = answer.get(timeout=min(CONNECT_SLICE, left))
        except queue.Empty:
            continue
        if isinstance(result, BaseException):
            raise result
        return result


def open_socket(
    host: str, port: int, timeout: float, cancel: CancelToken | None = None
) -> socket.socket:
    """A TCP connection to (host, port) within ``timeout`` seconds, lookup included.

    With ``cancel``, the socket is attached to the token *before* connecting,
    and the connect is polled in short slices, so a cancel aborts it at once
    even when the server is black-holed.
    """
    deadline = clock() + timeout
    last: OSError | None = None
    for family, type_, proto, _name, addr in _resolve(host, port, deadline, cancel):
        sock = DeadlineSocket(family, type_, proto)
        try:
            if cancel is not None:
                cancel._attach(sock)
            try:
                sock.setblocking(False)
                code = sock.connect_ex(addr)
                if code not in (0, errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK):
                    raise OSError(code, os.strerror(code))
                if code != 0:
                    with selectors.DefaultSelector() as sel:
                        sel.register(sock, selectors.EVENT_WRITE)
                        while True:
                            if cancel is not None:
                                cancel._check()
                            left = deadline - clock()
                            if left <= 0:
                                raise TimeoutError("timed out")
                            if sel.select(min(CONNECT_SLICE, left)):
                                break
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if code:
                        raise OSError(code, os.strerror(code))
            finally:
                if cancel is not None:
                    cancel._detach(sock)
            sock.setblocking(True)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
        except BaseException:
            sock.close()
            raise
    raise last or OSError(errno.EHOSTUNREACH, "no address to connect to")


if TYPE_CHECKING:
    _SocketBase = socket.socket
else:
    _SocketBase = object


class _Deadline(_SocketBase):
    """Sends and receives that all end by one :attr:`deadline` (None: no bound).

    A socket timeout bounds each read alone: a server that drips a byte a
    second (or sends ``100 Continue`` forever) would hold a call for ever.
    Here every read and send gets only the time left until the deadline.
    """

    deadline: float | None = None

    def _arm(self) -> None:
        if self.deadline is not None:
            left = self.deadline - clock()
            if left <= 0:
                raise TimeoutError("timed out")
            self.settimeout(left)

    def recv_into(self, *args: Any, **kwargs: Any) -> int:
        self._arm()
        return super().recv_into(*args, **kwargs)

    def recv(self, *args: Any, **kwargs: Any) -> bytes:
        self._arm()
        return super().recv(*args, **kwargs)

    def sendall(self, *args: Any, **kwargs: Any) -> None:
        self._arm()
        super().sendall(*args, **kwargs)  # type: ignore[misc]


class DeadlineSocket(_Deadline, socket.socket):
    """A TCP socket with a :attr:`deadline` for the whole call."""


class DeadlineSSLSocket(_Deadline, ssl.SSLSocket):
    """A TLS socket with a :attr:`deadline` for the whole call."""


class _Connection(http.client.HTTPConnection):
    """An HTTPConnection whose connect is :func:`open_socket` (bounded, cancellable),
    then a TLS handshake within the same time when ``context`` is given."""

    def __init__(
        self,
        host: str,
        port: int,
        timeout: float,
        cancel: CancelToken | None,
        context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(host, port, timeout=timeout)
        self._cancel = cancel
        self._context = context

    def connect(self) -> None:
        assert isinstance(self.timeout, float | int)
        deadline = clock() + float(self.timeout)
        sock = open_socket(self.host, self.port, float(self.timeout), self._cancel)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._context is not None:
            sock = self._handshake(sock, deadline)
        self.sock = sock

    def _handshake(self, sock: socket.socket, deadline: float) -> ssl.SSLSocket:
        assert self._context is not None
        try:
            sock.settimeout(max(0.01, deadline - clock()))
            tls = self._context.wrap_socket(
                sock, server_hostname=self.host, do_handshake_on_connect=False
            )
        except BaseException:
            sock.close()
            raise
        try:
            tls.do_handshake()
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError) as exc:
            # A cipher is chosen once the server's hello came: only then was it
            # the TLS handshake (our certificate) that the server ended.
            spoke_tls = tls.cipher() is not None
            tls.close()
            raise (HandshakeClosed if spoke_tls else ClosedBeforeAnswer)(str(exc)) from exc
        except BaseException:
            tls.close()
            raise
        return tls


class Requeue:
    """When a ``/wait/`` whose server went away is asked again, and for how long.

    A wait whose connection broke after it reached the server (the server
    crashed or restarted: its queue is gone, a server with durable state
    keeps only the leases) is sent again, and connection failures after
    that are retried, with a pause doubling up to 2 s, for at most
    :data:`REQUEUE_FOR` seconds of trying and never past the wait's deadline.
    A server that cannot be reached at all on the first try is an error at
    once, as before.
    """

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline
        self.since: float | None = None
        self.pause = REWAIT_PAUSE

    def again(self, exc: ServerUnavailable) -> bool:
        now = clock()
        if self.since is None:
            if not isinstance(exc, ConnectionLost):
                return False
            self.since, self.pause = now, REWAIT_PAUSE
        else:
            self.pause = min(REWAIT_PAUSE_MAX, self.pause * 2)
        if now - self.since > REQUEUE_FOR:
            return False
        return self.deadline is None or now + self.pause < self.deadline

    def answered(self) -> None:
        self.since = None

    def timed_out(self) -> bool:
        """Retrying, and the wait's deadline comes before the next try could."""
        if self.since is None or self.deadline is None:
            return False
        return clock() + self.pause >= self.deadline


class Client:
    """A blocking client of one distributex server.

    ``timeout`` bounds every HTTP call (connect, and the answer of calls that
    do not wait); a ``/wait/`` reads for its wait timeout plus ``timeout``.
    """

    def __init__(
        self,
        server: str,
        port: int | None = None,
        host: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        token: str | None = None,
        cacert: str | None = None,
        cert: str | None = None,
        key: str | None = None,
    ) -> None:
        self.server, self.port, self.tls, self.host, self._token = _client_setup(
            server, port, host, token, cacert, cert
        )
        self._ssl = client_ssl_context(cacert, cert, key) if self.tls else None
        if not 0 < timeout <= MAX_SECONDS:
            raise ValueError(f"timeout must be > 0 and at most {MAX_SECONDS:.0f} s")
        self.timeout = timeout
        self.sent = Sent(token=self._token is not None, cert=cert is not None)

    @property
    def address(self) -> str:
        host = f"[{self.server}]" if ":" in self.server else self.server
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """``http(s)://host:port`` of the server."""
        return f"{'https' if self.tls else 'http'}://{self.address}"

    def _headers(self) -> dict[str, str]:
        headers = {"User-Agent": _USER_AGENT, "Connection": "close"}
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    def __repr__(self) -> str:
        return f"Client({self.url!r}, host={self.host!r})"  # never the token

    # -- one HTTP call -----------------------------------------------------------------

    def _call(
        self,
        verb: str,
        params: dict[str, str | None],
        budget: float | None,
        cancel: CancelToken | None = None,
        connect_timeout: float | None = None,
    ) -> tuple[int, str, dict[str, str]]:
        with self._exchange(f"/{verb}/", params, budget, cancel, connect_timeout) as resp:
            body = resp.read(MAX_BODY).decode("utf-8", "replace")
            return resp.status, body, _lower(resp.headers)

    @contextlib.contextmanager
    def _exchange(
        self,
        path: str,
        params: dict[str, str | None],
        budget: float | None,
        cancel: CancelToken | None = None,
        connect_timeout: float | None = None,
        idle: float | None = None,
    ) -> Iterator[http.client.HTTPResponse]:
        """One GET of ``path``: the response, read within the block. Every network
        error, also one while the block reads, becomes a client error (one line).

        ``idle`` bounds each read alone (a stream); ``budget`` the whole call.
        """
        query = urlencode({k: v for k, v in params.items() if v is not None})
        connect = connect_timeout or self.timeout
        if budget is not None:
            connect = min(connect, budget)
        # ``budget`` bounds the whole call, connect included (None: unbounded,
        # for an untimed /wait/ that must keep its place in the queue).
        deadline = None if budget is None else clock() + budget
        conn = _Connection(self.server, self.port, connect, cancel, self._ssl)
        attached: socket.socket | None = None
        connected = False
        try:
            conn.connect()
            connected = True
            sock = conn.sock
            assert isinstance(sock, _Deadline)
            set_keepalive(sock)
            if cancel is not None:
                cancel._attach(sock)
                attached = sock
            sock.settimeout(idle)
            sock.deadline = deadline
            conn.request("GET", f"{path}?{query}" if query else path, headers=self._headers())
            yield conn.getresponse()
        except (OSError, http.client.HTTPException, UnicodeError, Cancelled) as exc:
            if cancel is not None and cancel.cancelled:
                raise Cancelled(f"{path} cancelled") from None
            failed = tls_failure(exc, self.address)
            if failed is not None:
                raise failed from exc
            # The server went away mid-request (crash, restart): not garbage or a timeout.
            lost = connected and isinstance(exc, ConnectionError | http.client.IncompleteRead)
            kind = ConnectionLost if lost else ServerUnavailable
            raise kind(f"cannot reach distributex server {self.address}: {describe(exc)}") from exc
        finally:
            if cancel is not None and attached is not None:
                cancel._detach(attached)
            conn.close()

    # -- the operator pages ------------------------------------------------------------

    def fetch(
        self, path: str, params: dict[str, str | None] | None = None, max_body: int = MAX_PAGE
    ) -> tuple[int, bytes, dict[str, str]]:
        """(status, body, lower-case headers) of ``GET path`` (``/status``, ``/metrics``),
        within :attr:`timeout`; the body is cut at ``max_body`` bytes."""
        with self._exchange(path, params or {}, self.timeout) as resp:
            return resp.status, resp.read(max_body), _lower(resp.headers)

    @contextlib.contextmanager
    def stream(
        self, path: str, params: dict[str, str | None] | None = None, idle: float = STREAM_IDLE
    ) -> Iterator[tuple[int, dict[str, str], Iterator[bytes]]]:
        """``GET path`` read line by line as it comes (``/status/events``): (status,
        lower-case headers, lines). A line may take ``idle`` seconds; the stream has no end
        of its own. Network errors while reading raise the client's errors."""
        with self._exchange(path, params or {}, None, idle=idle) as resp:
            yield resp.status, _lower(resp.headers), iter(resp.readline, b"")

    # -- the verbs ---------------------------------------------------------------------

    def acquire(
        self,
        pool: str,
        timeout: float | None = None,
        ttl: float | None = None,
        wait: bool = True,
        cancel: CancelToken | None = None,
    ) -> Lease:
        """Get a slot of ``pool`` (no background renewal; see :meth:`lock`).

        ``wait=False``: try once (``/get/``). Otherwise wait in the server's
        FIFO queue, at most ``timeout`` seconds (None: as long as it takes).
        A ``/wait/`` answered ``NO`` before that (the server could not hand
        a grant over) is asked again for the time that is left.
        ``ttl`` asks for a lease time shorter than the pool's ``expire``.

        Raises :class:`LockTimeout`, :class:`LockRefused`,
        :class:`ServerUnavailable` or :class:`Cancelled`.
        """
        check_durations(timeout, ttl)
        params: dict[str, str | None] = {"host": self.host, "pool": pool, "ttl": _fmt(ttl)}
        deadline = None if timeout is None else clock() + timeout
        pause = REWAIT_PAUSE
        requeue = Requeue(deadline)
        while True:
            sent = clock()
            try:
                if not wait:
                    verb = "get"
                    status, body, headers = self._call(verb, params, self.timeout, cancel)
                else:
                    verb = "wait"
                    left = None if deadline is None else max(0.0, deadline - sent)
                    params["timeout"] = _fmt(left)
                    read = None if left is None else left + self.timeout
                    status, body, headers = self._call(verb, params, read, cancel)
            except ServerUnavailable as exc:
                if not wait or not requeue.again(exc):
                    if requeue.timed_out():
                        raise LockTimeout(
                            f"pool '{pool}' not obtained within {timeout:g}s"
                        ) from exc
                    raise
                log.info("%s; queueing again in %.1fs", exc, requeue.pause)
                if cancel is not None:
                    if cancel._event.wait(requeue.pause):
                        raise Cancelled("/wait/ cancelled") from None
                else:
                    time.sleep(requeue.pause)
                continue
            requeue.answered()
            word = check_answer(verb, status, body, headers, self.sent)
            if word == "YES":
                break
            if word != "NO":
                raise ServerUnavailable(f"unexpected answer to /{verb}/: {word!r}")
            if not wait:
                raise LockTimeout(f"pool '{pool}' is busy")
            if deadline is not None and deadline - clock() < MIN_REWAIT:
                raise LockTimeout(f"pool '{pool}' not obtained within {timeout:g}s")
            log.info("/wait/ for pool '%s' answered NO early; asking again", pool)
            if deadline is None:
                # Never a hot loop, whatever the server does.
                if cancel is not None:
                    if cancel._event.wait(pause):
                        raise Cancelled("/wait/ cancelled")
                else:
                    time.sleep(pause)
                pause = min(REWAIT_PAUSE_MAX, pause * 2)
        try:
            fence, token, granted_ttl = grant_fields(headers)
        except ServerUnavailable:
            self._release_malformed(pool, headers, sent)
            raise
        lease = Lease(pool, held_as(headers, self.host), fence, token, granted_ttl, sent)
        if token and granted_ttl and clock() - sent > PIN_AFTER_WAIT * granted_ttl:
            self._pin(lease, ttl, cancel)
        return lease

    def _release_malformed(self, pool: str, headers: Mapping[str, str], sent: float) -> None:
        """A YES we cannot use (bad lease headers): give back exactly what was granted."""
        token = headers.get("x-distributex-lease")
        if token:
            self.release_quietly(Lease(pool, held_as(headers, self.host), None, token, None, sent))

    def _pin(self, lease: Lease, ttl: float | None, cancel: CancelToken | None) -> None:
        """Renew right after a long wait, so ``confirmed_until`` is tight."""
        try:
            self.renew(lease, ttl=ttl, cancel=cancel)
        except BaseException:
            # We cannot tell how long the lease has left; do not hand it out.
            with contextlib.suppress(Exception):
                self.release(lease)
            raise

    def renew(
        self,
        lease: Lease,
        ttl: float | None = None,
        timeout: float | None = None,
        cancel: CancelToken | None = None,
    ) -> None:
        """Restart the lease's TTL. Raises :class:`LockLost` if the server says GONE."""
        if not lease.token:
            raise ValueError("this lease has no token (0.7 server): it cannot be renewed")
        params = {
            "host": lease.host or None,
            "pool": lease.pool,
            "lease": lease.token,
            "ttl": _fmt(ttl),
        }
        sent = clock()
        status, body, headers = self._call(
            "renew", params, timeout or self.timeout, cancel, timeout or self.timeout
        )
        apply_renewal(lease, sent, status, body, headers, self.sent)

    def release(self, lease: Lease, timeout: float | None = None) -> bool:
        """Release exactly this lease. False if it was already gone (GONE)."""
        params: dict[str, str | None] = {"host": lease.host or None, "pool": lease.pool}
        if lease.token:
            params["lease"] = lease.token
        t = timeout or self.timeout
        status, body, headers = self._call("release", params, t, connect_timeout=t)
        lease.released = True
        return check_answer("release", status, body, headers, self.sent) == "OK"

    def release_host(self, pool: str, timeout: float | None = None) -> None:
        """The seed's release: every slot of ``pool`` this host holds."""
        t = timeout or self.timeout
        params: dict[str, str | None] = {"host": self.host, "pool": pool}
        status, body, headers = self._call("release", params, t, connect_timeout=t)
        check_answer("release", status, body, headers, self.sent)

    # -- the context manager -----------------------------------------------------------

    @contextlib.contextmanager
    def lock(
        self,
        pool: str,
        timeout: float | None = None,
        ttl: float | None = None,
        wait: bool = True,
        on_lost: Callable[[Lease], object] | None = None,
        lost_margin: float | None = None,
    ) -> Iterator[Lease]:
        """Hold a slot of ``pool`` for the ``with`` block, renewing it in the background.

        Leaving the block releases the lease (by token). If the lease was lost
        meanwhile, the exit raises :class:`LockLost` (unless the block raised
        an exception of its own, which then propagates unchanged).
        ``on_lost(lease)`` runs in the renewal thread as soon as a loss is
        detected; ``lease.lost`` is a :class:`threading.Event`.
        See :class:`LeaseKeeper` for ``lost_margin``.
        """
        lease = self.acquire(pool, timeout=timeout, ttl=ttl, wait=wait)
        keeper = LeaseKeeper(self, lease, ttl=ttl, on_lost=on_lost, lost_margin=lost_margin)
        keeper.start()
        try:
            yield lease
        except BaseException:
            keeper.stop()
            self.release_quietly(lease)
            raise
        keeper.check_deadline()  # a suspend may have ended the lease just now
        keeper.stop()
        held = self.release_quietly(lease)
        if lease.lost.is_set():
            raise LockLost(lease.lost_reason or "lease lost")
        if held is False:
            raise LockLost(f"lease on pool '{pool}' had ended before it was released")

    def release_quietly(self, lease: Lease, timeout: float | None = None) -> bool | None:
        """Release, logging failures: True released, False already gone, None unknown."""
        try:
            return self.release(lease, timeout)
        except Exception as exc:
            log.warning("could not release pool '%s': %s", lease.pool, exc)
            return None


class LeaseKeeper:
    """Renews a lease in a background thread until stopped or lost.

    Renewal is due every ``ttl/3`` after the last confirmed one. A failed
    renewal (server unreachable, 503, timeout) is retried every
    ``min(1, ttl/10)`` seconds. The lease is declared lost when the server
    answers GONE or refuses the renewal, or when no renewal has been
    confirmed until ``lost_margin`` seconds before the lease's earliest
    possible expiry (:attr:`Lease.confirmed_until`). The default margin is
    ``min(1, ttl/10)``; a caller that must stop work before the lease runs
    out (the CLI) passes the time it needs for that.

    A lease without TTL (0, or a 0.7 server) cannot expire: it is only
    checked every 30 s for a GONE answer, and silence never loses it.
    """

    def __init__(
        self,
        client: Client,
        lease: Lease,
        ttl: float | None = None,
        on_lost: Callable[[Lease], object] | None = None,
        lost_margin: float | None = None,
    ) -> None:
        self.client = client
        self.lease = lease
        self.ttl = ttl
        self.on_lost = on_lost
        self.lost_margin = lost_margin
        self.last_error: BaseException | None = None
        self._stop = threading.Event()
        self._cancel = CancelToken()
        self._thread = threading.Thread(
            target=self._run, name=f"distributex-renew-{lease.pool}", daemon=True
        )

    def margin(self) -> float:
        if self.lost_margin is not None:
            return self.lost_margin
        return min(1.0, (self.lease.ttl or 0) / 10)

    def start(self) -> None:
        if self.lease.token:
            self._thread.start()

    def stop(self) -> None:
        """Stop renewing (does not release). Returns promptly even mid-request."""
        self._stop.set()
        self._cancel.cancel()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def check_deadline(self) -> bool:
        """Declare the lease lost if its renewal deadline has passed; True if it is lost.

        The renewal thread does this itself at least every :data:`KEEPER_TICK`
        seconds; a supervisor may call it as often as it likes, from any thread.
        """
        lease = self.lease
        if lease.lost.is_set():
            return True
        if lease.ttl:
            now = clock()
            if now >= lease.confirmed_until - self.margin():
                self._declare_lost(self._silence_reason(now))
        return lease.lost.is_set()

    def _silence_reason(self, now: float) -> str:
        if self.last_error is not None:
            why = f"server unreachable: {self.last_error}"
        else:
            why = "no answer in time, or this client was not running"
        return (
            f"no renewal confirmed for {now - self.lease.renewed_at:.1f}s of a "
            f"{self.lease.ttl or 0:g}s lease ({why})"
        )

    def _declare_lost(self, reason: str) -> None:
        if self._stop.is_set() or not self.lease.mark_lost(reason):
            return
        log.warning("lost pool '%s': %s", self.lease.pool, reason)
        if self.on_lost is not None:
            try:
                self.on_lost(self.lease)
            except Exception:
                log.exception("on_lost callback failed")

    def _run(self) -> None:
        lease = self.lease
        retry_at: float | None = None
        while not self._stop.is_set():
            ttl = lease.ttl
            if ttl:
                lost_at = lease.confirmed_until - self.margin()
                due = lease.renewed_at + ttl / 3
                retry = min(1.0, ttl / 10)
            else:
                lost_at = math.inf
                due = lease.renewed_at + NO_EXPIRY_CHECK
                retry = NO_EXPIRY_CHECK
            if retry_at is not None:
                due = retry_at
            now = clock()
            if lease.lost.is_set():  # declared by check_deadline() in another thread
                return
            if now >= lost_at:
                self._declare_lost(self._silence_reason(now))
                return
            # Never sleep long: sleeps stand still while the machine is suspended.
            if now < due:
                if self._stop.wait(min(due - now, lost_at - now, KEEPER_TICK)):
                    return
                continue  # check the deadline again before renewing
            try:
                budget = max(0.05, min(self.client.timeout, lost_at - clock()))
                self.client.renew(lease, ttl=self.ttl, timeout=budget, cancel=self._cancel)
                retry_at = None
                self.last_error = None
            except Cancelled:
                return
            except LockLost as exc:
                self._declare_lost(str(exc))
                return
            except LockRefused as exc:
                self._declare_lost(f"renewal refused: {exc.reason}")
                return
            except ServerUnavailable as exc:
                self.last_error = exc
                retry_at = clock() + retry
                log.info("renewal of pool '%s' failed (will retry): %s", lease.pool, exc)
