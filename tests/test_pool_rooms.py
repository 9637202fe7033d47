"""What a server keeps per pool of a shared store stays bounded, and fences never go back.

A server keeps a room per pool it served (pool.py) and the page its queue's
tail ended in (pages.py); both are dropped when the pool is idle here. The
store is SQLite in this process: the rooms are the backend's own.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from distributex.backends.shared import SharedStateBackend
from distributex.backends.sqlite import SqliteStore
from distributex.engine import PoolSpec

pytestmark = pytest.mark.timeout(120)


class ShiftedClock(SqliteStore):
    """A SQLite store whose clock is this host's moved by ``shift`` seconds (a clock set wrong)."""

    shift = 0.0

    def now(self) -> float:
        return time.time() + self.shift


async def _until(condition, within: float = 20.0) -> None:
    async with asyncio.timeout(within):
        while not condition():
            await asyncio.sleep(0.02)


def test_pools_used_once_each_leave_no_room_behind(tmp_path: Path) -> None:
    """200 pools, each held and released once (and a queue tail cached for some):
    within a heartbeat or two the server keeps nothing of them. A pool held, or
    waited on here, keeps its room."""

    async def scenario() -> None:
        backend = SharedStateBackend(SqliteStore(str(tmp_path / "state.db")))
        await backend.start()
        try:
            held = PoolSpec("held")
            assert await backend.acquire(held, "h", None) is not None
            for i in range(200):
                spec = PoolSpec(f"once-{i}")
                lease = await backend.acquire(spec, "h", None)
                assert lease is not None
                assert await backend.release(spec, "h", lease.token)
                if i < 5:  # as a long queue's arrival would: the tail's page is cached
                    key = backend.pool_key(spec.name)
                    await backend.pages.append(key, 1, [f"w{i}", "s", "h", 30.0, 1.0])
            assert len(list(backend.pools)) == 201
            assert len(backend.pages._tail) == 5
            await _until(lambda: len(list(backend.pools)) == 1)
            assert [room.name for room in backend.pools] == ["held"]
            assert backend.pages._tail == {}
        finally:
            await backend.close()

    asyncio.run(scenario())


def test_a_pool_removed_by_a_reload_is_forgotten_once_idle(tmp_path: Path) -> None:
    async def scenario() -> None:
        backend = SharedStateBackend(SqliteStore(str(tmp_path / "state.db")))
        await backend.start()
        try:
            kept, idle, busy = PoolSpec("kept"), PoolSpec("idle"), PoolSpec("busy")
            for spec in (kept, idle):
                lease = await backend.acquire(spec, "h", None)
                assert lease is not None and await backend.release(spec, "h", lease.token)
            busy_lease = await backend.acquire(busy, "h", None)
            assert busy_lease is not None
            backend.reconfigure({"kept": kept})
            # Removed and idle: gone at once. Removed but held: kept (it drains).
            names = {room.name for room in backend.pools}
            assert "idle" not in names and "busy" in names
            assert await backend.release(busy, "h", busy_lease.token)
            backend.reconfigure({"kept": kept})
            assert "busy" not in {room.name for room in backend.pools}
        finally:
            await backend.close()

    asyncio.run(scenario())


def test_fences_never_go_back_across_a_forgotten_pool_and_a_lost_record(tmp_path: Path) -> None:
    """A fence above the clock (granted while the clock ran 1000 s ahead) is kept
    through the pool going idle here, the clock stepping back, and its record
    being lost: the next hold's fence is above it. Without the floor it starts
    at the clock, 1000 s of microseconds lower."""

    async def scenario() -> None:
        path = str(tmp_path / "state.db")
        store = ShiftedClock(path)
        backend = SharedStateBackend(store)
        await backend.start()
        try:
            spec = PoolSpec("p")
            store.shift = 1000.0
            first = await backend.acquire(spec, "h", None)
            assert first is not None
            assert await backend.release(spec, "h", first.token)
            store.shift = 0.0
            backend._prune()
            with sqlite3.connect(path) as db:  # the store loses the pool's record
                gone = db.execute("DELETE FROM kv WHERE key = ?", (backend.pool_key("p"),))
                assert gone.rowcount == 1
            second = await backend.acquire(spec, "h", None)
            assert second is not None
            assert second.fence > first.fence
            # Idle pools whose floor is below the clock are forgotten, fences and all:
            # a new record starts above the clock anyway.
            other = PoolSpec("q")
            lease = await backend.acquire(other, "h", None)
            assert lease is not None and await backend.release(other, "h", lease.token)
            backend._prune()
            assert backend.pools.get("q") is None
        finally:
            await backend.close()

    asyncio.run(scenario())
