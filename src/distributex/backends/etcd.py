"""The ``etcd`` backend: the shared-state layer over an etcd v3 cluster.

Pool records are written by transactions that compare the key's
``mod_revision`` with the one that was read (``create_revision == 0`` to make
one), so a write based on a record another server has replaced is refused and
the step is redone: the same rules as every backend, kept by the layer. The
new revision a transaction returns is the record's next version, so a server
that wrote a pool last steps it again without a read.

Client: etcd's HTTP/JSON gateway (``/v3/kv/range``, ``/v3/kv/txn``,
``/v3/watch``, ``/v3/lease/*``, ``/v3/auth/authenticate``) with aiohttp, which
the server runs on anyway. The asyncio gRPC clients on PyPI talk to one
endpoint only and bring grpcio; the gateway is part of every etcd since 3.4
(``/v3/``; 3.3 served it as ``/v3beta/`` only), so 3.4, 3.5 and 3.6 are
served; the tests run Debian's 3.4.

Endpoints: requests go to one member and move on to the next when it refuses
connections or says it has no leader (``hasleader`` metadata: a member cut
off from the quorum says so at once instead of hanging). A read also moves on
when a member does not answer within READ_ATTEMPT_TIMEOUT; a write whose
answer is lost is not sent again (it may have been applied): the layer treats
it as in doubt. With the quorum lost no write commits and every linearizable
read fails, so nothing is granted; the layer answers 503 within its bounds.

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
import base64
import contextlib
import json
import logging
import random
import ssl
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

import aiohttp

from distributex.backends.base import BackendUnavailable
from distributex.backends.shared import Conflict, Store, Stored, split_nudge

log = logging.getLogger("distributex.etcd")

API = "/v3"
# A read goes on to the next member if one does not answer in this time.
READ_ATTEMPT_TIMEOUT = 0.5
# Connections to etcd per distributex server.
POOL_SIZE = 32
WATCH_BACKOFF_MAX = 1.0
# gRPC status codes that etcd's gateway passes on.
UNAVAILABLE = 14
NOT_FOUND = 5
UNAUTHENTICATED = 16
# Refused before the request was proposed: safe to send to another member.
NO_LEADER = "etcdserver: no leader"
AUTH_RETRY = ("etcdserver: invalid auth token", "etcdserver: user name is empty")


def _b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode()


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text or "")


def _host(endpoint: str) -> str:
    return endpoint.split("://", 1)[1]


class EtcdError(Exception):
    """etcd answered with an error (``code``: the gRPC status code)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class EtcdStore(Store):
    """An etcd v3 cluster, through its HTTP/JSON gateway."""

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
        self._ssl: ssl.SSLContext | None = None
        if any(e.startswith("https://") for e in self.endpoints):
            try:
                self._ssl = ssl.create_default_context(cafile=cacert)
                if cert is not None:
                    self._ssl.load_cert_chain(cert, key)
            except (OSError, ssl.SSLError) as exc:
                raise BackendUnavailable(f"etcd TLS files: {exc}") from None
        self._user = user
        self._password = password
        self._token: str | None = None
        self._current = 0  # the member requests go to first
        self._session: aiohttp.ClientSession | None = None
        self._leases: dict[str, int] = {}  # key written with set(ttl) -> its etcd lease
        self._long: dict[int, tuple[int, float]] = {}  # ttl -> shared lease, when granted
        self._presence: int | None = None  # the lease of our heartbeat: nudge keys use it

    # -- connections ---------------------------------------------------------------------

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=POOL_SIZE, ssl=self._ssl or True)
            # A member cut off from the quorum answers "no leader" instead of waiting.
            headers = {"Grpc-Metadata-hasleader": "true"}
            self._session = aiohttp.ClientSession(connector=connector, headers=headers)
        return self._session

    async def start(self) -> None:
        self._open()

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def reset(self) -> None:
        # The member did not answer in time (or refused): start with the next one.
        # A request abandoned mid-answer is closed by aiohttp, not reused.
        self._current = (self._current + 1) % len(self.endpoints)

    def _headers(self) -> dict[str, str] | None:
        return None if self._token is None else {"Authorization": self._token}

    async def _post_once(self, endpoint: str, path: str, body: dict[str, Any]) -> Any:
        async with self._open().post(
            endpoint + API + path, json=body, headers=self._headers()
        ) as resp:
            raw = await resp.read()
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise EtcdError(0, f"HTTP {resp.status} from {endpoint}{API}{path}")
        error = data.get("error")
        if resp.status != 200 or error:
            if isinstance(error, dict):  # a stream's error
                data = error
            code = int(data.get("code") or data.get("grpc_code") or 0)
            raise EtcdError(code, str(data.get("message") or error or f"HTTP {resp.status}"))
        return data

    async def _authenticate(self, endpoint: str) -> None:
        self._token = None
        data = await self._post_once(
            endpoint, "/auth/authenticate", {"name": self._user, "password": self._password}
        )
        self._token = str(data["token"])

    async def _request(self, path: str, body: dict[str, Any], idempotent: bool) -> Any:
        """One call, to the first member that takes it.

        Goes on to the next member when one refuses the connection or says it
        has no leader; a read also when a member is slow or its answer is lost.
        """
        n = len(self.endpoints)
        failures: list[str] = []
        for i in range(n):
            index = (self._current + i) % n
            endpoint = self.endpoints[index]
            limit = READ_ATTEMPT_TIMEOUT if idempotent and i < n - 1 else None
            for auth_attempt in range(2):
                try:
                    async with asyncio.timeout(limit):
                        if self._user is not None and self._token is None:
                            await self._authenticate(endpoint)
                        data = await self._post_once(endpoint, path, body)
                    self._current = index
                    return data
                except EtcdError as exc:
                    if exc.message in AUTH_RETRY and self._user is not None and not auth_attempt:
                        self._token = None
                        continue
                    if exc.code == UNAVAILABLE and (idempotent or exc.message == NO_LEADER):
                        failures.append(f"{_host(endpoint)}: {exc.message}")
                        break
                    raise
                except TimeoutError:
                    failures.append(f"{_host(endpoint)}: timed out")
                    break
                except aiohttp.ClientConnectorError as exc:
                    # Not connected: nothing was sent.
                    failures.append(f"{_host(endpoint)}: {_reason(exc)}")
                    break
                except (aiohttp.ClientError, OSError) as exc:
                    if not idempotent:  # sent, maybe applied: the layer decides
                        raise BackendUnavailable(
                            f"etcd {_host(endpoint)}: {_reason(exc)}"
                        ) from None
                    failures.append(f"{_host(endpoint)}: {_reason(exc)}")
                    break
        raise BackendUnavailable(f"etcd: no member answers ({'; '.join(failures)})")

    async def _call(self, path: str, body: dict[str, Any], idempotent: bool = True) -> Any:
        """:meth:`_request`, with etcd's own refusals as BackendUnavailable."""
        try:
            return await self._request(path, body, idempotent)
        except EtcdError as exc:
            raise BackendUnavailable(f"{self.description}: {exc.message}") from None

    # -- leases --------------------------------------------------------------------------

    async def _grant(self, ttl: int) -> int:
        data = await self._call("/lease/grant", {"TTL": str(ttl)})
        return int(data["ID"])

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

    # -- the Store calls -----------------------------------------------------------------

    async def get(self, keys: list[str]) -> dict[str, Stored]:
        # Linearizable reads (etcd's default): never an answer from a stale member.
        if len(keys) == 1:
            ranges = [await self._call("/kv/range", {"key": _b64(keys[0])})]
        else:
            ops = [{"request_range": {"key": _b64(k)}} for k in keys]
            data = await self._call("/kv/txn", {"success": ops})
            ranges = [r.get("response_range", {}) for r in data.get("responses", [])]
        found: dict[str, Stored] = {}
        for answer in ranges:
            for kv in answer.get("kvs", []):
                found[_unb64(kv["key"]).decode()] = Stored(
                    _unb64(kv.get("value")), int(kv["mod_revision"])
                )
        return found

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
        if version is None:
            compare = {"key": _b64(key), "target": "CREATE", "create_revision": "0"}
        else:
            compare = {"key": _b64(key), "target": "MOD", "mod_revision": str(version)}
        compare["result"] = "EQUAL"
        nudges = self._nudges(nudge, pool, value)
        for attempt in range(2):
            write: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
            if ttl > 0:
                write["lease"] = str(await self._long_lease(ttl))
            body = {
                "compare": [compare],
                "success": [{"request_put": write}, *nudges],
                # Refused: what is stored now comes back, so the layer need not read it.
                "failure": [{"request_range": {"key": _b64(key)}}],
            }
            try:
                data = await self._request("/kv/txn", body, idempotent=False)
            except EtcdError as exc:
                # A lease that ended makes etcd refuse the whole txn: nothing applied.
                if exc.code == NOT_FOUND and attempt == 0 and (ttl > 0 or nudges):
                    self._long.pop(ttl, None)
                    if nudges:  # our presence lease ended: the next beat makes one
                        self._presence = None
                        nudges = self._nudges(nudge, pool, value)
                    continue
                raise BackendUnavailable(f"{self.description}: {exc.message}") from None
            if not data.get("succeeded"):
                return _current(data)
            return int(data["header"]["revision"])
        raise AssertionError("unreachable")

    async def set(self, key: str, value: bytes, ttl: int = 0) -> None:
        """Write a key one server owns; with ``ttl``, bound to an etcd lease we keep alive."""
        if ttl <= 0:
            await self._call("/kv/put", {"key": _b64(key), "value": _b64(value)}, False)
            return
        lease = self._leases.get(key)
        if lease is not None:
            data = await self._call("/lease/keepalive", {"ID": str(lease)})
            if int(data.get("result", data).get("TTL") or 0) <= 0:
                lease = None  # ended (we were cut off too long): etcd dropped the key too
        for attempt in range(2):
            if lease is None:
                lease = await self._grant(ttl)
                self._leases[key] = lease
            write = {"key": _b64(key), "value": _b64(value), "lease": str(lease)}
            try:
                await self._request("/kv/put", write, idempotent=True)
            except EtcdError as exc:
                if exc.code == NOT_FOUND and attempt == 0:
                    lease = None
                    continue
                raise BackendUnavailable(f"{self.description}: {exc.message}") from None
            break
        self._presence = lease

    # -- nudges --------------------------------------------------------------------------

    def _nudge_key(self, server: str) -> str:
        return f"{self.prefix}nudge/{server}"

    def _nudges(
        self, servers: Collection[str], pool: str, record: bytes | None = None
    ) -> list[dict[str, Any]]:
        """Txn operations that nudge ``servers`` to look at ``pool``.

        The value is the pool's name, then (in the txn that writes it) a NUL
        and the pool's record: its mod_revision is the txn's, so the servers
        nudged have the record and its version without a read.
        """
        # Bound to our presence, so the keys of servers long gone do not pile up.
        message = pool.encode() if record is None else pool.encode() + b"\0" + record
        ops = []
        for server in sorted(servers):
            write = {"key": _b64(self._nudge_key(server)), "value": _b64(message)}
            if self._presence is not None:
                write["lease"] = str(self._presence)
            ops.append({"request_put": write})
        return ops

    async def notify(self, servers: Collection[str], pool: str) -> None:
        ops = self._nudges(servers, pool)
        try:
            await self._request("/kv/txn", {"success": ops}, idempotent=True)
        except EtcdError as exc:
            if exc.code == NOT_FOUND:  # our presence lease ended: the next beat makes one
                self._presence = None
            raise BackendUnavailable(f"{self.description}: {exc.message}") from None

    async def listen(self, server: str, nudged: Callable[..., None]) -> None:
        key = _b64(self._nudge_key(server))
        revision: int | None = None  # the last revision seen: a new watch goes on from it
        index = self._current
        delay = 0.05
        failed = False
        while True:
            endpoint = self.endpoints[index % len(self.endpoints)]
            create: dict[str, Any] = {"key": key}
            if revision is not None:
                create["start_revision"] = str(revision + 1)
            try:
                async for result in self._watch(endpoint, create):
                    header = result.get("header", {})
                    if result.get("created"):
                        if revision is None and header.get("revision"):
                            revision = int(header["revision"])
                        if failed:
                            log.info("etcd watch at %s works again", _host(endpoint))
                            failed = False
                        delay = 0.05
                        nudged(None)  # nudges may have been missed: check every pool
                        continue
                    if result.get("canceled"):
                        if result.get("compact_revision"):
                            log.info(
                                "etcd watch: revision %s was compacted: checking every pool",
                                revision,
                            )
                            revision = None  # a full check follows the new watch
                        raise EtcdError(0, result.get("cancel_reason") or "watch cancelled")
                    for event in result.get("events", []):
                        kv = event.get("kv", {})
                        revision = max(revision or 0, int(kv.get("mod_revision", 0)))
                        if event.get("type") != "DELETE":
                            pool, record = split_nudge(_unb64(kv.get("value")))
                            version = int(kv["mod_revision"])
                            nudged(pool, None if record is None else Stored(record, version))
                raise EtcdError(0, "watch stream ended")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: watch again, from another member
                if not failed:
                    log.warning("etcd watch at %s broke: %s", _host(endpoint), _reason(exc))
                failed = True
            index += 1
            await asyncio.sleep(random.uniform(delay / 2, delay))
            delay = min(WATCH_BACKOFF_MAX, delay * 2)

    async def _watch(self, endpoint: str, create: dict[str, Any]) -> Any:
        """The results of one watch stream, as they come."""
        if self._user is not None and self._token is None:
            await self._authenticate(endpoint)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=2)
        async with self._open().post(
            endpoint + API + "/watch",
            json={"create_request": create},
            headers=self._headers(),
            timeout=timeout,
        ) as resp:
            if resp.status != 200:
                text = (await resp.read())[:200].decode("utf-8", "replace")
                if "auth" in text:
                    self._token = None
                raise EtcdError(0, f"HTTP {resp.status}: {text}")
            buffer = b""
            async for chunk in resp.content.iter_any():
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if not line.strip():
                        continue
                    message = json.loads(line)
                    if "error" in message:
                        error = message["error"]
                        text = error.get("message") if isinstance(error, dict) else error
                        if text in AUTH_RETRY:
                            self._token = None
                        raise EtcdError(0, str(text))
                    yield message.get("result", {})


def _reason(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError) and exc.os_error is not None:
        inner = exc.os_error
        return (inner.strerror or str(inner)).lower()
    if isinstance(exc, EtcdError):
        return exc.message
    with contextlib.suppress(Exception):
        if str(exc):
            return str(exc)
    return type(exc).__name__


def _current(data: dict[str, Any]) -> Conflict | bool:
    """What a refused write's failure branch read: the key as stored now (False: none)."""
    for response in data.get("responses", []):
        kvs = response.get("response_range", {}).get("kvs", [])
        if kvs:
            return Conflict(Stored(_unb64(kvs[0].get("value")), int(kvs[0]["mod_revision"])))
    return False
