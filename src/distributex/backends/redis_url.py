"""Where a ``redis_url`` points: its description, its Sentinels' client, and failures in words."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from distributex.backends.base import BackendUnavailable
from distributex.config import parse_sentinel_url

try:
    from redis.asyncio.sentinel import Sentinel
    from redis.exceptions import ResponseError
except ImportError:  # pragma: no cover - checked by make_backend
    pass


def describe_url(url: str) -> str:
    """Where a redis_url points, without its password: "redis 10.0.0.5:6379/0"."""
    parts = urlsplit(url)
    if parts.scheme == "redis+sentinel":
        where = parse_sentinel_url(url)
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in where.sentinels)
        return f"redis master '{where.service}' of sentinels {hosts} (db {where.db})"
    if parts.scheme == "unix":
        return f"redis {parts.path}"
    host = parts.hostname or "localhost"
    shown = f"[{host}]" if ":" in host else host
    db = parts.path.strip("/") or "0"
    tls = " (TLS)" if parts.scheme == "rediss" else ""
    return f"redis {shown}:{parts.port or 6379}/{db}{tls}"


def sentinel_client(url: str, options: dict[str, Any]) -> tuple[Any, Any]:
    """A client of the master that the Sentinels name; it asks them again after a fail-over.

    (redis-py's Sentinel pool has no blocking variant; it makes connections
    as needed, without a limit.)
    """
    where = parse_sentinel_url(url)
    sentinel_options = dict(options)
    if where.sentinel_password is not None:
        sentinel_options["password"] = where.sentinel_password
        sentinel_options["username"] = where.sentinel_username
    sentinel = Sentinel(
        list(where.sentinels),
        sentinel_kwargs=sentinel_options,
        username=where.username,
        password=where.password,
        db=where.db,
        **options,
    )
    return sentinel, sentinel.master_for(where.service)


def reason(exc: BaseException) -> str:
    if type(exc).__name__ == "MasterNotFoundError":  # its text holds a whole client's repr
        return "no Sentinel answered with the master (Sentinels down, or no such service)"
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


def unavailable(description: str, exc: BaseException) -> BackendUnavailable:
    if isinstance(exc, ResponseError):
        # e.g. OOM (maxmemory with noeviction), NOPERM, READONLY (a replica)
        return BackendUnavailable(f"{description} refused: {reason(exc)}")
    return BackendUnavailable(f"{description} unreachable: {reason(exc)}")
