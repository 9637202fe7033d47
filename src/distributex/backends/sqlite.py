"""The ``sqlite`` backend: the shared-state layer over a local SQLite file.

Lock state survives a crash of the server (``kill -9``, and with
``sqlite_sync: full`` a power loss): a step's write is committed before its
answer goes out, so every ``YES`` a client received, and every ``OK`` of a
release, is on disk. Restarted, the server finds every lease with its token
and absolute expiry (on the wall clock; one that ran out meanwhile is
expired by the first step) and every fence.

Off the event loop: one thread owns the connection; the event loop hands it
batches. Whatever arrives while the thread is busy (reads and writes of any
pools, from any request) goes in the next batch, and a batch with writes is
one transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``): one fsync per batch,
not per request (group commit), and none for a batch that changes nothing a
client was told (queue entries, heartbeats: the next synced commit covers
them). Compare-and-set is a version check inside
that transaction; a version is 62 random bits, so a key deleted and made
again does not repeat one, and no shared counter is written. A batch of one
write (a single pool's step, the common case on a busy mutex) is a single
statement, its own transaction: the worker thread makes one call into
SQLite for it, not four (each call hands the GIL back and forth with the
event loop).

Several ``distributexd`` processes on one host may share one file: SQLite's
locking serializes their transactions (``busy_timeout``), and the layer's
rules (compare-and-set, heartbeats, nudges over loopback) hold as for
memcached. A network filesystem is not supported (SQLite's locking is not
reliable there).

``sqlite_sync``: ``full`` (default) syncs the WAL on every commit: a YES
survives a power loss. ``normal`` syncs only at checkpoints: a YES survives a
crash of the server process but not of the machine (a power loss may lose
the last commits, and a restarted server could then grant a lock whose
earlier YES was lost; use ``start_delay`` with it if that matters).

The file: ``application_id`` marks it as distributex's and ``user_version``
is its schema; a file of another program, a newer schema or a corrupt file
stop the server at start with one line. Ended leases and idle pools leave
nothing behind: idle records expire (the layer gives them a TTL) and expired
rows are deleted every minute, so the file stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import sqlite3
import time
from collections.abc import Collection
from typing import Any

from distributex.backends.base import BackendUnavailable
from distributex.backends.sqlite_file import (
    StateFileError,
    file_identity,
    open_state_file,
)
from distributex.backends.sqlite_worker import SqliteWorker
from distributex.backends.store import Store, Stored, StoreReplaced

log = logging.getLogger("distributex.sqlite")

# Rows past their expiry are deleted this often.
CLEANUP_EVERY = 60.0
SYNC_MODES = ("full", "normal")


class SqliteStore(Store):
    """A SQLite file on this host (``sqlite_path``)."""

    def __init__(self, path: str, sync: str = "full") -> None:
        if sync not in SYNC_MODES:
            raise ValueError(f"sqlite_sync must be one of {', '.join(SYNC_MODES)}")
        self.path = path
        self.sync = sync
        self.description = f"SQLite file {path}"
        self._executor: SqliteWorker | None = None
        self._conn: sqlite3.Connection | None = None
        self._queue: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        # Set while a batch is with the worker thread; done once it is answered.
        self._in_flight: asyncio.Future[None] | None = None
        self._next_cleanup = 0.0
        self.commits = 0  # transactions committed, for the bench
        self.synced = 0  # of which synced to disk (fsync)
        self._sync_now = ""
        # (device, inode) of the file the connection has open: a path that
        # names another file (deleted and made again, replaced) is noticed.
        self._identity: tuple[int, int] | None = None

    # -- life (the connection lives in the one worker thread) ----------------------------

    async def start(self) -> None:
        self._executor = SqliteWorker()
        try:
            await self._executor.call(self._open)
        except BaseException:
            self._executor.stop()
            self._executor = None
            raise

    async def close(self) -> None:
        while self._in_flight is not None:
            with contextlib.suppress(BaseException):
                await asyncio.shield(self._in_flight)
        if self._executor is not None:
            with contextlib.suppress(Exception):
                await self._executor.call(self._close)
            self._executor.stop()
            self._executor = None

    def _open(self) -> None:
        mode = self.sync.upper()
        self._conn = open_state_file(self.path, self.description, mode)
        self._sync_now = mode
        self._identity = file_identity(self.path)

    def _check_identity(self) -> None:
        """In the worker thread: the path still names the file we have open, else reopen it.

        Two servers on one path must share one file. If it was deleted (or
        another put in its place) one of them could serve from the unlinked
        file while the other makes a new one: both would grant. The batch
        that notices is refused (503) and the path is opened afresh; the
        layer then records a loss of state there.
        """
        if file_identity(self.path) == self._identity:
            return
        gone = file_identity(self.path) is None
        self._close()
        self._sync_now = ""
        self._open()
        what = "deleted" if gone else "replaced by another file"
        log.warning("%s was %s while in use: now using the file at that path", self.path, what)
        raise StoreReplaced(
            f"{self.description} was {what} while in use (lock state lost; "
            "grants held back until leases could have ended)"
        )

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
            log.info(
                "%s: %d commits since start, %d fsync'd",
                self.description,
                self.commits,
                self.synced,
            )

    # -- the Store calls: queued, and run in batches by the worker thread ----------------

    async def get(self, keys: list[str]) -> dict[str, Stored]:
        return await self._submit(("get", keys))

    async def put(
        self,
        key: str,
        value: bytes,
        version: Any | None,
        ttl: int = 0,
        durable: bool = True,
        nudge: Collection[str] = (),
        pool: str = "",
    ) -> Any:
        return await self._submit(("put", key, value, version, ttl, durable))

    async def set(self, key: str, value: bytes, ttl: int = 0) -> None:
        # Heartbeats: lost in a crash with the server that wrote them.
        await self._submit(("set", key, value, ttl, False))

    async def _submit(self, op: tuple[Any, ...]) -> Any:
        if self._executor is None:
            raise BackendUnavailable(f"{self.description} is closed")
        future = asyncio.get_running_loop().create_future()
        self._queue.append((op, future))
        if self._in_flight is None:
            self._send_batch()
        return await future

    def _send_batch(self) -> None:
        """Hand what is queued to the worker as one batch; its answer sends the next.

        Callbacks, not a task: the results reach the waiting steps in the loop
        iteration that receives them (a task would take one more).
        """
        assert self._executor is not None
        batch, self._queue = self._queue, []
        self._in_flight = asyncio.get_running_loop().create_future()
        ops = [op for op, _future in batch]
        self._executor.submit(
            self._run_batch, (ops,), lambda results, error: self._answer(batch, results, error)
        )

    def _answer(
        self,
        batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]],
        results: list[Any] | None,
        error: BaseException | None,
    ) -> None:
        """In the loop: settle the batch's futures, then send what queued meanwhile."""
        in_flight, self._in_flight = self._in_flight, None
        if error is not None:
            if not isinstance(error, BackendUnavailable):
                error = _unavailable(self, error)
            for _op, future in batch:
                if not future.done():
                    future.set_exception(error)
        else:
            assert results is not None
            for (_op, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
        if in_flight is not None and not in_flight.done():
            in_flight.set_result(None)
        if self._queue and self._executor is not None:
            self._send_batch()

    def _run_batch(self, ops: list[tuple[Any, ...]]) -> list[Any]:
        """In the worker thread: every op of the batch, writes in one transaction."""
        if self._conn is None:
            if self._executor is None:
                raise BackendUnavailable(f"{self.description} is closed")
            self._open()  # a reopen failed before: try again
        self._check_identity()
        conn = self._conn
        assert conn is not None  # opened above (or by _check_identity)
        now = time.time()
        writes = any(op[0] != "get" for op in ops) or now >= self._next_cleanup
        if not writes:
            return [self._get(conn, op[1], now) for op in ops]
        # Durable (with sync=full: fsync'd) before anyone is answered, unless
        # nothing in the batch needs it (queue entries, heartbeats): the next
        # synced commit covers those anyway. (Set outside the transaction.)
        durable = self.sync == "full" and any(op[-1] for op in ops if op[0] != "get")
        self._set_sync(conn, "FULL" if durable else "NORMAL")
        if (
            len(ops) == 1
            and ops[0][0] == "put"
            and ops[0][3] is not None
            and now < self._next_cleanup
        ):
            # One compare-and-set of a record that exists: a single UPDATE,
            # atomic on its own (autocommit), is the whole transaction.
            result = self._put(conn, now, *ops[0][1:-1])
            self.commits += 1
            self.synced += durable
            return [result]
        conn.execute("BEGIN IMMEDIATE")
        try:
            results: list[Any] = []
            for op in ops:
                if op[0] == "get":
                    results.append(self._get(conn, op[1], now))
                elif op[0] == "put":
                    results.append(self._put(conn, now, *op[1:-1]))
                else:
                    self._set(conn, now, *op[1:-1])
                    results.append(None)
            if now >= self._next_cleanup:
                conn.execute("DELETE FROM kv WHERE expires IS NOT NULL AND expires <= ?", (now,))
                self._next_cleanup = now + CLEANUP_EVERY
            conn.execute("COMMIT")
            self.commits += 1
            self.synced += durable
            return results
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise

    def _set_sync(self, conn: sqlite3.Connection, mode: str) -> None:
        if mode != self._sync_now:
            conn.execute(f"PRAGMA synchronous = {mode}")
            self._sync_now = mode

    @staticmethod
    def _get(conn: sqlite3.Connection, keys: list[str], now: float) -> dict[str, Stored]:
        marks = ",".join("?" * len(keys))
        rows = conn.execute(
            f"SELECT key, value, version FROM kv WHERE key IN ({marks}) "
            "AND (expires IS NULL OR expires > ?)",
            (*keys, now),
        ).fetchall()
        return {key: Stored(bytes(value), version) for key, value, version in rows}

    @staticmethod
    def _next_version() -> int:
        # Random, not a counter in the file: one statement less per write, and
        # nothing that several processes sharing the file must serialize on.
        return secrets.randbits(62) + 1

    def _put(
        self, conn: sqlite3.Connection, now: float, key: str, value: bytes, version: Any, ttl: int
    ) -> int | None:
        """The new version, or None if the key was not at ``version``."""
        expires = now + ttl if ttl else None
        new = self._next_version()
        if version is None:
            conn.execute(
                "DELETE FROM kv WHERE key = ? AND expires IS NOT NULL AND expires <= ?", (key, now)
            )
            cursor = conn.execute(
                "INSERT OR IGNORE INTO kv (key, value, version, expires) VALUES (?, ?, ?, ?)",
                (key, value, new, expires),
            )
        else:
            cursor = conn.execute(
                "UPDATE kv SET value = ?, version = ?, expires = ? WHERE key = ? AND version = ? "
                "AND (expires IS NULL OR expires > ?)",
                (value, new, expires, key, version, now),
            )
        return new if cursor.rowcount == 1 else None

    def _set(self, conn: sqlite3.Connection, now: float, key: str, value: bytes, ttl: int) -> None:
        conn.execute(
            "INSERT OR REPLACE INTO kv (key, value, version, expires) VALUES (?, ?, ?, ?)",
            (key, value, self._next_version(), now + ttl if ttl else None),
        )


def _unavailable(store: SqliteStore, exc: BaseException) -> BackendUnavailable:
    if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
        return BackendUnavailable(f"{store.description} is busy (held by another process)")
    return BackendUnavailable(f"{store.description}: {exc}")


__all__ = ["SYNC_MODES", "SqliteStore", "StateFileError"]
