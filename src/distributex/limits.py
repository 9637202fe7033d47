"""Every limit on a request, in one place (docs/configuration.md#limits).

* the request line and each header line: ``max_header_size`` bytes, at most
  ``max_headers`` headers (aiohttp's parser answers 400 or 431);
* a body: a ``Content-Length`` is required (411) and at most
  ``max_body_size`` bytes (413); bodies are never read;
* a name (``host``, ``pool``) or a lease token: :data:`MAX_NAME` characters;
* a number of seconds (``timeout``, ``ttl``): at most :data:`MAX_SECONDS`,
  the same bound the configuration file has;
* parked ``/wait/`` requests on this server: ``max_waiters_per_pool`` of
  one pool, ``max_waiters_per_host`` of one host (429, :class:`WaiterCount`);
* pools made on first use that one host holds or waits on:
  ``max_pools_per_identity`` (429, :class:`PoolShares`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Set
from typing import Any

from distributex.config import MAX_NAME_LENGTH, Config
from distributex.config import MAX_SECONDS as MAX_SECONDS
from distributex.refusal import Refused

log = logging.getLogger("distributex.auth")  # the waiter counts' debug lines, as before

MAX_NAME = MAX_NAME_LENGTH


def parser_limits(config: Config) -> dict[str, Any]:
    """The request-head limits, as aiohttp's server takes them."""
    return {
        "max_line_size": config.max_header_size,
        "max_field_size": config.max_header_size,
        "max_headers": config.max_headers,
    }


def check_body(length: int | None, config: Config) -> None:
    """:class:`Refused` (411, 413) for a body without a length or longer than allowed.

    ``length`` is the body's ``Content-Length``: 0 for none, None for a body
    of unknown length (chunked).
    """
    if length == 0:
        return
    if length is None:
        raise Refused(411, "a request body needs a Content-Length (bodies are not used)")
    if length > config.max_body_size:
        raise Refused(
            413,
            f"request body of {length} bytes is larger than {config.max_body_size} "
            "(max_body_size; bodies are not used)",
        )


class WaiterCount:
    """Parked ``/wait/`` requests on this server, per pool and per host, with their caps."""

    def __init__(self) -> None:
        self.pools: Counter[str] = Counter()
        self.hosts: Counter[str] = Counter()

    def enter(self, config: Config, pool: str, host: str) -> None:
        """Count one waiter (:meth:`leave` when it leaves); :class:`Refused` (429) past a cap."""
        if self.pools[pool] >= config.max_waiters_per_pool:
            raise Refused(
                429,
                f"too many waiters on pool '{pool}': {config.max_waiters_per_pool} already "
                "wait here (max_waiters_per_pool)",
            )
        if self.hosts[host] >= config.max_waiters_per_host:
            raise Refused(
                429,
                f"too many waits by host '{host}': {config.max_waiters_per_host} already "
                "wait here (max_waiters_per_host)",
            )
        self.pools[pool] += 1
        self.hosts[host] += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                # (%.300r: quoted, one line, bounded, as the audit lines show them)
                "waiting: pool=%.300r host=%.300r (%d waiters of the pool, %d of the host)",
                pool,
                host,
                self.pools[pool],
                self.hosts[host],
            )

    def leave(self, pool: str, host: str) -> None:
        for counter, key in ((self.pools, pool), (self.hosts, host)):
            counter[key] -= 1
            if not counter[key]:
                del counter[key]


class PoolShares:
    """Pools made on first use that each host holds or waits on: ``max_pools_per_identity``.

    Noted on a grant or a park; a pool leaves the count once it is idle (checked
    when the host would make one more), so one identity cannot take every
    place of ``max_pools``.
    """

    def __init__(self) -> None:
        # A list, not a set: most hosts use one pool, and a fleet parked on a
        # pool made on first use keeps one of these per host (a set is 216 B,
        # a list of one 64 B); a host's list is at most its share long.
        self.pools: dict[str, list[str]] = {}
        self.noted = 0

    def note(self, host: str, pool: str) -> None:
        mine = self.pools.get(host)
        if mine is None:
            self.pools[host] = [pool]
            self.noted += 1
        elif pool not in mine:
            mine.append(pool)
            self.noted += 1

    def check(self, config: Config, host: str, in_use: Set[str]) -> None:
        """Before ``host`` makes a pool: :class:`Refused` (429) past its share."""
        if self.noted > 2 * len(in_use) + 1024:
            self._prune(in_use)  # hosts that went away: their idle pools are forgotten
        mine = self.pools.get(host)
        if not mine:
            return
        before = len(mine)
        mine[:] = [pool for pool in mine if pool in in_use]
        self.noted -= before - len(mine)
        share = pools_per_identity(config)
        if len(mine) >= share:
            raise Refused(
                429,
                f"too many pools in use by '{host}': {share} pools made on first use already "
                "have it as holder or waiter (max_pools_per_identity)",
            )

    def _prune(self, in_use: Set[str]) -> None:
        for host, mine in list(self.pools.items()):
            mine[:] = [pool for pool in mine if pool in in_use]
            if not mine:
                del self.pools[host]
        self.noted = sum(len(mine) for mine in self.pools.values())


def pools_per_identity(config: Config) -> int:
    """``max_pools_per_identity``, or (0) a tenth of ``max_pools`` but at least 100
    (``max_pools`` if smaller: a small site's one host is not held back)."""
    share = config.max_pools_per_identity
    return share or max(config.max_pools // 10, min(config.max_pools, 100))
