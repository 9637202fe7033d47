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
import math
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from distributex.client.errors import (
    ConnectionLost,
    LockLost,
    LockRefused,
    LockTimeout,
    ServerUnavailable,
)
from distributex.client.sync import (
    DEFAULT_TIMEOUT,
    KEEPER_TICK,
    MAX_BODY,
    MAX_SECONDS,
    MIN_REWAIT,
    NO_EXPIRY_CHECK,
    PIN_AFTER_WAIT,
    REWAIT_PAUSE,
    REWAIT_PAUSE_MAX,
    Lease,
    Requeue,
    Sent,
    _client_setup,
    _fmt,
    _lower,
    apply_renewal,
    check_answer,
    check_durations,
    client_ssl_context,
    clock,
    describe,
    grant_fields,
    held_as,
    one_line,
    set_keepalive,
    tls_failure,
)

log = logging.getLogger("distributex.client")


@dataclass(eq=False)
class AsyncLease(Lease):
    """A :class:`~.sync.Lease` whose ``lost`` is an :class:`asyncio.Event`."""

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


class AsyncClient:
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
        self.server, self.port, self.tls, self.host, self._token = _client_setup(
            server, port, host, token, cacert, cert
        )
        self._ssl = client_ssl_context(cacert, cert, key) if self.tls else None
        if not 0 < timeout <= MAX_SECONDS:
            raise ValueError(f"timeout must be > 0 and at most {MAX_SECONDS:.0f} s")
        self.timeout = timeout
        self.sent = Sent(token=self._token is not None, cert=cert is not None)
        self._session: aiohttp.ClientSession | None = None

    @property
    def address(self) -> str:
        host = f"[{self.server}]" if ":" in self.server else self.server
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """``http(s)://host:port`` of the server."""
        return f"{'https' if self.tls else 'http'}://{self.address}"

    def __repr__(self) -> str:
        return f"AsyncClient({self.url!r}, host={self.host!r})"  # never the token

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(
        self,
        verb: str,
        params: dict[str, str | None],
        budget: float | None,
        connect_timeout: float | None = None,
    ) -> tuple[int, str, dict[str, str]]:
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=_connector())
        query = {k: v for k, v in params.items() if v is not None}
        # ``budget`` bounds the whole call, not each read (None: an untimed /wait/).
        limits = aiohttp.ClientTimeout(total=budget, connect=connect_timeout or self.timeout)
        headers = {"User-Agent": "distributex-client/1"}
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        try:
            async with self._session.get(
                f"{self.url}/{verb}/",
                params=query,
                timeout=limits,
                headers=headers,
                ssl=self._ssl if self._ssl is not None else True,
            ) as resp:
                body = await resp.content.read(MAX_BODY)
                return resp.status, body.decode("utf-8", "replace"), _lower(resp.headers)
        except (aiohttp.ClientError, TimeoutError, OSError, UnicodeError) as exc:
            failed = tls_failure(exc, self.address)
            if failed is not None:
                raise failed from exc
            # Reached the server, then lost it (it crashed or restarted mid-request)?
            lost = isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError)
            kind = ConnectionLost if lost else ServerUnavailable
            raise kind(
                one_line(f"cannot reach distributex server {self.address}: {describe(exc)}")
            ) from exc

    async def acquire(
        self,
        pool: str,
        timeout: float | None = None,
        ttl: float | None = None,
        wait: bool = True,
    ) -> AsyncLease:
        """Get a slot of ``pool`` without background renewal (see :meth:`lock`)."""
        check_durations(timeout, ttl)
        params: dict[str, str | None] = {"host": self.host, "pool": pool, "ttl": _fmt(ttl)}
        deadline = None if timeout is None else clock() + timeout
        pause = REWAIT_PAUSE
        requeue = Requeue(deadline)
        while True:
            sent = clock()
            if wait:
                verb = "wait"
                left = None if deadline is None else max(0.0, deadline - sent)
                params["timeout"] = _fmt(left)
                read = None if left is None else left + self.timeout
            else:
                verb, read = "get", self.timeout
            try:
                status, body, headers = await self._call(verb, params, read)
            except ServerUnavailable as exc:
                if not wait or not requeue.again(exc):
                    if requeue.timed_out():
                        raise LockTimeout(
                            f"pool '{pool}' not obtained within {timeout:g}s"
                        ) from exc
                    raise
                log.info("%s; queueing again in %.1fs", exc, requeue.pause)
                await asyncio.sleep(requeue.pause)
                continue
            requeue.answered()
            word = check_answer(verb, status, body, headers, self.sent)
            if word == "YES":
                break
            if word != "NO":
                raise ServerUnavailable(f"unexpected answer to /{verb}/: {word!r}")
            if not wait:
                raise LockTimeout(f"pool '{pool}' is busy")
            if deadline is not None and deadline - clock() < MIN_REWAIT:
                raise LockTimeout(f"pool '{pool}' not obtained within {timeout:g}s")
            log.info("/wait/ for pool '%s' answered NO early; asking again", pool)
            if deadline is None:
                await asyncio.sleep(pause)
                pause = min(REWAIT_PAUSE_MAX, pause * 2)
        try:
            fence, token, granted_ttl = grant_fields(headers)
        except ServerUnavailable:
            # A YES we cannot use (bad lease headers): give back exactly what was granted.
            raw = headers.get("x-distributex-lease")
            if raw:
                held = held_as(headers, self.host)
                await self.release_quietly(AsyncLease(pool, held, None, raw, None, sent))
            raise
        lease = AsyncLease(pool, held_as(headers, self.host), fence, token, granted_ttl, sent)
        if token and granted_ttl and clock() - sent > PIN_AFTER_WAIT * granted_ttl:
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
        if not lease.token:
            raise ValueError("this lease has no token (0.7 server): it cannot be renewed")
        params = {
            "host": lease.host or None,
            "pool": lease.pool,
            "lease": lease.token,
            "ttl": _fmt(ttl),
        }
        sent = clock()
        t = timeout or self.timeout
        status, body, headers = await self._call("renew", params, t, t)
        apply_renewal(lease, sent, status, body, headers, self.sent)

    async def release(self, lease: Lease, timeout: float | None = None) -> bool:
        """Release exactly this lease. False if it was already gone (GONE)."""
        params: dict[str, str | None] = {"host": lease.host or None, "pool": lease.pool}
        if lease.token:
            params["lease"] = lease.token
        t = timeout or self.timeout
        status, body, headers = await self._call("release", params, t, t)
        lease.released = True
        return check_answer("release", status, body, headers, self.sent) == "OK"

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
    ) -> AsyncIterator[AsyncLease]:
        """Hold a slot of ``pool`` for the ``async with`` block, renewing it in a task.

        Same contract as :meth:`distributex.client.sync.Client.lock`;
        ``on_lost`` may be a plain function or a coroutine function.
        """
        lease = await self.acquire(pool, timeout=timeout, ttl=ttl, wait=wait)
        keeper = asyncio.create_task(self._keep(lease, ttl, on_lost, lost_margin))
        try:
            yield lease
        except BaseException:
            await _stop(keeper)
            await self.release_quietly(lease)
            raise
        if (
            lease.ttl
            and lease.token
            and clock() >= lease.confirmed_until - _margin(lease, lost_margin)
        ):  # a suspend may have ended the lease just now
            lease.mark_lost("the lease ran out while this machine was suspended or stalled")
        await _stop(keeper)
        held = await self.release_quietly(lease)
        if lease.lost.is_set():
            raise LockLost(lease.lost_reason or "lease lost")
        if held is False:
            raise LockLost(f"lease on pool '{pool}' had ended before it was released")

    async def _keep(
        self,
        lease: AsyncLease,
        ttl: float | None,
        on_lost: Callable[[AsyncLease], object] | None,
        lost_margin: float | None,
    ) -> None:
        """The renewal loop; the same schedule as :class:`~.sync.LeaseKeeper`."""
        if not lease.token:
            return
        retry_at: float | None = None
        last_error: Exception | None = None
        reason: str
        while True:
            granted = lease.ttl
            if granted:
                lost_at = lease.confirmed_until - _margin(lease, lost_margin)
                due = lease.renewed_at + granted / 3
                retry = min(1.0, granted / 10)
            else:
                lost_at, due, retry = math.inf, lease.renewed_at + NO_EXPIRY_CHECK, NO_EXPIRY_CHECK
            if retry_at is not None:
                due = retry_at
            now = clock()
            if now >= lost_at:
                err = f": {last_error}" if last_error else ""
                reason = (
                    f"no renewal confirmed for {now - lease.renewed_at:.1f}s of a {granted:g}s "
                    f"lease (server unreachable{err})"
                )
                break
            if now < due:
                # Never sleep long: sleeps stand still while the machine is suspended.
                await asyncio.sleep(min(due - now, lost_at - now, KEEPER_TICK))
                continue
            try:
                budget = max(0.05, min(self.timeout, lost_at - clock()))
                await self.renew(lease, ttl=ttl, timeout=budget)
                retry_at, last_error = None, None
            except LockLost as exc:
                reason = str(exc)
                break
            except LockRefused as exc:
                reason = f"renewal refused: {exc.reason}"
                break
            except ServerUnavailable as exc:
                last_error = exc
                retry_at = clock() + retry
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


def _margin(lease: Lease, lost_margin: float | None) -> float:
    return lost_margin if lost_margin is not None else min(1.0, (lease.ttl or 0) / 10)


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    # asyncio.wait does not raise the task's CancelledError; only our own cancellation.
    await asyncio.wait({task})
