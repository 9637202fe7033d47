"""Where lock state lives. Every backend keeps the rules of :mod:`distributex.engine`.

The HTTP layer talks to a :class:`~distributex.backends.base.LockBackend` only;
:func:`make_backend` picks the one the configuration names.
"""

from __future__ import annotations

from distributex.backends.base import BackendUnavailable, LockBackend
from distributex.config import Config

__all__ = ["BackendUnavailable", "LockBackend", "make_backend"]


def make_backend(config: Config) -> LockBackend:
    """The backend named by ``config.backend``; raises BackendUnavailable if it can't be built."""
    if config.backend == "inmemory":
        from distributex.backends.inmemory import InMemoryBackend

        return InMemoryBackend(start_delay=config.start_delay)
    raise BackendUnavailable(
        f"backend '{config.backend}' is not available in this version of distributex"
    )
