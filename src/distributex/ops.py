"""Endpoints for operators: status, live status stream, metrics, health, dashboard.

=====================  ==========================================================
``GET /status``        JSON: every pool with its holders and waiters
                       (``?pool=P``: that pool only); schema in :mod:`distributex.status`
``GET /status/events`` the same document as server-sent events, sent on every change
``GET /metrics``       Prometheus text (404 with ``metrics: false``)
``GET /healthz``       ``200 OK`` when the backend answers, else ``503 UNAVAILABLE: reason``
``GET /``              the live dashboard (one HTML page, no outside assets)
=====================  ==========================================================

Which pools ``/status`` lists: every pool of the configuration file (also
idle ones), every pool made on first use that has holders or waiters as far
as this server knows, and pools a reload removed that still drain. With a
shared backend (sqlite, memcache, redis, etcd) a pool made on first use is
known to the servers that served it since they started: ask one of those, or
name it (``?pool=P`` reads its state from the store whoever made it).
Pools of the configuration are read from the store, so every server shows
the same holders and waiters for them.
"""

from __future__ import annotations

import asyncio
import json
import time
from importlib import resources
from typing import Any

from aiohttp import web

from distributex import auth, query
from distributex.appkeys import BACKEND_KEY, CONFIG_KEY, DRAINING_KEY, EVENTS_KEY
from distributex.backends.base import BackendUnavailable
from distributex.engine import PoolSpec
from distributex.refusal import Refused
from distributex.status import PoolStatus

HEALTH_TIMEOUT = 5.0
_JSON = "application/json"


def json_response(doc: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(doc, ensure_ascii=False).encode(), status=status, content_type=_JSON
    )


def shown_pools(app: web.Application, only: str | None) -> list[tuple[PoolSpec, bool, bool]]:
    """(spec, configured, draining) of the pools to show, configured ones first."""
    config = app[CONFIG_KEY]
    draining = app[DRAINING_KEY]
    if only is not None:
        spec = config.pools.get(only)
        if spec is not None:
            return [(spec, True, False)]
        if only in draining:
            return [(draining[only], False, True)]
        spec = config.pool(only)
        if spec is None:
            raise Refused(404, f"unknown pool '{only}'")
        return [(spec, False, False)]
    shown: list[tuple[PoolSpec, bool, bool]] = [
        (spec, True, False) for spec in config.pools.values()
    ]
    others = sorted(set(app[BACKEND_KEY].known_pools()) - config.pools.keys())
    for name in others:
        if name in draining:
            shown.append((draining[name], False, True))
        else:
            spec = config.pool(name)
            if spec is not None:
                shown.append((spec, False, False))
    for name in sorted(draining.keys() - set(others) - config.pools.keys()):
        shown.append((draining[name], False, True))
    return shown


async def read_status(app: web.Application, only: str | None = None) -> list[PoolStatus]:
    """The pools ``/status`` shows (raises Refused for an unknown ``only``)."""
    shown = shown_pools(app, only)
    pools = await app[BACKEND_KEY].status([spec for spec, _c, _d in shown])
    result = []
    draining = app[DRAINING_KEY]
    for (_spec, configured, is_draining), pool in zip(shown, pools, strict=True):
        pool.configured = configured
        pool.draining = is_draining
        idle = not pool.holders and not pool.waiters
        if is_draining and idle:
            draining.pop(pool.name, None)  # drained: the pool is gone now
        if idle and not configured and only is None:
            continue  # made on first use and idle again: it holds no state
        result.append(pool)
    return result


def status_document(app: web.Application, pools: list[PoolStatus]) -> dict[str, Any]:
    now = time.time()
    return {
        "time": round(now, 3),
        "backend": app[CONFIG_KEY].backend,
        "pools": [pool.to_json(now) for pool in pools],
    }


def requested_pool(request: web.Request) -> str | None:
    if query.param(request, "pool") is None:
        return None
    return query.name(request, "pool")


async def status(request: web.Request) -> web.Response:
    try:
        pools = await read_status(request.app, requested_pool(request))
    except Refused as exc:
        return json_response({"error": exc.reason}, exc.status)
    except BackendUnavailable as exc:
        return json_response({"error": str(exc)}, 503)
    return json_response(status_document(request.app, pools))


async def metrics(request: web.Request) -> web.Response:
    collector = request.app[EVENTS_KEY].metrics
    if collector is None:
        return web.Response(text="metrics are off (metrics: false)", status=404)
    try:
        pools = await read_status(request.app)
        collector.gauges.up = True
    except BackendUnavailable:
        pools = []
        collector.gauges.up = False
    from distributex.metrics import CONTENT_TYPE

    response = web.Response(body=collector.render(pools))
    response.headers["Content-Type"] = CONTENT_TYPE
    return response


async def healthz(request: web.Request) -> web.Response:
    try:
        async with asyncio.timeout(HEALTH_TIMEOUT):
            await request.app[BACKEND_KEY].check()
    except BackendUnavailable as exc:
        return _unhealthy(str(exc))
    except TimeoutError:
        return _unhealthy(f"the backend did not answer within {HEALTH_TIMEOUT:.0f} s")
    return web.Response(text="OK")


def _unhealthy(reason: str) -> web.Response:
    reason = " ".join(reason.split())  # one line, also in the header
    return web.Response(
        text=f"UNAVAILABLE: {reason}", status=503, headers={"X-Distributex-Reason": reason}
    )


_DASHBOARD: bytes | None = None


async def dashboard(request: web.Request) -> web.Response:
    global _DASHBOARD
    if _DASHBOARD is None:
        _DASHBOARD = resources.files("distributex").joinpath("dashboard.html").read_bytes()
    return web.Response(
        body=_DASHBOARD,
        content_type="text/html",
        charset="utf-8",
        headers={"Cache-Control": "no-cache"},
    )


class _SecurityCounters:
    """The authentication layer's counters (auth.Security), in the same exposition."""

    def __init__(self, security: Any) -> None:
        self.security = security

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily

        yield CounterMetricFamily(
            "distributex_forced_releases",
            "Releases of another host's lock by an admin",
            value=self.security.forced_releases,
        )
        refused = CounterMetricFamily(
            "distributex_request_refusals",
            "Requests refused before a verb ran (authentication or a limit), by status",
            labels=["status"],
        )
        for status, count in sorted(self.security.refusals.items()):
            refused.add_metric([str(status)], count)
        yield refused


def add_routes(app: web.Application) -> None:
    """The operator endpoints (all GET; HEAD too)."""
    collector = app[EVENTS_KEY].metrics
    if collector is not None and auth.SECURITY_KEY in app:
        collector.registry.register(_SecurityCounters(app[auth.SECURITY_KEY]))
    app.router.add_get("/", dashboard)
    app.router.add_get("/status", status)
    app.router.add_get("/status/", status)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
