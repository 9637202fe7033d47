"""The HTTP text API: the seed's ``/get/``, ``/wait/``, ``/release/`` and their extensions.

Answers are one word of ``text/plain`` with no newline, so ``curl`` output
reads as the 0.7 README shows it:

==========  ======  ==================================================
body        status  meaning
==========  ======  ==================================================
YES         200     the host holds a slot (``/get/``, ``/wait/``)
NO          200     no slot: busy (``/get/``) or ``timeout`` ran out
OK          200     released (also when nothing was held); renewed
GONE        410     ``lease=`` names no current lease (released nothing)
INVALID     4xx     bad request; ``X-Distributex-Reason`` says why
UNAVAILABLE 503     the backend cannot answer now
==========  ======  ==================================================

Every YES (and every renewal) carries ``X-Distributex-Fence`` (the grant's
fencing token), ``X-Distributex-Lease`` (the lease token, for renewal and
exact release) and ``X-Distributex-TTL`` (seconds the lease lives without a
renewal; 0 = never expires).

Optional query parameters, never sent by 0.7 clients:

* ``timeout=SECONDS`` on ``/wait/``: answer NO when it runs out.
* ``ttl=SECONDS`` on ``/get/``, ``/wait/`` and ``/renew/``: a lease time
  shorter than the pool's ``expire`` (it cannot be longer).
* ``lease=TOKEN`` on ``/release/``: release exactly that lease.
* ``mode=shared`` on ``/get/`` and ``/wait/``: a shared (read) lock, held
  beside other shared holders and never beside default-mode ones;
  ``mode=exclusive`` is the default. A YES to a request that named a mode
  says the mode held in ``X-Distributex-Mode``.

``/renew/?host=H&pool=P&lease=TOKEN`` restarts the lease's time-to-live.

The query string is parsed strictly (400 INVALID otherwise): every ``%`` is
followed by two hex digits, the decoded bytes are UTF-8, ``+`` is a space, no
parameter is given twice, a name is printable, and a number is plain ASCII
decimal (``1``, ``1.5``, ``.5``, ``1e3``) from 0 to 10**9 seconds. A
parameter given empty (``lease=``, ``timeout=``) is refused, never taken as
left out.

Pools made on first use (not listed in the configuration) that hold state
at once are limited to ``max_pools``, and those one host holds or waits on to
``max_pools_per_identity``: a request that would make one more answers 429
INVALID. A ``/wait/`` whose token a reload removed or changed leaves the queue
and answers 403 INVALID.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import unicodedata
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote_to_bytes

from aiohttp import web

from distributex import auth
from distributex.backends.base import BackendUnavailable, LockBackend
from distributex.config import Config
from distributex.engine import EXCLUSIVE, MODES, Lease, PoolSpec
from distributex.events import Events

log = logging.getLogger("distributex.http")

BACKEND_KEY: web.AppKey[LockBackend] = web.AppKey("backend", LockBackend)
CONFIG_KEY: web.AppKey[Config] = web.AppKey("config", Config)
EVENTS_KEY: web.AppKey[Events] = web.AppKey("events", Events)
# Pools a reload removed while they had holders or waiters: they drain (see reload.py).
DRAINING_KEY: web.AppKey[dict[str, PoolSpec]] = web.AppKey("draining", dict)

MAX_NAME = 255
# Longer than any lease or wait anyone means (about 31 years); bigger numbers
# are refused rather than passed to timers as nonsense deadlines.
MAX_SECONDS = 1e9
_TEXT = "text/plain"
_QUERY_KEY = "distributex.query"
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
# ASCII only: float() also takes "1_0" and other scripts' digits.
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)


class Invalid(Exception):
    """A request the API refuses; becomes a 4xx INVALID answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _answer(word: str, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    all_headers = {"Content-Type": _TEXT}
    if headers:
        all_headers.update(headers)
    return web.Response(body=word.encode(), status=status, headers=all_headers)


def _invalid(status: int, reason: str) -> web.Response:
    return _answer("INVALID", status, {"X-Distributex-Reason": header_text(reason)})


def header_text(text: str) -> str:
    """``text`` fit for a header: control characters (e.g. of a decoded path) escaped.

    aiohttp refuses to send a header with one, and the request would fail.
    """
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def _seconds_text(seconds: float) -> str:
    """Seconds exactly as held: never rounded up, so a client's deadline is not late."""
    if seconds.is_integer():
        return str(int(seconds))
    return repr(seconds)


def _lease_headers(lease: Lease, mode: str | None = None) -> dict[str, str]:
    headers = {
        "X-Distributex-Fence": str(lease.fence),
        "X-Distributex-Lease": lease.token,
        "X-Distributex-TTL": _seconds_text(lease.ttl),
    }
    if mode is not None:  # asked with mode=: the mode held (0.7 answers stay as they were)
        headers["X-Distributex-Mode"] = lease.hold.mode
    return headers


def _unquote(raw: str, what: str) -> str:
    # yarl turns bad escapes and bad UTF-8 into U+FFFD, which would make
    # different names one; refuse them instead.
    if _BAD_PERCENT.search(raw):
        raise Invalid(400, f"{what} has a '%' not followed by two hex digits")
    try:
        return unquote_to_bytes(raw.replace("+", " ")).decode("utf-8")
    except UnicodeDecodeError:
        raise Invalid(400, f"{what} is not UTF-8 once percent-decoded") from None


def parse_query(raw: str) -> dict[str, list[str]]:
    """Strictly decode a raw query string (``a=1&b=%41``) as urllib would, ``+`` a space.

    Raises :class:`Invalid` for a bad percent escape or bytes that are not UTF-8.
    """
    params: dict[str, list[str]] = {}
    for field in raw.split("&"):
        if not field:
            continue
        raw_key, _, raw_value = field.partition("=")
        # Reasons name the key as sent: decoded, it could put CR LF in a header.
        key = _unquote(raw_key, f"parameter name '{raw_key}'")
        params.setdefault(key, []).append(_unquote(raw_value, f"parameter '{raw_key}'"))
    return params


def _param(request: web.Request, key: str) -> str | None:
    query = request.get(_QUERY_KEY)
    if query is None:
        query = request[_QUERY_KEY] = parse_query(request.rel_url.raw_query_string)
    values = query.get(key, [])
    if len(values) > 1:
        raise Invalid(400, f"parameter '{key}' given more than once")
    return values[0] if values else None


def _name(request: web.Request, key: str) -> str:
    value = _param(request, key) or ""
    if not value:
        raise Invalid(400, f"missing parameter '{key}'")
    if len(value) > MAX_NAME:
        raise Invalid(400, f"parameter '{key}' is longer than {MAX_NAME} characters")
    if not value.isprintable():
        if any(unicodedata.category(char) == "Cc" for char in value):
            raise Invalid(400, f"parameter '{key}' has control characters")
        bad = next(char for char in value if not char.isprintable())
        raise Invalid(
            400, f"parameter '{key}' has a character that is not printable (U+{ord(bad):04X})"
        )
    return value


def _seconds(request: web.Request, key: str) -> float | None:
    raw = _param(request, key)
    if raw is None:
        return None
    if raw == "":
        raise Invalid(400, f"parameter '{key}' is empty: give a number of seconds or leave it out")
    if not _NUMBER.fullmatch(raw):
        raise Invalid(400, f"parameter '{key}' must be a number of seconds")
    value = float(raw)
    if not math.isfinite(value) or value < 0:
        raise Invalid(400, f"parameter '{key}' must be a finite number >= 0")
    if value > MAX_SECONDS:
        raise Invalid(400, f"parameter '{key}' must be at most {MAX_SECONDS:.0f} seconds")
    return value


def _ttl(request: web.Request) -> float | None:
    ttl = _seconds(request, "ttl")
    if ttl == 0:
        raise Invalid(400, "parameter 'ttl' must be > 0 (leave it out for the pool's expire)")
    return ttl


def _mode(request: web.Request) -> str | None:
    """The ``mode=`` asked (None: not given, the default mode)."""
    mode = _param(request, "mode")
    if mode is not None and mode not in MODES:
        raise Invalid(400, "parameter 'mode' must be 'shared' or 'exclusive'")
    return mode


def _token(request: web.Request, required: bool) -> str | None:
    token = _param(request, "lease")
    if token is None:
        if required:
            raise Invalid(400, "missing parameter 'lease'")
        return None
    # An empty token once released every lease of the host: refuse it.
    if not token:
        raise Invalid(400, "parameter 'lease' is empty: give a lease token or leave it out")
    if len(token) > MAX_NAME:
        raise Invalid(400, "parameter 'lease' is too long")
    return token


Handler = Callable[[web.Request, PoolSpec, str, LockBackend], Awaitable[web.Response]]


def _verb(verb: str, handler: Handler) -> Callable[[web.Request], Awaitable[web.Response]]:
    """Checks shared by every verb: method, host, pool, allow-list, backend errors."""

    async def endpoint(request: web.Request) -> web.Response:
        events = request.app[EVENTS_KEY]
        host = pool_name = None
        try:
            try:
                if request.method not in ("GET", "POST"):
                    raise Invalid(405, f"method {request.method} not allowed (use GET)")
                identity = request.get(auth.IDENTITY_KEY)
                if identity is None:
                    host = _name(request, "host")
                pool_name = _name(request, "pool")
                if identity is not None:
                    # Authentication is on: the proven identity is the host.
                    claimed = (
                        _name(request, "host") if _param(request, "host") is not None else None
                    )
                    host = auth.host_for(request, identity, claimed, pool_name, handler is _release)
                assert host is not None  # named on both paths above
                request[auth.HOST_KEY] = host
                spec = request.app[CONFIG_KEY].pool(pool_name)
                if spec is None:
                    spec = _draining(request, verb, pool_name)
                if spec.servers is not None and host not in spec.servers:
                    raise Invalid(403, f"host '{host}' is not in the servers list of '{pool_name}'")
                response = await handler(request, spec, host, request.app[BACKEND_KEY])
            except (Invalid, auth.Refused) as exc:
                known = pool_name if exc.status not in (400, 404) else None
                events.refused(known, host, exc.status, exc.reason)
                response = _for_legacy_client(request, _invalid(exc.status, exc.reason))
            except BackendUnavailable as exc:
                events.refused(pool_name, host, 503, str(exc))
                answer = _answer("UNAVAILABLE", 503, {"X-Distributex-Reason": str(exc)})
                response = _for_legacy_client(request, answer)
        except asyncio.CancelledError:
            events.request(verb, 499)  # the client hung up (nginx's number for it)
            raise
        events.request(verb, response.status)
        return response

    return endpoint


def _draining(request: web.Request, verb: str, pool_name: str) -> PoolSpec:
    """A pool that a reload removed: its holders may still release and renew."""
    spec = request.app[DRAINING_KEY].get(pool_name)
    if spec is None:
        raise Invalid(404, f"unknown pool '{pool_name}'")
    if verb not in ("release", "renew"):
        raise Invalid(
            404, f"pool '{pool_name}' was removed from the configuration (draining: release only)"
        )
    return spec


def _check_room(
    request: web.Request, spec: PoolSpec, host: str, backend: LockBackend
) -> auth.PoolShares | None:
    """Refuse (429) to give state to one more pool made on first use past ``max_pools``,
    or past the host's share of it; the shares to note the pool in (None: listed)."""
    config = request.app[CONFIG_KEY]
    if spec.name in config.pools:
        return None  # listed pools are the operator's own: never limited
    shares = request.app[auth.SECURITY_KEY].shares
    in_use = backend.pools_in_use()
    if spec.name in in_use:
        return shares
    shares.check(config, host, in_use)
    listed_in_use = len(config.pools.keys() & in_use) if config.pools else 0
    if len(in_use) - listed_in_use >= config.max_pools:
        raise Invalid(
            429,
            f"too many pools in use: {config.max_pools} pools made on first use "
            "already have holders or waiters (max_pools)",
        )
    return shares


async def _get(request: web.Request, spec: PoolSpec, host: str, backend: LockBackend) -> Any:
    ttl = _ttl(request)
    mode = _mode(request)
    shares = _check_room(request, spec, host, backend)
    lease = await backend.acquire(spec, host, ttl, mode or EXCLUSIVE)
    if lease is None:
        return _answer("NO")
    if shares is not None:
        shares.note(host, spec.name)
    request.app[EVENTS_KEY].granted(spec.name, host, lease.fence, 0.0)
    return _answer("YES", headers=_lease_headers(lease, mode))


async def _wait(request: web.Request, spec: PoolSpec, host: str, backend: LockBackend) -> Any:
    ttl = _ttl(request)
    timeout = _seconds(request, "timeout")
    mode = _mode(request)
    shares = _check_room(request, spec, host, backend)
    if shares is not None:
        shares.note(host, spec.name)  # it waits on the pool

    def connected() -> bool:
        transport = request.transport
        revoked = auth.REVOKED_KEY in request
        return transport is not None and not transport.is_closing() and not revoked

    loop = asyncio.get_running_loop()
    started = loop.time()
    config = request.app[CONFIG_KEY]
    security = request.app[auth.SECURITY_KEY]
    try:
        with security.waiters.parked(config, spec.name, host), security.tracked(request):
            lease = await backend.wait(spec, host, ttl, timeout, connected, mode or EXCLUSIVE)
    except asyncio.CancelledError:
        revoked = request.get(auth.REVOKED_KEY)
        task = asyncio.current_task()
        if revoked is None or task is None:
            raise  # a hang-up or a stop
        task.uncancel()  # left the queue as a hang-up does; the client is told why
        raise auth.Refused(403, revoked) from None
    events = request.app[EVENTS_KEY]
    if lease is None:
        if connected():
            events.timed_out(spec.name, host, loop.time() - started)
        else:
            events.queued()  # hung up: it left the queue
        return _answer("NO")
    events.granted(spec.name, host, lease.fence, loop.time() - started)
    return _answer("YES", headers=_lease_headers(lease, mode))


async def _release(request: web.Request, spec: PoolSpec, host: str, backend: LockBackend) -> Any:
    token = _token(request, required=False)
    released = await backend.release(spec, host, token)
    if token is not None and not released:
        request.app[EVENTS_KEY].lost(spec.name, host)
        return _answer(
            "GONE", 410, {"X-Distributex-Reason": "no such lease: expired, released or not yours"}
        )
    return _answer("OK")


async def _renew(request: web.Request, spec: PoolSpec, host: str, backend: LockBackend) -> Any:
    token = _token(request, required=True)
    assert token is not None
    lease = await backend.renew(spec, host, token, _ttl(request))
    if lease is None:
        request.app[EVENTS_KEY].lost(spec.name, host)
        return _answer(
            "GONE", 410, {"X-Distributex-Reason": "no such lease: expired, released or not yours"}
        )
    return _answer("OK", headers=_lease_headers(lease))


async def _unknown(request: web.Request) -> web.Response:
    reason = f"unknown verb '{request.path}' (use /get/, /wait/, /release/, /renew/)"
    return _for_legacy_client(request, _invalid(404, reason))


# The 0.7 client reads answers with Python 2's urllib2, which raises on any
# status but 2xx before the body is read (a traceback in cron mail, exit 1).
LEGACY_CLIENT_AGENT = "Python-urllib/2."


def _for_legacy_client(request: web.Request, response: web.Response) -> web.Response:
    """A refusal as the 0.7 client must see it: status 200, the word in the body.

    It is told apart by its ``User-Agent`` (``Python-urllib/2.x``): nothing
    else sends that, and it sends nothing else. The real status stays in
    ``X-Distributex-Status``; curl, the new client and monitoring keep
    getting 4xx and 503. (Only refusals are rewritten, here rather than in a
    middleware that every request would pay for.)
    """
    if request.headers.get("User-Agent", "").startswith(LEGACY_CLIENT_AGENT):
        response.headers["X-Distributex-Status"] = str(response.status)
        response.set_status(200)
    return response


def create_app(
    config: Config, backend: LockBackend, events: Events | None = None
) -> web.Application:
    """The aiohttp application serving ``config``'s pools from ``backend``."""
    app = web.Application()
    app[CONFIG_KEY] = config
    app[BACKEND_KEY] = backend
    app[EVENTS_KEY] = events or backend.events
    app[DRAINING_KEY] = {}
    auth.install(app, lambda: app[CONFIG_KEY])  # limits, authentication, audit
    verbs = {"get": _get, "wait": _wait, "release": _release, "renew": _renew}
    for name, handler in verbs.items():
        endpoint = _verb(name, handler)
        app.router.add_route("*", f"/{name}", endpoint)
        app.router.add_route("*", f"/{name}/", endpoint)

    # -- operator endpoints (read-only): /status, /status/events, /metrics, /healthz
    # and the dashboard at /. All of them are added here, in one place, so that an
    # authentication middleware can guard them as a group (ops.OPERATOR_PATHS).
    from distributex import ops

    ops.add_routes(app)
    # -- end of operator endpoints

    app.router.add_route("*", "/{tail:.*}", _unknown)
    return app
