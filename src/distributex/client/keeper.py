"""The blocking client's renewal thread: :class:`LeaseKeeper`, a driver of
:class:`~distributex.client.schedule.Renewal`.

The keeper asks of its client only what :class:`Renewer` names, so it does not
import the blocking client (which imports the keeper): the client package's
modules import one way.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

from distributex.client import core, schedule
from distributex.client.blocking import CancelToken
from distributex.client.core import Lease
from distributex.client.errors import Cancelled, LockLost, LockRefused, ServerUnavailable
from distributex.client.schedule import Renew, Renewal, Sleep

log = logging.getLogger("distributex.client")


class Renewer(Protocol):
    """What a :class:`LeaseKeeper` needs of a client (a blocking ``Client`` is one)."""

    @property
    def timeout(self) -> float:
        """Seconds one request may take; the renewal schedule budgets with it."""
        ...

    def renew(
        self,
        lease: Lease,
        ttl: float | None = None,
        timeout: float | None = None,
        cancel: CancelToken | None = None,
    ) -> None:
        """Restart the lease's TTL; raises LockLost, LockRefused, ServerUnavailable
        or Cancelled as the blocking client does."""
        ...


class LeaseKeeper:
    """Renews a lease in a background thread until stopped or lost.

    The schedule and what counts as lost are :class:`~.schedule.Renewal`'s:
    renewal every ``ttl/3``, a failed one retried every ``min(1, ttl/10)``
    seconds, lost on GONE or a refusal, or when no renewal was confirmed
    until ``lost_margin`` seconds (default ``min(1, ttl/10)``) before the
    lease's earliest possible expiry. A caller that must stop work before the
    lease runs out (the CLI) passes the time it needs for that as
    ``lost_margin``. A lease without TTL is only checked every 30 s for GONE.
    """

    def __init__(
        self,
        client: Renewer,
        lease: Lease,
        ttl: float | None = None,
        on_lost: Callable[[Lease], object] | None = None,
        lost_margin: float | None = None,
    ) -> None:
        self.client = client
        self.lease = lease
        self.ttl = ttl
        self.on_lost = on_lost
        self.lost_margin = lost_margin
        self.renewal = Renewal(lease, lost_margin)
        self._stop = threading.Event()
        self._cancel = CancelToken()
        self._thread = threading.Thread(
            target=self._run, name=f"distributex-renew-{lease.pool}", daemon=True
        )

    @property
    def last_error(self) -> BaseException | None:
        return self.renewal.last_error

    def margin(self) -> float:
        return schedule.margin(self.lease, self.lost_margin)

    def start(self) -> None:
        if self.lease.token:
            self._thread.start()

    def stop(self) -> None:
        """Stop renewing (does not release). Returns promptly even mid-request."""
        self._stop.set()
        self._cancel.cancel()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def check_deadline(self) -> bool:
        """Declare the lease lost if its renewal deadline has passed; True if it is lost.

        The renewal thread does this itself at least every :data:`KEEPER_TICK`
        seconds; a supervisor may call it as often as it likes, from any thread.
        """
        if self.lease.lost.is_set():
            return True
        lost = self.renewal.expired(core.clock())
        if lost is not None:
            self._declare_lost(lost.reason)
        return self.lease.lost.is_set()

    def _declare_lost(self, reason: str) -> None:
        if self._stop.is_set() or not self.lease.mark_lost(reason):
            return
        log.warning("lost pool '%s': %s", self.lease.pool, reason)
        if self.on_lost is not None:
            try:
                self.on_lost(self.lease)
            except Exception:
                log.exception("on_lost callback failed")

    def _run(self) -> None:
        while not self._stop.is_set():
            step = self.renewal.step(core.clock(), self.client.timeout)
            if self.lease.lost.is_set():  # declared by check_deadline() in another thread
                return
            if isinstance(step, Sleep):
                if self._stop.wait(step.seconds):
                    return
                continue  # check the deadline again before renewing
            if not isinstance(step, Renew):
                self._declare_lost(step.reason)
                return
            try:
                self.client.renew(self.lease, self.ttl, step.budget, self._cancel)
                self.renewal.renewed()
            except Cancelled:
                return
            except (LockLost, LockRefused) as exc:
                self._declare_lost(self.renewal.refused(exc).reason)
                return
            except ServerUnavailable as exc:
                self.renewal.failed(exc, core.clock())
                log.info("renewal of pool '%s' failed (will retry): %s", self.lease.pool, exc)
