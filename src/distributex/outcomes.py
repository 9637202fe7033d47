"""What the outcome of a verb answers, and what is noted of it on the way out.

Shared by the verbs answered in one go (:mod:`distributex.verbs`) and a
``/wait/`` answered when the backend wakes it
(:mod:`distributex.parkedwait`): the same events, counts and audit either way.
"""

from __future__ import annotations

import time

from aiohttp import web

from distributex import audit, auth
from distributex.appkeys import EVENTS_KEY
from distributex.backends.base import BackendUnavailable
from distributex.call import FORCED_KEY, HOST_KEY, IDENTITY_KEY, Answer, Call
from distributex.engine import Lease, PoolSpec
from distributex.refusal import Refused, for_legacy_client, refusal


def seconds_text(seconds: float) -> str:
    """Seconds exactly as held: never rounded up, so a client's deadline is not late."""
    if seconds.is_integer():
        return str(int(seconds))
    return repr(seconds)


def lease_headers(lease: Lease, mode: str | None = None) -> dict[str, str]:
    headers = {
        "X-Distributex-Fence": str(lease.fence),
        "X-Distributex-Lease": lease.token,
        "X-Distributex-TTL": seconds_text(lease.ttl),
    }
    if mode is not None:  # asked with mode=: the mode held (0.7 answers stay as they were)
        headers["X-Distributex-Mode"] = lease.hold.mode
    return headers


def waited(
    app: web.Application,
    call: Call,
    spec: PoolSpec,
    host: str,
    mode: str | None,
    started: float,
    lease: Lease | None,
) -> Answer:
    """The answer to a ``/wait/`` that got ``lease`` (None: timed out or hung up)."""
    events = app[EVENTS_KEY]
    if lease is None:
        if call.still_wanted():
            events.timed_out(spec.name, host, time.monotonic() - started)
        else:
            events.queued()  # hung up: it left the queue
        return Answer("NO")
    events.granted(spec.name, host, lease.fence, time.monotonic() - started)
    return Answer("YES", headers=lease_headers(lease, mode))


def failed(
    app: web.Application,
    call: Call,
    pool_name: str | None,
    host: str | None,
    exc: Refused | BackendUnavailable,
) -> Answer:
    """The answer to a refused request or an unavailable backend, noted as an event."""
    events = app[EVENTS_KEY]
    if isinstance(exc, Refused):
        known = pool_name if exc.status not in (400, 404) else None
        events.refused(known, host, exc.status, exc.reason)
        return refusal(call.headers, exc.status, exc.reason)
    events.refused(pool_name, host, 503, str(exc))
    unavailable = Answer("UNAVAILABLE", 503, {"X-Distributex-Reason": str(exc)})
    return for_legacy_client(call.headers, unavailable)


def noted(app: web.Application, verb: str, call: Call, answer: Answer) -> Answer:
    """The answer's ``X-Distributex-Host``, counts and audit line."""
    security = app[auth.SECURITY_KEY]
    identity = call.get(IDENTITY_KEY)
    host = call.get(HOST_KEY)
    if identity is not None and host is not None and answer.status == 200 and host.isascii():
        # The host the lease is held under, for a client that left ``host`` out
        # (ASCII only: header bytes are read as Latin-1; without it, no host is sent).
        answer.headers["X-Distributex-Host"] = host
    status = answer.real_status()
    if status >= 400 and status != 410 and status != 503:
        security.refusals[status] += 1
    elif call.get(FORCED_KEY) and status == 200:
        security.forced_releases += 1
    if security.guard.audit:
        audit.answered(call, verb, identity, answer)
    return answer
