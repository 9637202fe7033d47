"""The client's answers to odd servers, lost leases, suspends, signals and bad input.

Real servers where a real server can produce the situation; a tiny socket
server (:class:`FakeServer`) only for answers a distributex server never gives.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from distributex.client import (
    AsyncClient,
    Cancelled,
    CancelToken,
    Client,
    LockLost,
    ServerUnavailable,
)
from distributex.client import core as core_module
from distributex.client.runner import EXIT_LOST, Runner, Settings

Server = Any  # conftest.Server

CLI = [sys.executable, "-m", "distributex.client.cli"]

pytestmark = pytest.mark.timeout(60)


# -- helpers -------------------------------------------------------------------------------


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTRIBUTEX_")}
    env["DISTRIBUTEX_CONFIG"] = ""
    env.update(extra)
    return env


_started: list[subprocess.Popen[Any]] = []
_pids: list[int] = []  # processes started by the clients' commands


@pytest.fixture(autouse=True)
def _stop_everything() -> Iterator[None]:
    """Every client and every command process a test started is gone after it."""
    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # forwarded to the command's group
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    while _pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(_pids.pop(), signal.SIGKILL)


def start(args: list[Any], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        CLI + args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env or cli_env(),
    )
    _started.append(proc)
    return proc


def run(args: list[Any], env: dict[str, str] | None = None, timeout: float = 30) -> Any:
    proc = subprocess.run(
        [os.fsencode(a) if isinstance(a, str) else a for a in CLI + args],
        capture_output=True,
        timeout=timeout,
        env=env or cli_env(),
    )
    proc.stderr = proc.stderr.decode("utf-8", "replace")
    return proc


def srv(port: int) -> list[str]:
    return ["-H", "127.0.0.1", "-p", str(port)]


def wait_for_file(path: Path, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().endswith("\n"):
            return path.read_text()
        time.sleep(0.02)
    raise AssertionError(f"{path} was not written within {timeout}s")


def wait_for_line(proc: subprocess.Popen[str], text: str, timeout: float = 10) -> None:
    """Read the client's stderr until a line contains ``text`` (its -v readiness line)."""
    assert proc.stderr is not None
    lines: list[str] = []

    def reader() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if text in line:
                return

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    thread.join(timeout)
    assert any(text in line for line in lines), f"no {text!r} on stderr: {lines}"


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_dead(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.02)
    return not alive(pid)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(body: str, status: str = "200 OK", headers: dict[str, str] | None = None) -> bytes:
    head = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return (
        f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{head}Connection: close\r\n\r\n{body}"
    ).encode()


def grant(ttl: str = "30", token: str = "tok", fence: str = "7") -> bytes:
    return http(
        "YES",
        headers={
            "X-Distributex-Fence": fence,
            "X-Distributex-Lease": token,
            "X-Distributex-TTL": ttl,
        },
    )


class FakeServer:
    """Answers each request with ``answer(verb, n)`` (n: how many of that verb came before)."""

    def __init__(self, answer: Callable[[str, int], bytes]) -> None:
        self.answer = answer
        self.seen: list[str] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = b""
                with contextlib.suppress(OSError):
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                path = data.split(b" ", 2)[1].decode() if data.count(b" ") >= 2 else "/"
                verb = path.strip("/").split("/")[0]
                n = sum(1 for v in self.seen if v == verb)
                self.seen.append(verb)
                with contextlib.suppress(OSError):
                    conn.sendall(self.answer(verb, n))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def fake() -> Iterator[Callable[[Callable[[str, int], bytes]], FakeServer]]:
    servers: list[FakeServer] = []

    def make(answer: Callable[[str, int], bytes]) -> FakeServer:
        server = FakeServer(answer)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


# -- 1. GONE at the final release ----------------------------------------------------------


def test_lease_ended_unnoticed_while_command_ran_exits_73(server: Server, tmp_path: Path) -> None:
    # --ttl 60 renews every 20 s: the keeper does not notice before the command ends.
    env_file, go = tmp_path / "env", tmp_path / "go"
    cmd = (
        f"echo $DISTRIBUTEX_HOST $DISTRIBUTEX_LEASE > {env_file}; "
        f"while [ ! -e {go} ]; do sleep 0.05; done; exit 0"
    )
    proc = start([*srv(server.port), "-r", "p", "--ttl", "60", cmd])
    host, token = wait_for_file(env_file).split()
    assert server.call(f"/release/?host={host}&pool=p&lease={token}").body == "OK"
    go.touch()
    assert proc.wait(10) == EXIT_LOST
    stderr = proc.stderr.read() if proc.stderr else ""
    assert stderr.count("\n") == 1 and "already gone at release" in stderr, stderr


def test_lease_ended_after_a_renewal_past_the_command_keeps_its_status(
    server: Server, tmp_path: Path
) -> None:
    # The lease was confirmed alive after the command ended (a --min-hold renewal):
    # its end cannot have cut the command short.
    env_file = tmp_path / "env"
    cmd = f"echo $DISTRIBUTEX_HOST $DISTRIBUTEX_LEASE > {env_file}; exit 3"
    args = [*srv(server.port), "-r", "p", "--ttl", "3", "--grace", "1", "--min-hold", "6", cmd]
    proc = start(args)
    host, token = wait_for_file(env_file).split()
    time.sleep(2.2)  # renewals at about 1 s and 2 s after the grant
    assert server.call(f"/release/?host={host}&pool=p&lease={token}").body == "OK"
    assert proc.wait(15) == 3
    stderr = proc.stderr.read() if proc.stderr else ""
    assert "during --min-hold" in stderr and stderr.count("\n") == 1, stderr


# -- 2. a suspended client machine ---------------------------------------------------------


class JumpingClock:
    """CLOCK_BOOTTIME as after a suspend: jumps ahead while monotonic sleeps stand still."""

    def __init__(self) -> None:
        self.offset = 0.0
        self.real = core_module.clock

    def __call__(self) -> float:
        return self.real() + self.offset


@pytest.fixture
def jumping_clock(monkeypatch: pytest.MonkeyPatch) -> JumpingClock:
    fake_clock = JumpingClock()
    monkeypatch.setattr(core_module, "clock", fake_clock)  # the one lease clock
    return fake_clock


def test_keeper_notices_a_suspend_promptly(server: Server, jumping_clock: JumpingClock) -> None:
    c = Client("127.0.0.1", server.port, host="me")
    with pytest.raises(LockLost), c.lock("p", ttl=30) as lease:
        time.sleep(0.3)
        jumping_clock.offset += 60  # "suspended" for a minute: the lease ran out
        assert lease.lost.wait(2), "the keeper slept through the suspend"
    assert "no renewal confirmed" in (lease.lost_reason or "")


def test_async_keeper_notices_a_suspend_promptly(
    server: Server, jumping_clock: JumpingClock
) -> None:
    async def main() -> None:
        async with AsyncClient("127.0.0.1", server.port, host="me") as c:
            with pytest.raises(LockLost):
                async with c.lock("p", ttl=30) as lease:
                    await asyncio.sleep(0.3)
                    jumping_clock.offset += 60
                    await asyncio.wait_for(lease.lost.wait(), 2)

    asyncio.run(main())


def test_runner_stops_the_command_after_a_suspend(
    server: Server, jumping_clock: JumpingClock, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    settings = Settings(
        pool="p",
        host_id="me",
        server="127.0.0.1",
        port=server.port,
        ttl=30,
        grace=1,
        shell_command=f"echo $$ > {pid_file}; exec sleep 30",
    )
    err = open(tmp_path / "stderr", "w+")  # noqa: SIM115 - closed below

    def suspend() -> None:
        wait_for_file(pid_file)
        _pids.append(int(pid_file.read_text()))
        jumping_clock.offset += 60

    jumper = threading.Thread(target=suspend, daemon=True)
    jumper.start()
    began = time.monotonic()
    try:
        code = Runner(settings, err=err).run()
    finally:
        jumper.join(5)
        err.seek(0)
        stderr = err.read()
        err.close()
    assert code == EXIT_LOST, stderr
    assert time.monotonic() - began < 5, "the command outlived the suspended lease"
    assert "lost" in stderr
    assert not alive(int(pid_file.read_text()))


# -- 3. --min-hold and signals -------------------------------------------------------------


def test_signal_ends_min_hold(server: Server, tmp_path: Path) -> None:
    started = tmp_path / "started"
    proc = start(
        [*srv(server.port), "-r", "p", "--min-hold", "20", f"touch {started}; sleep 30 & wait"]
    )
    while not started.exists():
        time.sleep(0.02)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 128 + signal.SIGTERM
    assert time.monotonic() - signalled < 3, "--min-hold held the lock after a signal"
    assert server.call("/get/?host=other&pool=p").body == "YES"


# -- 4. /wait/ answered NO -----------------------------------------------------------------


def _no_then_yes(verb: str, n: int) -> bytes:
    if verb == "wait":
        return http("NO") if n == 0 else grant()
    return http("OK")


def test_untimed_wait_answered_no_waits_again(fake: Callable[..., FakeServer]) -> None:
    server = fake(_no_then_yes)
    lease = Client("127.0.0.1", server.port, host="me").acquire("p")
    assert lease.token == "tok" and lease.fence == 7
    assert server.seen == ["wait", "wait"]


def test_async_untimed_wait_answered_no_waits_again(fake: Callable[..., FakeServer]) -> None:
    server = fake(_no_then_yes)

    async def main() -> None:
        async with AsyncClient("127.0.0.1", server.port, host="me") as c:
            lease = await c.acquire("p")
            assert lease.token == "tok"

    asyncio.run(main())
    assert server.seen == ["wait", "wait"]


def test_cli_untimed_wait_answered_no_runs_the_command(
    fake: Callable[..., FakeServer], tmp_path: Path
) -> None:
    server = fake(_no_then_yes)
    marker = tmp_path / "ran"
    result = run([*srv(server.port), "-r", "p", f"touch {marker}"])
    assert result.returncode == 0, result.stderr
    assert marker.exists()


def test_timed_wait_answered_no_early_waits_for_the_rest(fake: Callable[..., FakeServer]) -> None:
    server = fake(lambda verb, n: http("NO"))
    began = time.monotonic()
    with pytest.raises(Exception, match=r"within 0\.6s"):
        Client("127.0.0.1", server.port, host="me").acquire("p", timeout=0.6)
    assert len(server.seen) >= 2  # the fake answers at once: asked again until 0.6 s passed
    assert time.monotonic() - began >= 0.5


# -- 5. bad user input: one line, the right code, no traceback -----------------------------


def test_non_utf8_config_file_is_78(tmp_path: Path) -> None:
    conf = tmp_path / "client.conf"
    conf.write_bytes(b"server = \xff\xfe\n")
    result = run(["-r", "p", f"touch {tmp_path}/ran"], env=cli_env(DISTRIBUTEX_CONFIG=str(conf)))
    assert result.returncode == 78, result.stderr
    assert result.stderr.count("\n") == 1 and "UTF-8" in result.stderr
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["-H", "127.0.0.1", "-r", b"\xff", "true"],
        ["-l", "--lock-dir", "LOCKS", "-r", b"\xff", "true"],
        ["-H", "127.0.0.1", "-l", "--lock-dir", "LOCKS", "-r", b"p\xff", "true"],
        ["-H", "127.0.0.1", "--host-id", b"\xfe", "-r", "p", "true"],
        ["-l", "--lock-dir", "LOCKS", "--host-id", b"\xfe", "-r", "p", "true"],
        ["-H", "a b", "-r", "p", "true"],
        ["-H", b"\xff", "-r", "p", "true"],
    ],
)
def test_bad_text_arguments_are_usage_errors(args: list[Any], tmp_path: Path) -> None:
    args = [str(tmp_path / "locks") if a == "LOCKS" else a for a in args]
    result = run(args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "error:" in result.stderr


def test_non_utf8_host_id_in_environment_is_78() -> None:
    env = cli_env()
    env_bytes = {os.fsencode(k): os.fsencode(v) for k, v in env.items()}
    env_bytes[b"DISTRIBUTEX_HOST_ID"] = b"\xff"
    proc = subprocess.run(
        [*CLI, "-H", "127.0.0.1", "-r", "p", "true"], capture_output=True, env=env_bytes
    )
    assert proc.returncode == 78, proc.stderr
    assert proc.stderr.count(b"\n") == 1 and b"Traceback" not in proc.stderr


# -- 6. a server answering garbage ---------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        b"\x00\xffgarbage\r\n\r\nmore\nlines\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nYE",
        http("\x00\x1b[31mred\nline", "500 Oops"),
    ],
)
def test_garbage_answers_give_one_line(
    answer: bytes, fake: Callable[..., FakeServer], tmp_path: Path
) -> None:
    server = fake(lambda verb, n: answer)
    result = run([*srv(server.port), "-r", "p", f"touch {tmp_path}/ran"])
    assert result.returncode == 69, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("distributex: ") and "\x00" not in result.stderr
    assert "\x1b" not in result.stderr
    assert not (tmp_path / "ran").exists()


# -- 7. renewal answers and lease headers --------------------------------------------------


@pytest.mark.parametrize("word", ["NO", "YES", ""])
def test_renewal_needs_ok(word: str, fake: Callable[..., FakeServer]) -> None:
    server = fake(lambda verb, n: grant() if verb == "get" else http(word))
    c = Client("127.0.0.1", server.port, host="me")
    lease = c.acquire("p", wait=False)
    renewed_at = lease.renewed_at
    with pytest.raises(ServerUnavailable, match="unexpected answer"):
        c.renew(lease)
    assert lease.renewed_at == renewed_at


def test_keeper_loses_a_lease_whose_renewals_are_not_ok(fake: Callable[..., FakeServer]) -> None:
    server = fake(lambda verb, n: grant(ttl="2") if verb == "get" else http("NO"))
    c = Client("127.0.0.1", server.port, host="me", timeout=1)
    with pytest.raises(LockLost), c.lock("p", wait=False) as lease:
        assert lease.lost.wait(3), "a 200 NO was taken for a renewal"


@pytest.mark.parametrize("ttl", ["nan", "inf", "-1", "-inf", "soon"])
def test_bad_ttl_header_is_a_protocol_error(ttl: str, fake: Callable[..., FakeServer]) -> None:
    server = fake(lambda verb, n: grant(ttl=ttl) if verb == "get" else http("OK"))
    with pytest.raises(ServerUnavailable, match="malformed lease headers"):
        Client("127.0.0.1", server.port, host="me").acquire("p", wait=False)


def test_ttl_zero_means_never_expires(fake: Callable[..., FakeServer]) -> None:
    server = fake(lambda verb, n: grant(ttl="0") if verb == "get" else http("OK"))
    lease = Client("127.0.0.1", server.port, host="me").acquire("p", wait=False)
    assert lease.ttl == 0 and lease.confirmed_until == float("inf")


# -- 8. the command's process group --------------------------------------------------------


def test_sigkilled_client_takes_the_command_with_it(server: Server, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    proc = start([*srv(server.port), "-r", "p", f"echo $$ > {pid_file}; exec sleep 30"])
    pid = int(wait_for_file(pid_file))
    _pids.append(pid)
    proc.kill()
    proc.wait()
    assert wait_dead(pid, 3), "the command ran on, unsupervised, after the client died"


def test_background_jobs_are_stopped_before_release(server: Server, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    proc = start([*srv(server.port), "-r", "p", f"sleep 30 & echo $! > {pid_file}"])
    assert proc.wait(10) == 0
    pid = int(wait_for_file(pid_file))
    _pids.append(pid)
    assert not alive(pid), "a background job of the command outlived the lock"
    stderr = proc.stderr.read() if proc.stderr else ""
    assert "process group" in stderr


def test_background_jobs_ignoring_sigterm_get_sigkill_after_grace(
    server: Server, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    # The job writes its pid only once its trap is set, and the command ends only
    # after that: a busy machine cannot let the SIGTERM arrive before the trap.
    job = f"trap '' TERM; echo $$ > {pid_file}.tmp; mv {pid_file}.tmp {pid_file}; exec sleep 30"
    cmd = f'sh -c "{job}" & while [ ! -s {pid_file} ]; do sleep 0.01; done'
    proc = start([*srv(server.port), "-r", "p", "--ttl", "5", "--grace", "1", "-v", cmd])
    pid = int(wait_for_file(pid_file))
    _pids.append(pid)
    wait_for_line(proc, "left processes running")
    began = time.monotonic()
    assert proc.wait(10) == 0
    took = time.monotonic() - began
    assert not alive(pid)
    assert 0.8 < took < 5, took
    assert server.call("/get/?host=other&pool=p").body == "YES"


# -- 9. a black-holed server ---------------------------------------------------------------


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A port whose full accept queue drops every new SYN: connects hang."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fill = []
    for _ in range(4):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        fill.append(sock)
    time.sleep(0.1)
    yield port
    for sock in fill:
        sock.close()
    listener.close()


def test_cancel_aborts_a_hanging_connect(blackhole: int) -> None:
    token = CancelToken()
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            Client("127.0.0.1", blackhole, host="me", timeout=30).acquire("p", cancel=token)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.3)
    cancelled = time.monotonic()
    token.cancel()
    thread.join(5)
    assert not thread.is_alive()
    assert time.monotonic() - cancelled < 1
    assert errors and isinstance(errors[0], Cancelled)


def test_signal_while_connecting_to_a_blackholed_server(blackhole: int, tmp_path: Path) -> None:
    proc = start(
        [*srv(blackhole), "--http-timeout", "30", "-v", "-r", "p", f"touch {tmp_path}/ran"]
    )
    wait_for_line(proc, "waiting for pool")
    time.sleep(0.2)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 128 + signal.SIGTERM
    assert time.monotonic() - signalled < 2
    assert not (tmp_path / "ran").exists()


def test_connect_timeout_applies(blackhole: int) -> None:
    began = time.monotonic()
    with pytest.raises(ServerUnavailable, match="timed out"):
        Client("127.0.0.1", blackhole, host="me", timeout=0.5).acquire("p", wait=False)
    assert time.monotonic() - began < 3


# -- 10. a 0.7 server ----------------------------------------------------------------------


def test_old_server_without_leases_warns_and_runs(
    fake: Callable[..., FakeServer], tmp_path: Path
) -> None:
    server = fake(lambda verb, n: http("YES") if verb == "wait" else http("OK"))
    marker = tmp_path / "ran"
    result = run([*srv(server.port), "-r", "p", f"touch {marker}; exit 4"])
    assert result.returncode == 4
    assert marker.exists()
    assert result.stderr.count("\n") == 1 and "0.7" in result.stderr, result.stderr
    assert server.seen == ["wait", "release"]
