"""The rules a history must keep, proven from the history alone (pure: a history in, findings out).

* **safety**: at no instant are more than ``maxlocks`` client-seen leases
  open in a pool (leases of one client may overlap: asking again while
  holding is one hold). Client-seen intervals lie inside the server's own,
  so an overlap is a real double grant, not a race in the check.
* **fencing**: no fence is given to two owners; in a mutex, leases that follow
  each other carry increasing fences; in any pool, a grant asked for after
  another grant's YES arrived carries a higher fence (grant order).
* **liveness**: no wait long enough for FIFO to serve it was answered NO
  while nothing failed (a fault during the wait excuses it), and, when
  asked, every client was granted something.
* **durability** (``durable``: the store keeps its state through whatever
  happened): no renewal was answered GONE before the lease could have run
  out. Always: a lease released with OK cannot be renewed again.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from distributex.check.history import History, LeaseRecord

SAFETY = "safety"
FENCING = "fencing"
LIVENESS = "liveness"
DURABILITY = "durability"


@dataclass(frozen=True)
class Finding:
    """One broken rule: which, in which pool, a line saying how, and the leases involved."""

    rule: str
    pool: str
    message: str
    leases: tuple[LeaseRecord, ...] = ()

    def __str__(self) -> str:
        return f"{self.rule}: pool {self.pool}: {self.message}"


def check(
    history: History,
    maxlocks: dict[str, int],
    clients: int | None = None,
    durable: bool = True,
    max_shared: dict[str, int | None] | None = None,
) -> list[Finding]:
    """Every broken rule of ``history`` (empty: the rules held). ``clients``: the
    number of clients, each of which must have been granted something (None: not
    checked). ``durable``: no lease may end before its time. Modes:
    ``maxlocks`` bounds the holders of the default mode, ``max_shared`` (per
    pool; absent or None: no limit) the shared ones, and the two kinds never
    hold a pool at once."""
    findings: list[Finding] = []
    for pool, token in history.released_came_back:
        findings.append(
            Finding(DURABILITY, pool, f"lease {token[:8]}... renewed after its release")
        )
    if durable:
        for client, pool, fence in history.gone_while_valid:
            findings.append(
                Finding(DURABILITY, pool, f"{client}'s lease (fence {fence}) gone before its time")
            )
    for pool, limit in maxlocks.items():
        leases = [r for r in history.leases if r.pool == pool]
        shared_limit = (max_shared or {}).get(pool)
        findings += overlaps(pool, leases, limit, history.started, shared_limit)
        findings += fences(pool, leases, limit, history.started, history.faults)
    findings += starvation(history)
    if clients is not None:
        granted = {r.client for r in history.leases}
        if len(granted) < clients:
            missing = sorted(set(f"c{i}" for i in range(clients)) - granted)
            says = ", ".join(missing) if missing else f"{clients - len(granted)} clients"
            findings.append(Finding(LIVENESS, "*", f"never granted: {says}"))
    return findings


def overlaps(
    pool: str,
    leases: list[LeaseRecord],
    limit: int,
    origin: float,
    shared_limit: int | None = None,
) -> list[Finding]:
    """More holders at once than the rules allow; one finding per new set of open
    leases: more than ``limit`` of the default mode, more than ``shared_limit``
    shared ones (None: no limit), or the two kinds together.

    A lease whose YES came after its time could have run out (a long wait: the
    TTL may have started when the request arrived) is held for no instant.
    """
    leases = [r for r in leases if r.valid_until() > r.got]
    events = sorted(
        [(r.got, 1, i) for i, r in enumerate(leases)]
        + [(r.valid_until(), -1, i) for i, r in enumerate(leases)],
        key=lambda e: (e[0], e[1]),  # an end at the same instant comes first
    )
    found: list[Finding] = []
    open_: dict[int, LeaseRecord] = {}
    reported: set[frozenset[int]] = set()
    for when, step, i in events:
        if step < 0:
            open_.pop(i, None)
            continue
        open_[i] = leases[i]
        broken = _too_many(open_.values(), limit, shared_limit)
        if broken is None:
            continue
        key = frozenset(open_)
        if key in reported:
            continue
        reported.add(key)
        named = tuple(sorted(open_.values(), key=lambda r: r.got))
        found.append(
            Finding(
                SAFETY,
                pool,
                f"{broken} at {when - origin:.3f}s: "
                + "; ".join(r.describe(origin) for r in named),
                named,
            )
        )
    return found


def _too_many(open_: Iterable[LeaseRecord], limit: int, shared_limit: int | None) -> str | None:
    """What the open leases break, or None. A client's leases of one kind are one
    hold (asking again while holding joins the hold)."""
    open_ = list(open_)
    exclusive = {r.client for r in open_ if r.mode != "shared"}
    shared = {r.client for r in open_ if r.mode == "shared"}
    if len(exclusive) > limit:
        return f"{len(exclusive)} holders > maxlocks {limit}"
    if exclusive and shared:
        return f"{len(shared)} shared beside {len(exclusive)} exclusive"
    if shared_limit is not None and len(shared) > shared_limit:
        return f"{len(shared)} shared holders > max_shared {shared_limit}"
    return None


def fences(
    pool: str,
    leases: list[LeaseRecord],
    limit: int,
    origin: float,
    history_faults: Sequence[tuple[float, str]] = (),
) -> list[Finding]:
    found: list[Finding] = []
    owners: dict[int, LeaseRecord] = {}
    for record in leases:
        first = owners.setdefault(record.fence, record)
        if first.client != record.client:
            found.append(
                Finding(
                    FENCING,
                    pool,
                    f"fence {record.fence} given to two owners: {first.describe(origin)}; "
                    f"{record.describe(origin)}",
                    (first, record),
                )
            )
    ordered = sorted(leases, key=lambda r: r.got)
    if limit == 1:
        for before, after in itertools.pairwise(ordered):
            # Shared leases granted together may arrive in either order.
            both_shared = before.mode == after.mode == "shared"
            if before.client != after.client and not both_shared and before.fence >= after.fence:
                found.append(went_back(pool, before, after, origin))
    # Grant order: a grant asked for after another's YES arrived came later on the server.
    arrivals = [r.got for r in ordered]
    best: list[LeaseRecord] = []  # best[k]: the highest fence among ordered[: k + 1]
    for record in ordered:
        best.append(record if not best or record.fence > best[-1].fence else best[-1])
    unsure = uncertain_since(history_faults)
    for record in leases:
        k = bisect.bisect_left(arrivals, record.sent)
        if k == 0:
            continue
        earlier = best[k - 1]
        if earlier.client == record.client or record.fence > earlier.fence:
            continue
        # A slot the client already held comes back with its old fence: one it saw
        # (asked again while holding), or one whose YES it never got (a call that
        # failed may have been granted).
        again = any(
            r.client == record.client and r.fence == record.fence and r.got < record.got
            for r in leases
        )
        if not again and unsure.get(record.client, float("inf")) > record.sent:
            found.append(went_back(pool, earlier, record, origin))
    return found


def uncertain_since(faults: Sequence[tuple[float, str]]) -> dict[str, float]:
    """Each client's first failed call: from then on it may hold a slot it never saw."""
    first: dict[str, float] = {}
    for when, client in faults:
        first[client] = min(when, first.get(client, when))
    return first


def went_back(pool: str, before: LeaseRecord, after: LeaseRecord, origin: float) -> Finding:
    return Finding(
        FENCING,
        pool,
        f"fence went back: {before.describe(origin)} was granted before {after.describe(origin)}",
        (before, after),
    )


def starvation(history: History) -> list[Finding]:
    """Long waits answered NO while no call failed anywhere (a fault may excuse a refusal)."""
    faults = sorted(when for when, _client in history.faults)
    found = []
    for refusal in history.long_waits_refused:
        k = bisect.bisect_left(faults, refusal.sent)
        if k < len(faults) and faults[k] <= refusal.answered:
            continue
        found.append(
            Finding(
                LIVENESS,
                refusal.pool,
                f"{refusal.client}'s wait of {refusal.timeout:g}s answered NO after "
                f"{refusal.answered - refusal.sent:.3f}s with nothing failing (starved)",
            )
        )
    return found


def assert_held(
    history: History,
    maxlocks: dict[str, int],
    clients: int | None = None,
    durable: bool = True,
    max_shared: dict[str, int | None] | None = None,
) -> None:
    """:func:`check` for tests: AssertionError listing the findings, if any."""
    findings = check(history, maxlocks, clients, durable, max_shared)
    assert not findings, "\n".join(str(f) for f in findings[:10])
