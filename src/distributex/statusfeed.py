"""``GET /status/events``: the status document as server-sent events, cheap per viewer.

A ``status`` event carries the whole ``/status`` document, which is large on
a server with many pools (about 1.5 MB for 2,000). So:

* The document is read and encoded once per change for all viewers of the
  same query (every pool, or ``?pool=P``): a :class:`Feed` per query runs
  while anyone watches it, and its latest event is one shared ``bytes``.
* Each viewer writes that event in chunks of :data:`CHUNK` bytes, each only
  when its connection has sent the previous ones (a send buffer of
  :data:`SEND_BUFFER` bytes): a viewer that does not read holds a reference to
  the shared event and at most those few buffered bytes, never a copy.
* A viewer still busy with an event when newer ones come skips them and gets
  the latest when it is done; one that takes no chunk for :data:`STALL`
  seconds is dropped (its connection is aborted).
* At most ``max_status_streams`` viewers at once; one more answers ``503``
  with the reason in ``X-Distributex-Reason``. A stream's connection may be
  closed to make room when the connection cap is reached
  (:mod:`distributex.fairness`): the viewer reconnects by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Iterator
from typing import Any

from aiohttp import web

from distributex.appkeys import CONFIG_KEY, EVENTS_KEY
from distributex.backends.base import BackendUnavailable
from distributex.ops import json_response, read_status, requested_pool, shown_pools, status_document
from distributex.refusal import Refused

log = logging.getLogger("distributex")

# A feed looks again this often even without a change seen here (other servers
# sharing the store change it too), sends at most this often, and a viewer gets
# a comment line as a keep-alive when nothing was sent for KEEPALIVE seconds.
STREAM_REFRESH = 1.0
STREAM_MIN_GAP = 0.1
KEEPALIVE = 15.0
CHUNK = 16 * 1024
SEND_BUFFER = 32 * 1024
STALL = 30.0


class Snapshot:
    """One encoded event, shared by every viewer of a feed."""

    __slots__ = ("data", "seq")

    def __init__(self, seq: int, data: bytes) -> None:
        self.seq = seq
        self.data = data


class Feed:
    """The events of one query, read and encoded once per change while anyone watches."""

    def __init__(self, feeds: Feeds, app: web.Application, only: str | None) -> None:
        self._feeds = feeds
        self._app = app
        self.only = only
        self.viewers = 0
        self.latest: Snapshot | None = None
        self.ended = False
        self._fresh = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def next(self, seen: int, timeout: float) -> Snapshot | None:
        """The latest event if newer than ``seen``, waiting up to ``timeout`` (None: none)."""
        latest = self.latest
        if latest is not None and latest.seq > seen:
            return latest
        fresh = self._fresh
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await fresh.wait()
        latest = self.latest
        return latest if latest is not None and latest.seq > seen else None

    def _publish(self, snapshot: Snapshot | None) -> None:
        self.latest = snapshot
        fresh, self._fresh = self._fresh, asyncio.Event()
        fresh.set()

    async def _run(self) -> None:
        events = self._app[EVENTS_KEY]
        last: Any = None
        seq = 0
        try:
            while self.viewers and not events.closed:
                version = events.version
                key: Any  # what tells a change: the pools, or the reason they are not there
                try:
                    pools = await read_status(self._app, self.only)
                    kind, doc, key = "status", status_document(self._app, pools), pools
                except (BackendUnavailable, Refused) as exc:
                    reason = exc.reason if isinstance(exc, Refused) else str(exc)
                    kind, doc, key = "unavailable", {"error": reason}, reason
                if key != last:
                    seq += 1
                    data = json.dumps(doc, ensure_ascii=False)
                    del doc  # the document is large: only its encoding stays
                    self._publish(Snapshot(seq, f"event: {kind}\ndata: {data}\n\n".encode()))
                    last = key
                await events.wait_changed(version, STREAM_REFRESH)
                await asyncio.sleep(STREAM_MIN_GAP)  # a burst of changes makes one event
        finally:
            self.ended = True
            self._feeds.ended(self)
            self._publish(None)  # viewers see the end


class Feeds:
    """The running feeds by query, and the count of viewers."""

    def __init__(self) -> None:
        self.by_query: dict[str | None, Feed] = {}
        self.viewers = 0

    @contextlib.contextmanager
    def watch(self, app: web.Application, only: str | None) -> Iterator[Feed]:
        feed = self.by_query.get(only)
        if feed is None:
            feed = self.by_query[only] = Feed(self, app, only)
        feed.viewers += 1
        self.viewers += 1
        try:
            yield feed
        finally:
            feed.viewers -= 1
            self.viewers -= 1

    def ended(self, feed: Feed) -> None:
        if self.by_query.get(feed.only) is feed:
            del self.by_query[feed.only]


FEEDS_KEY: web.AppKey[Feeds] = web.AppKey("status_feeds", Feeds)


def add_route(app: web.Application) -> None:
    """``GET /status/events`` on ``app`` (before it starts)."""
    app[FEEDS_KEY] = Feeds()
    app.router.add_get("/status/events", status_events)


async def status_events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: a ``status`` event with the whole document on every change."""
    app = request.app
    events = app[EVENTS_KEY]
    try:
        only = requested_pool(request)
        shown_pools(app, only)
    except Refused as exc:
        return json_response({"error": exc.reason}, exc.status)
    feeds = app[FEEDS_KEY]
    cap = app[CONFIG_KEY].max_status_streams
    if feeds.viewers >= cap:
        reason = f"too many status viewers: {cap} already watch (max_status_streams)"
        full = json_response({"error": reason}, 503)
        full.headers["X-Distributex-Reason"] = reason
        full.headers["Retry-After"] = "5"
        return full
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # proxies must not hold the stream back
        }
    )
    await response.prepare(request)
    if hasattr(request.protocol, "streaming"):
        request.protocol.streaming = True  # may be closed to make room (fairness)
    _bound_send_buffers(request)
    loop = asyncio.get_running_loop()
    with feeds.watch(app, only) as feed, contextlib.suppress(ConnectionError):
        seen = 0
        last_sent = loop.time()
        while not events.closed:
            wait = max(0.0, KEEPALIVE - (loop.time() - last_sent))
            snapshot = await feed.next(seen, wait)
            if snapshot is not None:
                seen = snapshot.seq
                await _send(request, response, snapshot.data)
            elif feed.ended:
                break  # the server stops
            elif loop.time() - last_sent >= KEEPALIVE:
                await _send(request, response, b": keep-alive\n\n")
            else:
                continue
            last_sent = loop.time()
    return response


def _bound_send_buffers(request: web.Request) -> None:
    """Small send buffers for a stream: the kernel's too, else it holds megabytes a viewer."""
    transport = request.transport
    if transport is None:
        return
    transport.set_write_buffer_limits(high=SEND_BUFFER)
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)


async def _send(request: web.Request, response: web.StreamResponse, data: bytes) -> None:
    """Write ``data`` a chunk at a time as the viewer takes it; drop a viewer that stalls."""
    view = memoryview(data)
    for start in range(0, len(view), CHUNK):
        try:
            async with asyncio.timeout(STALL):
                await response.write(view[start : start + CHUNK])
        except TimeoutError:
            log.debug("status viewer %s took nothing for %s s: dropped", request.remote, STALL)
            transport = request.transport
            if transport is not None:
                transport.abort()  # never flushed: the viewer does not read
            raise ConnectionResetError("status viewer stalled") from None
