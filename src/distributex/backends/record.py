"""The stored records: a pool's (holders, queue, fence, block) and the store's epoch.

A pool's record is JSON (zlib-compressed for stores whose commits cost by
the byte), with times as absolute seconds on the store's clock. The epoch
record marks the store's life: a new one means the store lost its state.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from typing import Any

from distributex.engine import EXCLUSIVE, MODES, NEVER, Hold, Lease, PoolSpec, PoolState, Waiter

# The stored record's format; a record of a newer format is refused.
RECORD_VERSION = 1


class StaleRecord(Exception):
    """A record this version cannot read (corrupt, or written by a newer version)."""


@dataclass
class PageMarks:
    """Where a pool's queue goes on past the record (see ``pages.py``).

    ``first``: the page whose waiters come next after the record's own (None:
    the whole queue is in the record). ``top``: the highest page number used
    so far, so that a new run of pages never reuses one.
    """

    first: int | None = None
    top: int = 0


@dataclass
class PoolRecord:
    """A pool's record, decoded."""

    state: PoolState
    epoch: str
    pages: PageMarks
    settings: list[Any] | None = None  # [maxlocks, expire] it was written with


def encode_pool(
    name: str,
    state: PoolState | None,
    fence: int,
    epoch: str,
    fragments: dict[str, str] | None = None,
    compress: bool = False,
    spec: PoolSpec | None = None,
    pages: PageMarks | None = None,
) -> bytes:
    """A pool's record: JSON, times as absolute seconds on the store's clock.

    ``fragments`` (waiter id -> its queue entry's JSON), kept by the caller
    from one record of a pool to the next, saves encoding the same queue
    entries at every step (under load the queue is long and changes at its
    ends only); this record's new entries are added to it.
    """

    def when(t: float) -> float | None:
        return None if t == NEVER else t

    holds = []
    queue: list[str] = []
    blocked = None
    if state is not None:
        for hold in state.holds:
            leases = []
            for lease in hold.leases.values():
                w = lease.waiter
                waiter: list[Any] | None = None
                if w is not None:
                    waiter = [w.id, w.server, w.since, w.ttl]
                    waiter += [] if w.mode == EXCLUSIVE else [w.mode]
                leases.append(
                    [lease.token, lease.ttl, lease.granted_at, when(lease.expires_at), waiter]
                )
            # A mode other than the default is a fifth item (records as before otherwise).
            mode = [] if hold.mode == EXCLUSIVE else [hold.mode]
            holds.append([hold.owner, hold.fence, hold.granted_at, leases, *mode])
        known: dict[str, str] = {} if fragments is None else fragments

        def entry(w: Waiter) -> str:
            known[w.id] = text = queue_entry(w)
            return text

        queue = [known.get(w.id) or entry(w) for w in state.queue]
        if len(known) > 2 * len(queue) + 64:
            # Entries of waiters gone (granted, left): forgotten now and then,
            # not at every step (ids are never used again).
            current = {w.id for w in state.queue}
            for gone in known.keys() - current:
                del known[gone]
        if state.blocked_until != -math.inf:
            blocked = state.blocked_until
    head = {
        "v": RECORD_VERSION,
        "pool": name,
        "epoch": epoch,
        "fence": fence,
        "blocked": blocked,
        "holds": holds,
    }
    if state is not None and state.delays:
        head["delays"] = [[until, mode] for until, mode in state.delays]
    if pages is not None and (pages.first is not None or pages.top):
        head["pages"] = [pages.first, pages.top]
    if spec is not None:
        # The settings the writer ran the pool with: a server configured
        # otherwise says so (two servers, two maxlocks: more holders than one allows).
        head["spec"] = settings_of(spec)
    record = f'{_json(head)[:-1]},"queue":[{",".join(queue)}]}}'.encode()
    # A JSON record starts with "{"; a compressed one with zlib's header byte.
    return zlib.compress(record, 1) if compress else record


def settings_of(spec: PoolSpec) -> list[Any]:
    return [spec.maxlocks, spec.expire]


def record_settings(raw: bytes) -> list[Any] | None:
    """The pool settings a record was written with (None: not said)."""
    try:
        record = json.loads(raw if raw[:1] == b"{" else zlib.decompress(raw))
        return record.get("spec") if isinstance(record, dict) else None
    except (ValueError, zlib.error):
        return None


def split_nudge(message: bytes) -> tuple[str, bytes | None]:
    """A nudge a store carried: the pool's name, and what follows a NUL (the
    record written with the grant, in the store's own framing) if anything does."""
    name, sep, rest = message.partition(b"\0")
    return name.decode("utf-8", "replace"), rest if sep else None


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def decode_pool(raw: bytes, queue: bool = True) -> tuple[PoolState, str]:
    """The state in a record (JSON, or JSON compressed), and the epoch it was written in.

    ``queue`` False leaves the queue out (empty): for a look at the grants only.
    """
    record = decode_record(raw, queue)
    return record.state, record.epoch


def queue_entry(waiter: Waiter) -> str:
    """A waiter as the JSON of its queue entry (in a record or a page); a mode
    other than the default is a sixth item."""
    entry = [waiter.id, waiter.server, waiter.owner, waiter.ttl, waiter.since]
    if waiter.mode != EXCLUSIVE:
        entry.append(waiter.mode)
    return _json(entry)


def _mode(rest: list[Any]) -> str:
    mode = rest[0] if rest else EXCLUSIVE
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}")
    return str(mode)


def waiter_of(pool: str, entry: list[Any]) -> Waiter:
    """The waiter a decoded queue entry stands for."""
    w_id, server, owner, ttl, since, *rest = entry
    return Waiter(pool, owner, ttl, since, id=w_id, server=server, mode=_mode(rest))


def decode_record(raw: bytes, queue: bool = True) -> PoolRecord:
    """A pool's record (JSON, or JSON compressed), decoded; see :func:`decode_pool`."""
    try:
        record = json.loads(raw if raw[:1] == b"{" else zlib.decompress(raw))
        if not isinstance(record, dict) or "v" not in record:
            raise ValueError("not a distributex pool record")
        if record["v"] != RECORD_VERSION:
            raise StaleRecord(f"pool record of format {record['v']} (this version reads 1)")
        name = record["pool"]
        state = PoolState(fence=int(record["fence"]))
        if record["blocked"] is not None:
            state.blocked_until = float(record["blocked"])
        for owner, fence, granted_at, leases, *mode in record["holds"]:
            hold = Hold(
                pool=name, owner=owner, fence=int(fence), granted_at=granted_at, mode=_mode(mode)
            )
            for token, ttl, l_granted, expires_at, waiter in leases:
                lease = Lease(
                    hold=hold,
                    token=token,
                    ttl=ttl,
                    granted_at=l_granted,
                    expires_at=NEVER if expires_at is None else expires_at,
                    delivered=waiter is None,
                )
                if waiter is not None:
                    w_id, server, since, w_ttl, *w_mode = waiter
                    lease.waiter = Waiter(
                        name, owner, w_ttl, since, lease, id=w_id, server=server, mode=_mode(w_mode)
                    )
                hold.leases[token] = lease
            state.holds.append(hold)
        state.delays = [(float(until), _mode([mode])) for until, mode in record.get("delays", ())]
        for entry in record["queue"] if queue else ():
            state.queue.append(waiter_of(name, entry))
        first, top = record.get("pages") or (None, 0)
        marks = PageMarks(None if first is None else int(first), int(top))
        return PoolRecord(state, str(record["epoch"]), marks, record.get("spec"))
    except StaleRecord:
        raise
    except (ValueError, KeyError, TypeError, zlib.error) as exc:
        raise StaleRecord(f"unreadable pool record ({exc})") from None


@dataclass
class Epoch:
    """The store's life: made once; a new one means the store lost its state at ``lost_at``."""

    id: str
    created: float
    lost_at: float | None = None

    def encode(self) -> bytes:
        return json.dumps(
            {"id": self.id, "created": self.created, "lost_at": self.lost_at}
        ).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Epoch:
        try:
            record = json.loads(raw)
            return cls(str(record["id"]), float(record["created"]), record.get("lost_at"))
        except (ValueError, KeyError, TypeError):
            raise StaleRecord("unreadable epoch record") from None
