"""An :class:`~distributex.call.Answer` as HTTP/1.1 bytes, as aiohttp would send it.

The lean protocol (:mod:`distributex.fastlane`) writes each answer as one
buffer with the headers aiohttp's answers carry (``Content-Type:
text/plain``, ``Content-Length``, ``Date``, ``Server``), so a client cannot
tell which of the two served it. What does not change per answer (the
status lines, the ``Server`` header, the date within a second) is made once.
"""

from __future__ import annotations

import email.utils
import time
from http import HTTPStatus

from aiohttp.http import SERVER_SOFTWARE

from distributex.call import Answer


class _Clock:
    """The ``Date`` header, made once a second."""

    second = 0
    text = ""

    @classmethod
    def date(cls) -> str:
        now = int(time.time())
        if now != cls.second:
            cls.second, cls.text = now, email.utils.formatdate(now, usegmt=True)
        return cls.text


def encode(answer: Answer, keep_alive: bool) -> bytes:
    """``answer`` as HTTP/1.1 bytes: the headers aiohttp would send, in one buffer."""
    body = answer.word.encode()
    status = answer.status
    first = _FIRST_LINES.get(status) or f"HTTP/1.1 {status} \r\nContent-Type: text/plain\r\n"
    extra = "".join([f"{name}: {value}\r\n" for name, value in answer.headers.items()])
    close = "" if keep_alive else "Connection: close\r\n"
    length = f"Content-Length: {len(body)}\r\nDate: {_Clock.date()}\r\n"
    return f"{first}{extra}{length}{_SERVER}{close}\r\n".encode() + body


# The status line and Content-Type of each status, and the Server header, made once.
_FIRST_LINES = {
    status.value: f"HTTP/1.1 {status.value} {status.phrase}\r\nContent-Type: text/plain\r\n"
    for status in HTTPStatus
}
_SERVER = f"Server: {SERVER_SOFTWARE}\r\n"
