"""The client's exceptions: one base class and one class per way a lock call can fail."""

from __future__ import annotations


class DistributexError(Exception):
    """Base class of every error the distributex client raises."""


class LockTimeout(DistributexError):
    """The lock was not obtained: the wait timed out, or it was busy and we did not wait."""


class LockLost(DistributexError):
    """A lease ended while it was meant to be held (renewal refused, or server unreachable
    until the lease must have run out)."""


class LockRefused(DistributexError):
    """The server refused the request (``INVALID``, a 4xx answer).

    ``status`` is the HTTP status (400 bad parameter, 403 host not allowed in the pool,
    404 unknown pool) and ``reason`` the server's ``X-Distributex-Reason``.
    """

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class ServerUnavailable(DistributexError):
    """The server could not answer: unreachable, HTTP timeout, 503, or not a distributex server."""


class ConnectionLost(ServerUnavailable):
    """The server was reached, then the connection broke before it answered (it crashed,
    restarted, or a network path failed mid-request)."""


class Cancelled(DistributexError):
    """A request was aborted from another thread through a :class:`CancelToken`."""


class AuthenticationFailed(LockRefused):
    """The server wants a proven identity and got none it accepts (HTTP 401): no token
    sent, or a token it does not know."""


class TLSFailed(ServerUnavailable):
    """The TLS connection could not be made: the server's certificate is not trusted, the
    server refused our client certificate, or the server does not speak TLS."""


class CertificateMismatch(TLSFailed):
    """The server's certificate is trusted but names another server than the one asked for."""
