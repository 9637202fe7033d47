"""The distributex client: a Python library and the ``distributex`` command.

Blocking::

    from distributex.client import Client
    with Client("dx.example.com").lock("pool1", timeout=60, ttl=30) as lease:
        ...

asyncio::

    from distributex.client import AsyncClient
    async with AsyncClient("dx.example.com") as client:
        async with client.lock("pool1") as lease:
            ...
"""

from typing import Any

from distributex.client.errors import (
    AuthenticationFailed,
    Cancelled,
    CertificateMismatch,
    ConnectionLost,
    DistributexError,
    LockLost,
    LockRefused,
    LockTimeout,
    ServerUnavailable,
    TLSFailed,
)
from distributex.client.sync import CancelToken, Client, Lease, LeaseKeeper

__all__ = [
    "AsyncClient",
    "AsyncLease",
    "AuthenticationFailed",
    "CancelToken",
    "Cancelled",
    "CertificateMismatch",
    "Client",
    "ConnectionLost",
    "DistributexError",
    "Lease",
    "LeaseKeeper",
    "LockLost",
    "LockRefused",
    "LockTimeout",
    "ServerUnavailable",
    "TLSFailed",
]


def __getattr__(name: str) -> Any:
    # The asyncio client pulls in aiohttp; load it only when asked, so the
    # ``distributex`` command starts fast.
    if name in ("AsyncClient", "AsyncLease"):
        from distributex.client import aio

        return getattr(aio, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
