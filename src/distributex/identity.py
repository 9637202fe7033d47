"""A proven identity: what authentication found a request to be (see :mod:`distributex.auth`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Identity:
    """A proven identity: ``names`` it may use as host (the first is its default)."""

    names: tuple[str, ...]
    via: str  # "token", "certificate" or "token+certificate"
    pools: frozenset[str] | None = None  # None: every pool
    admin: bool = False

    @property
    def name(self) -> str:
        return self.names[0]
