"""The etcd cluster as one connection: a channel per member, the leader first, failover.

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

Authentication (``user``/``password``) and TLS files are handled here too;
the store adapter (:mod:`distributex.backends.etcd`) only builds requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from distributex.backends.base import BackendUnavailable

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


def host(endpoint: str) -> str:
    return endpoint.split("://", 1)[1]


class EtcdError(Exception):
    """etcd answered with an error (``code``: the gRPC status)."""

    def __init__(self, code: Any, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Member:
    """One etcd member: its channel and the stubs of the services used."""

    def __init__(self, endpoint: str, credentials: Any) -> None:
        target = host(endpoint)
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


class EtcdMembers:
    """The members of one etcd cluster, called as one: leader first, then the next that answers."""

    def __init__(
        self,
        endpoints: Sequence[str],
        description: str,
        *,
        cacert: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        user: str | None = None,
        password: str | None = None,
    ) -> None:
        self.endpoints = list(endpoints)
        self.description = description
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
        self.user = user
        self._password = password
        self.token: str | None = None
        self.current = 0  # the member requests go to first
        self._members: list[Member] | None = None
        self._leader_task: asyncio.Task[None] | None = None
        self._status_refused = False  # said once in the log

    def open(self) -> list[Member]:
        """The members' channels (made on first use)."""
        # Made in the running loop: grpc.aio channels belong to the loop that made them.
        if self._members is None:
            self._members = [Member(e, self._credentials) for e in self.endpoints]
        return self._members

    async def start(self) -> None:
        self.open()
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
        members = self.open()
        if self.user is not None and self.token is None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(LEADER_CHECK_TIMEOUT):
                    await self.authenticate(members[self.current])
        answers = await asyncio.gather(*(self._status(m) for m in members), return_exceptions=True)
        for index, answer in enumerate(answers):
            if isinstance(answer, BaseException):
                continue
            if answer.leader and answer.leader == answer.header.member_id:
                self.current = index
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

    async def _status(self, member: Member) -> Any:
        """The member's own view of the cluster (its id, the leader's), within the bound."""
        async with asyncio.timeout(LEADER_CHECK_TIMEOUT):
            return await member.maintenance.Status(rpc.StatusRequest(), metadata=self.metadata())

    async def _follow_leader(self) -> None:
        """Every LEADER_CHECK_INTERVAL, go back to the leader if requests left it."""
        while True:
            await asyncio.sleep(LEADER_CHECK_INTERVAL)
            with contextlib.suppress(Exception):  # requests fail over by themselves
                answer = await self._status(self.open()[self.current])
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
        self.current = (self.current + 1) % len(self.endpoints)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        if self.token is None:
            return (HASLEADER,)
        return (HASLEADER, ("token", self.token))

    async def authenticate(self, member: Member) -> None:
        self.token = None
        request = rpc.AuthenticateRequest(name=self.user, password=self._password)
        answer = await member.auth.Authenticate(request, metadata=(HASLEADER,))
        self.token = answer.token

    async def request(self, call: Callable[[Member, Any], Awaitable[T]], idempotent: bool) -> T:
        """``call(member, metadata)`` on the first member that takes it.

        Goes on to the next member when one cannot be reached or says it has
        no leader; a read also when a member is slow or its answer is lost.
        """
        members = self.open()
        n = len(members)
        failures: list[str] = []
        for i in range(n):
            index = (self.current + i) % n
            member = members[index]
            where = host(self.endpoints[index])
            limit = READ_ATTEMPT_TIMEOUT if idempotent and i < n - 1 else None
            for auth_attempt in range(2):
                try:
                    async with asyncio.timeout(limit):
                        if self.user is not None and self.token is None:
                            await self.authenticate(member)
                        answer = await call(member, self.metadata())
                    self.current = index
                    return answer
                except grpc.aio.AioRpcError as exc:
                    code, message = exc.code(), exc.details() or ""
                    if message in AUTH_RETRY and self.user is not None and not auth_attempt:
                        self.token = None
                        continue
                    if code != grpc.StatusCode.UNAVAILABLE:
                        raise EtcdError(code, message) from None
                    if idempotent or message == NO_LEADER or message.startswith(NOT_CONNECTED):
                        failures.append(f"{where}: {reason(message)}")
                        break
                    # Sent, maybe applied: the layer decides.
                    raise BackendUnavailable(f"etcd {where}: {reason(message)}") from None
                except TimeoutError:
                    failures.append(f"{where}: timed out")
                    break
        raise BackendUnavailable(f"etcd: no member answers ({'; '.join(failures)})")

    async def call(self, call: Callable[[Member, Any], Awaitable[T]], idempotent: bool = True) -> T:
        """:meth:`_request`, with etcd's own refusals as BackendUnavailable."""
        try:
            return await self.request(call, idempotent)
        except EtcdError as exc:
            raise BackendUnavailable(f"{self.description}: {exc.message}") from None

    async def txn(self, request: Any, idempotent: bool) -> Any:
        return await self.request(lambda m, md: m.kv.Txn(request, metadata=md), idempotent)


def reason(problem: BaseException | str) -> str:
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
