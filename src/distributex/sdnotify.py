"""systemd's readiness protocol (``Type=notify``), in the few lines it takes.

systemd passes ``$NOTIFY_SOCKET`` (a Unix datagram socket; ``@`` starts an
abstract name) and waits for ``READY=1`` before it counts the service as
started. Outside systemd the variable is unset and nothing is sent.
"""

from __future__ import annotations

import os
import socket
import time


def notify(*lines: str) -> bool:
    """Send ``KEY=VALUE`` lines to systemd; False when not under systemd (or it fails)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or address[0] not in "/@":
        return False
    if address[0] == "@":
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(lines).encode())
    except OSError:
        return False
    return True


def ready(status: str = "") -> bool:
    return notify("READY=1", *([f"STATUS={status}"] if status else []))


def reloading() -> bool:
    # MONOTONIC_USEC lets systemd (253 and later) match the reload to this message.
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}")


def stopping() -> bool:
    return notify("STOPPING=1")
