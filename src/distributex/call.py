"""One lock-verb request and its answer, whichever HTTP server read it.

The text API (:mod:`distributex.verbs`) decides on a :class:`Call` and gives
back an :class:`Answer`; an adapter turns the bytes of a connection into the
one and the other into bytes. Two adapters exist: the lean protocol that
serves the lock verbs (:mod:`distributex.fastlane`) and aiohttp, which serves
every other page and a verb on a connection it took over
(:mod:`distributex.httpapi`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

VERBS = ("get", "wait", "release", "renew")
# What the layers note on a request as it is served (a Call, or aiohttp's request).
IDENTITY_KEY = "distributex.identity"  # the proven identity (authentication on)
HOST_KEY = "distributex.host"  # the host acted for
POOL_KEY = "distributex.pool"
FORCED_KEY = "distributex.forced"  # an admin's release of another host's lease
REVOKED_KEY = "distributex.revoked"  # why a reload ended this parked request
# The paths the lock verbs answer on, each with the verb it names.
VERB_PATHS = {path: verb for verb in VERBS for path in (f"/{verb}", f"/{verb}/")}


class Call(dict[str, Any]):
    """A lock-verb request: what was asked, on which connection.

    As a mapping it holds what the layers note about it as it is served
    (the proven identity, the host acted for, why a reload ended it).
    """

    __slots__ = (
        "body_length",
        "cancel",
        "headers",
        "method",
        "parkable",
        "path",
        "peer",
        "raw_query",
        "reserved",
        "transport",
    )

    def __init__(
        self,
        method: str,
        path: str,
        raw_query: str,
        headers: Mapping[str, str],
        transport: Any,
        peer: str | None,
        reserved: bool = False,
        body_length: int | None = 0,
        cancel: Callable[[], object] | None = None,
        parkable: bool = False,
    ) -> None:
        super().__init__()
        self.method = method
        self.path = path
        self.raw_query = raw_query  # as sent: percent escapes not decoded
        self.headers = headers  # read with lower-case names (a plain dict on the lean path)
        self.transport = transport  # None once the connection is gone
        self.peer = peer  # the client's address, None if unknown
        self.reserved = reserved  # on a place beyond the connection cap (fairness)
        self.body_length = body_length  # 0: none; None: a body of unknown length (chunked)
        # Ends the request as a hang-up does (a reload revoking its token): the
        # lean protocol may start serving a request before it has a task.
        self.cancel = cancel
        # A /wait/ may come back from verbs.serve() parked (parkedwait.ParkedWait), to
        # be answered later: the lean protocol on a backend that parks waits.
        self.parkable = parkable

    def still_wanted(self) -> bool:
        """Whether the client still waits for the answer (no hang-up, no revoked token)."""
        transport = self.transport
        return transport is not None and not transport.is_closing() and REVOKED_KEY not in self


class Answer:
    """One word of ``text/plain`` with its status and headers; ``close`` ends the connection."""

    __slots__ = ("close", "headers", "status", "word")

    def __init__(
        self,
        word: str,
        status: int = 200,
        headers: dict[str, str] | None = None,
        close: bool = False,
    ) -> None:
        self.word = word
        self.status = status
        self.headers = headers if headers is not None else {}
        self.close = close

    def real_status(self) -> int:
        """The status meant, also when rewritten to 200 for the 0.7 client."""
        shown = self.headers.get("X-Distributex-Status")
        return int(shown) if shown is not None else self.status

    def __repr__(self) -> str:
        return f"Answer({self.word!r}, {self.status})"
