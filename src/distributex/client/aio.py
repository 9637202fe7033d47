"""The asyncio distributex client: :class:`AsyncClient`, the twin of :class:`~.sync.Client`.

::

    async with AsyncClient("dx.example.com") as client:
        async with client.lock("pool1", timeout=60, ttl=30) as lease:
            await do_work(fence=lease.fence)   # renewed by a background task
    # LockLost on leaving the block if the lease was lost meanwhile

Same rules as the blocking client (see :mod:`distributex.client.sync`): one
long ``/wait/`` with TCP keepalive for an unbounded wait (keeps the FIFO
place), a read timeout of wait timeout + ``timeout`` otherwise, a ``/wait/``
answered ``NO`` early asked again for the time left, renewal every ``ttl/3``
(the renewal task never sleeps longer than ``KEEPER_TICK``, so a suspend of
this machine is noticed promptly). Cancelling a task that waits for a lock
closes its connection, and the server drops it from the queue.
``lease.lost`` is an :class:`asyncio.Event`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from distributex.client import core
from distributex.client.core import DEFAULT_TIMEOUT, MAX_BODY, Lease, Request, apply_renewal
from distributex.client.errors import (
    LockLost,
    LockRefused,
    ServerUnavailable,
)
from distributex.client.schedule import Acquisition, Renew, Renewal, Sleep
from distributex.client.transport import (
    Driver,
    set_keepalive,
)

log = logging.getLogger("distributex.client")


@dataclass(eq=False)
class AsyncLease(Lease):
    """A :class:`~.core.Lease` whose ``lost`` is an :class:`asyncio.Event`."""

    lost: Any = field(default_factory=asyncio.Event)


def _keepalive_socket(addr_info: Any) -> socket.socket:
    family, type_, proto = addr_info[0], addr_info[1], addr_info[2]
    sock = socket.socket(family, type_, proto)
    set_keepalive(sock)
    return sock


def _connector() -> aiohttp.TCPConnector:
    # socket_factory exists from aiohttp 3.12; older versions just go without keepalive.
    try:
        return aiohttp.TCPConnector(force_close=True, socket_factory=_keepalive_socket)
    except TypeError:
        return aiohttp.TCPConnector(force_close=True)


class AsyncClient(Driver):
    """An asyncio client of one distributex server (see :class:`~.sync.Client`).

    Use ``async with AsyncClient(...) as client`` or call :meth:`close`.
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
        super().__init__(server, port, host, timeout, token, cacert, cert, key)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _send(self, request: Request) -> tuple[int, str, dict[str, str]]:
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=_connector())
        query = {k: v for k, v in request.params.items() if v is not None}
        # ``budget`` bounds the whole call, not each read (None: an untimed /wait/).
        limits = aiohttp.ClientTimeout(total=request.budget, connect=request.connect)
        try:
            async with self._session.get(
                f"{self.url}{request.path}",
                params=query,
                timeout=limits,
                headers=core.headers(self._token),
                ssl=self._ssl if self._ssl is not None else True,
            ) as resp:
                body = await resp.content.read(MAX_BODY)
                return resp.status, body.decode("utf-8", "replace"), core.lower(resp.headers)
        except (aiohttp.ClientError, TimeoutError, OSError, UnicodeError) as exc:
            # Reached the server, then lost it (it crashed or restarted mid-request)?
            lost = isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError)
            raise self.unreachable(exc, lost) from exc

    async def acquire(
        self,
        pool: str,
        timeout: float | None = None,
        ttl: float | None = None,
        wait: bool = True,
        shared: bool = False,
    ) -> AsyncLease:
        """Get a slot of ``pool`` without background renewal (see :meth:`lock`);
        ``shared=True``: a shared lock (``mode=shared``)."""
        plan = Acquisition(
            pool, self.host, timeout, ttl, wait, self.timeout, core.clock(), shared=shared
        )
        while True:
            try:
                status, body, headers = await self._send(plan.request(core.clock()))
            except ServerUnavailable as exc:
                again = plan.unreachable(exc, core.clock())
            else:
                granted = plan.answered(status, body, headers, self.sent, core.clock())
                if granted is None:
                    break
                again = granted
            log.info("%s", again.note)
            if again.pause > 0:
                await asyncio.sleep(again.pause)
        try:
            lease = plan.lease(headers, AsyncLease)
        except ServerUnavailable:
            unusable = plan.unusable(headers, AsyncLease)
            if unusable is not None:
                await self.release_quietly(unusable)
            raise
        assert isinstance(lease, AsyncLease)
        if plan.needs_pin(lease, core.clock()):
            try:
                await self.renew(lease, ttl=ttl)
            except BaseException:
                with contextlib.suppress(Exception):
                    await self.release(lease)
                raise
        return lease

    async def renew(
        self, lease: Lease, ttl: float | None = None, timeout: float | None = None
    ) -> None:
        """Restart the lease's TTL. Raises :class:`LockLost` if the server says GONE."""
        request = core.renew_request(lease, ttl, timeout or self.timeout)
        sent = core.clock()
        status, body, headers = await self._send(request)
        apply_renewal(lease, sent, status, body, headers, self.sent)

    async def release(self, lease: Lease, timeout: float | None = None) -> bool:
        """Release exactly this lease. False if it was already gone (GONE)."""
        status, body, headers = await self._send(
            core.release_request(lease, timeout or self.timeout)
        )
        lease.released = True
        return core.released(status, body, headers, self.sent)

    async def release_quietly(self, lease: Lease, timeout: float | None = None) -> bool | None:
        """Release, logging failures: True released, False already gone, None unknown."""
        try:
            return await self.release(lease, timeout)
        except Exception as exc:
            log.warning("could not release pool '%s': %s", lease.pool, exc)
            return None

    @contextlib.asynccontextmanager
    async def lock(
        self,
        pool: str,
        timeout: float | None = None,
        ttl: float | None = None,
        wait: bool = True,
        on_lost: Callable[[AsyncLease], object] | None = None,
        lost_margin: float | None = None,
        shared: bool = False,
    ) -> AsyncIterator[AsyncLease]:
        """Hold a slot of ``pool`` for the ``async with`` block, renewing it in a task.

        Same contract as :meth:`distributex.client.sync.Client.lock`;
        ``on_lost`` may be a plain function or a coroutine function.
        """
        lease = await self.acquire(pool, timeout=timeout, ttl=ttl, wait=wait, shared=shared)
        renewal = Renewal(lease, lost_margin)
        keeper = asyncio.create_task(self._keep(lease, renewal, ttl, on_lost))
        try:
            yield lease
        except BaseException:
            await _stop(keeper)
            await self.release_quietly(lease)
            raise
        expired = renewal.expired(core.clock()) if lease.token else None
        if expired is not None:  # a suspend may have ended the lease just now
            lease.mark_lost(expired.reason)
        await _stop(keeper)
        held = await self.release_quietly(lease)
        if lease.lost.is_set():
            raise LockLost(lease.lost_reason or "lease lost")
        if held is False:
            raise LockLost(f"lease on pool '{pool}' had ended before it was released")

    async def _keep(
        self,
        lease: AsyncLease,
        renewal: Renewal,
        ttl: float | None,
        on_lost: Callable[[AsyncLease], object] | None,
    ) -> None:
        """The renewal loop: :class:`~.schedule.Renewal`'s schedule, as the blocking keeper."""
        if not lease.token:
            return
        while True:
            step = renewal.step(core.clock(), self.timeout)
            if isinstance(step, Sleep):
                await asyncio.sleep(step.seconds)
                continue
            if not isinstance(step, Renew):
                reason = step.reason
                break
            try:
                await self.renew(lease, ttl=ttl, timeout=step.budget)
                renewal.renewed()
            except (LockLost, LockRefused) as exc:
                reason = renewal.refused(exc).reason
                break
            except ServerUnavailable as exc:
                renewal.failed(exc, core.clock())
                log.info("renewal of pool '%s' failed (will retry): %s", lease.pool, exc)
        if lease.mark_lost(reason):
            log.warning("lost pool '%s': %s", lease.pool, reason)
            if on_lost is not None:
                try:
                    result = on_lost(lease)
                    if inspect.isawaitable(result):
                        await result
                except Exception:
                    log.exception("on_lost callback failed")


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    # asyncio.wait does not raise the task's CancelledError; only our own cancellation.
    await asyncio.wait({task})
