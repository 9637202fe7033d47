"""Concurrent clients against a running server: safety and liveness under contention.

Bounded in time and count; every client records when it held the lock, and the
intervals are checked afterwards, so a violation cannot hide in a race window.
"""

from __future__ import annotations

import random
import socket
import threading
import time
import urllib.request

from tests.conftest import Server

GHOST_TTL = 0.5
CONFIG = """\
pools:
  - name: mutex
  - name: sem3
    maxlocks: 3
"""


def call(server: Server, path: str) -> tuple[str, dict[str, str]]:
    with urllib.request.urlopen(server.url + path, timeout=30) as resp:
        return resp.read().decode(), dict(resp.headers)


def hang_up_while_waiting(server: Server, host: str, pool: str) -> None:
    # If the slot happens to be free, the YES goes out before the hang-up and
    # the ghost rightly holds it, like a client that crashed: hence a short ttl.
    sock = socket.create_connection(("127.0.0.1", server.port))
    path = f"/wait/?host={host}&pool={pool}&ttl={GHOST_TTL}"
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    time.sleep(random.uniform(0, 0.02))
    sock.close()


def fight(server: Server, pool: str, clients: int, seconds: float) -> list[tuple]:
    """Clients loop wait -> hold briefly -> release; some also hang up mid-wait."""
    held: list[tuple[float, float, int, str]] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds
    errors: list[BaseException] = []

    def client(i: int) -> None:
        rng = random.Random(i)
        host = f"host{i}"
        try:
            while time.monotonic() < stop_at:
                if rng.random() < 0.1:
                    hang_up_while_waiting(server, f"ghost{i}", pool)
                body, headers = call(server, f"/wait/?host={host}&pool={pool}&timeout=20")
                assert body == "YES"
                start = time.monotonic()
                time.sleep(rng.uniform(0, 0.005))
                end = time.monotonic()
                with lock:
                    held.append((start, end, int(headers["X-Distributex-Fence"]), host))
                assert call(server, f"/release/?host={host}&pool={pool}")[0] == "OK"
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors[0]
    return held


def max_overlap(held: list[tuple]) -> int:
    events = sorted([(s, 1) for s, *_ in held] + [(e, -1) for _, e, *_ in held])
    depth = best = 0
    for _, step in events:
        depth += step
        best = max(best, depth)
    return best


def test_mutex_never_has_two_holders(server_factory) -> None:
    server = server_factory(CONFIG)
    held = fight(server, "mutex", clients=12, seconds=3)
    assert len(held) > 50
    assert max_overlap(held) == 1
    fences = [fence for _s, _e, fence, _h in sorted(held)]
    assert fences == sorted(set(fences))  # grant order = fence order, none reused
    # Every client got its turn: FIFO leaves nobody starving.
    assert {host for *_x, host in held} == {f"host{i}" for i in range(12)}


def test_semaphore_never_exceeds_maxlocks(server_factory) -> None:
    server = server_factory(CONFIG)
    held = fight(server, "sem3", clients=12, seconds=3)
    assert len(held) > 50
    assert 2 <= max_overlap(held) <= 3
    # Ghosts that hung up hold nothing (past their ttl): the pool is free again.
    time.sleep(GHOST_TTL + 0.2)
    for i in range(3):
        assert call(server, f"/get/?host=late{i}&pool=sem3")[0] == "YES"
    assert call(server, "/get/?host=late3&pool=sem3")[0] == "NO"
