"""The lock verbs: ``/get/``, ``/wait/``, ``/release/``, ``/renew/`` on a :class:`Call`.

What a verb request goes through, in order, whichever HTTP server read it
(see :mod:`distributex.httpapi` for the answers and their meaning):

1. request limits and authentication (:mod:`distributex.auth`): a body
   without a length (411) or too long (413) closes the connection;
2. a place beyond the connection cap serves one ``/renew/`` or
   ``/release/`` only, and a proven identity's parked ``/wait/`` requests are
   capped (:mod:`distributex.fairness`);
3. the verb: method, ``host`` and ``pool``, the pool's allow-list, the
   backend;
4. the answer's audit line, counts, and ``X-Distributex-Host``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from distributex import audit, auth, fairness, outcomes, query
from distributex.appkeys import BACKEND_KEY, CONFIG_KEY, DRAINING_KEY, EVENTS_KEY
from distributex.backends.base import BackendUnavailable, LockBackend, ParkingBackend
from distributex.call import HOST_KEY, IDENTITY_KEY, POOL_KEY, REVOKED_KEY, Answer, Call
from distributex.engine import EXCLUSIVE, PoolSpec
from distributex.limits import PoolShares, check_body
from distributex.parkedwait import ParkedWait
from distributex.refusal import Refused, for_legacy_client, refusal

NO_SUCH_LEASE = "no such lease: expired, released or not yours"


async def serve(app: web.Application, verb: str, call: Call) -> Answer | ParkedWait:
    """The answer to ``call``, a request for ``verb`` (one of :data:`~distributex.call.VERBS`);
    a :class:`ParkedWait` only for a ``call.parkable`` one."""
    security = app[auth.SECURITY_KEY]
    guard = security.guard
    identity = None
    try:
        check_body(call.body_length, guard.config)
        if guard.enabled:
            identity = call[IDENTITY_KEY] = guard.authenticate(call)
    except Refused as exc:
        security.refusals[exc.status] += 1
        if guard.audit:
            who = call.get(IDENTITY_KEY) or exc.who
            audit.refused_call(call, who, exc.status, exc.reason)
        refused = refusal(call.headers, exc.status, exc.reason)
        refused.close = exc.status in (411, 413)  # the body was not read
        return refused
    answer: Answer | ParkedWait
    if call.reserved:
        answer = await _on_reserved_place(app, verb, call)
    elif verb == "wait" and identity is not None:
        answer = await _within_identity_share(app, identity.name, call)
    else:
        answer = await _answer(app, verb, call)
    if isinstance(answer, ParkedWait):
        return answer  # noted when it is answered
    return outcomes.noted(app, verb, call, answer)


async def _on_reserved_place(app: web.Application, verb: str, call: Call) -> Answer:
    """One request on a place beyond the cap: a renewal or release, else 503; then close."""
    answer: Answer | ParkedWait
    if verb in ("renew", "release"):
        answer = await _answer(app, verb, call)
        assert isinstance(answer, Answer)  # only a /wait/ parks
    else:
        answer = for_legacy_client(call.headers, fairness.server_full())
    answer.close = True
    return answer


async def _within_identity_share(
    app: web.Application, name: str, call: Call
) -> Answer | ParkedWait:
    """A ``/wait/`` of a proven identity, within its share of long-lived requests."""
    requests = app[fairness.IDENTITY_REQUESTS_KEY]
    if not requests.enter(name):
        return refusal(call.headers, 429, requests.too_many(name))
    try:
        answer = await _answer(app, "wait", call)
    except BaseException:
        requests.leave(name)
        raise
    if not isinstance(answer, ParkedWait):
        requests.leave(name)  # (a parked one leaves when it is answered)
    return answer


async def _answer(app: web.Application, verb: str, call: Call) -> Answer | ParkedWait:
    """Checks shared by every verb (method, host, pool, allow-list), the verb, its errors."""
    events = app[EVENTS_KEY]
    host = pool_name = None
    try:
        try:
            if call.method not in ("GET", "POST"):
                raise Refused(405, f"method {call.method} not allowed (use GET)")
            identity = call.get(IDENTITY_KEY)
            if identity is None:
                host = query.name(call, "host")
            pool_name = call[POOL_KEY] = query.name(call, "pool")
            if identity is not None:
                # Authentication is on: the proven identity is the host.
                claimed = (
                    query.name(call, "host") if query.param(call, "host") is not None else None
                )
                host = auth.host_for(call, identity, claimed, pool_name, verb == "release")
            assert host is not None  # named on both paths above
            call[HOST_KEY] = host
            spec = app[CONFIG_KEY].pool(pool_name)
            if spec is None:
                spec = _draining(app, verb, pool_name)
            if spec.servers is not None and host not in spec.servers:
                raise Refused(403, f"host '{host}' is not in the servers list of '{pool_name}'")
            answer = await _HANDLERS[verb](app, call, spec, host, app[BACKEND_KEY])
        except (Refused, BackendUnavailable) as exc:
            answer = outcomes.failed(app, call, pool_name, host, exc)
    except asyncio.CancelledError:
        events.request(verb, 499)  # the client hung up (nginx's number for it)
        raise
    if isinstance(answer, ParkedWait):
        return answer  # counted when it is answered
    events.request(verb, answer.status)
    return answer


def _draining(app: web.Application, verb: str, pool_name: str) -> PoolSpec:
    """A pool that a reload removed: its holders may still release and renew."""
    spec = app[DRAINING_KEY].get(pool_name)
    if spec is None:
        raise Refused(404, f"unknown pool '{pool_name}'")
    if verb not in ("release", "renew"):
        raise Refused(
            404, f"pool '{pool_name}' was removed from the configuration (draining: release only)"
        )
    return spec


def _check_room(
    app: web.Application, spec: PoolSpec, host: str, backend: LockBackend
) -> PoolShares | None:
    """Refuse (429) to give state to one more pool made on first use past ``max_pools``,
    or past the host's share of it; the shares to note the pool in (None: listed)."""
    config = app[CONFIG_KEY]
    if spec.name in config.pools:
        return None  # listed pools are the operator's own: never limited
    shares = app[auth.SECURITY_KEY].shares
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


async def _get(
    app: web.Application, call: Call, spec: PoolSpec, host: str, backend: LockBackend
) -> Answer:
    ttl = query.ttl(call)
    mode = query.mode(call)
    shares = _check_room(app, spec, host, backend)
    lease = await backend.acquire(spec, host, ttl, mode or EXCLUSIVE)
    if lease is None:
        return Answer("NO")
    if shares is not None:
        shares.note(host, spec.name)
    app[EVENTS_KEY].granted(spec.name, host, lease.fence, 0.0)
    return Answer("YES", headers=outcomes.lease_headers(lease, mode))


async def _wait(
    app: web.Application, call: Call, spec: PoolSpec, host: str, backend: LockBackend
) -> Answer | ParkedWait:
    ttl = query.ttl(call)
    timeout = query.seconds(call, "timeout")
    mode = query.mode(call)
    query.forget(call)  # read: a parked request does not keep it
    shares = _check_room(app, spec, host, backend)
    if shares is not None:
        shares.note(host, spec.name)  # it waits on the pool
    started = time.monotonic()
    security = app[auth.SECURITY_KEY]
    security.waiters.enter(app[CONFIG_KEY], spec.name, host)
    if call.parkable and isinstance(backend, ParkingBackend):
        return ParkedWait(app, call, spec, host, mode, started).park(backend, ttl, timeout)
    try:
        with security.tracked(call):
            lease = await backend.wait(
                spec, host, ttl, timeout, call.still_wanted, mode or EXCLUSIVE
            )
    except asyncio.CancelledError:
        revoked = call.get(REVOKED_KEY)
        if revoked is None:
            raise  # a hang-up or a stop
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()  # left the queue as a hang-up does; the client is told why
        raise Refused(403, revoked) from None
    finally:
        security.waiters.leave(spec.name, host)
    return outcomes.waited(app, call, spec, host, mode, started, lease)


async def _release(
    app: web.Application, call: Call, spec: PoolSpec, host: str, backend: LockBackend
) -> Answer:
    token = query.token(call, required=False)
    released = await backend.release(spec, host, token)
    if token is not None and not released:
        app[EVENTS_KEY].lost(spec.name, host)
        return Answer("GONE", 410, {"X-Distributex-Reason": NO_SUCH_LEASE})
    return Answer("OK")


async def _renew(
    app: web.Application, call: Call, spec: PoolSpec, host: str, backend: LockBackend
) -> Answer:
    token = query.token(call, required=True)
    assert token is not None
    lease = await backend.renew(spec, host, token, query.ttl(call))
    if lease is None:
        app[EVENTS_KEY].lost(spec.name, host)
        return Answer("GONE", 410, {"X-Distributex-Reason": NO_SUCH_LEASE})
    return Answer("OK", headers=outcomes.lease_headers(lease))


Handler = Callable[
    [web.Application, Call, PoolSpec, str, LockBackend], Awaitable[Answer | ParkedWait]
]
_HANDLERS: dict[str, Handler] = {"get": _get, "wait": _wait, "release": _release, "renew": _renew}
