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
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from distributex import auth, ops, query, statusfeed
from distributex.appkeys import BACKEND_KEY, CONFIG_KEY, DRAINING_KEY, EVENTS_KEY
from distributex.backends.base import BackendUnavailable, LockBackend
from distributex.config import Config
from distributex.engine import EXCLUSIVE, Lease, PoolSpec
from distributex.events import Events
from distributex.refusal import Refused, answer, for_legacy_client, refused

log = logging.getLogger("distributex.http")


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


Handler = Callable[[web.Request, PoolSpec, str, LockBackend], Awaitable[web.Response]]


def _verb(verb: str, handler: Handler) -> Callable[[web.Request], Awaitable[web.Response]]:
    """Checks shared by every verb: method, host, pool, allow-list, backend errors."""

    async def endpoint(request: web.Request) -> web.Response:
        events = request.app[EVENTS_KEY]
        host = pool_name = None
        try:
            try:
                if request.method not in ("GET", "POST"):
                    raise Refused(405, f"method {request.method} not allowed (use GET)")
                identity = request.get(auth.IDENTITY_KEY)
                if identity is None:
                    host = query.name(request, "host")
                pool_name = query.name(request, "pool")
                if identity is not None:
                    # Authentication is on: the proven identity is the host.
                    claimed = (
                        query.name(request, "host")
                        if query.param(request, "host") is not None
                        else None
                    )
                    host = auth.host_for(request, identity, claimed, pool_name, handler is _release)
                assert host is not None  # named on both paths above
                request[auth.HOST_KEY] = host
                spec = request.app[CONFIG_KEY].pool(pool_name)
                if spec is None:
                    spec = _draining(request, verb, pool_name)
                if spec.servers is not None and host not in spec.servers:
                    raise Refused(403, f"host '{host}' is not in the servers list of '{pool_name}'")
                response = await handler(request, spec, host, request.app[BACKEND_KEY])
            except Refused as exc:
                known = pool_name if exc.status not in (400, 404) else None
                events.refused(known, host, exc.status, exc.reason)
                response = refused(request, exc.status, exc.reason)
            except BackendUnavailable as exc:
                events.refused(pool_name, host, 503, str(exc))
                unavailable = answer("UNAVAILABLE", 503, {"X-Distributex-Reason": str(exc)})
                response = for_legacy_client(request, unavailable)
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
        raise Refused(404, f"unknown pool '{pool_name}'")
    if verb not in ("release", "renew"):
        raise Refused(
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
        raise Refused(
            429,
            f"too many pools in use: {config.max_pools} pools made on first use "
            "already have holders or waiters (max_pools)",
        )
    return shares


async def _get(request: web.Request, spec: PoolSpec, host: str, backend: LockBackend) -> Any:
    ttl = query.ttl(request)
    mode = query.mode(request)
    shares = _check_room(request, spec, host, backend)
    lease = await backend.acquire(spec, host, ttl, mode or EXCLUSIVE)
    if lease is None:
        return answer("NO")
    if shares is not None:
        shares.note(host, spec.name)
    request.app[EVENTS_KEY].granted(spec.name, host, lease.fence, 0.0)
    return answer("YES", headers=_lease_headers(lease, mode))


async def _wait(request: web.Request, spec: PoolSpec, host: str, backend: LockBackend) -> Any:
    ttl = query.ttl(request)
    timeout = query.seconds(request, "timeout")
    mode = query.mode(request)
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
        raise Refused(403, revoked) from None
    events = request.app[EVENTS_KEY]
    if lease is None:
        if connected():
            events.timed_out(spec.name, host, loop.time() - started)
        else:
            events.queued()  # hung up: it left the queue
        return answer("NO")
    events.granted(spec.name, host, lease.fence, loop.time() - started)
    return answer("YES", headers=_lease_headers(lease, mode))


async def _release(request: web.Request, spec: PoolSpec, host: str, backend: LockBackend) -> Any:
    token = query.token(request, required=False)
    released = await backend.release(spec, host, token)
    if token is not None and not released:
        request.app[EVENTS_KEY].lost(spec.name, host)
        return answer(
            "GONE", 410, {"X-Distributex-Reason": "no such lease: expired, released or not yours"}
        )
    return answer("OK")


async def _renew(request: web.Request, spec: PoolSpec, host: str, backend: LockBackend) -> Any:
    token = query.token(request, required=True)
    assert token is not None
    lease = await backend.renew(spec, host, token, query.ttl(request))
    if lease is None:
        request.app[EVENTS_KEY].lost(spec.name, host)
        return answer(
            "GONE", 410, {"X-Distributex-Reason": "no such lease: expired, released or not yours"}
        )
    return answer("OK", headers=_lease_headers(lease))


async def _unknown(request: web.Request) -> web.Response:
    reason = f"unknown verb '{request.path}' (use /get/, /wait/, /release/, /renew/)"
    return refused(request, 404, reason)


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

    # Operator endpoints (read-only): /status, /status/events, /metrics, /healthz
    # and the dashboard at /; auth.STATUS_PATHS and auth.ALWAYS_OPEN name them.
    ops.add_routes(app)
    statusfeed.add_route(app)

    app.router.add_route("*", "/{tail:.*}", _unknown)
    return app
