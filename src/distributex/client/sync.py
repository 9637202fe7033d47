"""The blocking distributex client: :class:`Client`, :class:`Lease`, :class:`LeaseKeeper`.

::

    from distributex.client import Client, LockLost

    client = Client("dx.example.com")
    with client.lock("pool1", timeout=60, ttl=30) as lease:
        do_work(fence=lease.fence)        # renewed in the background every ttl/3
        if lease.lost.is_set():           # or pass on_lost=callback
            ...
    # leaving the block releases by lease token; LockLost if the lease was lost

HTTP: the standard library's :mod:`http.client`, one short connection per call,
and every call has a timeout. Connecting (name lookup included) is bounded by
``Client.timeout`` and can be aborted at once through a :class:`CancelToken`.
A ``/wait/`` with a timeout reads for (wait timeout + ``Client.timeout``). An
unbounded ``/wait/`` is *one* long request with no read timeout, because
re-issuing a ``/wait/`` would lose the place in the server's FIFO queue. A
dead server process resets the connection at once; a dead or unreachable
server *machine* is noticed by TCP keepalive (probes after 10 s idle, every
5 s, 3 misses: about 25 s). A ``/wait/`` answered ``NO`` before its timeout
ran out (the server could not hand the grant over) is simply asked again,
for the time that is left (an unbounded wait: for as long as it takes).

Times are taken from ``CLOCK_BOOTTIME`` where the OS has it (a monotonic clock
that keeps counting while *this* machine is suspended), else
:func:`time.monotonic`. The server's lease clock is its event loop's
monotonic clock, which does *not* count a suspend of the server machine: a
suspended server's leases then last longer in wall time, which is safe. A
suspend of the *client* machine, on the other hand, counts fully against its
leases, as it must: after resuming, a lease whose time ran out meanwhile is
lost. The renewal thread never sleeps longer than
:data:`KEEPER_TICK` at a time, so it notices such a jump promptly (sleeps use
the monotonic clock, which stands still during a suspend).

Identity: a client identifies itself by ``host`` (default: what distributex
0.7 sent, see :func:`default_host_id`). The server treats one host as one holder: two clients with
the same ``host`` asking for the same pool *share* the slot. Give concurrent
holders on one machine distinct ``host`` names (or use a local lock as well).
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import socket
import time
from collections.abc import Callable, Iterator
from urllib.parse import urlencode

from distributex.client import core
from distributex.client.blocking import (
    BoundedConnection,
    CancelToken,
    DeadlineMixin,
    DeadlineSSLSocket,
    open_socket,
)
from distributex.client.core import (
    DEFAULT_PORT,
    DEFAULT_TIMEOUT,
    MAX_BODY,
    MAX_SECONDS,
    Lease,
    Request,
    Sent,
    apply_renewal,
    check_answer,
    check_durations,
    check_token,
    grant_fields,
    held_as,
    not_authenticated,
    one_line,
    parse_server,
    split_server,
)
from distributex.client.errors import (
    Cancelled,
    LockLost,
    ServerUnavailable,
)
from distributex.client.keeper import LeaseKeeper
from distributex.client.schedule import (
    KEEPER_TICK,
    NO_EXPIRY_CHECK,
    Acquisition,
    Requeue,
)
from distributex.client.transport import (
    Driver,
    default_host_id,
    set_keepalive,
)

log = logging.getLogger("distributex.client")

# The operator pages (``/status`` of many pools) are larger than a verb's answer.
MAX_PAGE = 64 * 1024 * 1024
# A status stream sends a keep-alive every 15 s; this much silence is a dead server.
STREAM_IDLE = 45.0


def clock() -> float:
    """Seconds on the client's lease clock (see :func:`distributex.client.core.clock`)."""
    return core.clock()


class Client(Driver):
    """A blocking client of one distributex server.

    ``timeout`` bounds every HTTP call (connect, and the answer of calls that
    do not wait); a ``/wait/`` reads for its wait timeout plus ``timeout``.
    """

    def __init__(
        self,
        server: str,
        port: int | None = None,
        host: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        token: str | None = None,
        cacert: str | None = None,
        cert: str | None = None,
        key: str | None = None,
    ) -> None:
        super().__init__(server, port, host, timeout, token, cacert, cert, key, DeadlineSSLSocket)

    # -- one HTTP call -----------------------------------------------------------------

    def _send(
        self, request: Request, cancel: CancelToken | None = None
    ) -> tuple[int, str, dict[str, str]]:
        return self._call(request.verb, request.params, request.budget, cancel, request.connect)

    def _call(
        self,
        verb: str,
        params: dict[str, str | None],
        budget: float | None,
        cancel: CancelToken | None = None,
        connect_timeout: float | None = None,
    ) -> tuple[int, str, dict[str, str]]:
        with self._exchange(f"/{verb}/", params, budget, cancel, connect_timeout) as resp:
            body = resp.read(MAX_BODY).decode("utf-8", "replace")
            return resp.status, body, core.lower(resp.headers)

    @contextlib.contextmanager
    def _exchange(
        self,
        path: str,
        params: dict[str, str | None],
        budget: float | None,
        cancel: CancelToken | None = None,
        connect_timeout: float | None = None,
        idle: float | None = None,
    ) -> Iterator[http.client.HTTPResponse]:
        """One GET of ``path``: the response, read within the block. Every network
        error, also one while the block reads, becomes a client error (one line).

        ``idle`` bounds each read alone (a stream); ``budget`` the whole call.
        """
        query = urlencode({k: v for k, v in params.items() if v is not None})
        connect = connect_timeout or self.timeout
        if budget is not None:
            connect = min(connect, budget)
        # ``budget`` bounds the whole call, connect included (None: unbounded,
        # for an untimed /wait/ that must keep its place in the queue).
        deadline = None if budget is None else core.clock() + budget
        conn = BoundedConnection(self.server, self.port, connect, cancel, self._ssl)
        attached: socket.socket | None = None
        connected = False
        try:
            conn.connect()
            connected = True
            sock = conn.sock
            assert isinstance(sock, DeadlineMixin)
            set_keepalive(sock)
            if cancel is not None:
                cancel._attach(sock)
                attached = sock
            sock.settimeout(idle)
            sock.deadline = deadline
            conn.request(
                "GET",
                f"{path}?{query}" if query else path,
                headers={**core.headers(self._token), "Connection": "close"},
            )
            yield conn.getresponse()
        except (OSError, http.client.HTTPException, UnicodeError, Cancelled) as exc:
            if cancel is not None and cancel.cancelled:
                raise Cancelled(f"{path} cancelled") from None
            # The server went away mid-request (crash, restart): not garbage or a timeout.
            lost = connected and isinstance(exc, ConnectionError | http.client.IncompleteRead)
            raise self.unreachable(exc, lost) from exc
        finally:
            if cancel is not None and attached is not None:
                cancel._detach(attached)
            conn.close()

    # -- the operator pages ------------------------------------------------------------

    def fetch(
        self, path: str, params: dict[str, str | None] | None = None, max_body: int = MAX_PAGE
    ) -> tuple[int, bytes, dict[str, str]]:
        """(status, body, lower-case headers) of ``GET path`` (``/status``, ``/metrics``),
        within :attr:`timeout`; the body is cut at ``max_body`` bytes."""
        with self._exchange(path, params or {}, self.timeout) as resp:
            return resp.status, resp.read(max_body), core.lower(resp.headers)

    @contextlib.contextmanager
    def stream(
        self, path: str, params: dict[str, str | None] | None = None, idle: float = STREAM_IDLE
    ) -> Iterator[tuple[int, dict[str, str], Iterator[bytes]]]:
        """``GET path`` read line by line as it comes (``/status/events``): (status,
        lower-case headers, lines). A line may take ``idle`` seconds; the stream has no end
        of its own. Network errors while reading raise the client's errors."""
        with self._exchange(path, params or {}, None, idle=idle) as resp:
            yield resp.status, core.lower(resp.headers), iter(resp.readline, b"")

    # -- the verbs ---------------------------------------------------------------------

    def acquire(
        self,
        pool: str,
        timeout: float | None = None,
        ttl: float | None = None,
        wait: bool = True,
        cancel: CancelToken | None = None,
        shared: bool = False,
    ) -> Lease:
        """Get a slot of ``pool`` (no background renewal; see :meth:`lock`).

        ``wait=False``: try once (``/get/``). Otherwise wait in the server's
        FIFO queue, at most ``timeout`` seconds (None: as long as it takes).
        A ``/wait/`` answered ``NO`` before that (the server could not hand
        a grant over) is asked again for the time that is left.
        ``ttl`` asks for a lease time shorter than the pool's ``expire``.
        ``shared=True`` asks a shared lock (``mode=shared``): held beside other
        shared holders, never beside exclusive ones (``lease.mode`` says which).

        Raises :class:`LockTimeout`, :class:`LockRefused`,
        :class:`ServerUnavailable` or :class:`Cancelled`.
        """
        plan = Acquisition(
            pool, self.host, timeout, ttl, wait, self.timeout, core.clock(), shared=shared
        )
        while True:
            try:
                status, body, headers = self._send(plan.request(core.clock()), cancel)
            except ServerUnavailable as exc:
                again = plan.unreachable(exc, core.clock())
            else:
                granted = plan.answered(status, body, headers, self.sent, core.clock())
                if granted is None:
                    break
                again = granted
            log.info("%s", again.note)
            if again.pause > 0:
                self._pause(again.pause, cancel)
        try:
            lease = plan.lease(headers)
        except ServerUnavailable:
            unusable = plan.unusable(headers)
            if unusable is not None:
                self.release_quietly(unusable)
            raise
        if plan.needs_pin(lease, core.clock()):
            self._pin(lease, ttl, cancel)
        return lease

    @staticmethod
    def _pause(seconds: float, cancel: CancelToken | None) -> None:
        if cancel is None:
            time.sleep(seconds)
        elif cancel._event.wait(seconds):
            raise Cancelled("/wait/ cancelled")

    def _pin(self, lease: Lease, ttl: float | None, cancel: CancelToken | None) -> None:
        """Renew right after a long wait, so ``confirmed_until`` is tight."""
        try:
            self.renew(lease, ttl=ttl, cancel=cancel)
        except BaseException:
            # We cannot tell how long the lease has left; do not hand it out.
            with contextlib.suppress(Exception):
                self.release(lease)
            raise

    def renew(
        self,
        lease: Lease,
        ttl: float | None = None,
        timeout: float | None = None,
        cancel: CancelToken | None = None,
    ) -> None:
        """Restart the lease's TTL. Raises :class:`LockLost` if the server says GONE."""
        request = core.renew_request(lease, ttl, timeout or self.timeout)
        sent = core.clock()
        status, body, headers = self._send(request, cancel)
        apply_renewal(lease, sent, status, body, headers, self.sent)

    def release(self, lease: Lease, timeout: float | None = None) -> bool:
        """Release exactly this lease. False if it was already gone (GONE)."""
        status, body, headers = self._send(core.release_request(lease, timeout or self.timeout))
        lease.released = True
        return core.released(status, body, headers, self.sent)

    def release_host(self, pool: str, timeout: float | None = None) -> None:
        """The seed's release: every slot of ``pool`` this host holds."""
        request = core.release_host_request(self.host, pool, timeout or self.timeout)
        core.released(*self._send(request), self.sent)

    # -- the context manager -----------------------------------------------------------

    @contextlib.contextmanager
    def lock(
        self,
        pool: str,
        timeout: float | None = None,
        ttl: float | None = None,
        wait: bool = True,
        on_lost: Callable[[Lease], object] | None = None,
        lost_margin: float | None = None,
        shared: bool = False,
    ) -> Iterator[Lease]:
        """Hold a slot of ``pool`` for the ``with`` block, renewing it in the background.

        Leaving the block releases the lease (by token). If the lease was lost
        meanwhile, the exit raises :class:`LockLost` (unless the block raised
        an exception of its own, which then propagates unchanged).
        ``on_lost(lease)`` runs in the renewal thread as soon as a loss is
        detected; ``lease.lost`` is a :class:`threading.Event`.
        See :class:`LeaseKeeper` for ``lost_margin``.
        """
        lease = self.acquire(pool, timeout=timeout, ttl=ttl, wait=wait, shared=shared)
        keeper = LeaseKeeper(self, lease, ttl=ttl, on_lost=on_lost, lost_margin=lost_margin)
        keeper.start()
        try:
            yield lease
        except BaseException:
            keeper.stop()
            self.release_quietly(lease)
            raise
        keeper.check_deadline()  # a suspend may have ended the lease just now
        keeper.stop()
        held = self.release_quietly(lease)
        if lease.lost.is_set():
            raise LockLost(lease.lost_reason or "lease lost")
        if held is False:
            raise LockLost(f"lease on pool '{pool}' had ended before it was released")

    def release_quietly(self, lease: Lease, timeout: float | None = None) -> bool | None:
        """Release, logging failures: True released, False already gone, None unknown."""
        try:
            return self.release(lease, timeout)
        except Exception as exc:
            log.warning("could not release pool '%s': %s", lease.pool, exc)
            return None


__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_TIMEOUT",
    "KEEPER_TICK",
    "MAX_SECONDS",
    "NO_EXPIRY_CHECK",
    "CancelToken",
    "Client",
    "Lease",
    "LeaseKeeper",
    "Requeue",
    "Sent",
    "check_answer",
    "check_durations",
    "check_token",
    "clock",
    "default_host_id",
    "grant_fields",
    "held_as",
    "not_authenticated",
    "one_line",
    "open_socket",
    "parse_server",
    "split_server",
]
