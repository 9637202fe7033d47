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

The verbs are decided in :mod:`distributex.verbs`. The lean protocol of
:mod:`distributex.fastlane` serves them; this module is the aiohttp
application behind it, which serves the operator pages, and a verb on a
connection aiohttp took over (a request the lean protocol leaves to it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

from distributex import auth, ops, statusfeed, verbs
from distributex.appkeys import BACKEND_KEY, CONFIG_KEY, DRAINING_KEY, EVENTS_KEY
from distributex.backends.base import LockBackend
from distributex.call import VERB_PATHS, Answer, Call
from distributex.config import Config
from distributex.events import Events
from distributex.refusal import refused, web_response


def call_of(request: web.Request) -> Call:
    """The :class:`Call` an aiohttp request makes (in the task that serves it)."""
    task = asyncio.current_task()
    return Call(
        request.method,
        request.path,
        request.rel_url.raw_query_string,
        request.headers,
        request.transport,
        request.remote,
        reserved=getattr(request.protocol, "reserved", False),
        body_length=request.content_length if request.body_exists else 0,
        cancel=task.cancel if task is not None else None,
    )


def _endpoint(verb: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def endpoint(request: web.Request) -> web.Response:
        answer = await verbs.serve(request.app, verb, call_of(request))
        assert isinstance(answer, Answer)  # its calls are not parkable: waits await here
        return web_response(answer)

    return endpoint


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
    for path, verb in VERB_PATHS.items():
        app.router.add_route("*", path, _endpoint(verb))

    # Operator endpoints (read-only): /status, /status/events, /metrics, /healthz
    # and the dashboard at /; auth.STATUS_PATHS and auth.ALWAYS_OPEN name them.
    ops.add_routes(app)
    statusfeed.add_route(app)

    app.router.add_route("*", "/{tail:.*}", _unknown)
    return app
