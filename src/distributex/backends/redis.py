"""The ``redis`` backend: the shared-state layer over one Redis.

Every key holds a string: a 16-character version, then the value. A pool's
record is written by :data:`CAS_SCRIPT` (one ``EVALSHA``): it compares the
stored version with the one the step read and, only if they match, writes
the new value under a new version (random, chosen by the caller, so a key
deleted and made again never repeats a version) and returns it. The layer
keeps that version and skips the read before its next step on the pool; a
refused write returns what the key holds, so the step is redone without a
read. A Lua script is one round trip, atomic on the server; ``WATCH``,
``GET``, ``MULTI``/``SET``/``EXEC`` would take three and a connection held
between them (measured: ``bench/redis_cas.py``, figures in
``docs/backends.md``).

Clock: leases are judged by Redis's clock (``TIME``), not the servers' own.
``now()`` must answer without a round trip, so :class:`RedisClock` samples
``TIME`` every second and keeps the offset to this host's monotonic clock,
from the sample with the shortest round trip of the last few. Its error is at
most half that round trip plus the drift of the monotonic clock since the
sample (NTP slews it by at most 0.05 %: 1 ms over 2 s), so servers whose wall
clocks disagree by minutes still agree on every deadline to about a
millisecond on a LAN.

Nudges: ``PUBLISH`` on ``<prefix>nudge/<server id>`` with the pool's name
and, from the script that writes a grant, the record it wrote; each server
subscribes to its own channel and answers its waiter from that record (no
read, and with a short lease no write either: the shared layer's
``ANSWER_ON_READ_MAX_TTL``). After every (re)subscription the
layer is told to look at every pool it waits on, so a nudge sent while the
subscription was down is never lost, only late.

Cluster: every command touches one key (reads are single-key ``GET`` s in one
pipeline, not ``MGET``), and a pool's record key carries its own hash tag
(``<prefix>pool/{<digest>}``), so the layout is ready for Redis Cluster. It is
refused today all the same: the epoch record that detects a lost store lives
on one shard, so a shard that lost its state would go unnoticed (see
``docs/backends.md``).

Sentinel: ``redis+sentinel://host:26379,host2:26379/mymaster/0`` asks the
Sentinels for the master at start and every second; when it has moved,
every connection is dropped (the old master may take writes until Sentinel
demotes it) and the subscription made again on the new one. A write
answered ``READONLY`` makes redis-py ask at once too. A fail-over to a
replica that had every write loses nothing; one that had not is a store loss
as the layer sees it (see ``docs/backends.md``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable, Collection
from typing import Any
from urllib.parse import urlsplit

from distributex.backends.base import BackendUnavailable
from distributex.backends.record import split_nudge
from distributex.backends.redis_clock import CLOCK_EVERY, RedisClock
from distributex.backends.redis_url import describe_url, reason, sentinel_client, unavailable
from distributex.backends.store import Conflict, Store, Stored
from distributex.config import parse_sentinel_url

try:
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import RedisError, ResponseError
except ImportError:  # pragma: no cover - checked by make_backend
    aioredis = None  # type: ignore[assignment]

log = logging.getLogger("distributex.redis")

# Every stored string starts with its version: this many characters.
VERSION_LENGTH = 16
# Connections to Redis per distributex server (the pub/sub one comes on top).
POOL_SIZE = 16
# A connection that cannot be made in this time counts as a failure (the layer
# bounds each call at 1.2 s as well).
CONNECT_TIMEOUT = 1.0
# The pub/sub listener waits this long between reconnections, doubling.
LISTEN_BACKOFF_MIN = 0.05
LISTEN_BACKOFF_MAX = 2.0
# A subscription quiet this long is PINGed; no PONG by the next such wait, and
# it is taken for dead (a connection cut without a word would never say so).
LISTEN_PING_EVERY = 5.0

# KEYS[1]: the key. ARGV: the version read ("" = the key must not exist), the
# new version, the value, the TTL in ms ("0" = none), then the pool and the
# channels of the servers to nudge once it is written (the grant and its nudge
# in one round trip; PUBLISH names no key): the message is the pool's name, a
# NUL, then the record as stored, so the servers nudged need not read it. Returns the new version;
# if the key is not at the version read, what it holds now ({current}: the
# layer need not read it), or false if it does not exist. (16: VERSION_LENGTH.)
CAS_SCRIPT = """
local current = redis.call('GET', KEYS[1])
if ARGV[1] == '' then
  if current then return {current} end
elseif not current then
  return false
elseif string.sub(current, 1, 16) ~= ARGV[1] then
  return {current}
end
if ARGV[4] ~= '0' then
  redis.call('SET', KEYS[1], ARGV[2] .. ARGV[3], 'PX', ARGV[4])
else
  redis.call('SET', KEYS[1], ARGV[2] .. ARGV[3])
end
for i = 6, #ARGV do
  redis.call('PUBLISH', ARGV[i], ARGV[5] .. '\0' .. ARGV[2] .. ARGV[3])
end
return ARGV[2]
"""


def _nudge_message(data: bytes) -> tuple[str, Stored | None]:
    """A nudge: the pool's name, and the record written with it if it came along."""
    pool, raw = split_nudge(data)
    if raw is None or len(raw) < VERSION_LENGTH:
        return pool, None  # from notify(): the name alone
    return pool, Stored(raw[VERSION_LENGTH:], raw[:VERSION_LENGTH].decode())


def _new_version() -> str:
    return secrets.token_hex(VERSION_LENGTH // 2)


class RedisStore(Store):
    """One Redis (``redis_url``) shared by every server of a cluster."""

    notifies = True
    nudges_with_put = True

    def __init__(self, url: str, key_prefix: str) -> None:
        self.url = url
        self.prefix = key_prefix
        self.description = describe_url(url)
        self.clock = RedisClock()
        self._client: Any = None
        self._cas: Any = None
        self._clock_task: asyncio.Task[None] | None = None
        self._sentinel: Any = None  # with redis+sentinel://: the Sentinels, and
        self._master: Any = None  # the master they named last
        self._pubsub: Any = None  # the listener's subscription

    def _connect(self) -> Any:
        if self._client is None:
            options: dict[str, Any] = {
                "socket_connect_timeout": CONNECT_TIMEOUT,
                "socket_timeout": None,
                # The layer bounds every call and never retries inside a request:
                # a retried compare-and-set could not tell its own write from another's.
                "retry": Retry(NoBackoff(), 0),
                "retry_on_timeout": False,
            }
            if urlsplit(self.url).scheme == "redis+sentinel":
                self._sentinel, self._client = sentinel_client(self.url, options)
            else:
                # A blocking pool: a step that finds every connection busy waits
                # for one (the layer bounds the wait) instead of failing.
                pool = aioredis.BlockingConnectionPool.from_url(
                    self.url, max_connections=POOL_SIZE, timeout=None, **options
                )
                self._client = aioredis.Redis.from_pool(pool)  # closing it closes the pool
            self._cas = self._client.register_script(CAS_SCRIPT)
        return self._client

    def key(self, key: str) -> str:
        """The Redis key of a layer key: a pool's record gets a hash tag of its own."""
        rest = key[len(self.prefix) :]
        if rest.startswith("pool/"):
            return f"{self.prefix}pool/{{{rest[5:]}}}"
        return key

    def channel(self, server: str) -> str:
        return f"{self.prefix}nudge/{server}"

    async def start(self) -> None:
        client = self._connect()
        try:
            info = await client.info("cluster")
        except ResponseError:
            info = {}  # INFO may be renamed or forbidden: then it is no cluster we can see
        except (RedisError, OSError) as exc:
            raise BackendUnavailable(f"{self.description} unreachable: {reason(exc)}") from None
        if info.get("cluster_enabled"):
            raise BackendUnavailable(
                f"{self.description} is a Redis Cluster node: not supported yet "
                "(use one Redis, with replicas if you like)"
            )
        try:
            if self._sentinel is not None:
                await self._follow_master()
            await self.clock.sample(client)
        except (RedisError, OSError) as exc:
            raise BackendUnavailable(f"{self.description} unreachable: {reason(exc)}") from None
        self._clock_task = asyncio.create_task(self._clock_loop())

    async def _clock_loop(self) -> None:
        while True:
            await asyncio.sleep(CLOCK_EVERY)
            if self._sentinel is not None:  # Sentinels down need not stop the clock
                with contextlib.suppress(RedisError, OSError, TimeoutError):
                    async with asyncio.timeout(CLOCK_EVERY):
                        await self._follow_master()
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with asyncio.timeout(CLOCK_EVERY):
                    await self.clock.sample(self._connect())

    async def _follow_master(self) -> None:
        """Sentinel: if the master moved, drop every connection (the old one may
        still take writes until Sentinel demotes it: split brain) and subscribe
        again on the new one (the layer then checks every pool it waits on)."""
        self._connect()
        service = parse_sentinel_url(self.url).service
        master = await self._sentinel.discover_master(service)
        if self._master is not None and master != self._master:
            log.warning(
                "%s: the master moved from %s:%s to %s:%s; connecting to it",
                self.description,
                *self._master,
                *master,
            )
            await self._client.connection_pool.disconnect(inuse_connections=True)
            if self._pubsub is not None:
                await self._pubsub.aclose()
        self._master = master

    async def close(self) -> None:
        if self._clock_task is not None:
            self._clock_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._clock_task
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def now(self) -> float:
        return self.clock.now()

    async def get(self, keys: list[str]) -> dict[str, Stored]:
        # One GET per key in one round trip: each command stays within one key's
        # slot (the epoch and a pool live in different slots under Cluster).
        async with self._connect().pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.get(self.key(key))
            try:
                values = await pipe.execute()
            except RedisError as exc:
                raise unavailable(self.description, exc) from None
        found: dict[str, Stored] = {}
        for key, raw in zip(keys, values, strict=True):
            if raw is not None:
                found[key] = Stored(raw[VERSION_LENGTH:], raw[:VERSION_LENGTH].decode())
        return found

    async def put(
        self,
        key: str,
        value: bytes,
        version: Any | None,
        ttl: int = 0,
        durable: bool = True,
        nudge: Collection[str] = (),
        pool: str = "",
    ) -> str | Conflict | None:
        self._connect()
        new = _new_version()
        channels = [self.channel(server) for server in sorted(nudge)]
        try:
            written = await self._cas(
                keys=[self.key(key)],
                args=[version or "", new, value, int(ttl * 1000), pool, *channels],
            )
        except RedisError as exc:
            raise unavailable(self.description, exc) from None
        if isinstance(written, list):  # refused: what is stored now
            raw = written[0]
            return Conflict(Stored(raw[VERSION_LENGTH:], raw[:VERSION_LENGTH].decode()))
        return new if written else None

    async def set(self, key: str, value: bytes, ttl: int = 0) -> None:
        raw = _new_version().encode() + value
        try:
            await self._connect().set(self.key(key), raw, ex=ttl or None)
        except RedisError as exc:
            raise unavailable(self.description, exc) from None

    async def notify(self, servers: Collection[str], pool: str) -> None:
        async with self._connect().pipeline(transaction=False) as pipe:
            for server in servers:
                pipe.publish(self.channel(server), pool.encode())
            try:
                await pipe.execute()
            except RedisError as exc:
                raise unavailable(self.description, exc) from None

    async def listen(self, server: str, nudged: Callable[..., None]) -> None:
        delay = LISTEN_BACKOFF_MIN
        down: str | None = None  # the failure logged, so each outage is logged once
        while True:
            pubsub = self._pubsub = self._connect().pubsub()
            try:
                await pubsub.subscribe(self.channel(server))
                # Wait for the confirmation: only from then on can no nudge be missed.
                if await pubsub.get_message(timeout=CONNECT_TIMEOUT) is None:
                    raise TimeoutError("no answer to SUBSCRIBE")
                if down is not None:
                    log.info("%s: nudges arrive again", self.description)
                down = None
                delay = LISTEN_BACKOFF_MIN
                nudged(None)  # nudges sent while we were not subscribed: look at every pool
                pinged = False
                while True:
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=LISTEN_PING_EVERY
                    )
                    if message is None:
                        if pinged:
                            raise TimeoutError("no answer to PING")
                        await pubsub.ping()
                        pinged = True
                    elif message["type"] == "pong":
                        pinged = False
                    elif message["type"] == "message":
                        pool, stored = _nudge_message(bytes(message["data"]))
                        nudged(pool, stored)
            except Exception as exc:  # whatever broke it, subscribe again
                why = reason(exc)
                if down != why:
                    log.warning("%s: no nudges (%s); servers poll meanwhile", self.description, why)
                down = why
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(LISTEN_BACKOFF_MAX, delay * 2)
