"""Who is asking: bearer tokens and client certificates, on every request.

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

The operator pages go through :func:`middleware` here: the request limits
(:mod:`distributex.limits`), then authentication, then the audit line of a
refusal (:mod:`distributex.audit`). The lock verbs do the same in
:mod:`distributex.verbs`, whichever server read them. :class:`Security`
keeps this server's state of it: the guard of the configuration in force,
the waiter counts and pool shares (their caps are limits), the refusals
counted, and the parked requests a reload that removes their token ends.
Secrets never reach an answer or ``/status``: the server never holds a
token, only its hash.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Protocol

from aiohttp import web

from distributex import audit
from distributex.call import FORCED_KEY, IDENTITY_KEY, REVOKED_KEY, VERB_PATHS, Call
from distributex.config import Config
from distributex.identity import Identity
from distributex.limits import MAX_NAME, PoolShares, WaiterCount, check_body
from distributex.refusal import Refused, refused
from distributex.tls import peer_names

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
            audit.refused_request(request, who, exc.status, exc.reason)
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
            audit.refused_request(request, identity, status, reason or "")
    return response


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


def install(app: web.Application, get_config: Callable[[], Config]) -> Security:
    """Add the middleware and its state to ``app``; ``get_config`` gives the current config."""
    security = Security(get_config)
    app[SECURITY_KEY] = security
    app.middlewares.append(middleware)
    return security
