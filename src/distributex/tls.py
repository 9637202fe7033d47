"""TLS for the server: the SSL context built from ``tls:``, and its reload.

``tls: {cert, key, client_ca}`` in the configuration turns TLS on for every
connection; with ``client_ca`` each client must present a certificate signed
by that CA (mutual TLS), and the certificate's names are its identity (see
:mod:`distributex.auth`).

The context is built by :func:`server_context`, a small function with no
other state. The running server's :class:`TLSHolder` is ``app[TLS_KEY]``
(``runner.app`` of :func:`distributex.server.start_server`); a configuration
reload (SIGHUP) calls ``app[TLS_KEY].swap(new_config.tls)``: connections
accepted afterwards use the new certificate and client CA, open ones keep
theirs. (Tokens and the other settings of :mod:`distributex.auth` follow the
configuration the application holds by themselves.) A context that cannot be built (a file
missing, a key that does not match its certificate) raises
:class:`~distributex.config.ConfigError` with one line, so a reload keeps
the old context and start-up stops with exit status 2.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable

from aiohttp import web

from distributex.config import ConfigError, TLSSettings


def server_context(settings: TLSSettings) -> ssl.SSLContext:
    """A server-side SSL context for ``settings``; ConfigError (one line) if it cannot be made."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # The server sees a client's certificate only with client_ca; no session
    # tickets, so a reloaded CA is not bypassed by a resumed session.
    context.options |= ssl.OP_NO_TICKET
    try:
        context.load_cert_chain(settings.cert, settings.key)
    except FileNotFoundError as exc:
        raise ConfigError(
            f"tls: cannot read {exc.filename or settings.cert}: no such file"
        ) from None
    except PermissionError as exc:
        raise ConfigError(
            f"tls: cannot read {exc.filename or settings.key}: permission denied"
        ) from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"tls: cannot use cert {settings.cert} with key {settings.key}: {_reason(exc)}"
        ) from None
    if settings.client_ca is not None:
        try:
            context.load_verify_locations(cafile=settings.client_ca)
        except FileNotFoundError:
            raise ConfigError(
                f"tls: cannot read client_ca {settings.client_ca}: no such file"
            ) from None
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"tls: cannot use client_ca {settings.client_ca}: {_reason(exc)}"
            ) from None
        # Optional in the handshake, required by distributex.auth: a client
        # with no certificate gets a clear 401 rather than a closed connection.
        # A certificate that is sent must still verify against client_ca.
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return " ".join(str(exc).split())[:120] or type(exc).__name__


class TLSHolder:
    """The SSL context new connections get (None: plain HTTP); swapped by a reload.

    The listening site reads :attr:`context` at each accept, so a swap takes
    effect for the next connection without closing anything.
    """

    def __init__(self, context: ssl.SSLContext | None) -> None:
        self.context = context

    @classmethod
    def from_settings(cls, settings: TLSSettings | None) -> TLSHolder:
        return cls(server_context(settings) if settings is not None else None)

    def swap(self, settings: TLSSettings | None) -> None:
        """Reload: build the context for ``settings`` and use it from now on.

        Raises ConfigError and keeps the old context if the new one cannot be
        built. Turning TLS on or off needs a restart (the port's scheme would
        change under its clients): that raises ConfigError too.
        """
        if (settings is None) != (self.context is None):
            raise ConfigError("tls: turning TLS on or off needs a restart")
        if settings is not None:
            self.context = server_context(settings)


TLS_KEY: web.AppKey[TLSHolder] = web.AppKey("tls", TLSHolder)


def peer_names(cert: dict | None) -> tuple[str, ...]:
    """A verified client certificate's names: its CN first, then its DNS SANs (no duplicates)."""
    if not cert:
        return ()
    names: list[str] = []
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                names.append(value)
    names.extend(_dns_names(cert.get("subjectAltName", ())))
    return tuple(dict.fromkeys(name for name in names if name))


def _dns_names(alt_names: Iterable[tuple[str, str]]) -> list[str]:
    return [value for kind, value in alt_names if kind == "DNS"]
