"""No one client starves the others: the connection table, and caps per peer and identity.

The server caps open connections (``max_connections``). One client must not
be able to fill that cap and lock everyone else out, nor cost a holder its
lease by keeping its ``/renew/`` from being accepted. So:

* Connections that cost nobody anything when closed are *evictable*: an idle
  kept-alive connection, one still in its TLS handshake (or not made yet),
  and a ``/status/events`` stream (the viewer reconnects by itself). When
  the cap is reached a new connection closes one: the oldest idle one, else
  the oldest handshake, else the oldest stream. Only a request in progress
  (a parked ``/wait/``, a verb being answered) is never closed; with nothing
  evictable the newcomer is closed at once.
* One peer address holds at most ``max_connections_per_peer`` connections
  (default: half the cap). Past it, its new connection closes that peer's own
  oldest evictable one, else it is closed: a peer can never take the whole cap.
* With nothing to close (every connection a request in progress, each client
  within its caps) a new connection may still take one of :data:`RESERVE`
  places beyond the cap (one per peer address) for one ``/renew/`` or
  ``/release/``: a holder keeps its lease. Any other request there answers
  ``503 UNAVAILABLE`` with the reason, and the connection closes after one
  answer either way.
* One proven identity has at most ``max_requests_per_identity`` long-lived
  requests (parked ``/wait/`` and status streams) at once (default: half the
  cap); one more answers ``429 INVALID`` with the reason. Without
  authentication (or on ``status_public`` pages) there is no identity, and the
  per-peer cap applies.

The checks run when a connection is accepted and on the long-lived paths
only: a ``/get/`` or ``/release/`` pays an attribute and a set lookup (0.2 µs).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Protocol

from aiohttp import web

from distributex.appkeys import CONFIG_KEY
from distributex.call import IDENTITY_KEY, VERB_PATHS, Answer
from distributex.config import Config
from distributex.refusal import for_legacy_client, header_text, refused, web_response

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

# Pages whose requests may last, counted against the identity's cap here (a
# parked /wait/ counts itself: distributex.verbs).
LONG_LIVED = frozenset(("/status/events",))
# Places beyond the cap, for one renewal or release each (distributex.verbs serves them).
RESERVE = 8


def share(limit: int, configured: int) -> int:
    """A per-peer or per-identity cap: ``configured``, or (0) half the connection cap."""
    return configured if configured > 0 else max(1, limit // 2)


class Evictable(Protocol):
    """What the table needs of a connection (``distributex.transport.Connection``)."""

    peer: str
    pending: bool  # accepted, TLS handshake (or the protocol) not done yet
    streaming: bool  # serves a /status/events stream
    reserved: bool  # in a place beyond the cap: one renewal or release

    def idle(self) -> bool: ...

    def evict(self) -> None: ...


def _rank(conn: Evictable) -> int:
    """The order in which connections are closed to make room (lower first; 3: never)."""
    if conn.pending:
        return 1
    if conn.idle():
        return 0
    return 2 if conn.streaming else 3


class ConnectionTable:
    """The open connections, oldest first, with their count per peer address."""

    def __init__(self, limit: int, per_peer: Callable[[], int] = lambda: 0) -> None:
        self.limit = limit
        self._per_peer = per_peer  # the setting in force (a reload may change it)
        self.open: dict[Evictable, None] = {}
        self.peers: Counter[str] = Counter()
        self.reserved: Counter[str] = Counter()  # places beyond the cap, by peer
        self.evicted = 0  # closed to make room, ever
        self.refused = 0  # closed at once, ever

    @property
    def per_peer(self) -> int:
        return share(self.limit, self._per_peer())

    def full(self) -> bool:
        return len(self.open) >= self.limit

    def add(self, conn: Evictable) -> None:
        self.open[conn] = None
        self.peers[conn.peer] += 1
        if conn.reserved:
            self.reserved[conn.peer] += 1

    def forget(self, conn: Evictable) -> None:
        """``conn`` is closed (or closing): no longer counted. Idempotent."""
        if self.open.pop(conn, False) is None:
            _less(self.peers, conn.peer)
            if conn.reserved:
                _less(self.reserved, conn.peer)

    def close(self, conn: Evictable) -> None:
        self.forget(conn)
        conn.evict()

    def victim(self, peer: str | None = None) -> Evictable | None:
        """The connection to close to make room: of ``peer`` only if given; None if none."""
        best: Evictable | None = None
        best_rank = 3
        for conn in self.open:
            if (peer is not None and conn.peer != peer) or conn.reserved:
                continue  # a reserved place serves its one request
            rank = _rank(conn)
            if rank < best_rank:
                best, best_rank = conn, rank
                if rank == 0:
                    break  # the oldest idle one: nothing ranks before it
        return best

    def room_for(self, peer: str) -> tuple[bool, Evictable | None]:
        """Whether a new connection from ``peer`` may stay, and whom to close for it."""
        if self.peers[peer] >= self.per_peer:
            victim = self.victim(peer)
            return victim is not None, victim
        if self.full():
            victim = self.victim()
            return victim is not None, victim
        return True, None

    def may_reserve(self, peer: str) -> bool:
        """Whether ``peer`` may take a place beyond the cap (for one renewal or release)."""
        return not self.reserved[peer] and sum(self.reserved.values()) < RESERVE


class ConnectionMetrics:
    """The table's numbers for ``/metrics`` (a ``prometheus_client`` collector)."""

    def __init__(self, table: ConnectionTable, streams: Callable[[], int]) -> None:
        self.table = table
        self.streams = streams

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        table = self.table
        yield GaugeMetricFamily("distributex_connections", "Open now", value=len(table.open))
        yield CounterMetricFamily(
            "distributex_connections_evicted",
            "Connections closed to make room (idle, in a TLS handshake, status streams)",
            value=table.evicted,
        )
        yield CounterMetricFamily(
            "distributex_connections_refused",
            "New connections closed at once: a cap reached and nothing to close",
            value=table.refused,
        )
        yield GaugeMetricFamily(
            "distributex_status_streams", "/status/events viewers", value=self.streams()
        )


def _less(counter: Counter[str], key: str) -> None:
    left = counter[key] - 1
    if left:
        counter[key] = left
    else:
        del counter[key]


class IdentityRequests:
    """Long-lived requests in progress per proven identity, and their cap."""

    def __init__(self, get_config: Callable[[], Config], limit: Callable[[], int]) -> None:
        self._get_config = get_config
        self._limit = limit
        self.counts: Counter[str] = Counter()

    def cap(self) -> int:
        return share(self._limit(), self._get_config().max_requests_per_identity)

    def enter(self, name: str) -> bool:
        """Count one more request of ``name``; False (nothing counted) at its cap."""
        if self.counts[name] >= self.cap():
            return False
        self.counts[name] += 1
        return True

    def leave(self, name: str) -> None:
        _less(self.counts, name)

    def too_many(self, name: str) -> str:
        """Why one more long-lived request of ``name`` is refused."""
        return (
            f"too many requests in progress for '{name}': {self.cap()} already "
            "(parked /wait/ and status streams; max_requests_per_identity)"
        )


def server_full() -> Answer:
    """The answer on a place beyond the cap to anything but a renewal or release."""
    reason = "the server is full (max_connections): only /renew/ and /release/ are taken now"
    return Answer(
        "UNAVAILABLE", 503, {"X-Distributex-Reason": header_text(reason), "Retry-After": "1"}
    )


IDENTITY_REQUESTS_KEY: web.AppKey[IdentityRequests] = web.AppKey(
    "identity_requests", IdentityRequests
)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def identity_share(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Caps the long-lived requests of one identity (runs inside the auth middleware);
    serves nothing on a reserved place. The lock verbs do both themselves
    (:mod:`distributex.verbs`)."""
    if request.path in VERB_PATHS:
        return await handler(request)
    if getattr(request.protocol, "reserved", False):
        response = web_response(for_legacy_client(request.headers, server_full()))
        response.force_close()
        return response
    if request.path not in LONG_LIVED:
        return await handler(request)
    identity = request.get(IDENTITY_KEY)
    if identity is None:
        return await handler(request)
    requests = request.app[IDENTITY_REQUESTS_KEY]
    if not requests.enter(identity.name):
        return refused(request, 429, requests.too_many(identity.name))
    try:
        return await handler(request)
    finally:
        requests.leave(identity.name)


def install(app: web.Application, limit: Callable[[], int]) -> None:
    """Add the per-identity cap to ``app`` (before its router is frozen)."""
    app[IDENTITY_REQUESTS_KEY] = IdentityRequests(lambda: app[CONFIG_KEY], limit)
    app.middlewares.append(identity_share)
