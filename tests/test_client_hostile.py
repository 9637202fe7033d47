"""The client against what a hostile tester did to it: stopped clients, broken pipes, odd values.

Each test here failed before its fix. Real servers and client processes; a
tiny socket server only for answers a distributex server never gives.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_until
from tests.test_client_robustness import (  # noqa: F401 - fixtures used by name
    CLI,
    FakeServer,
    _pids,
    _stop_everything,
    alive,
    cli_env,
    fake,
    grant,
    http,
    run,
    srv,
    start,
    wait_dead,
    wait_for_file,
)

Server = Any  # conftest.Server

pytestmark = pytest.mark.timeout(90)


def size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


# -- a client that does not run --------------------------------------------------------------


def test_stopped_client_cannot_let_another_host_run_alongside(
    server: Server, tmp_path: Path
) -> None:
    a_log, b_started = tmp_path / "a.log", tmp_path / "b.started"
    a_cmd = f"while :; do date >> {a_log}; sleep .05; done"
    a = start([*srv(server.port), "--host-id", "A", "--ttl", "3", "--grace", "1", "-r", "p", a_cmd])
    wait_until(lambda: size(a_log) > 0, 10, "A's command writing")
    b = start([*srv(server.port), "--host-id", "B", "-r", "p", f"touch {b_started}; sleep 1"])
    time.sleep(0.3)  # B queues behind A (no harm if it has not yet: it waits anyway)
    a.send_signal(signal.SIGSTOP)
    try:
        wait_until(b_started.exists, 20, "B granted after A's lease ran out")
        grown_at_b = size(a_log)
        assert b.wait(20) == 0, b.stderr.read() if b.stderr else ""
        assert size(a_log) == grown_at_b, "A's command ran on while B held the lock"
    finally:
        a.send_signal(signal.SIGCONT)
    status = a.wait(20)
    stderr = a.stderr.read() if a.stderr else ""
    assert status == 73, stderr
    assert "watchdog" in stderr and stderr.count("\n") == 1, stderr
    assert size(a_log) == grown_at_b, "A's command was resumed after its lease was lost"


def test_sigkilled_client_takes_the_whole_group_with_it(server: Server, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    proc = start([*srv(server.port), "-r", "p", f"sleep 30 & echo $! > {pid_file}; wait"])
    pid = int(wait_for_file(pid_file))
    _pids.append(pid)
    proc.kill()
    proc.wait()
    assert wait_dead(pid, 5), "a background job ran on, unlocked, after the client died"


def test_ctrl_z_does_not_stop_the_client(server: Server, tmp_path: Path) -> None:
    started, done = tmp_path / "started", tmp_path / "done"
    cmd = f"touch {started}; sleep 4; touch {done}"
    proc = start([*srv(server.port), "-r", "p", "--ttl", "3", "--grace", "1", cmd])
    wait_until(started.exists, 10, "the command started")
    proc.send_signal(signal.SIGTSTP)  # what Ctrl-Z sends; a stopped client would lose the lock
    assert proc.wait(20) == 0, proc.stderr.read() if proc.stderr else ""
    assert done.exists()


# -- messages never stand in the way -----------------------------------------------------------


def test_broken_stderr_still_stops_the_group_and_releases(server: Server, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    command = f"sleep 41 & echo $! > {pid_file}; exit 0"
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone (journald restarted)
    try:
        proc = subprocess.Popen(
            [*CLI, *srv(server.port), "-r", "p", "--ttl", "22", "--grace", "3", command],
            stdout=subprocess.DEVNULL,
            stderr=write_end,
            env=cli_env(),
        )
    finally:
        os.close(write_end)
    try:
        status = proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
    pid = int(wait_for_file(pid_file))
    _pids.append(pid)
    assert status == 0
    assert not alive(pid), "the background job outlived the lock"
    assert server.call("/get/?host=other&pool=p").body == "YES", "the lock was left held"


# -- whatever a server answers -----------------------------------------------------------------


def test_nul_in_a_lease_token_is_one_line_and_released(
    fake: Callable[..., FakeServer],  # noqa: F811 - the imported fixture
    tmp_path: Path,
) -> None:
    server = fake(lambda verb, n: grant(token="to\x00ken") if verb == "get" else http("OK"))
    result = run([*srv(server.port), "--no-wait", "-r", "p", f"touch {tmp_path}/ran"])
    assert result.returncode == 69, result.stderr
    assert result.stderr.count("\n") == 1 and "malformed lease" in result.stderr, result.stderr
    assert not (tmp_path / "ran").exists()
    wait_until(lambda: "release" in server.seen, 5, "the grant given back")


class DripServer:
    """Accepts, then sends one byte a second (or ``100 Continue`` forever)."""

    def __init__(self, continues: bool) -> None:
        self.continues = continues
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket) -> None:
        chunk = b"HTTP/1.1 100 Continue\r\n\r\n" if self.continues else b"H"
        with conn:
            while not self._stop.wait(1 if not self.continues else 0.2):
                try:
                    conn.sendall(chunk)
                except OSError:
                    return

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


@pytest.fixture(params=[False, True], ids=["drip", "continue"])
def drip(request: pytest.FixtureRequest) -> Iterator[DripServer]:
    server = DripServer(request.param)
    yield server
    server.close()


def test_http_timeout_bounds_the_whole_call(drip: DripServer, tmp_path: Path) -> None:
    began = time.monotonic()
    result = run(
        [*srv(drip.port), "--timeout", "2", "--http-timeout", "3", "-r", "p", "true"], timeout=40
    )
    took = time.monotonic() - began
    assert result.returncode == 69, result.stderr
    assert took < 15, f"a dripping server held the client {took:.1f}s"


# -- bad values --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["--timeout", "1e18"],
        ["--http-timeout", "1e10"],
        ["--ttl", "1e300"],
        ["--grace", "1e12"],
        ["--min-hold", "1e20"],
    ],
)
def test_huge_values_are_usage_errors(args: list[str], tmp_path: Path) -> None:
    result = run(["-H", "127.0.0.1", "-p", "1", *args, "-r", "p", f"touch {tmp_path}/ran"])
    assert result.returncode == 2, result.stderr
    assert "at most" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "ran").exists()


def test_huge_http_timeout_in_the_environment_is_78() -> None:
    result = run(
        ["-H", "127.0.0.1", "-r", "p", "true"], env=cli_env(DISTRIBUTEX_HTTP_TIMEOUT="1e10")
    )
    assert result.returncode == 78, result.stderr
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("server_arg", "problem"),
    [("user@127.0.0.1:9", "user names"), ("127.0.0.1:9/path", "path"), ("h?x=1", "path")],
)
def test_server_with_user_or_path_is_refused(server_arg: str, problem: str) -> None:
    result = run(["-H", server_arg, "-r", "p", "true"])
    assert result.returncode == 2 and problem in result.stderr, result.stderr


def test_bare_ipv6_server_address(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET6) as sock:  # a free port on ::1, nobody listening
        try:
            sock.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback here")
        port = sock.getsockname()[1]
    result = run(["-H", "::1", "-p", str(port), "--no-wait", "-r", "p", "true"])
    assert result.returncode == 69, result.stderr
    assert "[::1]" in result.stderr and "bad port" not in result.stderr
