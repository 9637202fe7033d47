"""The client's rules, without I/O: what to send, how to read the answer, and what a lease is.

Both drivers, the blocking :class:`~distributex.client.sync.Client` and the
asyncio :class:`~distributex.client.aio.AsyncClient`, build their requests
and read their answers here; :mod:`distributex.client.schedule` holds the
rules in time (re-queueing, the renewal schedule, when a lease is lost).
Nothing here touches the network. :func:`clock` is the one lease clock of
the client: every driver reads it through this module, so a test patches it
once (``monkeypatch.setattr(core, "clock", fake)``).

Answers (seed-compatible, see the server's ``httpapi``): ``YES``/``NO``
(200) to ``/get/`` and ``/wait/``, ``OK`` (200) to ``/release/`` and
``/renew/``, ``GONE`` (410) for a lease that no longer exists, ``INVALID``
(4xx, the reason in ``X-Distributex-Reason``; 401 wants credentials),
``UNAVAILABLE`` (503). A 0.7 server sends ``YES`` without lease headers:
such a grant cannot be renewed and is released by host.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

from distributex.client.errors import (
    AuthenticationFailed,
    LockLost,
    LockRefused,
    ServerUnavailable,
)

DEFAULT_PORT = 9889
DEFAULT_TIMEOUT = 10.0
MAX_BODY = 64 * 1024
USER_AGENT = "distributex-client/1"
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


# -- the server and who we are -------------------------------------------------------------


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


@dataclass(frozen=True)
class Endpoint:
    """A client's server and credentials, as both drivers set them up."""

    server: str
    port: int
    tls: bool
    host: str | None
    token: str | None

    @property
    def address(self) -> str:
        host = f"[{self.server}]" if ":" in self.server else self.server
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """``http(s)://host:port`` of the server."""
        return f"{'https' if self.tls else 'http'}://{self.address}"


def endpoint(
    server: str,
    port: int | None,
    host: str | None,
    token: str | None,
    cacert: str | None,
    cert: str | None,
    default_host: Callable[[], str],
) -> Endpoint:
    """The :class:`Endpoint` of a client.

    TLS when the server is written ``https://``, or with no scheme when a CA
    or a client certificate is given. ``host`` None: ``default_host()`` (the
    machine's identity as 0.7 sent it), unless a token or client certificate
    proves one (then no ``host`` is sent and the server takes the proven one).
    """
    scheme, name, chosen = split_server(server, port)
    tls = scheme == "https" or (scheme == "" and (cacert is not None or cert is not None))
    if not tls and (cacert is not None or cert is not None):
        raise ValueError(f"server {server!r} is http://: a CA or certificate needs https://")
    if token is not None:
        token = check_token(token)
    if host is None and token is None and cert is None:
        host = default_host()
    return Endpoint(name, chosen, tls, host or None, token)


def check_timeout(timeout: float) -> float:
    """A client's HTTP timeout, or ValueError."""
    if not 0 < timeout <= MAX_SECONDS:
        raise ValueError(f"timeout must be > 0 and at most {MAX_SECONDS:.0f} s")
    return timeout


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


def fmt_seconds(seconds: float | None) -> str | None:
    """Seconds for a query parameter, exactly (``:g`` would round 1234567.5 up)."""
    if seconds is None:
        return None
    seconds = float(seconds)
    return str(int(seconds)) if seconds.is_integer() else repr(seconds)


def lower(headers: Mapping[str, str] | Any) -> dict[str, str]:
    """Headers with lower-case names, as the readers below take them."""
    return {k.lower(): v for k, v in headers.items()}


# -- requests ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One ``GET /verb/?query``: its parameters (None: left out) and time bounds.

    ``budget`` bounds the whole call (None: an untimed ``/wait/``, one long
    request that keeps its place in the server's queue); ``connect`` the
    connection (name lookup and TLS included).
    """

    verb: str
    params: dict[str, str | None]
    budget: float | None
    connect: float

    @property
    def path(self) -> str:
        return f"/{self.verb}/"

    def query(self) -> str:
        return urlencode({k: v for k, v in self.params.items() if v is not None})


def headers(token: str | None) -> dict[str, str]:
    """The headers of every request (the token as a bearer token)."""
    sent = {"User-Agent": USER_AGENT}
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    return sent


def renew_request(lease: Lease, ttl: float | None, timeout: float) -> Request:
    if not lease.token:
        raise ValueError("this lease has no token (0.7 server): it cannot be renewed")
    params = {
        "host": lease.host or None,
        "pool": lease.pool,
        "lease": lease.token,
        "ttl": fmt_seconds(ttl),
    }
    return Request("renew", params, timeout, timeout)


def release_request(lease: Lease, timeout: float) -> Request:
    """Release exactly this lease (by its token; a 0.7 lease by host)."""
    params: dict[str, str | None] = {"host": lease.host or None, "pool": lease.pool}
    if lease.token:
        params["lease"] = lease.token
    return Request("release", params, timeout, timeout)


def release_host_request(host: str | None, pool: str, timeout: float) -> Request:
    """The seed's release: every slot of ``pool`` that ``host`` holds."""
    return Request("release", {"host": host, "pool": pool}, timeout, timeout)


# -- answers -------------------------------------------------------------------------------


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


def held_as(headers: Mapping[str, str], host: str | None) -> str:
    """The host a grant is held under: the server's word for it (it may be the
    identity a token or certificate proved), else the one we sent."""
    named = headers.get("x-distributex-host", "")
    if named and named.isprintable() and len(named) <= 255:
        return named
    return host or ""


def released(status: int, body: str, headers: Mapping[str, str], sent: Sent | None = None) -> bool:
    """The answer to a release: True released, False the lease was already gone (GONE)."""
    return check_answer("release", status, body, headers, sent) == "OK"


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
    mode: str = "exclusive"  # the mode held: "shared" or "exclusive"

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
