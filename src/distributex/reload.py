"""Rereading the configuration on SIGHUP, without dropping held locks or queued waiters.

What a reload changes at once:

* **Pools added** answer from the next request on.
* **maxlocks raised**: waiters are granted the new slots at once.
* **maxlocks lowered**: no holder loses its slot; new grants wait until the
  pool has fewer holders than the new ``maxlocks``.
* **expire changed**: leases keep the time they were given; grants and
  renewals from now on get the new ``expire`` (a renewal is never longer),
  also the grants of waiters queued before. After it was lowered, a shared
  store's loss blocks the pool until an old lease could have ended.
* **servers changed**: the next request is checked against the new list;
  held slots and queued waiters of hosts no longer listed stay (they may
  release, and a waiter already queued is still served).
* **Pool removed** (and not made on first use): it *drains*. New ``/get/``
  and ``/wait/`` answer ``404 INVALID`` at once; its holders keep their
  leases and can renew and release them; waiters already queued are served
  in order. ``/status`` shows it with ``"draining": true`` until it has no
  holders and no waiters; then it is gone.
* ``autocreate`` and ``max_pools`` apply to the next request.
* **Token removed or changed** (its hash, ``pools`` or ``admin``): the
  identity's parked ``/wait/`` requests leave their queues (as a hang-up) and
  answer ``403 INVALID`` with the reason; its ``/status/events`` streams are
  closed. The log line names the identities whose tokens were added,
  changed or removed (never a token or its hash).

Keys that only a restart can change (the backend and its settings, the
listen address, ``start_delay``, connection limits, ``metrics``) keep their
old values; the reload logs which ones it left alone.

A file that does not load (YAML error, bad value) is refused with one line in
the log, and the old configuration stays in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import warnings
from dataclasses import fields, replace

from aiohttp import web

from distributex import auth
from distributex.appkeys import BACKEND_KEY, CONFIG_KEY, DRAINING_KEY, EVENTS_KEY
from distributex.config import Config
from distributex.engine import PoolSpec
from distributex.ops import read_status

log = logging.getLogger("distributex.reload")

# Read once at start-up: a reload keeps their old values. Names that a Config of
# this version does not have are skipped (other backends add their own keys).
RESTART_KEYS = (
    "backend",
    "memcachehost",
    "memcacheport",
    "key_prefix",
    "sqlite_path",
    "sqlite_sync",
    "unsafe_store",
    "redis_url",
    "etcd_endpoints",
    "bind",
    "port",
    "start_delay",
    "max_connections",
    "header_timeout",
    "idle_timeout",
    "metrics",
)


def apply(app: web.Application, new: Config) -> str:
    """Put ``new`` in force on a running server; returns a one-line summary for the log."""
    old = app[CONFIG_KEY]
    names = {f.name for f in fields(Config)}
    kept = [key for key in RESTART_KEYS if key in names and getattr(old, key) != getattr(new, key)]
    if kept:
        new = replace(new, **{key: getattr(old, key) for key in kept})
        log.warning("reload: %s need a restart; kept the running values", ", ".join(kept))
    backend = app[BACKEND_KEY]
    draining = app[DRAINING_KEY]
    in_use = set(backend.known_pools())
    specs: dict[str, PoolSpec] = {}
    # Every listed pool too: one may be in a first step here (not yet in use)
    # under the spec its request made before the reload.
    for name in in_use | old.pools.keys() | draining.keys() | new.pools.keys():
        spec = new.pool(name)
        if spec is not None:
            draining.pop(name, None)
            specs[name] = spec
            continue
        previous = draining.get(name) or old.pool(name)
        # A listed pool may have holders on other servers of a shared backend:
        # it drains until /status finds it empty.
        if previous is not None and (name in in_use or name in old.pools or name in draining):
            draining[name] = previous
            specs[name] = previous
    _swap(app, new)
    backend.reconfigure(specs)
    if draining:
        # A removed pool that turns out idle stops draining now, not at the next /status.
        task = asyncio.get_running_loop().create_task(_prune(app))
        _tasks.add(task)
        task.add_done_callback(_tasks.discard)
    events = app[EVENTS_KEY]
    if events.metrics is not None:
        events.metrics.set_listed(new.pools)
    events.changed()
    added = sorted(new.pools.keys() - old.pools.keys())
    removed = sorted(old.pools.keys() - new.pools.keys())
    changed = sorted(n for n in new.pools.keys() & old.pools.keys() if new.pools[n] != old.pools[n])
    parts = []
    for word, group in (("added", added), ("changed", changed), ("removed", removed)):
        if group:
            parts.append(f"{word} {', '.join(group)}")
    draining_now = sorted(n for n in draining if n in removed or n in in_use)
    if draining_now:
        parts.append(f"draining {', '.join(draining_now)}")
    return "; ".join(parts + _tokens(app, old, new)) or "no pool changed"


def _tokens(app: web.Application, old: Config, new: Config) -> list[str]:
    """End the parked requests of removed or changed tokens; what changed (names only)."""
    added, removed, changed = auth.token_changes(old, new)
    if not (added or removed or changed):
        return []
    ended = app[auth.SECURITY_KEY].revoke(set(removed) | set(changed))
    parts = [f"tokens: {len(new.tokens)} (was {len(old.tokens)})"]
    for word, group in (("added", added), ("changed", changed), ("removed", removed)):
        if group:
            parts.append(f"tokens {word} for {', '.join(group)}")
    if ended:
        parts.append(f"ended {ended} parked request{'s' if ended > 1 else ''} of those tokens")
    return parts


_tasks: set[asyncio.Task[None]] = set()


async def _prune(app: web.Application) -> None:

    with contextlib.suppress(Exception):  # best effort: /status prunes again
        await read_status(app)


def _swap(app: web.Application, config: Config) -> None:
    # Handlers read app[CONFIG_KEY] once per request, so the swap takes effect
    # between requests. aiohttp warns about changing a running application's
    # state (nothing else goes wrong); here it is the point.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        app[CONFIG_KEY] = config
