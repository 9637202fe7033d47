"""The ``distributex`` command against real servers, real processes and real signals."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

Server = Any  # conftest.Server (tests/ is not a package, so no import)

CLI = [sys.executable, "-m", "distributex.client.cli"]

pytestmark = pytest.mark.timeout(60)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli_env(**extra: str) -> dict[str, str]:
    """The test's environment without inherited DISTRIBUTEX_* and without config files."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTRIBUTEX_")}
    env["DISTRIBUTEX_CONFIG"] = ""
    env.update(extra)
    return env


def run(
    args: list[str], timeout: float = 30, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        CLI + args, capture_output=True, text=True, timeout=timeout, env=env or cli_env()
    )


_started: list[subprocess.Popen[str]] = []
_groups: list[int] = []  # process groups of commands the clients ran


@pytest.fixture(autouse=True)
def _stop_everything() -> Iterator[None]:
    """Every client and command process group a test started is gone after it."""
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
    while _groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(_groups.pop(), signal.SIGKILL)


def start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        CLI + args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env or cli_env(),
    )
    _started.append(proc)
    return proc


def wait_for_line(proc: subprocess.Popen[str], text: str, timeout: float = 10) -> None:
    """Read the client's stderr until a line contains ``text`` (a -v progress line)."""
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


def srv(server: Server) -> list[str]:
    return ["-H", "127.0.0.1", "-p", str(server.port)]


def wait_for_file(path: Path, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().endswith("\n"):
            return path.read_text()
        time.sleep(0.02)
    raise AssertionError(f"{path} was not written within {timeout}s")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def intervals(log: Path) -> list[tuple[float, float]]:
    """(start, end) pairs from lines 'start T' / 'end T' written by each run."""
    starts: list[float] = []
    pairs: list[tuple[float, float]] = []
    for line in log.read_text().split("\n"):
        if not line:
            continue
        word, stamp = line.split()
        if word == "start":
            starts.append(float(stamp))
        else:
            pairs.append((starts.pop(0), float(stamp)))
    return sorted(pairs)


TIMED = "echo start $(date +%s.%N) >> {log}; sleep {secs}; echo end $(date +%s.%N) >> {log}"


# -- exit status ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "status"),
    [("exit 0", 0), ("exit 7", 7), ("kill -9 $$", 128 + 9), ("kill -15 $$", 128 + 15)],
)
def test_exit_status_is_the_commands(server: Server, command: str, status: int) -> None:
    result = run([*srv(server), "-r", "p", command])
    assert result.returncode == status, result.stderr
    # the lock was released afterwards
    assert server.call("/get/?host=other&pool=p").body == "YES"


def test_argv_form_runs_without_shell(server: Server, tmp_path: Path) -> None:
    out = tmp_path / "out"
    arg = "a b; $HOME"  # a shell would split and expand this
    code = f"import sys; open({str(out)!r}, 'w').write(sys.argv[1]); sys.exit(3)"
    result = run([*srv(server), "-r", "p", "--", sys.executable, "-c", code, arg])
    assert result.returncode == 3, result.stderr
    assert out.read_text() == arg


def test_missing_program_is_127_and_lock_released(server: Server) -> None:
    result = run([*srv(server), "-r", "p", "--", "/nonexistent/program"])
    assert result.returncode == 127
    assert "not found" in result.stderr
    assert server.call("/get/?host=other&pool=p").body == "YES"


# -- mutual exclusion ----------------------------------------------------------------------


def test_two_clients_never_overlap_and_second_follows_at_once(
    server: Server, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    cmd = TIMED.format(log=log, secs=1)
    first = start([*srv(server), "-r", "p", "--host-id", "a", cmd])
    time.sleep(0.3)
    second = start([*srv(server), "-r", "p", "--host-id", "b", cmd])
    assert first.wait(20) == 0, first.stderr.read() if first.stderr else ""
    assert second.wait(20) == 0
    (_, e1), (s2, _) = intervals(log)
    assert e1 <= s2, "the two commands overlapped"
    # "Right after": far sooner than any renewal or retry period (60 s ttl: 20 s, 1 s).
    assert s2 - e1 < 2.0, f"the second started {s2 - e1:.2f}s after the first ended"


def test_local_lock_prevents_overlap_on_one_host(tmp_path: Path) -> None:
    log = tmp_path / "log"
    cmd = TIMED.format(log=log, secs=1)
    args = ["-l", "--lock-dir", str(tmp_path / "locks"), "-r", "job", cmd]
    procs = [start(args) for _ in range(3)]
    assert [p.wait(20) for p in procs] == [0, 0, 0]
    pairs = intervals(log)
    assert len(pairs) == 3
    for (_, end), (begin, _) in itertools.pairwise(pairs):
        assert end <= begin, f"local lock let runs overlap: {pairs}"


def test_local_lock_no_wait_is_busy(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    locks = str(tmp_path / "locks")
    holder = start(["-l", "--lock-dir", locks, "-r", "job", f"echo $$ > {tmp_path}/h; sleep 30"])
    _groups.append(int(wait_for_file(tmp_path / "h")))  # the command's process group
    result = run(["-l", "--lock-dir", locks, "-r", "job", "--no-wait", f"touch {marker}"])
    assert result.returncode == 75
    assert "busy" in result.stderr
    assert not marker.exists()
    holder.send_signal(signal.SIGTERM)  # forwarded to the whole command group
    assert holder.wait(10) == 128 + signal.SIGTERM


def wait_for_file_exists(path: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_local_and_server_lock_together(server: Server, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = [*srv(server), "-l", "--lock-dir", str(tmp_path / "locks"), "-r", "both"]
    result = run([*args, f"echo $DISTRIBUTEX_FENCE > {out}"])
    assert result.returncode == 0, result.stderr
    assert int(out.read_text())
    assert (tmp_path / "locks" / "both.lock").exists()


# -- not getting the lock ------------------------------------------------------------------


def test_no_wait_and_timeout_exit_75_without_running(server: Server, tmp_path: Path) -> None:
    assert server.call("/get/?host=other&pool=p").body == "YES"
    marker = tmp_path / "ran"
    busy = run([*srv(server), "-r", "p", "--no-wait", f"touch {marker}"])
    assert busy.returncode == 75
    assert busy.stderr.count("\n") == 1 and "busy" in busy.stderr
    began = time.monotonic()
    late = run([*srv(server), "-r", "p", "--timeout", "1", f"touch {marker}"])
    took = time.monotonic() - began
    assert late.returncode == 75
    assert "not obtained within 1s" in late.stderr
    assert 0.9 < took < 5
    assert not marker.exists()
    # the timed-out waiter left the queue: a release frees the pool for anyone
    assert server.call("/release/?host=other&pool=p").body == "OK"
    assert server.call("/get/?host=third&pool=p").body == "YES"


def test_unreachable_server_exits_69_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    result = run(["-H", "127.0.0.1", "-p", str(free_port()), "-r", "p", f"touch {marker}"])
    assert result.returncode == 69
    assert "cannot reach" in result.stderr and result.stderr.count("\n") == 1
    assert not marker.exists()


def test_invalid_pool_exits_77_without_running(server_factory, tmp_path: Path) -> None:
    server = server_factory("pools:\n  - name: p1\n    servers: alpha\n")
    marker = tmp_path / "ran"
    unknown = run([*srv(server), "-r", "nope", "--host-id", "alpha", f"touch {marker}"])
    assert unknown.returncode == 77
    assert "unknown pool" in unknown.stderr
    refused = run([*srv(server), "-r", "p1", "--host-id", "beta", f"touch {marker}"])
    assert refused.returncode == 77
    assert "servers list" in refused.stderr
    assert not marker.exists()
    ok = run([*srv(server), "-r", "p1", "--host-id", "alpha", f"touch {marker}"])
    assert ok.returncode == 0 and marker.exists()


@pytest.mark.parametrize(
    "args",
    [
        ["-r", "p", "echo hi"],  # neither -H nor -l
        ["-H", "127.0.0.1", "-r", "p"],  # no command
        ["-H", "127.0.0.1", "-r", "p", "echo", "hi"],  # two words without --
        ["-H", "127.0.0.1", "-r", "p", "--ttl", "5", "--grace", "10", "echo hi"],
        ["-H", "127.0.0.1", "-r", "p", "--no-wait", "--timeout", "3", "echo hi"],
        ["-H", "127.0.0.1", "-r", "p", "--timeout", "-1", "echo hi"],
        ["-H", "127.0.0.1", "-r", "p", "cmd", "--", "other"],
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    result = run(args)
    assert result.returncode == 2, result.stderr
    assert "error:" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--token", "s3cr3t", "-r", "p", "true"],  # was taken for --token-file s3cr3t
        ["--token=s3cr3t", "-r", "p", "-l", "true"],
        ["-r", "p", "-l", "--tok", "s3cr3t", "true"],
        ["status", "p", "--token", "s3cr3t"],  # echoed as an unrecognized argument
        ["status", "--password=s3cr3t"],
    ],
)
def test_a_token_on_the_command_line_is_refused_and_never_shown(args: list[str]) -> None:
    result = run(args)
    assert result.returncode == 2, result.stderr
    assert "error:" in result.stderr
    assert "s3cr3t" not in result.stderr + result.stdout, result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["-r", "p", "-l", "--tok", "{token_file}", "true"],  # --token-file
        ["-r", "p", "-l", "--no-w", "true"],  # --no-wait
        ["status", "--js"],  # --json
    ],
)
def test_abbreviated_options_are_refused(args: list[str], tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("t0ken\n")
    result = run([arg.format(token_file=token_file) for arg in args])
    assert result.returncode == 2, result.stderr
    assert "unrecognized arguments" in result.stderr, result.stderr


def test_help_documents_exit_codes() -> None:
    result = run(["--help"])
    assert result.returncode == 0
    for text in ("69", "73", "75", "77", "--min-hold", "--grace", "DISTRIBUTEX_LEASE"):
        assert text in result.stdout


# -- leases while the command runs ---------------------------------------------------------


def test_renewal_keeps_a_short_lease_for_a_long_command(server_factory, tmp_path: Path) -> None:
    server = server_factory("pools:\n  - name: p\n    expire: 2\n")
    started, done = tmp_path / "started", tmp_path / "done"
    cmd = f"touch {started}; sleep 6; touch {done}"
    proc = start([*srv(server), "-r", "p", "--host-id", "a", cmd])
    wait_for_file_exists(started)
    answers = []
    while True:
        answer = server.call("/get/?host=b&pool=p").body
        if done.exists():  # this answer may come after the release: it proves nothing
            break
        answers.append(answer)
        time.sleep(0.2)
    assert proc.wait(10) == 0, proc.stderr.read() if proc.stderr else ""
    assert len(answers) > 20
    assert set(answers) == {"NO"}, "another host got the lock while the command ran"
    assert server.call("/get/?host=b&pool=p").body == "YES"


def test_server_killed_stops_command_within_ttl_plus_grace(server: Server, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    # Both the shell and its child ignore SIGTERM: only SIGKILL after the grace stops them.
    cmd = f"trap '' TERM; sleep 60 & echo $$ $! > {pids}; wait; wait"
    proc = start([*srv(server), "-r", "p", "--ttl", "3", "--grace", "1", cmd])
    shell_pid, child_pid = map(int, wait_for_file(pids).split())
    time.sleep(1.2)  # at least one renewal happened
    killed_at = time.monotonic()
    server.stop(signal.SIGKILL)
    status = proc.wait(10)
    took = time.monotonic() - killed_at
    stderr = proc.stderr.read() if proc.stderr else ""
    assert status == 73, stderr
    assert "lost" in stderr
    assert took < 3 + 1, f"command outlived TTL + grace: {took:.2f}s"
    assert took > 0.5, "gave up at once: no tolerance for blips"
    assert not alive(shell_pid) and not alive(child_pid)


def test_lease_released_by_someone_else_stops_command(server: Server, tmp_path: Path) -> None:
    env_file = tmp_path / "env"
    cmd = f"echo $DISTRIBUTEX_HOST $DISTRIBUTEX_LEASE > {env_file}; sleep 30"
    proc = start([*srv(server), "-r", "p", "--ttl", "3", "--grace", "1", cmd])
    host, token = wait_for_file(env_file).split()
    assert server.call(f"/release/?host={host}&pool=p&lease={token}").body == "OK"
    status = proc.wait(10)
    stderr = proc.stderr.read() if proc.stderr else ""
    assert status == 73, stderr
    assert "gone" in stderr


def test_min_hold_keeps_the_lock_after_a_quick_command(server: Server) -> None:
    began = time.monotonic()
    proc = start([*srv(server), "-r", "p", "--host-id", "a", "--min-hold", "2", "true"])
    time.sleep(0.8)
    assert server.call("/get/?host=b&pool=p").body == "NO"
    assert proc.wait(10) == 0
    assert time.monotonic() - began >= 2
    assert server.call("/get/?host=b&pool=p").body == "YES"


# -- signals -------------------------------------------------------------------------------


def test_sigterm_reaches_the_command_and_lock_is_freed(server: Server, tmp_path: Path) -> None:
    started, got = tmp_path / "started", tmp_path / "got"
    cmd = f"trap 'echo term > {got}; exit 5' TERM; touch {started}; sleep 30 & wait"
    proc = start([*srv(server), "-r", "p", "--host-id", "a", cmd])
    wait_for_file_exists(started)
    assert server.call("/get/?host=b&pool=p").body == "NO"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 5
    assert got.read_text() == "term\n"
    assert server.call("/get/?host=b&pool=p").body == "YES"


def test_second_signal_kills(server: Server, tmp_path: Path) -> None:
    started = tmp_path / "started"
    cmd = f"trap '' INT TERM; touch {started}; sleep 30 & wait; wait"
    proc = start([*srv(server), "-r", "p", "--host-id", "a", cmd])
    wait_for_file_exists(started)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert proc.poll() is None, "the command ignores SIGINT, so it should still run"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 128 + 9
    assert server.call("/get/?host=b&pool=p").body == "YES"


def test_signal_while_waiting_gives_up_without_running(server: Server, tmp_path: Path) -> None:
    assert server.call("/get/?host=other&pool=p").body == "YES"
    marker = tmp_path / "ran"
    proc = start([*srv(server), "-r", "p", "--host-id", "a", "-v", f"touch {marker}"])
    wait_for_line(proc, "waiting for pool")  # printed right before the /wait/ request
    time.sleep(0.3)  # let the request reach the server's queue
    proc.send_signal(signal.SIGHUP)
    assert proc.wait(10) == 128 + signal.SIGHUP
    assert server.call("/release/?host=other&pool=p").body == "OK"
    time.sleep(0.3)
    assert not marker.exists()
    # the waiter left the server's queue, so the pool is free
    assert server.call("/get/?host=third&pool=p").body == "YES"


# -- environment ---------------------------------------------------------------------------


def test_environment_reaches_the_command(server: Server, tmp_path: Path) -> None:
    out = tmp_path / "env"
    cmd = (
        "echo $DISTRIBUTEX_SERVER $DISTRIBUTEX_POOL $DISTRIBUTEX_HOST $DISTRIBUTEX_FENCE "
        f"$DISTRIBUTEX_LEASE > {out}; sleep 1"
    )
    proc = start([*srv(server), "-r", "pool-x", "--host-id", "web1", cmd])
    address, pool, host, fence, token = wait_for_file(out).split()
    assert address == f"127.0.0.1:{server.port}"
    assert (pool, host) == ("pool-x", "web1")
    assert int(fence) > 0
    # the lease token is the live one: the server renews it
    renewed = server.call(f"/renew/?host=web1&pool=pool-x&lease={token}")
    assert renewed.status == 200
    assert renewed.headers["X-Distributex-Fence"] == fence
    assert proc.wait(10) == 0


def test_defaults_from_environment_and_config_file(server: Server, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = cli_env(DISTRIBUTEX_SERVER=f"127.0.0.1:{server.port}", DISTRIBUTEX_HOST_ID="envhost")
    result = run(["-r", "p", f"echo $DISTRIBUTEX_HOST > {out}"], env=env)
    assert result.returncode == 0, result.stderr
    assert out.read_text() == "envhost\n"

    conf = tmp_path / "client.conf"
    conf.write_text(f"# cron defaults\nserver = 127.0.0.1\nport = {server.port}\nhost_id = cf\n")
    result = run(
        ["-r", "p", f"echo $DISTRIBUTEX_HOST > {out}"], env=cli_env(DISTRIBUTEX_CONFIG=str(conf))
    )
    assert result.returncode == 0, result.stderr
    assert out.read_text() == "cf\n"

    conf.write_text("server = 127.0.0.1\nbogus = 1\n")
    result = run(["-r", "p", f"touch {tmp_path}/ran"], env=cli_env(DISTRIBUTEX_CONFIG=str(conf)))
    assert result.returncode == 78
    assert f"{conf}:2" in result.stderr
    assert not (tmp_path / "ran").exists()


# -- shared locks (-s) ----------------------------------------------------------------------


def _hold_until(marker: Path, go: Path) -> str:
    """A command that says it runs, then holds on until ``go`` exists."""
    return f"touch {marker}; while [ ! -e {go} ]; do sleep 0.05; done"


def test_shared_clients_run_side_by_side_and_never_beside_an_exclusive_one(
    server: Server, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    readers = [
        start(
            [
                *srv(server),
                "-r",
                "db",
                "--host-id",
                f"r{i}",
                "-s",
                _hold_until(tmp_path / f"r{i}", go),
            ]
        )
        for i in range(2)
    ]
    # Both commands run at once: neither ends before both have started.
    for i in range(2):
        wait_for_file_exists(tmp_path / f"r{i}")
    status = server.call("/status")
    pool = next(p for p in json.loads(status.body)["pools"] if p["name"] == "db")
    assert sorted((h["host"], h["mode"]) for h in pool["holders"]) == [
        ("r0", "shared"),
        ("r1", "shared"),
    ]
    ran = tmp_path / "writer-ran"
    busy = run([*srv(server), "-r", "db", "--host-id", "w", "--no-wait", f"touch {ran}"])
    assert busy.returncode == 75 and not ran.exists(), busy.stderr
    go.touch()
    assert [r.wait(20) for r in readers] == [0, 0]
    writer = start(
        [*srv(server), "-r", "db", "--host-id", "w", _hold_until(ran, go.with_name("go2"))]
    )
    wait_for_file_exists(ran)
    late = run([*srv(server), "-r", "db", "--host-id", "r9", "--shared", "--no-wait", "true"])
    assert late.returncode == 75, late.stderr
    (tmp_path / "go2").touch()
    assert writer.wait(20) == 0


def test_shared_local_locks_overlap_and_exclude_an_exclusive_one(tmp_path: Path) -> None:
    locks = ["-l", "--lock-dir", str(tmp_path / "locks"), "-r", "job"]
    go = tmp_path / "go"
    readers = [start([*locks, "-s", _hold_until(tmp_path / f"r{i}", go)]) for i in range(2)]
    for i in range(2):
        wait_for_file_exists(tmp_path / f"r{i}")
    busy = run([*locks, "--no-wait", "true"])
    assert busy.returncode == 75, busy.stderr
    go.touch()
    assert [r.wait(20) for r in readers] == [0, 0]
