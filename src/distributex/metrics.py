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

from bisect import bisect_left
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

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


class _PoolCounts:
    """What happened on one pool label: plain numbers, read when ``/metrics`` is scraped."""

    __slots__ = ("buckets", "expiries", "grants", "lost", "releases", "timeouts", "waited")

    def __init__(self) -> None:
        self.grants = self.releases = self.expiries = self.lost = self.timeouts = 0
        self.buckets = [0] * (len(WAIT_BUCKETS) + 1)  # waits per bucket, the last +Inf
        self.waited = 0.0


class Metrics:
    """The server's metrics, in a registry of its own (one per server, not the global one).

    The lock events are counted in plain numbers and turned into metric
    families by ``prometheus_client`` at scrape time (the same text as its
    ``Counter`` and ``Histogram`` objects wrote): those take a lock on every
    increment, and the four counts of a hand-off (grant, wait time, release,
    two requests) cost 3.0 µs through them, 0.8 µs here (2026-12-05, 100,000
    in a loop). Every count moves in the event loop's thread, where
    ``/metrics`` is also rendered.
    """

    def __init__(self, listed_pools: Iterable[str] = ()) -> None:
        # The *_created series double the text and tell nothing a scraper needs.
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        self.listed = set(listed_pools)
        self._labels: dict[str, str] = {}
        self._by_label: dict[str, _PoolCounts] = {}
        self._of_pool: dict[str, _PoolCounts] = {}
        self._refusals: dict[tuple[str, str], int] = {}
        self._requests: dict[tuple[str, int], int] = {}
        self.registry.register(_Families(self))
        self.gauges = _PoolGauges()
        self.registry.register(self.gauges)

    def set_listed(self, pools: Iterable[str]) -> None:
        """The pools of the configuration (after a reload): always labelled by name."""
        self.listed = set(pools)
        for pool in self.listed:
            if self._labels.get(pool) == OTHER_POOLS:
                del self._labels[pool]
                self._of_pool.pop(pool, None)

    def _label(self, pool: str) -> str:
        label = self._labels.get(pool)
        if label is None:
            if pool in self.listed or len(self._labels) < MAX_POOL_LABELS:
                label = pool
            else:
                label = OTHER_POOLS
            self._labels[pool] = label
        return label

    def _counts(self, pool: str) -> _PoolCounts:
        counts = self._of_pool.get(pool)
        if counts is None:
            label = self._label(pool)
            counts = self._by_label.get(label)
            if counts is None:
                counts = self._by_label[label] = _PoolCounts()
            if label != OTHER_POOLS or len(self._of_pool) < 2 * MAX_POOL_LABELS:
                self._of_pool[pool] = counts
        return counts

    def granted(self, pool: str, waited: float) -> None:
        counts = self._counts(pool)
        counts.grants += 1
        counts.buckets[bisect_left(WAIT_BUCKETS, waited)] += 1  # the first bound >= waited
        counts.waited += waited

    def released(self, pool: str) -> None:
        self._counts(pool).releases += 1

    def expired(self, pool: str) -> None:
        self._counts(pool).expiries += 1

    def lost(self, pool: str) -> None:
        self._counts(pool).lost += 1

    def timed_out(self, pool: str) -> None:
        self._counts(pool).timeouts += 1

    def refused(self, pool: str | None, status: int) -> None:
        key = ("" if pool is None else self._label(pool), REASONS.get(status, "other"))
        self._refusals[key] = self._refusals.get(key, 0) + 1

    def request(self, verb: str, status: int) -> None:
        key = (verb, status)
        self._requests[key] = self._requests.get(key, 0) + 1

    def render(self, pools: list[PoolStatus]) -> bytes:
        """The exposition text, with the gauges taken from ``pools``."""
        self.gauges.pools = [p for p in pools if self._label(p.name) != OTHER_POOLS]
        return generate_latest(self.registry)


class _Families:
    """The counted lock events as metric families, made at each scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        metrics = self._metrics
        pools = metrics._by_label
        for name, doc, field in _POOL_COUNTERS:
            family = CounterMetricFamily(name, doc, labels=["pool"])
            for label, counts in pools.items():
                family.add_metric([label], getattr(counts, field))
            yield family
        refusals = CounterMetricFamily(
            "distributex_refusals", "INVALID and UNAVAILABLE answers", labels=["pool", "reason"]
        )
        for (label, reason), count in metrics._refusals.items():
            refusals.add_metric([label, reason], count)
        yield refusals
        waited = HistogramMetricFamily(
            "distributex_wait_seconds", "Seconds from request to YES", labels=["pool"]
        )
        for label, counts in pools.items():
            waited.add_metric([label], list(_cumulative(counts.buckets)), counts.waited)
        yield waited
        requests = CounterMetricFamily(
            "distributex_requests", "Lock verbs answered", labels=["verb", "status"]
        )
        for (verb, status), count in metrics._requests.items():
            requests.add_metric([verb, str(status)], count)
        yield requests


_POOL_COUNTERS = (
    ("distributex_grants", "YES answers", "grants"),
    ("distributex_releases", "Releases", "releases"),
    ("distributex_expiries", "Leases run out", "expiries"),
    ("distributex_lost_leases", "Renewals or releases of a gone lease", "lost"),
    ("distributex_timeouts", "Waits timed out", "timeouts"),
)
_BOUNDS = [floatToGoString(bound) for bound in WAIT_BUCKETS] + ["+Inf"]


def _cumulative(buckets: list[int]) -> Iterator[tuple[str, float]]:
    total = 0
    for bound, count in zip(_BOUNDS, buckets, strict=True):
        total += count
        yield bound, total
