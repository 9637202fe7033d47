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

Endpoints: one channel per member; calls go to the leader first (each
member's status, asked at start and every LEADER_CHECK_INTERVAL, says which
it is; a follower would pass writes on to it), and move on to the next
member when one cannot connect or says it has no leader (``hasleader``
metadata: a member cut off from the quorum says so at once instead of
hanging). A read also moves on when a member does not answer within
READ_ATTEMPT_TIMEOUT; a write whose answer is lost is not sent again (it may
have been applied): the layer treats it as in doubt. With the quorum lost no
write commits and every linearizable read fails, so nothing is granted; the
layer answers 503 within its bounds. Channels retry a lost member at most
RECONNECT_MAX_MS apart, so service resumes soon after the quorum returns.

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

import asyncio
import contextlib
import logging
import os
import random
import re
import ssl
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Collection, Sequence
from typing import Any, TypeVar

from distributex.backends.base import BackendUnavailable
from distributex.backends.record import split_nudge
from distributex.backends.store import Conflict, Store, Stored

# gRPC's core logs to stderr on its own (a refused TLS handshake: three lines);
# the store says what failed in its own words. GRPC_VERBOSITY=INFO shows them.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

try:  # the ``etcd`` extra
    import grpc
    from aetcd import rpc
except ImportError:  # pragma: no cover - make_backend says what to install
    grpc = None
    rpc = None

log = logging.getLogger("distributex.etcd")

T = TypeVar("T")

# A read goes on to the next member if one does not answer in this time.
READ_ATTEMPT_TIMEOUT = 0.5
WATCH_BACKOFF_MAX = 1.0
WATCH_CREATE_TIMEOUT = 2.0
# etcd's default --max-txn-ops: a read of more keys is made of several transactions.
MAX_TXN_OPS = 128
# How often the server checks that its requests go to the leader, and for how long.
LEADER_CHECK_INTERVAL = 5.0
LEADER_CHECK_TIMEOUT = 1.0
# A channel that lost its member tries again at most this far apart (gRPC's
# default grows to two minutes: too long to notice a quorum come back).
RECONNECT_MAX_MS = 1000
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", RECONNECT_MAX_MS),
    # A member gone silent (no RST) is found by pings, also on an idle watch (gRPC
    # stops after two pings without data unless told); etcd accepts one per 5 s.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    # No 4 MiB cap on answers: a watch resumed after an outage may bring many records.
    ("grpc.max_receive_message_length", -1),
]
# A member cut off from the quorum answers "no leader" instead of waiting.
HASLEADER = ("hasleader", "true")
# Refused before the request was proposed: safe to send to another member.
NO_LEADER = "etcdserver: no leader"
AUTH_RETRY = ("etcdserver: invalid auth token", "etcdserver: user name is empty")
# gRPC's words for a call that never reached a member.
NOT_CONNECTED = "failed to connect to all addresses"
_GRPC_PREFIX = re.compile(r"^[A-Z_]+: (?:(?:ipv4|ipv6|unix):\S+: )?")


# One request to a member: ``(member, metadata) -> awaitable answer``.
MemberCall = Callable[[Any, Any], Awaitable[Any]]


def _txn(request: Any) -> MemberCall:
    return lambda member, metadata: member.kv.Txn(request, metadata=metadata)


def _put(request: Any) -> MemberCall:
    return lambda member, metadata: member.kv.Put(request, metadata=metadata)


def _host(endpoint: str) -> str:
    return endpoint.split("://", 1)[1]


class EtcdError(Exception):
    """etcd answered with an error (``code``: the gRPC status)."""

    def __init__(self, code: Any, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Member:
    """One etcd member: its channel and the stubs of the services used."""

    def __init__(self, endpoint: str, credentials: Any) -> None:
        target = _host(endpoint)
        if endpoint.startswith("https://"):
            self.channel = grpc.aio.secure_channel(target, credentials, CHANNEL_OPTIONS)
        else:
            self.channel = grpc.aio.insecure_channel(target, CHANNEL_OPTIONS)
        self.kv = rpc.KVStub(self.channel)
        self.lease = rpc.LeaseStub(self.channel)
        self.watch = rpc.WatchStub(self.channel)
        self.auth = rpc.AuthStub(self.channel)
        self.maintenance = rpc.MaintenanceStub(self.channel)


def _ca_file(cacert: str | None) -> str | None:
    """The CA file https endpoints are checked with: the one named, else the system's."""
    if cacert is not None:
        return cacert
    paths = ssl.get_default_verify_paths()
    for path in (paths.cafile, paths.openssl_cafile, "/etc/ssl/certs/ca-certificates.crt"):
        if path and os.path.isfile(path):
            return path
    return None  # grpcio's own roots


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


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
        self.description = "etcd " + ",".join(_host(e) for e in self.endpoints)
        self._credentials: Any = None
        if any(e.startswith("https://") for e in self.endpoints):
            try:
                # Checked here so a bad file is one line at start-up, not a refusal per call.
                context = ssl.create_default_context(cafile=cacert)
                if cert is not None:
                    context.load_cert_chain(cert, key)
                self._credentials = grpc.ssl_channel_credentials(
                    root_certificates=_read(_ca_file(cacert)),
                    # Without a key file, the certificate's file holds the key too.
                    private_key=_read(key or cert) if cert is not None else None,
                    certificate_chain=_read(cert),
                )
            except (OSError, ssl.SSLError) as exc:
                raise BackendUnavailable(f"etcd TLS files: {exc}") from None
        self._user = user
        self._password = password
        self._token: str | None = None
        self._current = 0  # the member requests go to first
        self._members: list[_Member] | None = None
        self._leader_task: asyncio.Task[None] | None = None
        self._status_refused = False  # said once in the log
        self._leases: dict[str, int] = {}  # key written with set(ttl) -> its etcd lease
        self._long: dict[int, tuple[int, float]] = {}  # ttl -> shared lease, when granted
        self._presence: int | None = None  # the lease of our heartbeat: nudge keys use it

    # -- connections ---------------------------------------------------------------------

    def _open(self) -> list[_Member]:
        # Made in the running loop: grpc.aio channels belong to the loop that made them.
        if self._members is None:
            self._members = [_Member(e, self._credentials) for e in self.endpoints]
        return self._members

    async def start(self) -> None:
        self._open()
        if len(self.endpoints) > 1 and self._leader_task is None:
            await self._find_leader()
            self._leader_task = asyncio.create_task(self._follow_leader())

    async def _find_leader(self) -> bool:
        """Send requests to the leader first, if a member says it is the leader.

        A write sent to a follower is passed on to the leader, and a follower
        learns of a commit one message later: measured here, a transaction
        took 0.1 ms less at the leader (1.24-1.34 against 1.33-1.50 ms) and
        cost the cluster less CPU; the two-server benchmark gained 7 %.
        """
        members = self._open()
        if self._user is not None and self._token is None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(LEADER_CHECK_TIMEOUT):
                    await self._authenticate(members[self._current])
        answers = await asyncio.gather(*(self._status(m) for m in members), return_exceptions=True)
        for index, answer in enumerate(answers):
            if isinstance(answer, BaseException):
                continue
            if answer.leader and answer.leader == answer.header.member_id:
                self._current = index
                return True
        refusals = [
            a.details() or ""
            for a in answers
            if isinstance(a, grpc.aio.AioRpcError)
            and a.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)
        ]
        if refusals and not self._status_refused:
            # etcd 3.6 shows a member's status to admins only.
            log.info(
                "etcd refuses this user its members' status (%s): no leader first", refusals[0]
            )
            self._status_refused = True
        return False

    async def _status(self, member: _Member) -> Any:
        """The member's own view of the cluster (its id, the leader's), within the bound."""
        async with asyncio.timeout(LEADER_CHECK_TIMEOUT):
            return await member.maintenance.Status(rpc.StatusRequest(), metadata=self._metadata())

    async def _follow_leader(self) -> None:
        """Every LEADER_CHECK_INTERVAL, go back to the leader if requests left it."""
        while True:
            await asyncio.sleep(LEADER_CHECK_INTERVAL)
            with contextlib.suppress(Exception):  # requests fail over by themselves
                answer = await self._status(self._open()[self._current])
                if answer.leader != answer.header.member_id:
                    await self._find_leader()

    async def close(self) -> None:
        task, self._leader_task = self._leader_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        members, self._members = self._members, None
        for member in members or ():
            await member.channel.close()

    def reset(self) -> None:
        # The member did not answer in time (or refused): start with the next one.
        self._current = (self._current + 1) % len(self.endpoints)

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        if self._token is None:
            return (HASLEADER,)
        return (HASLEADER, ("token", self._token))

    async def _authenticate(self, member: _Member) -> None:
        self._token = None
        request = rpc.AuthenticateRequest(name=self._user, password=self._password)
        answer = await member.auth.Authenticate(request, metadata=(HASLEADER,))
        self._token = answer.token

    async def _request(self, call: Callable[[_Member, Any], Awaitable[T]], idempotent: bool) -> T:
        """``call(member, metadata)`` on the first member that takes it.

        Goes on to the next member when one cannot be reached or says it has
        no leader; a read also when a member is slow or its answer is lost.
        """
        members = self._open()
        n = len(members)
        failures: list[str] = []
        for i in range(n):
            index = (self._current + i) % n
            member = members[index]
            where = _host(self.endpoints[index])
            limit = READ_ATTEMPT_TIMEOUT if idempotent and i < n - 1 else None
            for auth_attempt in range(2):
                try:
                    async with asyncio.timeout(limit):
                        if self._user is not None and self._token is None:
                            await self._authenticate(member)
                        answer = await call(member, self._metadata())
                    self._current = index
                    return answer
                except grpc.aio.AioRpcError as exc:
                    code, message = exc.code(), exc.details() or ""
                    if message in AUTH_RETRY and self._user is not None and not auth_attempt:
                        self._token = None
                        continue
                    if code != grpc.StatusCode.UNAVAILABLE:
                        raise EtcdError(code, message) from None
                    if idempotent or message == NO_LEADER or message.startswith(NOT_CONNECTED):
                        failures.append(f"{where}: {_reason(message)}")
                        break
                    # Sent, maybe applied: the layer decides.
                    raise BackendUnavailable(f"etcd {where}: {_reason(message)}") from None
                except TimeoutError:
                    failures.append(f"{where}: timed out")
                    break
        raise BackendUnavailable(f"etcd: no member answers ({'; '.join(failures)})")

    async def _call(
        self, call: Callable[[_Member, Any], Awaitable[T]], idempotent: bool = True
    ) -> T:
        """:meth:`_request`, with etcd's own refusals as BackendUnavailable."""
        try:
            return await self._request(call, idempotent)
        except EtcdError as exc:
            raise BackendUnavailable(f"{self.description}: {exc.message}") from None

    async def _txn(self, request: Any, idempotent: bool) -> Any:
        return await self._request(lambda m, md: m.kv.Txn(request, metadata=md), idempotent)

    # -- leases --------------------------------------------------------------------------

    async def _grant(self, ttl: int) -> int:
        request = rpc.LeaseGrantRequest(TTL=ttl)
        answer = await self._call(lambda m, md: m.lease.LeaseGrant(request, metadata=md))
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

        async def once(member: _Member, metadata: Any) -> int:
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

        return await self._call(once)

    # -- the Store calls -----------------------------------------------------------------

    async def get(self, keys: list[str]) -> dict[str, Stored]:
        # Linearizable reads (etcd's default): never an answer from a stale member.
        if len(keys) == 1:
            request = rpc.RangeRequest(key=keys[0].encode())
            ranges = [await self._call(lambda m, md: m.kv.Range(request, metadata=md))]
        else:
            ranges = []
            for first in range(0, len(keys), MAX_TXN_OPS):
                ops = [
                    rpc.RequestOp(request_range=rpc.RangeRequest(key=k.encode()))
                    for k in keys[first : first + MAX_TXN_OPS]
                ]
                request = rpc.TxnRequest(success=ops)
                answer = await self._call(_txn(request))
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
        answer = await self._call(lambda m, md: m.kv.Range(request, metadata=md))
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
                answer = await self._txn(request, idempotent=False)
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
            await self._call(lambda m, md: m.kv.Put(request, metadata=md), False)
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
                await self._request(_put(request), True)
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
            await self._txn(request, idempotent=True)
        except EtcdError as exc:
            if exc.code == grpc.StatusCode.NOT_FOUND:  # our presence lease ended
                self._presence = None  # the next beat makes one
            raise BackendUnavailable(f"{self.description}: {exc.message}") from None

    async def listen(self, server: str, nudged: Callable[..., None]) -> None:
        key = self._nudge_key(server)
        revision: int | None = None  # the last revision seen: a new watch goes on from it
        index = self._current
        delay = 0.05
        failed = False
        while True:
            member = self._open()[index % len(self.endpoints)]
            where = _host(self.endpoints[index % len(self.endpoints)])
            start = 0 if revision is None else revision + 1
            try:
                async with contextlib.aclosing(self._watch(member, key, start)) as results:
                    async for result in results:
                        # Before ``created``: etcd refuses a watch with created and canceled.
                        if result.canceled:
                            if result.compact_revision:
                                log.info(
                                    "etcd watch: revision %s was compacted: checking every pool",
                                    revision,
                                )
                                revision = None  # a full check follows the new watch
                            reason = result.cancel_reason or "watch cancelled"
                            if "auth" in reason or "permission" in reason:
                                self._token = None  # (a token that ended: ask for another)
                            raise EtcdError(None, reason)
                        if result.created:
                            if revision is None and result.header.revision:
                                revision = result.header.revision
                            if failed:
                                log.info("etcd watch at %s works again", where)
                                failed = False
                            delay = 0.05
                            nudged(None)  # nudges may have been missed: check every pool
                            continue
                        for event in result.events:
                            kv = event.kv
                            revision = max(revision or 0, kv.mod_revision)
                            if event.type != rpc.Event.DELETE:
                                pool, record = split_nudge(kv.value)
                                stored = None if record is None else Stored(record, kv.mod_revision)
                                nudged(pool, stored)
                raise EtcdError(None, "watch stream ended")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: watch again, from another member
                if not failed:
                    log.warning("etcd watch at %s broke: %s", where, _reason(exc))
                failed = True
            index += 1
            await asyncio.sleep(random.uniform(delay / 2, delay))
            delay = min(WATCH_BACKOFF_MAX, delay * 2)

    async def _watch(self, member: _Member, key: bytes, start: int) -> AsyncGenerator[Any, None]:
        """The answers of one watch stream on ``key`` from revision ``start``, as they come.

        Made within WATCH_CREATE_TIMEOUT (a member that drops packets would
        hold it for gRPC's 20 s connect timeout); then as long as it lasts.
        """
        stream = None
        try:
            async with asyncio.timeout(WATCH_CREATE_TIMEOUT):
                if self._user is not None and self._token is None:
                    await self._authenticate(member)
                stream = member.watch.Watch(metadata=self._metadata())
                create = rpc.WatchCreateRequest(key=key, start_revision=start)
                await stream.write(rpc.WatchRequest(create_request=create))
                answer = await stream.read()
            while answer is not grpc.aio.EOF:
                yield answer
                answer = await stream.read()
        except TimeoutError:
            # etcd 3.4 answers a watch with a token it no longer knows with silence:
            # the next try asks for a new one.
            if self._user is not None:
                self._token = None
            raise EtcdError(None, "timed out") from None
        except grpc.aio.AioRpcError as exc:
            if (exc.details() or "") in AUTH_RETRY:
                self._token = None
            raise EtcdError(exc.code(), exc.details() or str(exc.code())) from None
        finally:
            if stream is not None:
                stream.cancel()


def _reason(problem: BaseException | str) -> str:
    """A failure in a few words, for a 503's reason and the log."""
    if isinstance(problem, EtcdError):
        return problem.message
    text = problem if isinstance(problem, str) else str(problem)
    if text.startswith(NOT_CONNECTED):
        # "...; last error: UNKNOWN: ipv4:10.0.0.5:2379: Failed to connect to remote
        # host: Connection refused": the last words say what happened.
        last = _GRPC_PREFIX.sub("", text.partition("last error: ")[2])
        last = last.removeprefix("Failed to connect to remote host: ")
        return f"cannot connect: {last.lower()}" if last else "cannot connect"
    return text or (type(problem).__name__ if isinstance(problem, BaseException) else "unavailable")


def _current(answer: Any) -> Conflict | bool:
    """What a refused write's failure branch read: the key as stored now (False: none)."""
    for response in answer.responses:
        kvs = response.response_range.kvs
        if kvs:
            return Conflict(Stored(kvs[0].value, kvs[0].mod_revision))
    return False
