"""A long queue's tail in pages of the store: arrivals and departures cost the same at any length.

A pool's record keeps its holders and the head of its queue (a *window* of
at most WINDOW_MAX waiters): every step reads, decodes and writes that much,
whatever the queue's length. Arrivals past a full window go to *pages*,
keys of their own (``<pool key>/q/<n>``) of at most PAGE_SIZE entries each,
appended to with compare-and-set on the page alone. A step whose window has
run low (below WINDOW_LOW) takes the first page: it *seals* it (a sealed page
takes no more arrivals or departures), and moves its waiters into the window
in the same write that moves the record's mark to the next page. Moving is
idempotent: a step that fails to write leaves the page sealed, and the next
step moves it.

The record's :class:`~distributex.backends.record.PageMarks` say which page
comes next (``first``; None while the whole queue is in the record). While
a pool is paged every arrival goes to the pages (except an owner already
holding or in the window, which the engine joins to its hold or its wait),
so that the order is the arrival order: window, then page after page. A
page that filled up says ``more``: the next number has entries.

The rules stay in the engine: it sees the record's holders and window only,
and pages hold waiters in order, nothing else; a page's waiters join the
record as any wait does (``LockEngine.enqueue``). One consequence: a host
that asks again while its first wait is still on a page waits on the pages
too (which of its waits are where is not looked up: that would cost the
whole queue); the engine joins the two when the second reaches the record,
granting it at once if the host holds by then. A departure from a page (a
hang-up, a timeout) removes the entry with compare-and-set on the page; from
a sealed page it is a step on the record, as from the window.

Bytes per waiter in the store: one queue entry's JSON (about 80 bytes), in
the record or in a page; sealed pages expire SEALED_TTL after sealing.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from distributex.backends.base import BackendUnavailable
from distributex.backends.record import PageMarks, waiter_of
from distributex.backends.store import Conflict, Store, Stored
from distributex.engine import EXCLUSIVE, LockEngine, PoolSpec, Waiter

# Waiters the record keeps before arrivals go to pages.
WINDOW_MAX = 128
# A step whose window holds fewer waiters than this moves the first page in.
WINDOW_LOW = 32
# Entries per page.
PAGE_SIZE = 128
# A sealed page is dropped by the store this long after sealing (it is moved
# into the record by then); pages still taking arrivals live as idle records do.
SEALED_TTL = 300
PAGE_TTL = 24 * 3600
# Compare-and-set attempts on one page before the caller is told to try again.
MAX_ATTEMPTS = 20

Item = TypeVar("Item")
Outcome = TypeVar("Outcome")

#: One bounded store call: the backend's ``_call`` (a timeout, errors noted).
Call = Callable[..., Awaitable[Any]]


@dataclass
class Page:
    """One page of a queue's tail: entries (JSON arrays, as in the record), in order."""

    entries: list[list[Any]] = field(default_factory=list)
    sealed: bool = False
    more: bool = False  # full: the next page number goes on

    def encode(self) -> bytes:
        body = {"sealed": self.sealed, "more": self.more, "entries": self.entries}
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def decode(cls, stored: Stored | None) -> Page | None:
        if stored is None:
            return None
        try:
            body = json.loads(stored.value)
            return cls(list(body["entries"]), bool(body["sealed"]), bool(body["more"]))
        except (ValueError, KeyError, TypeError):
            return None  # unreadable: taken as gone (its waiters queue again)


class Sealed(Exception):
    """The page takes no more changes (a step is moving it into the record)."""


def page_key(pool_key: str, number: int) -> str:
    return f"{pool_key}/q/{number}"


class Batches(Generic[Item, Outcome]):
    """Items for one key that come while a write for that key is under way wait
    and go together in the next write; each caller gets its item's outcome."""

    def __init__(self) -> None:
        self._waiting: dict[str, list[tuple[Item, asyncio.Future[Outcome]]]] = {}
        self._writing: set[str] = set()

    async def add(
        self, key: str, item: Item, write: Callable[[list[Item]], Awaitable[list[Outcome]]]
    ) -> Outcome:
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append((item, future))
        if key not in self._writing:
            self._writing.add(key)
            asyncio.get_running_loop().create_task(self._write_waiting(key, write))
        return await future

    async def _write_waiting(
        self, key: str, write: Callable[[list[Item]], Awaitable[list[Outcome]]]
    ) -> None:
        try:
            while batch := self._waiting.pop(key, []):
                try:
                    outcomes = await write([item for item, _ in batch])
                except BaseException as exc:
                    for _item, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (_item, future), outcome in zip(batch, outcomes, strict=True):
                    if not future.done():
                        future.set_result(outcome)
        finally:
            self._writing.discard(key)


class PageQueue:
    """Appends to, removes from and takes pages, for every pool of one server."""

    def __init__(self, store: Store, call: Call) -> None:
        self.store = store
        self._call = call
        self._tail: dict[str, int] = {}  # pool key -> the page appended to last
        # Arrivals of one pool, and departures from one page, that come
        # together on this server make one write (two servers contend on a
        # page less than two hundred waiters of one server would).
        self._arrivals: Batches[list[Any], int | None] = Batches()
        self._departures: Batches[str, bool] = Batches()

    def forget(self, pool_key: str) -> None:
        self._tail.pop(pool_key, None)

    async def append(self, pool_key: str, first: int, entry: list[Any]) -> int:
        """Add a waiter's entry at the end of the pages from ``first`` on; its page number.

        Raises :class:`Sealed` if the page the queue ends in is sealed (the
        pool may have left paging: the caller asks the record again).
        Appends that come together on this server make one write.
        """
        number = await self._arrivals.add(
            pool_key, entry, lambda entries: self._write(pool_key, first, entries)
        )
        if number is None:
            raise Sealed(pool_key)  # the end is sealed, or too busy: ask the record again
        return number

    async def _write(self, pool_key: str, first: int, entries: list[list[Any]]) -> list[int | None]:
        """Append ``entries`` in order, filling page after page; the page of each
        (None: not appended, the end of the queue was sealed or stayed too busy)."""
        number = max(first, self._tail.get(pool_key, first))
        numbers: list[int | None] = []
        left = entries
        seen: Stored | None = None
        misses = 0
        while left and misses < MAX_ATTEMPTS:
            key = page_key(pool_key, number)
            stored = seen or (await self._call(self.store.get([key]))).get(key)
            seen = None
            page = Page.decode(stored) if stored is not None else Page()
            if page is None or page.sealed:
                self._tail.pop(pool_key, None)
                break
            if page.more:
                number += 1
                continue
            taken = left[: max(0, PAGE_SIZE - len(page.entries))]
            page.entries += taken
            # Full with more to come: say so in the same write, then go on.
            page.more = len(taken) < len(left)
            written = await self._call(
                self.store.put(key, page.encode(), stored.version if stored else None, PAGE_TTL)
            )
            if written:
                numbers += [number] * len(taken)
                left = left[len(taken) :]
                self._tail[pool_key] = number
                misses = 0
                continue
            misses += 1
            if isinstance(written, Conflict):
                seen = written.current
        return numbers + [None] * len(left)

    async def remove(self, pool_key: str, number: int, waiter_id: str) -> bool:
        """Take a waiter's entry off its page; False if the page is sealed (or gone),
        or stayed too busy to change (the caller tries the record)."""
        key = page_key(pool_key, number)
        return await self._departures.add(key, waiter_id, lambda ids: self._remove(key, ids))

    async def _remove(self, key: str, waiter_ids: list[str]) -> list[bool]:
        done = await self._remove_all(key, set(waiter_ids))
        return [done] * len(waiter_ids)

    async def _remove_all(self, key: str, leaving: set[str]) -> bool:
        seen: Stored | None = None
        for _ in range(MAX_ATTEMPTS):
            stored = seen or (await self._call(self.store.get([key]))).get(key)
            seen = None
            page = Page.decode(stored)
            if stored is None or page is None or page.sealed:
                return False
            kept = [e for e in page.entries if e[0] not in leaving]
            if len(kept) == len(page.entries):
                return True  # not there (taken off before)
            page.entries = kept
            written = await self._call(self.store.put(key, page.encode(), stored.version, PAGE_TTL))
            if written:
                return True
            if isinstance(written, Conflict):
                seen = written.current
        return False

    async def take(self, pool_name: str, pool_key: str, number: int) -> tuple[list[Waiter], bool]:
        """Seal page ``number`` and read its waiters, and whether a next page goes on.

        A page that does not exist (nobody appended to it yet, or it expired)
        is sealed empty, so that no arrival writes to it after this.
        """
        key = page_key(pool_key, number)
        seen: Stored | None = None
        for _ in range(MAX_ATTEMPTS):
            stored = seen or (await self._call(self.store.get([key]))).get(key)
            seen = None
            page = Page.decode(stored) if stored is not None else Page()
            if page is None:
                page = Page()
            if not page.sealed:
                page.sealed = True
                written = await self._call(
                    self.store.put(
                        key, page.encode(), stored.version if stored else None, SEALED_TTL
                    )
                )
                if not written:
                    if isinstance(written, Conflict):
                        seen = written.current
                    continue
            self._tail.pop(pool_key, None)
            return [waiter_of(pool_name, e) for e in page.entries], page.more
        raise BackendUnavailable(f"queue page {key} kept changing: try again")


async def count_waiting(store: Store, call: Call, pool_key: str, first: int) -> int:
    """Entries on the pages from ``first`` on (for /status: a read of every page)."""
    total, number = 0, first
    while True:
        keys = [page_key(pool_key, n) for n in range(number, number + 16)]
        found = await call(store.get(keys))
        for key in keys:
            page = Page.decode(found.get(key))
            if page is None:
                return total
            total += len(page.entries)
            if not page.more:
                return total
        number += 16


def page_for_arrival(
    engine: LockEngine, pool: str, owner: str, marks: PageMarks, mode: str = EXCLUSIVE
) -> int | None:
    """Where a new wait goes: None into the record (the engine), else the first page
    number of the pages it is appended to (a new run of pages begins if needed:
    ``marks`` is changed, and the record must be written)."""
    if not goes_to_pages(engine, pool, marks.first):
        return None
    if engine.holds_or_waits(pool, owner, mode):
        # The engine joins it to its hold or its wait (a shared holder's
        # exclusive request joins no hold: it queues behind the pages).
        return None
    if marks.first is None:
        marks.top += 1
        marks.first = marks.top
    return marks.first


def move_into(engine: LockEngine, spec: PoolSpec, waiters: list[Waiter], now: float) -> None:
    """Queue a taken page's waiters in the record, in their order, as the engine
    queues any wait: behind those that came before it, joined to its owner's
    wait or hold if it has one (then granted at once). Those already in the
    record (a step moved the page before) are skipped."""
    present = engine.waiter_ids(spec.name)
    for w in waiters:
        if w.id not in present:
            engine.enqueue(spec, w.owner, now, w.ttl, w.server, w.id, w.since, w.mode)


def pages_due(engine: LockEngine, pool: str, first: int | None) -> bool:
    """Should a step move the first page into the record now? (The window is
    counted only when there are pages: not at all in most steps.)"""
    return first is not None and engine.waiter_count(pool) < WINDOW_LOW


def goes_to_pages(engine: LockEngine, pool: str, first: int | None) -> bool:
    """Does a new arrival (not an owner already holding or waiting) go to the pages?"""
    return first is not None or engine.waiter_count(pool) >= WINDOW_MAX


__all__ = [
    "PAGE_SIZE",
    "WINDOW_LOW",
    "WINDOW_MAX",
    "PageQueue",
    "Sealed",
    "count_waiting",
    "goes_to_pages",
    "move_into",
    "page_for_arrival",
    "page_key",
    "pages_due",
]


async def take_due(
    pages: PageQueue,
    engine: LockEngine,
    spec: PoolSpec,
    pool_key: str,
    marks: PageMarks,
    now: float,
) -> None:
    """Move the first pages of the queue's tail into the window while it runs low."""
    for _ in range(4):  # a few at most (pages emptied by departures)
        if not pages_due(engine, spec.name, marks.first):
            return
        assert marks.first is not None
        waiters, more = await pages.take(spec.name, pool_key, marks.first)
        marks.top = max(marks.top, marks.first)
        marks.first = marks.first + 1 if more else None
        move_into(engine, spec, waiters, now)
