"""What the shared-state layer needs of a store: a key-value interface with compare-and-set.

Each store-backed backend (sqlite, memcache, redis, etcd) is a small adapter
implementing :class:`Store`; the layer (:mod:`distributex.backends.shared`)
keeps every rule in the engine and uses only these calls.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from distributex.backends.base import BackendUnavailable


class StoreReplaced(BackendUnavailable):
    """The store is not the one this server served from (its file was deleted or replaced).

    The store has moved on to what is there now; the layer records a loss of
    state in it, as for a store that restarted empty.
    """


@dataclass
class Stored:
    """A value read from the store and the version to compare against when writing it."""

    value: bytes
    version: Any


@dataclass
class Conflict:
    """A refused write (false) that says what the store holds now: the layer need not read it."""

    current: Stored

    def __bool__(self) -> bool:
        return False


class Store(abc.ABC):
    """A key-value store with compare-and-set, as the shared-state layer needs it.

    Keys are text of at most 250 characters (no spaces or control characters).
    Calls raise :class:`BackendUnavailable` (with a reason for the 503) when the
    store cannot answer; the layer bounds them in time as well.
    """

    #: Says where the store is, for messages ("memcached 127.0.0.1:11211").
    description: str = "store"
    #: True if the store carries nudges between servers (:meth:`notify` and
    #: :meth:`listen`); the layer then opens no UDP socket and polls slowly.
    notifies: bool = False
    #: True if :meth:`put` takes ``nudge`` (server ids) and ``pool``, and tells
    #: them in the same write (one round trip and one commit less per hand-off).
    nudges_with_put: bool = False
    #: True if pool records are stored zlib-compressed (about half the size):
    #: for a store whose commits cost by the byte (etcd: a 4.7 KB value takes
    #: 3.0 ms to commit on three members, 1.5 KB 2.2 ms, 100 B 1.9 ms).
    compress: bool = False

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect (a first round trip may be made by the layer)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Drop connections."""

    def reset(self) -> None:  # noqa: B027 - optional hook
        """Drop connections after a failed or abandoned call (they may be mid-answer)."""

    def now(self) -> float:
        """Seconds on the clock every server judges leases by (default: the wall clock)."""
        return time.time()

    @abc.abstractmethod
    async def get(self, keys: list[str]) -> dict[str, Stored]:
        """The values of those keys that exist, with their versions."""

    @abc.abstractmethod
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
        """Write if the key is still at ``version`` (None: only if it does not exist).

        ``ttl`` > 0 lets the store drop the key after that many seconds.
        ``durable`` False: the write may be lost in a crash (a store that
        syncs to disk may skip the sync for it).
        ``nudge`` and ``pool``: the servers to nudge about ``pool`` once the
        write succeeds; only a store with :attr:`nudges_with_put` is given
        them (the others ignore them: the layer nudges on its own).
        Returns something false (None, False, or a :class:`Conflict` with
        what is stored now, which saves the layer a read) if another write
        came first; else the new version if the store knows it (the layer then need not
        read the record back before its next step), else True.
        """

    @abc.abstractmethod
    async def set(self, key: str, value: bytes, ttl: int = 0) -> None:
        """Write unconditionally: only for keys a single server owns (its heartbeat)."""

    async def own_clock(self) -> tuple[float, float] | None:
        """The store's own clock and its resolution in seconds, if it has one
        that is not already the clock of :meth:`now` (memcached's ``stats``)."""
        return None

    async def beats(self, prefix: str) -> dict[str, bytes] | None:
        """Every key under ``prefix`` (servers' heartbeats) and its value, if the
        store can list keys; None if it cannot."""
        return None

    async def unsafe_setting(self) -> str | None:
        """A setting of the store that breaks mutual exclusion (memcached that
        evicts items when full), or None."""
        return None

    async def notify(self, servers: Collection[str], pool: str) -> None:
        """Tell each of ``servers`` (server ids) to step ``pool`` now (``notifies`` stores).

        A hint only: one that is lost is made up for by the poll.
        """
        raise NotImplementedError

    async def listen(self, server: str, nudged: Callable[..., None]) -> None:
        """Run until cancelled: ``nudged(pool)`` for each :meth:`notify` to ``server``.

        A store that sends the record the nudge is about with it calls
        ``nudged(pool, stored)``: the layer then need not read it.

        Calls ``nudged(None)`` whenever nudges may have been missed (after
        connecting, and after every reconnection): the layer then steps every
        pool it waits on. Reconnects by itself; never returns.
        """
        raise NotImplementedError
