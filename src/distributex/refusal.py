"""A refused request and how it is answered: ``INVALID`` with a 4xx and a reason.

The one exception every part of the web layer raises for a request it will
not serve (bad parameters, authentication, a limit), and the answer it
becomes, including the rewrite the 0.7 client needs.
"""

from __future__ import annotations

from aiohttp import web

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

    aiohttp refuses to send a header with one, and the request would fail.
    """
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def answer(word: str, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """One word of ``text/plain``, no newline (as 0.7 answered)."""
    all_headers = {"Content-Type": TEXT}
    if headers:
        all_headers.update(headers)
    return web.Response(body=word.encode(), status=status, headers=all_headers)


def refused(request: web.BaseRequest, status: int, reason: str) -> web.Response:
    """The ``INVALID`` answer to ``request`` (as the 0.7 client must see it)."""
    headers = {"X-Distributex-Reason": header_text(reason)}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="distributex"'
    return for_legacy_client(request, answer("INVALID", status, headers))


def for_legacy_client(request: web.BaseRequest, response: web.Response) -> web.Response:
    """A refusal as the 0.7 client must see it: status 200, the word in the body.

    It is told apart by its ``User-Agent`` (``Python-urllib/2.x``): nothing
    else sends that, and it sends nothing else. The real status stays in
    ``X-Distributex-Status``; curl, the new client and monitoring keep
    getting 4xx and 503. (Only refusals are rewritten, here rather than in a
    middleware that every request would pay for.)
    """
    if request.headers.get("User-Agent", "").startswith(LEGACY_CLIENT_AGENT):
        response.headers["X-Distributex-Status"] = str(response.status)
        response.set_status(200)
    return response
