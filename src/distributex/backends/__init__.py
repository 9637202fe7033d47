"""Where lock state lives. Every backend keeps the rules of :mod:`distributex.engine`.

The HTTP layer talks to a :class:`~distributex.backends.base.LockBackend` only;
:func:`make_backend` picks the one the configuration names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from distributex.backends.base import BackendUnavailable, LockBackend
from distributex.config import DEFAULT_BIND, Config

if TYPE_CHECKING:
    from distributex.backends.store import Store

__all__ = ["BackendUnavailable", "LockBackend", "make_backend"]


def make_backend(config: Config) -> LockBackend:
    """The backend named by ``config.backend``; raises BackendUnavailable if it can't be built."""
    store: Store
    if config.backend == "inmemory":
        from distributex.backends.inmemory import InMemoryBackend

        return InMemoryBackend(start_delay=config.start_delay)
    if config.backend == "sqlite":
        from distributex.backends.shared import SharedStateBackend
        from distributex.backends.sqlite import SqliteStore

        assert config.sqlite_path is not None  # the loader requires it
        store = SqliteStore(config.sqlite_path, config.sqlite_sync)
        return SharedStateBackend(
            store, advertise=config.bind or DEFAULT_BIND, unsafe_store=config.unsafe_store
        )
    if config.backend == "memcache":
        from distributex.backends import memcache
        from distributex.backends.shared import SharedStateBackend

        if memcache.aiomcache is None:
            raise BackendUnavailable(
                "backend 'memcache' needs aiomcache: pip install 'distributex[memcache]'"
            )
        store = memcache.MemcacheStore(config.memcachehost, config.memcacheport)
        # Nudges go to the address the server listens on (the same machine).
        advertise = config.bind or DEFAULT_BIND
        return SharedStateBackend(
            store,
            key_prefix=config.key_prefix,
            advertise=advertise,
            unsafe_store=config.unsafe_store,
        )
    if config.backend == "etcd":
        from distributex.backends import etcd
        from distributex.backends.shared import SharedStateBackend

        if etcd.grpc is None:
            raise BackendUnavailable(
                "backend 'etcd' needs aetcd (grpcio): pip install 'distributex[etcd]'"
            )
        store = etcd.EtcdStore(
            config.etcd_endpoints,
            config.key_prefix,
            cacert=config.etcd_cacert,
            cert=config.etcd_cert,
            key=config.etcd_key,
            user=config.etcd_user,
            password=config.etcd_password,
        )
        return SharedStateBackend(
            store, key_prefix=config.key_prefix, unsafe_store=config.unsafe_store
        )
    if config.backend == "redis":
        from distributex.backends import redis
        from distributex.backends.shared import SharedStateBackend

        if redis.aioredis is None:
            raise BackendUnavailable(
                "backend 'redis' needs redis-py: pip install 'distributex[redis]'"
            )
        # Nudges go through Redis itself (pub/sub): no address to advertise.
        store = redis.RedisStore(config.redis_url, config.key_prefix)
        return SharedStateBackend(
            store, key_prefix=config.key_prefix, unsafe_store=config.unsafe_store
        )
    raise BackendUnavailable(
        f"backend '{config.backend}' is not available in this version of distributex"
    )
