"""The floor for a parked waiter: a bare mutex server on an asyncio protocol.

    .venv/bin/python bench/bare_mutex.py [asyncio] PORT   # uvloop by default

A baseline for ``parked_waiters.py --baseline``: the least a Python lock
server on one event loop can keep per parked ``/wait/`` (the transport, the
protocol object, a queue entry). It speaks just enough HTTP/1.1 for the
benches: ``/get/``, ``/wait/`` and ``/release/`` with ``host`` and ``pool``
(mutexes only, a FIFO queue per pool, a counting fence, keep-alive), a
parked waiter that hangs up leaves its queue, anything else is ``404``. No
leases, limits, logs or authentication: not a server to use.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections import deque
from typing import Any

_HEAD_END = b"\r\n\r\n"
_fence = 0
holders: dict[bytes, bytes] = {}  # pool -> host
queues: dict[bytes, deque[tuple[BareMutex, bytes]]] = {}  # pool -> (connection, host)


def _answer(body: bytes, fence: int | None = None) -> bytes:
    extra = b"" if fence is None else b"X-Distributex-Fence: %d\r\n" % fence
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%b\r\n%b" % (
        len(body),
        extra,
        body,
    )


def _grant(pool: bytes, host: bytes) -> bytes:
    global _fence
    _fence += 1
    holders[pool] = host
    return _answer(b"YES", _fence)


class BareMutex(asyncio.Protocol):
    """One connection; at most one request parked on it."""

    __slots__ = ("buffer", "parked", "transport")

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.buffer = b""
        self.parked: bytes | None = None  # the pool this connection waits on

    def connection_lost(self, exc: Exception | None) -> None:
        if self.parked is not None:
            queue = queues.get(self.parked)
            if queue:
                queues[self.parked] = deque(e for e in queue if e[0] is not self)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data
        out = []
        while (end := buffer.find(_HEAD_END)) >= 0:
            head, buffer = buffer[:end], buffer[end + 4 :]
            answer = self.handle(head.split(b" ", 2)[1])
            if answer is not None:
                out.append(answer)
        self.buffer = buffer
        if out:
            self.transport.write(b"".join(out))

    def handle(self, target: bytes) -> bytes | None:
        path, _, query = target.partition(b"?")
        args = dict(p.partition(b"=")[::2] for p in query.split(b"&"))
        host, pool = args.get(b"host", b""), args.get(b"pool", b"")
        verb = path.strip(b"/")
        holder = holders.get(pool)
        if verb == b"get":
            if holder is None or holder == host:
                return _grant(pool, host)
            return _answer(b"NO")
        if verb == b"wait":
            if holder is None or holder == host:
                return _grant(pool, host)
            queues.setdefault(pool, deque()).append((self, host))
            self.parked = pool
            return None
        if verb == b"release":
            if holder == host:
                del holders[pool]
                queue = queues.get(pool)
                if queue:
                    conn, waiter = queue.popleft()
                    conn.parked = None
                    conn.transport.write(_grant(pool, waiter))
            return _answer(b"OK")
        return b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


async def _serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(BareMutex, "127.0.0.1", port, backlog=4096)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    server.close()


def main(argv: list[str]) -> int:
    port = int(argv[-1])
    if "asyncio" in argv[:-1]:
        asyncio.run(_serve(port))
    else:
        import uvloop

        uvloop.run(_serve(port))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
