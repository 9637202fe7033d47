"""A refused request and how it is answered: ``INVALID`` with a 4xx and a reason.

The one exception every part of the web layer raises for a request it will
not serve (bad parameters, authentication, a limit), and the answer it
becomes, including the rewrite the 0.7 client needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from aiohttp import web

from distributex.call import Answer
from distributex.identity import Identity

TEXT = "text/plain"
# The 0.7 client reads answers with Python 2's urllib2, which raises on any
# status but 2xx before the body is read (a traceback in cron mail, exit 1).
LEGACY_CLIENT_AGENT = "Python-urllib/2."


class Refused(Exception):
    """A request refused for what it asks, who sent it, or a limit; a 4xx ``INVALID`` answer."""

    def __init__(self, status: int, reason: str, who: Identity | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.who = who  # what was proven before the refusal (a certificate), for the audit


def header_text(text: str) -> str:
    """``text`` fit for a header: control characters (e.g. of a decoded path) escaped.

    A header with one cannot be sent, and the request would fail.
    """
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def refusal(headers: Mapping[str, str], status: int, reason: str) -> Answer:
    """The ``INVALID`` answer to a request with these headers (as the 0.7 client must see it)."""
    extra = {"X-Distributex-Reason": header_text(reason)}
    if status == 401:
        extra["WWW-Authenticate"] = 'Bearer realm="distributex"'
    return for_legacy_client(headers, Answer("INVALID", status, extra))


def for_legacy_client(headers: Mapping[str, str], answer: Answer) -> Answer:
    """A refusal as the 0.7 client must see it: status 200, the word in the body.

    It is told apart by its ``User-Agent`` (``Python-urllib/2.x``): nothing
    else sends that, and it sends nothing else. The real status stays in
    ``X-Distributex-Status``; curl, the new client and monitoring keep
    getting 4xx and 503. (Only refusals are rewritten, here rather than in a
    layer that every request would pay for.)
    """
    if _from_legacy_client(headers):
        answer.headers["X-Distributex-Status"] = str(answer.status)
        answer.status = 200
    return answer


def _from_legacy_client(headers: Mapping[str, str]) -> bool:
    return headers.get("user-agent", "").startswith(LEGACY_CLIENT_AGENT)


_LEGACY_WORDING: Mapping[str, str] = MappingProxyType({"user-agent": LEGACY_CLIENT_AGENT})
_PLAIN_WORDING: Mapping[str, str] = MappingProxyType({})


def wording_headers(headers: Mapping[str, str]) -> Mapping[str, str]:
    """Headers that word a later answer as ``headers`` would, shared by every request
    (what a parked request keeps: a fleet parked keeps no headers of its own)."""
    return _LEGACY_WORDING if _from_legacy_client(headers) else _PLAIN_WORDING


def web_response(answer: Answer) -> web.Response:
    """``answer`` as aiohttp sends it."""
    headers = {"Content-Type": TEXT}
    headers.update(answer.headers)
    response = web.Response(body=answer.word.encode(), status=answer.status, headers=headers)
    if answer.close:
        response.force_close()
    return response


def refused(request: web.BaseRequest, status: int, reason: str) -> web.Response:
    """The ``INVALID`` answer to an aiohttp ``request``."""
    return web_response(refusal(request.headers, status, reason))
