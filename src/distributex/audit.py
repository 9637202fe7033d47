"""What the logs say of requests: the audit lines, and secrets kept out of every line.

The ``distributex.audit`` logger gets one line per grant, release, forced
release (at WARNING) and refusal, with the pool, the host, the identity that
asked, how it was proven and the peer address. It is on when authentication
is on (``audit: false`` turns it off) and off otherwise (``audit: true``
turns it on): :attr:`distributex.auth.Guard.audit` says which.

Secrets never reach a log line: the server never holds a token, only its
hash, lease tokens are not in the audit lines, and aiohttp's access log
(``--access-log``) shows ``lease=<redacted>`` and no ``Authorization`` or
``Cookie`` value. A value a client sent is quoted and cut at 300
characters, so one line stays one line.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from aiohttp import web
from aiohttp.web_log import AccessLogger

from distributex import query
from distributex.call import FORCED_KEY, HOST_KEY, POOL_KEY, Answer, Call
from distributex.identity import Identity

audit_log = logging.getLogger("distributex.audit")


def shown(value: str | None) -> str:
    """A client-given value for a log line: quoted, one line, bounded."""
    if value is None:
        return "-"
    return repr(value[:300])


def answered(call: Call, verb: str, identity: Identity | None, answer: Answer) -> None:
    """The audit line of a lock verb's answer: a grant, a release, a refusal (else none)."""
    status = answer.real_status()
    word = answer.word
    pool = call.get(POOL_KEY)
    host = call.get(HOST_KEY)
    if word == "INVALID":
        refused_call(call, identity, status, answer.headers.get("X-Distributex-Reason", ""))
    elif word == "YES":
        fence = answer.headers.get("X-Distributex-Fence", "-")
        who = _who(identity, call.peer)
        audit_log.info("grant pool=%s host=%s fence=%s %s", shown(pool), shown(host), fence, who)
    elif verb == "release" and word == "OK":
        who = _who(identity, call.peer)
        if call.get(FORCED_KEY):
            audit_log.warning("forced release pool=%s host=%s %s", shown(pool), shown(host), who)
        else:
            audit_log.info("release pool=%s host=%s %s", shown(pool), shown(host), who)


def refused_call(call: Call, identity: Identity | None, status: int, reason: str) -> None:
    """The audit line of a refused lock-verb request."""
    pool = call.get(POOL_KEY) or query.lenient(call.raw_query, "pool")
    refused(call.method, call.path, pool, call.peer, identity, status, reason)


def refused_request(
    request: web.Request, identity: Identity | None, status: int, reason: str
) -> None:
    """The audit line of a refused request for another page (aiohttp's request)."""
    pool = request.rel_url.query.get("pool")
    refused(request.method, request.path, pool, request.remote, identity, status, reason)


def refused(
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
        shown(path),
        shown(pool),
        _who(identity, peer),
        reason,
    )


def _who(identity: Identity | None, peer: str | None) -> str:
    name = identity.name if identity is not None else None
    via = identity.via if identity is not None else "none"
    return f"identity={shown(name)} via={via} addr={peer or '-'}"


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
