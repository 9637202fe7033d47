"""The sqlite backend: lock state that survives ``kill -9``, and files it must refuse.

Real ``distributexd`` processes on a real SQLite file, killed with SIGKILL and
started again on the same port; real ``distributex`` clients across the crash.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from distributex.check import clients, rules
from tests.conftest import Server, free_port, request_read_by_server
from tests.test_http import q

pytestmark = pytest.mark.timeout(300)

CLI = [sys.executable, "-m", "distributex.client.cli"]


def config(path: Path, pools: str = "", sync: str = "full") -> str:
    return (
        f"backend: sqlite\nsqlite_path: {path}\nsqlite_sync: {sync}\nautocreate: true\n"
        "pools:\n  - name: p\n    expire: 30\n" + pools
    )


def start_fails(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "distributex", "-c", str(cfg), "-p", str(free_port())],
        capture_output=True,
        text=True,
        timeout=30,
    )


# -- files it must refuse ------------------------------------------------------------------


def foreign(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE users (name TEXT)")


def future(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA application_id = 1148737585")  # ours
        conn.execute("CREATE TABLE kv (key TEXT PRIMARY KEY)")
        conn.execute("PRAGMA user_version = 99")


def corrupt(path: Path) -> None:
    path.write_bytes(b"SQLite format 3\x00" + os.urandom(4000))


def not_sqlite(path: Path) -> None:
    path.write_text("backend: inmemory\n")


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (foreign, "not a distributex state file"),
        (future, "newer distributex"),
        (corrupt, "SQLite file"),
        (not_sqlite, "not a usable SQLite file"),
    ],
)
def test_unusable_files_stop_the_server_with_one_line(tmp_path: Path, make, words: str) -> None:
    path = tmp_path / "state.db"
    make(path)
    before = path.read_bytes()
    result = start_fails(tmp_path, config(path))
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert path.read_bytes() == before, "the file was changed"


def test_missing_folder_is_one_line(tmp_path: Path) -> None:
    result = start_fails(tmp_path, config(tmp_path / "no" / "such" / "state.db"))
    assert result.returncode == 1
    assert "does not exist" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_sqlite_path_is_required(tmp_path: Path) -> None:
    result = start_fails(tmp_path, "backend: sqlite\npools:\n  - name: p\n")
    assert result.returncode == 2 and "sqlite_path" in result.stderr


def test_the_file_is_the_owners_only(server_factory, tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    server: Server = server_factory(config(path))
    assert server.call(q("get", "a", "p")).body == "YES"
    assert path.stat().st_mode & 0o077 == 0  # lease tokens are secrets


def test_the_file_stays_bounded(server_factory, tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    server: Server = server_factory(config(path))

    def size() -> int:
        return sum(f.stat().st_size for f in tmp_path.glob("state.db*"))

    for i in range(500):  # warm up: the pages the state needs
        server.call(q("get", f"h{i}", f"pool{i % 10}"))
        server.call(q("release", f"h{i}", f"pool{i % 10}"))
    warm = size()
    for i in range(4000):
        lease = server.call(q("get", f"h{i}", f"pool{i % 10}")).headers["X-Distributex-Lease"]
        server.call(q("release", f"h{i}", f"pool{i % 10}", f"&lease={lease}"))
    assert size() < max(2 * warm, 600_000), (warm, size())


# -- crashes -------------------------------------------------------------------------------


def test_held_leases_survive_kill_9(server_factory, tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    port = free_port()
    server: Server = server_factory(config(path, "  - name: short\n    expire: 1\n"), port=port)
    held = server.call(q("get", "a", "p"))
    short = server.call(q("get", "a", "short"))
    released = server.call(q("get", "b", "other"))
    assert (
        server.call(
            q("release", "b", "other", f"&lease={released.headers['X-Distributex-Lease']}")
        ).body
        == "OK"
    )
    server.stop(signal.SIGKILL)
    time.sleep(1.2)  # the 1 s lease runs out while the server is down
    again: Server = server_factory(config(path, "  - name: short\n    expire: 1\n"), port=port)
    token = held.headers["X-Distributex-Lease"]
    assert again.call(q("renew", "a", "p", f"&lease={token}")).body == "OK"
    assert again.call(q("get", "b", "p")).body == "NO"
    assert again.call(q("get", "b", "short")).body == "YES"  # expired by the clock
    old = released.headers["X-Distributex-Lease"]
    assert again.call(q("renew", "b", "other", f"&lease={old}")).status == 410
    after = again.call(q("get", "c", "other"))
    assert int(after.headers["X-Distributex-Fence"]) > int(released.headers["X-Distributex-Fence"])
    assert int(short.headers["X-Distributex-Fence"]) < int(
        again.call(q("get", "b", "short")).headers["X-Distributex-Fence"]
    )


def test_history_across_random_kill_9(server_factory, tmp_path: Path) -> None:
    seed = int(os.environ.get("DISTRIBUTEX_HISTORY_SEED", random.randrange(1 << 30)))
    print(f"history seed: {seed} (replay with DISTRIBUTEX_HISTORY_SEED={seed})")
    rng = random.Random(seed)
    path = tmp_path / "state.db"
    pools = "  - name: mutex\n    expire: 2\n  - name: sem\n    maxlocks: 2\n    expire: 2\n"
    port = free_port()
    current = [server_factory(config(path, pools), port=port)]
    seconds = float(os.environ.get("DISTRIBUTEX_HISTORY_SECONDS", "10"))

    def crashes() -> None:
        for _ in range(4):
            time.sleep(rng.uniform(0.5, seconds / 5))
            current[0].stop(signal.SIGKILL)
            time.sleep(rng.uniform(0, 0.3))
            current[0] = server_factory(config(path, pools), port=port)

    killer = threading.Thread(target=crashes, daemon=True)
    killer.start()
    result = clients.run(
        lambda: [("127.0.0.1", port)], ["mutex", "sem"], 6, seconds, seed, min_leases=31
    )
    killer.join(60)
    # Waits cut by a crash are not starvation; durability and safety are checked.
    result.long_waits_refused.clear()
    rules.assert_held(result, {"mutex": 1, "sem": 2}, 6, durable=True)
    assert len(result.leases) > 30
    print(f"{len(result.leases)} leases, {result.errors} failed calls of {result.calls}")


def test_a_command_keeps_its_lock_across_a_server_crash(server_factory, tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    port = free_port()
    server: Server = server_factory(config(path), port=port)
    started, done = tmp_path / "started", tmp_path / "done"
    cmd = f"touch {started}; sleep 4; touch {done}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTRIBUTEX_")}
    env["DISTRIBUTEX_CONFIG"] = ""
    proc = subprocess.Popen(
        [*CLI, "-H", "127.0.0.1", "-p", str(port), "-r", "p", "--ttl", "6", "--grace", "1", cmd],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 20
        while not started.exists():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        server.stop(signal.SIGKILL)
        again: Server = server_factory(config(path), port=port)
        assert again.call(q("get", "other", "p")).body == "NO"
        assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""
        assert done.exists()
        assert again.call(q("get", "other", "p")).body == "YES"  # released at the end
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_waiting_client_queues_again_after_a_crash(server_factory, tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    port = free_port()
    server: Server = server_factory(config(path), port=port)
    holder = server.call(q("get", "holder", "p")).headers["X-Distributex-Lease"]
    ran = tmp_path / "ran"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTRIBUTEX_")}
    env["DISTRIBUTEX_CONFIG"] = ""
    proc = subprocess.Popen(
        [*CLI, "-H", "127.0.0.1", "-p", str(port), "-r", "p", "--host-id", "w", f"touch {ran}"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 20
        while not request_read_by_server(port):  # its /wait/ is parked
            assert time.monotonic() < deadline, "the client never reached the server"
            time.sleep(0.02)
        server.stop(signal.SIGKILL)
        time.sleep(0.3)
        again: Server = server_factory(config(path), port=port)
        # The holder's lease survived the crash; its release hands the lock on.
        assert again.call(q("release", "holder", "p", f"&lease={holder}")).body == "OK"
        assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else ""
        assert ran.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
