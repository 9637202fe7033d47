"""The ``etcd`` backend: the shared-state layer over an etcd v3 cluster.

Pool records are written by transactions that compare the key's
``mod_revision`` with the one that was read (``create_revision == 0`` to make
one), so a write based on a record another server has replaced is refused and
the step is redone: the same rules as every backend, kept by the layer. The
new revision a transaction returns is the record's next version, so a server
that wrote a pool last steps it again without a read.

Client: etcd's own protocol, gRPC, through grpcio's asyncio API, with the
protocol's messages and stubs from aetcd (a maintained asyncio etcd client).
aetcd's ``Client`` itself is not used: it talks to one member and sends no
per-call metadata, and this store needs both failover and ``hasleader``.
gRPC rather than etcd's HTTP/JSON gateway: the gateway is a proxy inside
etcd, and measured here a transaction through it cost etcd 820-860 us of CPU
against 410-430 us over gRPC (one 600-byte write; the client's CPU was about
the same). etcd 3.4, 3.5 and 3.6 are served; the tests run Debian's 3.4.

Endpoints, failover to the next member and the leader first are
:mod:`distributex.backends.etcd_members`; the watch that brings nudges is
:mod:`distributex.backends.etcd_watch`. This module only builds requests.

Presence: a server's heartbeat key is bound to an etcd lease that the server
keeps alive; etcd itself deletes the key of a server that stops (its leader's
clock judges that), and the server's queue entries are dropped by the next
step. Leases of clients are judged by deadlines in the pool's record, on the
servers' wall clocks (see docs/backends.md for why and the margin).

Nudges: a server that grants a waiter of another server puts, in the
transaction that writes the grant, the pool's name and record under
``<prefix>nudge/<server id>``; every server watches its own key, and answers
its waiter from the record the watch brings (no read, no write of its own:
see the shared layer's ``ANSWER_ON_READ_MAX_TTL``): a hand-off across
servers costs one commit, as within one. A
broken watch is made again from the last revision seen, so no nudge is
missed; if that revision was compacted, the layer checks every pool it waits
on.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any

from distributex.backends.base import BackendUnavailable
from distributex.backends.etcd_members import EtcdError, EtcdMembers, Member, grpc, host, rpc
from distributex.backends.etcd_watch import watch_nudges
from distributex.backends.store import Conflict, Store, Stored

# etcd's default --max-txn-ops: a read of more keys is made of several transactions.
MAX_TXN_OPS = 128

# One request to a member: ``(member, metadata) -> awaitable answer``.
MemberCall = Callable[[Any, Any], Awaitable[Any]]


def _txn(request: Any) -> MemberCall:
    return lambda member, metadata: member.kv.Txn(request, metadata=metadata)


def _put(request: Any) -> MemberCall:
    return lambda member, metadata: member.kv.Put(request, metadata=metadata)


class EtcdStore(Store):
    """An etcd v3 cluster, over gRPC."""

    notifies = True
    nudges_with_put = True
    compress = True

    def __init__(
        self,
        endpoints: Sequence[str],
        key_prefix: str = "distributex/",
        *,
        cacert: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        user: str | None = None,
        password: str | None = None,
    ) -> None:
        if not endpoints:
            raise BackendUnavailable("etcd_endpoints names no endpoint")
        self.endpoints = list(endpoints)
        self.prefix = key_prefix
        self.description = "etcd " + ",".join(host(e) for e in self.endpoints)
        self._cluster = EtcdMembers(
            self.endpoints,
            self.description,
            cacert=cacert,
            cert=cert,
            key=key,
            user=user,
            password=password,
        )
        self._leases: dict[str, int] = {}  # key written with set(ttl) -> its etcd lease
        self._long: dict[int, tuple[int, float]] = {}  # ttl -> shared lease, when granted
        self._presence: int | None = None  # the lease of our heartbeat: nudge keys use it

    async def start(self) -> None:
        await self._cluster.start()

    async def close(self) -> None:
        await self._cluster.close()

    def reset(self) -> None:
        self._cluster.reset()

    # -- leases --------------------------------------------------------------------------

    async def _grant(self, ttl: int) -> int:
        request = rpc.LeaseGrantRequest(TTL=ttl)
        answer = await self._cluster.call(lambda m, md: m.lease.LeaseGrant(request, metadata=md))
        return int(answer.ID)

    async def _long_lease(self, ttl: int) -> int:
        """A lease shared by writes with this ttl for a while (a grant per write is a waste).

        A key lives between ``ttl`` and ``ttl`` + the sharing time.
        """
        share = max(60, ttl // 24)
        cached = self._long.get(ttl)
        if cached is not None and time.monotonic() - cached[1] < share:
            return cached[0]
        lease = await self._grant(ttl + share)
        self._long[ttl] = (lease, time.monotonic())
        return lease

    async def _keep_alive(self, lease: int) -> int:
        """Renew ``lease``; its TTL now (0: it had ended)."""

        async def once(member: Member, metadata: Any) -> int:
            # A keep-alive is a stream in etcd's API; one beat is one exchange.
            stream = member.lease.LeaseKeepAlive(metadata=metadata)
            try:
                await stream.write(rpc.LeaseKeepAliveRequest(ID=lease))
                answer = await stream.read()
            finally:
                stream.cancel()
            if answer is grpc.aio.EOF:
                raise EtcdError(grpc.StatusCode.UNAVAILABLE, "keep-alive stream ended")
            return int(answer.TTL)

        return await self._cluster.call(once)

    # -- the Store calls -----------------------------------------------------------------

    async def get(self, keys: list[str]) -> dict[str, Stored]:
        # Linearizable reads (etcd's default): never an answer from a stale member.
        if len(keys) == 1:
            request = rpc.RangeRequest(key=keys[0].encode())
            ranges = [await self._cluster.call(lambda m, md: m.kv.Range(request, metadata=md))]
        else:
            ranges = []
            for first in range(0, len(keys), MAX_TXN_OPS):
                ops = [
                    rpc.RequestOp(request_range=rpc.RangeRequest(key=k.encode()))
                    for k in keys[first : first + MAX_TXN_OPS]
                ]
                request = rpc.TxnRequest(success=ops)
                answer = await self._cluster.call(_txn(request))
                ranges += [r.response_range for r in answer.responses]
        return {
            kv.key.decode(): Stored(kv.value, kv.mod_revision)
            for answer in ranges
            for kv in answer.kvs
        }

    async def beats(self, prefix: str) -> dict[str, bytes]:
        start = prefix.encode()
        # Every key with this prefix: up to the prefix with its last byte raised.
        request = rpc.RangeRequest(key=start, range_end=start[:-1] + bytes([start[-1] + 1]))
        answer = await self._cluster.call(lambda m, md: m.kv.Range(request, metadata=md))
        return {kv.key.decode(): kv.value for kv in answer.kvs}

    async def put(
        self,
        key: str,
        value: bytes,
        version: Any | None,
        ttl: int = 0,
        durable: bool = True,
        nudge: Collection[str] = (),
        pool: str = "",
    ) -> int | Conflict | bool:
        # The nudges to servers whose waiters this write grants go in the same
        # transaction: no commit of their own, and the watch fires with it.
        name = key.encode()
        if version is None:
            compare = rpc.Compare(
                key=name, target=rpc.Compare.CREATE, result=rpc.Compare.EQUAL, create_revision=0
            )
        else:
            compare = rpc.Compare(
                key=name, target=rpc.Compare.MOD, result=rpc.Compare.EQUAL, mod_revision=version
            )
        # Refused: what is stored now comes back, so the layer need not read it.
        failure = [rpc.RequestOp(request_range=rpc.RangeRequest(key=name))]
        nudges = self._nudges(nudge, pool, value)
        for attempt in range(2):
            write = rpc.PutRequest(key=name, value=value)
            if ttl > 0:
                write.lease = await self._long_lease(ttl)
            request = rpc.TxnRequest(
                compare=[compare],
                success=[rpc.RequestOp(request_put=write), *nudges],
                failure=failure,
            )
            try:
                answer = await self._cluster.txn(request, idempotent=False)
            except EtcdError as exc:
                # A lease that ended makes etcd refuse the whole txn: nothing applied.
                if exc.code == grpc.StatusCode.NOT_FOUND and attempt == 0 and (ttl > 0 or nudges):
                    self._long.pop(ttl, None)
                    if nudges:  # our presence lease ended: the next beat makes one
                        self._presence = None
                        nudges = self._nudges(nudge, pool, value)
                    continue
                raise BackendUnavailable(f"{self.description}: {exc.message}") from None
            if not answer.succeeded:
                return _current(answer)
            return int(answer.header.revision)
        raise AssertionError("unreachable")

    async def set(self, key: str, value: bytes, ttl: int = 0) -> None:
        """Write a key one server owns; with ``ttl``, bound to an etcd lease we keep alive."""
        name = key.encode()
        if ttl <= 0:
            request = rpc.PutRequest(key=name, value=value)
            await self._cluster.call(lambda m, md: m.kv.Put(request, metadata=md), False)
            return
        lease = self._leases.get(key)
        if lease is not None and await self._keep_alive(lease) <= 0:
            lease = None  # ended (we were cut off too long): etcd dropped the key too
        for attempt in range(2):
            if lease is None:
                lease = await self._grant(ttl)
                self._leases[key] = lease
            request = rpc.PutRequest(key=name, value=value, lease=lease)
            try:
                await self._cluster.request(_put(request), True)
            except EtcdError as exc:
                if exc.code == grpc.StatusCode.NOT_FOUND and attempt == 0:
                    lease = None
                    continue
                raise BackendUnavailable(f"{self.description}: {exc.message}") from None
            break
        self._presence = lease

    # -- nudges --------------------------------------------------------------------------

    def _nudge_key(self, server: str) -> bytes:
        return f"{self.prefix}nudge/{server}".encode()

    def _nudges(
        self, servers: Collection[str], pool: str, record: bytes | None = None
    ) -> list[Any]:
        """Txn operations that nudge ``servers`` to look at ``pool``.

        The value is the pool's name, then (in the txn that writes it) a NUL
        and the pool's record: its mod_revision is the txn's, so the servers
        nudged have the record and its version without a read.
        """
        # Bound to our presence, so the keys of servers long gone do not pile up.
        message = pool.encode() if record is None else pool.encode() + b"\0" + record
        lease = self._presence or 0
        return [
            rpc.RequestOp(
                request_put=rpc.PutRequest(key=self._nudge_key(server), value=message, lease=lease)
            )
            for server in sorted(servers)
        ]

    async def notify(self, servers: Collection[str], pool: str) -> None:
        request = rpc.TxnRequest(success=self._nudges(servers, pool))
        try:
            await self._cluster.txn(request, idempotent=True)
        except EtcdError as exc:
            if exc.code == grpc.StatusCode.NOT_FOUND:  # our presence lease ended
                self._presence = None  # the next beat makes one
            raise BackendUnavailable(f"{self.description}: {exc.message}") from None

    async def listen(self, server: str, nudged: Callable[..., None]) -> None:
        await watch_nudges(self._cluster, self._nudge_key(server), nudged)


def _current(answer: Any) -> Conflict | bool:
    """What a refused write's failure branch read: the key as stored now (False: none)."""
    for response in answer.responses:
        kvs = response.response_range.kvs
        if kvs:
            return Conflict(Stored(kvs[0].value, kvs[0].mod_revision))
    return False
