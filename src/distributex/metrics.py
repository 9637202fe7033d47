"""Prometheus metrics (``GET /metrics``), through the official ``prometheus-client``.

Counters move as events happen (see :mod:`distributex.events`); the holder
and waiter gauges are read from the backend's status when ``/metrics`` is
scraped, so they are right whichever server of a cluster changed the state.

==========================================  =======================================
``distributex_grants_total{pool}``          YES answers (``/get/`` and ``/wait/``)
``distributex_releases_total{pool}``        holds or leases ended by a release
``distributex_expiries_total{pool}``        leases that ran out (on this server's steps)
``distributex_lost_leases_total{pool}``     renewals or releases of a lease already gone (GONE)
``distributex_timeouts_total{pool}``        ``/wait/`` that ran out of ``timeout`` (NO)
``distributex_refusals_total{pool,reason}`` INVALID and UNAVAILABLE answers
``distributex_holders{pool}``               holders now
``distributex_waiters{pool}``               waiting hosts now
``distributex_maxlocks{pool}``              slots of the pool
``distributex_wait_seconds{pool}``          histogram: time from request to YES
``distributex_requests_total{verb,status}`` lock verbs answered, by HTTP status (499: hung up)
``distributex_backend_up``                  1 if the backend answered the last scrape
``distributex_connections``                 open connections now
``distributex_connections_evicted_total``   closed to make room (idle, TLS handshake, stream)
``distributex_connections_refused_total``   closed at once: a cap reached, nothing to close
``distributex_status_streams``              ``/status/events`` viewers now
==========================================  =======================================

``reason`` is one of ``bad_request`` (400), ``forbidden`` (403),
``unknown`` (404: unknown pool or verb), ``method`` (405), ``too_many_pools``
(429), ``unavailable`` (503), or ``other``.

The connection numbers come from :mod:`distributex.fairness`, registered by
the server.

A pool label is the pool's name for pools in the configuration file and
for the first ``MAX_POOL_LABELS`` pools made on first use; later ones are
counted under ``pool="_other"``, so a client inventing names cannot grow the
metrics without bound. Refusals that name no usable pool (an unknown pool, a
bad parameter) have ``pool=""``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from distributex.status import PoolStatus

MAX_POOL_LABELS = 1000
OTHER_POOLS = "_other"
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800, 3600)
REASONS = {
    400: "bad_request",
    403: "forbidden",
    404: "unknown",
    405: "method",
    429: "too_many_pools",
    503: "unavailable",
}
CONTENT_TYPE = CONTENT_TYPE_LATEST


class _PoolGauges:
    """Holders, waiters and slots per pool, from the latest status read at scrape time."""

    def __init__(self) -> None:
        self.pools: list[PoolStatus] = []
        self.up = True

    def collect(self) -> Iterator[GaugeMetricFamily]:
        holders = GaugeMetricFamily("distributex_holders", "Holders now", labels=["pool"])
        waiters = GaugeMetricFamily("distributex_waiters", "Waiting hosts now", labels=["pool"])
        slots = GaugeMetricFamily("distributex_maxlocks", "Slots of the pool", labels=["pool"])
        for pool in self.pools:
            holders.add_metric([pool.name], len(pool.holders))
            # Hosts listed, and the waits beyond a long queue's listed head.
            waiters.add_metric([pool.name], len(pool.waiters) + pool.more_waiting)
            slots.add_metric([pool.name], pool.maxlocks)
        yield holders
        yield waiters
        yield slots
        yield GaugeMetricFamily(
            "distributex_backend_up", "1 if the backend answered the last scrape", value=self.up
        )


class Metrics:
    """The server's metrics, in a registry of its own (one per server, not the global one)."""

    def __init__(self, listed_pools: Iterable[str] = ()) -> None:
        # The *_created series double the text and tell nothing a scraper needs.
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        self.listed = set(listed_pools)
        self._labels: dict[str, str] = {}
        self._pool_children: dict[str, tuple[Any, ...]] = {}
        self._requests: dict[tuple[str, int], Any] = {}
        r = self.registry
        self._grants = Counter("distributex_grants", "YES answers", ["pool"], registry=r)
        self._releases = Counter("distributex_releases", "Releases", ["pool"], registry=r)
        self._expiries = Counter("distributex_expiries", "Leases run out", ["pool"], registry=r)
        self._lost = Counter(
            "distributex_lost_leases", "Renewals or releases of a gone lease", ["pool"], registry=r
        )
        self._timeouts = Counter("distributex_timeouts", "Waits timed out", ["pool"], registry=r)
        self._refusals = Counter(
            "distributex_refusals",
            "INVALID and UNAVAILABLE answers",
            ["pool", "reason"],
            registry=r,
        )
        self._waited = Histogram(
            "distributex_wait_seconds",
            "Seconds from request to YES",
            ["pool"],
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self._verbs = Counter(
            "distributex_requests", "Lock verbs answered", ["verb", "status"], registry=r
        )
        self.gauges = _PoolGauges()
        r.register(self.gauges)

    def set_listed(self, pools: Iterable[str]) -> None:
        """The pools of the configuration (after a reload): always labelled by name."""
        self.listed = set(pools)
        for pool in self.listed:
            if self._labels.get(pool) == OTHER_POOLS:
                del self._labels[pool]
                self._pool_children.pop(pool, None)

    def _label(self, pool: str) -> str:
        label = self._labels.get(pool)
        if label is None:
            if pool in self.listed or len(self._labels) < MAX_POOL_LABELS:
                label = pool
            else:
                label = OTHER_POOLS
            self._labels[pool] = label
        return label

    def _children(self, pool: str) -> tuple[Any, ...]:
        # labels() takes a lock and builds a tuple each call; a grant should not.
        children = self._pool_children.get(pool)
        if children is None:
            label = self._label(pool)
            children = (
                self._grants.labels(label),
                self._releases.labels(label),
                self._expiries.labels(label),
                self._lost.labels(label),
                self._timeouts.labels(label),
                self._waited.labels(label),
            )
            if label != OTHER_POOLS or len(self._pool_children) < 2 * MAX_POOL_LABELS:
                self._pool_children[pool] = children
        return children

    def granted(self, pool: str, waited: float) -> None:
        children = self._children(pool)
        children[0].inc()
        children[5].observe(waited)

    def released(self, pool: str) -> None:
        self._children(pool)[1].inc()

    def expired(self, pool: str) -> None:
        self._children(pool)[2].inc()

    def lost(self, pool: str) -> None:
        self._children(pool)[3].inc()

    def timed_out(self, pool: str) -> None:
        self._children(pool)[4].inc()

    def refused(self, pool: str | None, status: int) -> None:
        label = "" if pool is None else self._label(pool)
        self._refusals.labels(label, REASONS.get(status, "other")).inc()

    def request(self, verb: str, status: int) -> None:
        child = self._requests.get((verb, status))
        if child is None:
            child = self._requests[(verb, status)] = self._verbs.labels(verb, str(status))
        child.inc()

    def render(self, pools: list[PoolStatus]) -> bytes:
        """The exposition text, with the gauges taken from ``pools``."""
        self.gauges.pools = [p for p in pools if self._label(p.name) != OTHER_POOLS]
        return generate_latest(self.registry)
