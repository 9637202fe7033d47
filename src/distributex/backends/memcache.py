"""The ``memcache`` backend: the shared-state layer over one memcached server.

Pool records are read with ``gets`` and written with ``cas`` (``add`` to
create one), so a write based on a version another server has replaced is
refused and the step is redone: never a blind ``set`` of lock state. Only a
server's own heartbeat key is written with ``set``.

Client: aiomcache (aio-libs), the maintained asyncio memcached client with
``gets``/``cas``/``add``. It has no timeouts of its own, so every call is
bounded by the layer; a call abandoned mid-answer leaves its connection out
of step with the server, so that connection (and only it) is closed, never
put back in the pool.

Clock: leases are judged by the servers' wall clocks (keep them in sync
with NTP). Each server compares its clock with memcached's (``stats``, whole
seconds) every heartbeat and steps no pool while it is more than
:data:`~distributex.backends.clocks.MAX_CLOCK_SKEW` off (``503``).

Evictions: a memcached that evicts items when full (the default, without
``-M``) can drop a held pool's record, and the lock is then granted again.
The server refuses such a memcached at start (and stops granting if one
restarts so), unless ``unsafe_store: warn``.

One memcached only: several would split the keys of the cluster between
them, and the epoch record that detects a lost store would live on one of
them only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator
from typing import Any

from distributex.backends.base import BackendUnavailable
from distributex.backends.store import Store, Stored

try:
    import aiomcache
    from aiomcache.client import acquire as _with_connection
except ImportError:  # pragma: no cover - checked by make_backend
    aiomcache = None  # type: ignore[assignment]

# Connections to memcached per distributex server. aiomcache opens a new
# connection only while its pool is below its minimum size, so the minimum is
# the size: with a minimum of 1 every call of a server waited for one
# connection, and one slow call made the calls queued behind it time out.
POOL_SIZE = 8


@contextlib.contextmanager
def _discarded_if_abandoned(conn: Any) -> Iterator[None]:
    """A call cancelled (timed out) half-way through its answer leaves its
    connection out of step: the rest of that answer would be read as the next
    call's. aiomcache puts a cancelled call's connection back in its pool;
    marking its reader failed makes the pool close it instead. (A call that
    fails with an exception is marked so by aiomcache itself.)"""
    try:
        yield
    except BaseException as exc:
        if not isinstance(exc, Exception):
            conn.reader.set_exception(ConnectionAbortedError("call abandoned mid-answer"))
        raise


if aiomcache is not None:

    class _Client(aiomcache.Client):
        """aiomcache's client with ``gets`` of several keys in one round trip; a
        connection whose call was abandoned is closed, never reused; and a
        one-line answer ends at a closed connection."""

        @_with_connection
        async def gets_many(self, conn: Any, *keys: bytes) -> tuple[dict[bytes, bytes], dict]:
            with _discarded_if_abandoned(conn):
                return await self._multi_get(conn, *keys, with_cas=True)

        @_with_connection
        async def stats(self, conn: Any, args: bytes | None = None) -> dict[bytes, bytes | None]:
            with _discarded_if_abandoned(conn):
                return await aiomcache.Client.stats.__wrapped__(self, conn, args)  # type: ignore[attr-defined]

        async def _execute_simple_command(self, conn: Any, raw_command: bytes) -> bytes:
            # aiomcache 0.8.2's own loop reads lines until one ends in CRLF; at end
            # of file readline() gives b"" at once, so a connection closed in the
            # middle of an answer (memcached going away) spun the event loop for
            # good: the server froze at 100 % CPU and did not even stop on SIGTERM
            # (aio-libs/aiomcache#502).
            with _discarded_if_abandoned(conn):
                conn.writer.write(raw_command)
                await conn.writer.drain()
                answer = bytearray()
                while not answer.endswith(b"\r\n"):
                    line = await conn.reader.readline()
                    if not line:
                        raise ConnectionResetError("memcached closed the connection mid-answer")
                    answer.extend(line)
                return bytes(answer[:-2])


class MemcacheStore(Store):
    """One memcached server (``memcachehost``:``memcacheport``)."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        shown = f"[{host}]" if ":" in host else host
        self.description = f"memcached {shown}:{port}"
        self._client: Any = None

    def _connect(self) -> Any:
        if self._client is None:
            self._client = _Client(
                self.host, self.port, pool_size=POOL_SIZE, pool_minsize=POOL_SIZE
            )
        return self._client

    async def start(self) -> None:
        self._connect()

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    def reset(self) -> None:
        # Nothing to drop: a call abandoned mid-answer closes its own connection
        # (_discarded_if_abandoned), so the pool holds only connections in step,
        # and the busy ones belong to calls still within their time. Closing
        # those too failed every call in flight with the one that timed out
        # (4,898 of 20,000 arrivals answered 503 after one slow call).
        return

    async def get(self, keys: list[str]) -> dict[str, Stored]:
        try:
            values, versions = await self._connect().gets_many(*(k.encode() for k in keys))
        except aiomcache.exceptions.ClientException as exc:
            raise BackendUnavailable(f"{self.description}: {exc}") from None
        return {k.decode(): Stored(v, versions.get(k)) for k, v in values.items()}

    async def put(
        self,
        key: str,
        value: bytes,
        version: Any | None,
        ttl: int = 0,
        durable: bool = True,
        nudge: Collection[str] = (),
        pool: str = "",
    ) -> bool:
        # memcached does not say the new cas value: True, and the layer reads first.
        client = self._connect()
        try:
            if version is None:
                return bool(await client.add(key.encode(), value, exptime=ttl))
            return bool(await client.cas(key.encode(), value, version, exptime=ttl))
        except aiomcache.exceptions.ClientException as exc:
            # e.g. SERVER_ERROR out of memory (memcached -M), object too large
            raise BackendUnavailable(f"{self.description} refused a write: {exc}") from None

    async def own_clock(self) -> tuple[float, float] | None:
        # memcached's clock ticks in whole seconds.
        seconds = await self._stat(b"", b"time")
        return None if seconds is None else (float(seconds), 1.0)  # None: not shown

    async def unsafe_setting(self) -> str | None:
        if await self._stat(b"settings", b"evictions") == b"on":
            return (
                f"{self.description} evicts items when its memory is full (started "
                "without -M): a held pool's record could be evicted and its lock granted "
                "twice; start memcached with -M (--disable-evictions)"
            )
        return None

    async def _stat(self, group: bytes, name: bytes) -> bytes | None:
        try:
            stats = await self._connect().stats(group or None)
        except aiomcache.exceptions.ClientException as exc:
            raise BackendUnavailable(f"{self.description}: {exc}") from None
        return stats.get(name)

    async def set(self, key: str, value: bytes, ttl: int = 0) -> None:
        try:
            await self._connect().set(key.encode(), value, exptime=ttl)
        except aiomcache.exceptions.ClientException as exc:
            raise BackendUnavailable(f"{self.description} refused a write: {exc}") from None
