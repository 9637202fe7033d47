"""The blocking driver's HTTP plumbing: connections bounded by one deadline, made
within a timeout and abortable at once through a :class:`CancelToken`."""

from __future__ import annotations

import contextlib
import errno
import http.client
import os
import queue
import selectors
import socket
import ssl
import threading
from typing import TYPE_CHECKING, Any

from distributex.client import core
from distributex.client.errors import Cancelled
from distributex.client.transport import ClosedBeforeAnswer, HandshakeClosed

# Granularity of a cancellable connect.
CONNECT_SLICE = 0.1


class CancelToken:
    """Aborts a blocking client call from another thread (e.g. a long ``/wait/``).

    The aborted call raises :class:`Cancelled`; the server sees the
    connection close and drops the waiter from its queue.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._event = threading.Event()
        self.cancelled = False

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            self._event.set()
            socks = list(self._socks)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _attach(self, sock: socket.socket) -> None:
        with self._lock:
            if self.cancelled:
                raise Cancelled("cancelled")
            self._socks.add(sock)

    def _detach(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.discard(sock)

    def _check(self) -> None:
        if self.cancelled:
            raise Cancelled("cancelled")


def _resolve(
    host: str, port: int, deadline: float, cancel: CancelToken | None
) -> list[tuple[Any, ...]]:
    """getaddrinfo, bounded by ``deadline`` and abortable (it has no timeout of its own)."""
    kind = (socket.AF_UNSPEC, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        return socket.getaddrinfo(host, port, *kind, socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError):
        pass
    answer: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def lookup() -> None:
        try:
            answer.put(socket.getaddrinfo(host, port, *kind))
        except BaseException as exc:
            answer.put(exc)

    # A daemon thread: a lookup that hangs is abandoned, not waited for.
    threading.Thread(target=lookup, name="distributex-resolve", daemon=True).start()
    while True:
        if cancel is not None:
            cancel._check()
        left = deadline - core.clock()
        if left <= 0:
            raise socket.gaierror(errno.ETIMEDOUT, "name lookup timed out")
        try:
            result = answer.get(timeout=min(CONNECT_SLICE, left))
        except queue.Empty:
            continue
        if isinstance(result, BaseException):
            raise result
        return result


def open_socket(
    host: str, port: int, timeout: float, cancel: CancelToken | None = None
) -> socket.socket:
    """A TCP connection to (host, port) within ``timeout`` seconds, lookup included.

    With ``cancel``, the socket is attached to the token *before* connecting,
    and the connect is polled in short slices, so a cancel aborts it at once
    even when the server is black-holed.
    """
    deadline = core.clock() + timeout
    last: OSError | None = None
    for family, type_, proto, _name, addr in _resolve(host, port, deadline, cancel):
        sock = DeadlineSocket(family, type_, proto)
        try:
            if cancel is not None:
                cancel._attach(sock)
            try:
                sock.setblocking(False)
                code = sock.connect_ex(addr)
                if code not in (0, errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK):
                    raise OSError(code, os.strerror(code))
                if code != 0:
                    with selectors.DefaultSelector() as sel:
                        sel.register(sock, selectors.EVENT_WRITE)
                        while True:
                            if cancel is not None:
                                cancel._check()
                            left = deadline - core.clock()
                            if left <= 0:
                                raise TimeoutError("timed out")
                            if sel.select(min(CONNECT_SLICE, left)):
                                break
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if code:
                        raise OSError(code, os.strerror(code))
            finally:
                if cancel is not None:
                    cancel._detach(sock)
            sock.setblocking(True)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
        except BaseException:
            sock.close()
            raise
    raise last or OSError(errno.EHOSTUNREACH, "no address to connect to")


if TYPE_CHECKING:
    _SocketBase = socket.socket
else:
    _SocketBase = object


class DeadlineMixin(_SocketBase):
    """Sends and receives that all end by one :attr:`deadline` (None: no bound).

    A socket timeout bounds each read alone: a server that drips a byte a
    second (or sends ``100 Continue`` forever) would hold a call for ever.
    Here every read and send gets only the time left until the deadline.
    """

    deadline: float | None = None

    def _arm(self) -> None:
        if self.deadline is not None:
            left = self.deadline - core.clock()
            if left <= 0:
                raise TimeoutError("timed out")
            self.settimeout(left)

    def recv_into(self, *args: Any, **kwargs: Any) -> int:
        self._arm()
        return super().recv_into(*args, **kwargs)

    def recv(self, *args: Any, **kwargs: Any) -> bytes:
        self._arm()
        return super().recv(*args, **kwargs)

    def sendall(self, *args: Any, **kwargs: Any) -> None:
        self._arm()
        super().sendall(*args, **kwargs)


class DeadlineSocket(DeadlineMixin, socket.socket):
    """A TCP socket with a :attr:`deadline` for the whole call."""


class DeadlineSSLSocket(DeadlineMixin, ssl.SSLSocket):
    """A TLS socket with a :attr:`deadline` for the whole call."""


class BoundedConnection(http.client.HTTPConnection):
    """An HTTPConnection whose connect is :func:`open_socket` (bounded, cancellable),
    then a TLS handshake within the same time when ``context`` is given."""

    def __init__(
        self,
        host: str,
        port: int,
        timeout: float,
        cancel: CancelToken | None,
        context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(host, port, timeout=timeout)
        self._cancel = cancel
        self._context = context

    def connect(self) -> None:
        assert isinstance(self.timeout, float | int)
        deadline = core.clock() + float(self.timeout)
        sock = open_socket(self.host, self.port, float(self.timeout), self._cancel)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._context is not None:
            sock = self._handshake(sock, deadline)
        self.sock = sock

    def _handshake(self, sock: socket.socket, deadline: float) -> ssl.SSLSocket:
        assert self._context is not None
        try:
            sock.settimeout(max(0.01, deadline - core.clock()))
            tls = self._context.wrap_socket(
                sock, server_hostname=self.host, do_handshake_on_connect=False
            )
        except BaseException:
            sock.close()
            raise
        try:
            tls.do_handshake()
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError) as exc:
            # A cipher is chosen once the server's hello came: only then was it
            # the TLS handshake (our certificate) that the server ended.
            spoke_tls = tls.cipher() is not None
            tls.close()
            raise (HandshakeClosed if spoke_tls else ClosedBeforeAnswer)(str(exc)) from exc
        except BaseException:
            tls.close()
            raise
        return tls
