"""The lean protocol and its hand-off to aiohttp, over raw sockets to a real server.

Plain verb requests are served by distributex.fastlane; anything else on a
connection (an operator page, a body, HTTP/1.0, bytes that are not a verb)
is handed to aiohttp with every byte not yet served. These tests send what
real clients send on one connection and read every answer, in order.
"""

from __future__ import annotations

import socket
import time

import pytest

from tests.conftest import Server


def _connect(server: Server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.settimeout(10)
    return sock


def _head(path: str, extra: str = "", version: str = "1.1") -> bytes:
    return f"GET {path} HTTP/{version}\r\nHost: t\r\n{extra}\r\n".encode()


def _read_answers(sock: socket.socket, count: int) -> list[tuple[int, dict[str, str], bytes]]:
    """``count`` answers read off ``sock`` (Content-Length bodies), in order."""
    answers = []
    data = b""
    while len(answers) < count:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                raise AssertionError(f"closed after {len(answers)} answers: {data!r}")
            data += chunk
        head, _, data = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {
            name.lower(): value for name, value in (line.split(": ", 1) for line in lines[1:])
        }
        length = int(headers.get("content-length", "0"))
        while len(data) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise AssertionError("closed inside a body")
            data += chunk
        body, data = data[:length], data[length:]
        answers.append((int(lines[0].split()[1]), headers, body))
    return answers


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def server(server_factory) -> Server:
    return server_factory("autocreate: true\n")


def test_a_verb_after_an_operator_page_on_one_connection(server: Server) -> None:
    sock = _connect(server)
    sock.sendall(_head("/status"))
    [(status, headers, _)] = _read_answers(sock, 1)
    assert status == 200 and headers["content-type"].startswith("application/json")
    # The connection is aiohttp's now: the verb is still the lock verb.
    sock.sendall(_head("/get/?host=a&pool=p"))
    sock.sendall(_head("/get/?host=b&pool=p"))
    answers = _read_answers(sock, 2)
    assert [body for _, _, body in answers] == [b"YES", b"NO"]
    assert "x-distributex-fence" in answers[0][1]


def test_pipelined_verbs_are_answered_in_order(server: Server) -> None:
    sock = _connect(server)
    sock.sendall(
        _head("/get/?host=a&pool=p")
        + _head("/get/?host=b&pool=p")
        + _head("/release/?host=a&pool=p")
        + _head("/get/?host=b&pool=p")
    )
    bodies = [body for _, _, body in _read_answers(sock, 4)]
    assert bodies == [b"YES", b"NO", b"OK", b"YES"]


def test_a_page_pipelined_behind_a_verb_keeps_its_bytes(server: Server) -> None:
    sock = _connect(server)
    sock.sendall(
        _head("/get/?host=a&pool=p") + _head("/healthz") + _head("/release/?host=a&pool=p")
    )
    answers = _read_answers(sock, 3)
    assert answers[0][2] == b"YES"
    assert answers[1][0] == 200
    assert answers[2][2] == b"OK"


def test_a_parked_wait_then_pipelined_release_on_the_same_connection(server: Server) -> None:
    holder = _connect(server)
    holder.sendall(_head("/get/?host=a&pool=p"))
    assert _read_answers(holder, 1)[0][2] == b"YES"
    waiter = _connect(server)
    # The release waits behind the parked /wait/ and is answered after it.
    waiter.sendall(_head("/wait/?host=b&pool=p") + _head("/release/?host=b&pool=p"))
    time.sleep(0.2)
    holder.sendall(_head("/release/?host=a&pool=p"))
    assert _read_answers(holder, 1)[0][2] == b"OK"
    assert [body for _, _, body in _read_answers(waiter, 2)] == [b"YES", b"OK"]


def test_a_head_sent_a_byte_at_a_time(server: Server) -> None:
    sock = _connect(server)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for byte in _head("/get/?host=a&pool=p"):
        sock.send(bytes([byte]))
    assert _read_answers(sock, 1)[0][2] == b"YES"


def test_connection_close_is_honoured(server: Server) -> None:
    sock = _connect(server)
    sock.sendall(_head("/get/?host=a&pool=p", "Connection: close\r\n"))
    [(status, headers, body)] = _read_answers(sock, 1)
    assert (status, body) == (200, b"YES")
    assert headers.get("connection", "").lower() == "close"
    assert _closed(sock)


@pytest.mark.parametrize(
    ("request_bytes", "word"),
    [
        # HTTP/1.0, a body, a form POST: aiohttp's, the same answers.
        (_head("/get/?host=a&pool=p", version="1.0"), b"YES"),
        (
            b"POST /get/?host=a&pool=p HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello",
            b"YES",
        ),
        (
            b"POST /get/?host=a&pool=p HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n",
            b"YES",
        ),
        (b"DELETE /get/?host=a&pool=p HTTP/1.1\r\nHost: t\r\n\r\n", b"INVALID"),
        (_head("/get/?host=%61&pool=p"), b"YES"),
        (_head("/ge%74/?host=a&pool=p"), b"YES"),
    ],
)
def test_requests_left_to_aiohttp_get_the_same_answers(
    server: Server, request_bytes: bytes, word: bytes
) -> None:
    sock = _connect(server)
    sock.sendall(request_bytes)
    assert _read_answers(sock, 1)[0][2] == word


def test_a_body_answered_by_aiohttp_then_a_verb_on_the_same_connection(server: Server) -> None:
    sock = _connect(server)
    sock.sendall(
        b"POST /get/?host=a&pool=p HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc"
        + _head("/get/?host=b&pool=p")
    )
    assert [body for _, _, body in _read_answers(sock, 2)] == [b"YES", b"NO"]


def test_bytes_that_are_not_http_get_an_answer_at_once(server: Server) -> None:
    sock = _connect(server)
    sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a TLS hello's start
    started = time.monotonic()
    [(status, _, _)] = _read_answers(sock, 1)
    assert status == 400
    assert time.monotonic() - started < 5  # not the head deadline


def test_a_lean_answer_has_what_aiohttp_answers_carry(server: Server) -> None:
    sock = _connect(server)
    sock.sendall(_head("/get/?host=a&pool=p") + _head("/get/?host=", "Connection: close\r\n"))
    (status, headers, body), (bad, bad_headers, _) = _read_answers(sock, 2)
    assert (status, body) == (200, b"YES")
    assert headers["content-type"] == "text/plain"
    assert headers["content-length"] == "3"
    assert {"date", "server", "x-distributex-lease", "x-distributex-ttl"} <= headers.keys()
    assert bad == 400 and bad_headers["x-distributex-reason"] == "missing parameter 'host'"
