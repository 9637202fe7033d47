"""Who is asking: bearer tokens, client certificates, request limits and the audit log.

Off unless configured: with neither ``tokens`` nor ``tls.client_ca`` in the
configuration every request is served as in 0.7 (the ``host`` parameter is
the identity, and anyone may send any host).

With authentication on, every request but ``/healthz`` must prove an
identity:

* ``tokens``: ``Authorization: Bearer TOKEN`` whose SHA-256 (hex) is listed;
  the entry's ``identity`` is the host. A request without one, or with one
  not listed, answers ``401 INVALID`` (``WWW-Authenticate: Bearer``).
* ``tls.client_ca``: a client certificate signed by that CA (one that does
  not verify fails the TLS handshake; none at all answers ``401``); its CN
  and DNS subject alternative names are the names it may use as host (the
  CN when ``host`` is left out).
* both: both are required, and the token's identity must be one of the
  certificate's names (else ``403``).

Then, on the lock verbs, the proven identity is the host: a ``host``
parameter that disagrees answers ``403 INVALID`` (``host`` may be left out),
a token's ``pools`` bound the pools it may use (``403``), and the pool's
``servers`` list is checked against the proven host. Leases belong to hosts,
so only the holder can renew or release one; an ``admin`` token may name
another ``host`` on ``/release/`` (a *forced release*: logged at WARNING and
counted). ``/status``, ``/metrics`` and ``/`` need a proven identity too,
unless ``status_public: true`` opens them (they only read).

Limits (always on, see docs/configuration.md, "Limits"): a request body larger than
``max_body_size`` answers ``413`` (a body of unknown length, chunked, ``411``)
and the connection is closed; parked ``/wait/`` requests of one pool beyond
``max_waiters_per_pool``, or of one host beyond ``max_waiters_per_host``,
answer ``429 INVALID``. These count the waiters parked on *this* server.

Audit: the ``distributex.audit`` logger gets one line per grant, release,
forced release and refusal, with the pool, the host, the identity that
asked, how it was proven and the peer address. It is on when authentication
is on (``audit: false`` turns it off) and off otherwise (``audit: true``
turns it on). Secrets never reach a log line, an answer or ``/status``: the
server never holds a token, only its hash, and lease tokens are not logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping, Set
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Protocol

from aiohttp import web
from aiohttp.web_log import AccessLogger

from distributex import query
from distributex.call import REVOKED_KEY, VERB_PATHS, Answer, Call
from distributex.config import Config
from distributex.identity import Identity
from distributex.limits import MAX_NAME, check_body
from distributex.refusal import Refused, refused
from distributex.tls import peer_names

audit_log = logging.getLogger("distributex.audit")
log = logging.getLogger("distributex.auth")

IDENTITY_KEY = "distributex.identity"
HOST_KEY = "distributex.host"
POOL_KEY = "distributex.pool"
FORCED_KEY = "distributex.forced"

# Paths that answer without credentials even with authentication on: a load
# balancer's health check must not need a secret.
ALWAYS_OPEN = frozenset(("/healthz", "/healthz/"))
# Read-only pages that ``status_public: true`` opens.
STATUS_PATHS = frozenset(("/", "/status", "/status/", "/status/events", "/metrics", "/metrics/"))
BEARER = "bearer "


class Asker(Protocol):
    """What authentication reads of a request (an aiohttp request or a :class:`Call`)."""

    @property
    def headers(self) -> Mapping[str, str]: ...

    @property
    def transport(self) -> Any: ...


def token_digest(token: str) -> str:
    """The hex SHA-256 of a token, as ``tokens[].sha256`` lists it."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


class Guard:
    """What one configuration asks of each request (rebuilt when the configuration changes)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.enabled = config.auth_enabled
        self.tokens = {spec.sha256: spec for spec in config.tokens}
        self.mtls = config.tls is not None and config.tls.client_ca is not None
        self.audit = config.audit if config.audit is not None else self.enabled

    def authenticate(self, request: Asker) -> Identity:
        """The request's proven identity; :class:`Refused` (401/403) if it proves none."""
        names: tuple[str, ...] = ()
        via = []
        if self.mtls:
            # Names a host could not be (control characters, too long) are left out.
            cert = _peer_cert(request)
            if not cert:
                raise Refused(401, "a client certificate is required (mutual TLS)")
            names = tuple(
                name for name in peer_names(cert) if name.isprintable() and len(name) <= MAX_NAME
            )
            if not names:
                # A certificate without a CN or a DNS name cannot name a host.
                raise Refused(401, "the client certificate names no host (no CN, no DNS name)")
            via.append("certificate")
        pools = None
        admin = False
        if self.tokens:
            # A refusal names the certificate's identity in the audit line.
            proven = Identity(names, "certificate") if names else None
            spec = self.tokens.get(self._bearer_digest(request))
            if spec is None:
                raise Refused(401, self._why_no_token(request), proven)
            if names and spec.identity not in names:
                raise Refused(
                    403,
                    f"the token speaks for '{spec.identity}', which the client certificate "
                    "does not name",
                    proven,
                )
            names = (spec.identity,)
            pools, admin = spec.pools, spec.admin
            via.insert(0, "token")
        return Identity(names, "+".join(via), pools, admin)

    @staticmethod
    def _bearer_digest(request: Asker) -> str:
        value = request.headers.get("authorization", "")
        if value[: len(BEARER)].lower() != BEARER:
            return ""
        return token_digest(value[len(BEARER) :].strip())

    @staticmethod
    def _why_no_token(request: Asker) -> str:
        value = request.headers.get("authorization")
        if value is None:
            return "authentication required: send 'Authorization: Bearer TOKEN'"
        if value[: len(BEARER)].lower() != BEARER:
            return "only 'Authorization: Bearer TOKEN' is accepted"
        return "token not recognised"


def _peer_cert(request: Asker) -> dict | None:
    transport = request.transport
    if transport is None:
        return None
    ssl_object = transport.get_extra_info("ssl_object")
    if not isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
        return None
    return ssl_object.getpeercert()


def host_for(
    request: MutableMapping[str, Any],
    identity: Identity,
    claimed: str | None,
    pool: str,
    release: bool,
) -> str:
    """The host a verb acts for under ``identity``; :class:`Refused` (403) if not allowed.

    ``claimed`` is the ``host`` parameter (None: left out). An admin token may
    name another host on ``/release/``: a forced release, marked on the request.
    """
    if identity.pools is not None and pool not in identity.pools:
        raise Refused(403, f"'{identity.name}' may not use pool '{pool}'")
    if claimed is None:
        return identity.name
    if claimed in identity.names:
        return claimed
    if release and identity.admin:
        request[FORCED_KEY] = True
        return claimed
    raise Refused(403, f"host '{claimed}' is not the authenticated identity '{identity.name}'")


class WaiterCount:
    """Parked ``/wait/`` requests on this server, per pool and per host, with their caps."""

    def __init__(self) -> None:
        self.pools: Counter[str] = Counter()
        self.hosts: Counter[str] = Counter()

    def enter(self, config: Config, pool: str, host: str) -> None:
        """Count one waiter (:meth:`leave` when it leaves); :class:`Refused` (429) past a cap."""
        if self.pools[pool] >= config.max_waiters_per_pool:
            raise Refused(
                429,
                f"too many waiters on pool '{pool}': {config.max_waiters_per_pool} already "
                "wait here (max_waiters_per_pool)",
            )
        if self.hosts[host] >= config.max_waiters_per_host:
            raise Refused(
                429,
                f"too many waits by host '{host}': {config.max_waiters_per_host} already "
                "wait here (max_waiters_per_host)",
            )
        self.pools[pool] += 1
        self.hosts[host] += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "waiting: pool=%s host=%s (%d waiters of the pool, %d of the host)",
                _shown(pool),
                _shown(host),
                self.pools[pool],
                self.hosts[host],
            )

    def leave(self, pool: str, host: str) -> None:
        for counter, key in ((self.pools, pool), (self.hosts, host)):
            counter[key] -= 1
            if not counter[key]:
                del counter[key]


class PoolShares:
    """Pools made on first use that each host holds or waits on: ``max_pools_per_identity``.

    Noted on a grant or a park; a pool leaves the count once it is idle (checked
    when the host would make one more), so one identity cannot take every
    place of ``max_pools``.
    """

    def __init__(self) -> None:
        # A list, not a set: most hosts use one pool, and a fleet parked on a
        # pool made on first use keeps one of these per host (a set is 216 B,
        # a list of one 64 B); a host's list is at most its share long.
        self.pools: dict[str, list[str]] = {}
        self.noted = 0

    def note(self, host: str, pool: str) -> None:
        mine = self.pools.get(host)
        if mine is None:
            self.pools[host] = [pool]
            self.noted += 1
        elif pool not in mine:
            mine.append(pool)
            self.noted += 1

    def check(self, config: Config, host: str, in_use: Set[str]) -> None:
        """Before ``host`` makes a pool: :class:`Refused` (429) past its share."""
        if self.noted > 2 * len(in_use) + 1024:
            self._prune(in_use)  # hosts that went away: their idle pools are forgotten
        mine = self.pools.get(host)
        if not mine:
            return
        before = len(mine)
        mine[:] = [pool for pool in mine if pool in in_use]
        self.noted -= before - len(mine)
        share = pools_per_identity(config)
        if len(mine) >= share:
            raise Refused(
                429,
                f"too many pools in use by '{host}': {share} pools made on first use already "
                "have it as holder or waiter (max_pools_per_identity)",
            )

    def _prune(self, in_use: Set[str]) -> None:
        for host, mine in list(self.pools.items()):
            mine[:] = [pool for pool in mine if pool in in_use]
            if not mine:
                del self.pools[host]
        self.noted = sum(len(mine) for mine in self.pools.values())


def pools_per_identity(config: Config) -> int:
    """``max_pools_per_identity``, or (0) a tenth of ``max_pools`` but at least 100
    (``max_pools`` if smaller: a small site's one host is not held back)."""
    share = config.max_pools_per_identity
    return share or max(config.max_pools // 10, min(config.max_pools, 100))


_UNTRACKED = nullcontext()


def _revocable(request: Call | web.Request) -> str | None:
    """The identity a reload can revoke the request of: one a token proved."""
    identity = request.get(IDENTITY_KEY)
    return identity.name if identity is not None and identity.via.startswith("token") else None


class Security:
    """Per-application state: the guard of the current configuration, waiters, counters."""

    def __init__(self, get_config: Callable[[], Config]) -> None:
        self._get_config = get_config
        self._guard: Guard | None = None
        self.waiters = WaiterCount()
        self.shares = PoolShares()
        self.refusals: Counter[int] = Counter()
        self.forced_releases = 0
        # Parked /wait/ and /status/events of token identities, ended if a reload
        # removes or changes the token.
        # (Each is known by what ends it as a hang-up does.)
        self.parked: dict[str, dict[Callable[[], object], Call | web.Request]] = {}

    def tracked(self, request: Call | web.Request) -> AbstractContextManager[None]:
        """Know how to end the request during the block, if a token proved its identity."""
        name = _revocable(request)
        return _UNTRACKED if name is None else self._tracking(request, name)

    @contextmanager
    def _tracking(self, request: Call | web.Request, name: str) -> Iterator[None]:
        cancel: Callable[[], object] | None
        if isinstance(request, Call):
            cancel = request.cancel
        else:
            task = asyncio.current_task()
            cancel = task.cancel if task is not None else None
        if cancel is None:
            yield
            return
        self._track(name, cancel, request)
        try:
            yield
        finally:
            self._untrack(name, cancel)

    def track(self, call: Call) -> None:
        """:meth:`tracked` without a block, for a request parked outside a coroutine
        (:meth:`untrack` when it ends)."""
        name = _revocable(call)
        if name is not None and call.cancel is not None:
            self._track(name, call.cancel, call)

    def untrack(self, call: Call) -> None:
        name = _revocable(call)
        if name is not None and call.cancel is not None:
            self._untrack(name, call.cancel)

    def _track(self, name: str, cancel: Callable[[], object], request: Call | web.Request) -> None:
        self.parked.setdefault(name, {})[cancel] = request

    def _untrack(self, name: str, cancel: Callable[[], object]) -> None:
        mine = self.parked.get(name)
        if mine is not None:
            mine.pop(cancel, None)
            if not mine:
                del self.parked[name]

    def revoke(self, names: set[str]) -> int:
        """End the parked requests of these identities (as a hang-up); how many."""
        ended = 0
        for name in names:
            for cancel, request in list(self.parked.get(name, {}).items()):
                request[REVOKED_KEY] = f"the token of '{name}' was removed or changed by a reload"
                cancel()
                ended += 1
        return ended

    @property
    def guard(self) -> Guard:
        config = self._get_config()
        if self._guard is None or self._guard.config is not config:
            self._guard = Guard(config)  # a reload swapped the configuration
        return self._guard


SECURITY_KEY: web.AppKey[Security] = web.AppKey("security", Security)


def _shown(value: str | None) -> str:
    """A client-given value for a log line: quoted, one line, bounded."""
    if value is None:
        return "-"
    return repr(value[:300])


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request limits, then authentication, then the audit line of a refusal.

    The lock verbs do the same themselves (:mod:`distributex.verbs`), whichever
    server reads them: this serves the operator pages.
    """
    path = request.path
    if path in VERB_PATHS:
        return await handler(request)
    security = request.app[SECURITY_KEY]
    guard = security.guard
    config = guard.config
    try:
        check_body(request.content_length if request.body_exists else 0, config)
        identity = None
        opened = path in ALWAYS_OPEN or (config.status_public and path in STATUS_PATHS)
        if guard.enabled and not opened:
            identity = guard.authenticate(request)
            request[IDENTITY_KEY] = identity
    except Refused as exc:
        security.refusals[exc.status] += 1
        if guard.audit:
            who = request.get(IDENTITY_KEY) or exc.who
            _audit_refused(
                request.method,
                path,
                _query_pool(request),
                request.remote,
                who,
                exc.status,
                exc.reason,
            )
        refusal = refused(request, exc.status, exc.reason)
        if exc.status in (411, 413):
            refusal.force_close()  # the body was not read
        return refusal
    response: web.StreamResponse
    if path == "/status/events":
        with security.tracked(request):  # a reload that revokes its token ends it
            response = await handler(request)
    else:
        response = await handler(request)
    # The status meant, also when rewritten to 200 for the 0.7 client (as verbs.py counts).
    status = int(response.headers.get("X-Distributex-Status", response.status))
    if status >= 400 and status != 410 and status != 503:
        security.refusals[status] += 1
    if guard.audit:
        reason = response.headers.get("X-Distributex-Reason")
        if status >= 400 and status != 404:
            _audit_refused(
                request.method,
                path,
                _query_pool(request),
                request.remote,
                identity,
                status,
                reason or "",
            )
    return response


def _query_pool(request: web.Request) -> str | None:
    return request.rel_url.query.get("pool")


def audit(call: Call, verb: str, identity: Identity | None, answer: Answer) -> None:
    """The audit line of a lock verb's answer: a grant, a release, a refusal (else none)."""
    status = answer.real_status()
    word = answer.word
    pool = call.get(POOL_KEY)
    host = call.get(HOST_KEY)
    if word == "INVALID":
        audit_refusal(call, identity, status, answer.headers.get("X-Distributex-Reason", ""))
    elif word == "YES":
        fence = answer.headers.get("X-Distributex-Fence", "-")
        who = _who(identity, call.peer)
        audit_log.info("grant pool=%s host=%s fence=%s %s", _shown(pool), _shown(host), fence, who)
    elif verb == "release" and word == "OK":
        who = _who(identity, call.peer)
        if call.get(FORCED_KEY):
            audit_log.warning("forced release pool=%s host=%s %s", _shown(pool), _shown(host), who)
        else:
            audit_log.info("release pool=%s host=%s %s", _shown(pool), _shown(host), who)


def audit_refusal(call: Call, identity: Identity | None, status: int, reason: str) -> None:
    """The audit line of a refused lock-verb request."""
    pool = call.get(POOL_KEY) or query.lenient(call.raw_query, "pool")
    _audit_refused(call.method, call.path, pool, call.peer, identity, status, reason)


def _audit_refused(
    method: str,
    path: str,
    pool: str | None,
    peer: str | None,
    identity: Identity | None,
    status: int,
    reason: str,
) -> None:
    audit_log.info(
        "refused %d %s %s pool=%s %s: %s",
        status,
        method if method.isalpha() else "?",
        _shown(path),
        _shown(pool),
        _who(identity, peer),
        reason,
    )


def _who(identity: Identity | None, peer: str | None) -> str:
    name = identity.name if identity is not None else None
    via = identity.via if identity is not None else "none"
    return f"identity={_shown(name)} via={via} addr={peer or '-'}"


def token_changes(old: Config, new: Config) -> tuple[list[str], list[str], list[str]]:
    """Identities whose tokens a reload added, removed and changed (hash, pools, admin)."""

    def by_name(config: Config) -> dict[str, set[object]]:
        specs: dict[str, set[object]] = {}
        for spec in config.tokens:
            specs.setdefault(spec.identity, set()).add(spec)
        return specs

    before, after = by_name(old), by_name(new)
    added = sorted(after.keys() - before.keys())
    removed = sorted(before.keys() - after.keys())
    changed = sorted(n for n in before.keys() & after.keys() if before[n] != after[n])
    return added, removed, changed


# A secret in a query (a lease token; a bearer token sent as ?token=) is never logged.
_SECRET_PARAM = re.compile(r"(?i)((?:^|[?&;/])(?:lease|token|access_token)=)[^&;#\s\"]*")
_SECRET_HEADERS = frozenset(("authorization", "proxy-authorization", "cookie"))


def redact(text: str) -> str:
    """``text`` (a path with its query) with the values of secret parameters hidden."""
    return _SECRET_PARAM.sub(r"\1<redacted>", text) if "=" in text else text


class AccessLog(AccessLogger):
    """aiohttp's access log with secrets redacted (``lease=<redacted>``)."""

    def _format_line(
        self, request: web.BaseRequest, response: web.StreamResponse, time: float
    ) -> list[tuple[Any, Any]]:
        line: list[tuple[Any, Any]] = []
        for key, value in super()._format_line(request, response, time):
            if isinstance(key, tuple) and key[1].lower() in _SECRET_HEADERS:
                value = "<redacted>"
            elif isinstance(value, str):
                value = redact(value)
            line.append((key, value))
        return line


def install(app: web.Application, get_config: Callable[[], Config]) -> Security:
    """Add the middleware and its state to ``app``; ``get_config`` gives the current config."""
    security = Security(get_config)
    app[SECURITY_KEY] = security
    app.middlewares.append(middleware)
    return security
