"""For operators: event log lines (text and JSON), systemd readiness, the unit file,
the example configuration and the Dockerfile."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distributex.config import load_config
from tests.conftest import Server
from tests.test_http import ParkedWait, q

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
CONFIG = """\
pools:
  - name: p
    expire: 300
  - name: short
    expire: 0.3
  - name: guarded
    servers: web1
"""


def until_logged(server: Server, needle: str, timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    while needle not in (text := server.log.read_text()):
        assert time.monotonic() < deadline, f"{needle!r} not logged: {text[-2000:]}"
        time.sleep(0.02)
    return text


def make_events(server: Server) -> None:
    """One of each event: grant, release, expiry, lost lease, timeout, refusal."""
    assert server.call(q("get", "a", "p")).body == "YES"
    assert server.call(q("wait", "b", "p", "&timeout=0.1")).body == "NO"
    assert server.call(q("release", "a", "p")).body == "OK"
    lease = server.call(q("get", "c", "short")).headers["X-Distributex-Lease"]
    until_logged(server, "expire")
    assert server.call(q("renew", "c", "short", f"&lease={lease}")).status == 410
    assert server.call(q("get", "intruder", "guarded")).status == 403


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_one_line_per_event(server_factory, loop: str) -> None:
    # On either event loop (the rest of the suite runs on the default: uvloop).
    server = server_factory(CONFIG, args=["--event-loop", loop])
    make_events(server)
    text = until_logged(server, "refuse")
    lines = text.splitlines()
    assert f", {loop} loop)" in next(x for x in lines if " serving " in x)

    def line(event: str, pool: str = "p") -> str:
        found = [x for x in lines if f"distributex.events: {event} pool={pool} " in x]
        assert len(found) == 1, (event, lines)
        return found[0]

    assert re.search(r"grant pool=p host=a fence=\d+ waited=0\.0$", line("grant"))
    assert re.search(r"release pool=p host=a fence=\d+$", line("release"))
    assert re.search(r"timeout pool=p host=b waited=0\.\d+$", line("timeout"))
    assert re.search(r"expire pool=short host=c fence=\d+$", line("expire", "short"))
    assert line("lost", "short").endswith("lost pool=short host=c")
    assert line("refuse", "guarded").endswith(
        "refuse pool=guarded host=intruder status=403 "
        "reason=\"host 'intruder' is not in the servers list of 'guarded'\""
    )


def test_json_log_lines(server_factory) -> None:
    server = server_factory(CONFIG, args=["--log-format", "json"])
    make_events(server)
    until_logged(server, '"refuse"')
    records = [json.loads(x) for x in server.log.read_text().splitlines()]  # every line is JSON
    by_event = {r["event"]: r for r in records if "event" in r and r["pool"] != "short"}
    assert set(by_event) == {"grant", "release", "timeout", "refuse"}
    assert {r["event"] for r in records if r.get("pool") == "short"} == {"grant", "expire", "lost"}
    grant = by_event["grant"]
    assert (grant["pool"], grant["host"], grant["waited"]) == ("p", "a", 0.0)
    assert grant["fence"] == by_event["release"]["fence"]
    assert grant["level"] == "info" and grant["logger"] == "distributex.events"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", grant["time"])
    assert by_event["refuse"]["status"] == 403
    assert any(r["message"].startswith("distributex ") for r in records)  # start-up line too


def test_uvloop_asked_for_and_missing_is_one_line(tmp_path: Path) -> None:
    # An importable "uvloop" that fails as an uninstalled one would.
    fake = tmp_path / "uvloop"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('No module named uvloop')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "distributex", "-p", "0", "--event-loop", "uvloop"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "distributexd: error: --event-loop uvloop: uvloop is not installed "
        "(pip install 'distributex[uvloop]')"
    ]
    # auto falls back to asyncio's loop.
    cmd[-1] = "auto"
    with subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env) as proc:
        assert proc.stderr is not None
        try:
            line = next(x for x in proc.stderr if " serving " in x)
        finally:
            proc.terminate()
    assert line.rstrip().endswith(", asyncio loop)")


def test_warning_level_logs_no_lock_events(server_factory) -> None:
    server = server_factory(CONFIG, args=["--log-level", "warning"])
    assert server.call(q("get", "a", "p")).body == "YES"
    assert server.call(q("release", "a", "p")).body == "OK"
    server.stop()
    assert "distributex.events" not in server.log.read_text()


def test_systemd_readiness_and_reload_notices(
    server_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The protocol systemd speaks: a Unix datagram socket named by $NOTIFY_SOCKET.
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(15)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        server = server_factory(CONFIG)
        ready = sock.recv(4096).decode().splitlines()
        assert ready[0] == "READY=1"
        assert ready[1] == f"STATUS=serving on http://127.0.0.1:{server.port}/"
        # Ready means listening: a request is served at once.
        assert server.call(q("get", "a", "p")).body == "YES"
        server.proc.send_signal(signal.SIGHUP)
        reloading = sock.recv(4096).decode().splitlines()
        assert reloading[0] == "RELOADING=1"
        assert re.fullmatch(r"MONOTONIC_USEC=\d+", reloading[1])
        assert sock.recv(4096).decode().startswith("READY=1")
        server.proc.send_signal(signal.SIGTERM)
        assert sock.recv(4096).decode() == "STOPPING=1"
        assert server.proc.wait(15) == 0


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here")
    unit = (ROOT / "packaging" / "distributexd.service").read_text()
    assert "Type=notify" in unit and "ExecReload=/bin/kill -HUP $MAINPID" in unit
    # verify wants ExecStart to exist: point it at this checkout's distributexd.
    daemon = Path(sys.executable).parent / "distributexd"
    assert daemon.exists()
    copy = tmp_path / "distributexd.service"
    copy.write_text(unit.replace("/opt/distributex/bin/distributexd", str(daemon)))
    done = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    # Unknown keys and bad values are only warnings: any output is a failure.
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


@pytest.mark.parametrize(
    "path", ["packaging/distributex.yaml", "packaging/docker/distributex.yaml"]
)
def test_example_configurations_load(path: str) -> None:
    config = load_config(ROOT / path)
    assert config.backend == "sqlite"
    assert config.sqlite_path == "/var/lib/distributex/state.db"
    assert config.bind == "0.0.0.0"


def test_dockerfile_runs_unprivileged_with_a_health_check() -> None:
    text = (ROOT / "Dockerfile").read_text()
    final = text.split("\nFROM ")[-1]  # the image that ships
    users = re.findall(r"^USER (\S+)", final, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", final, re.MULTILINE)
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.MULTILINE):
        for item in source.split():
            assert (ROOT / item).exists(), item


def test_docker_image_builds_and_gets_healthy() -> None:
    """Builds the image where a container builder works (opt-in: it needs the base image)."""
    if os.environ.get("DISTRIBUTEX_DOCKER_TEST") != "1":
        pytest.skip("set DISTRIBUTEX_DOCKER_TEST=1 where docker can build and pull python:3.11")
    if shutil.which("docker") is None:
        pytest.skip("docker is not installed")
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        pytest.skip("the docker daemon is not usable here")
    tag = f"distributex-test:{os.getpid()}"
    subprocess.run(["docker", "build", "-t", tag, str(ROOT)], check=True, timeout=900)
    name = f"distributex-test-{os.getpid()}"
    subprocess.run(["docker", "run", "-d", "--name", name, tag], check=True, timeout=60)
    try:
        deadline = time.monotonic() + 90
        while True:
            state = subprocess.run(
                ["docker", "inspect", "-f", "{{.State.Health.Status}} {{.Config.User}}", name],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.split()
            if state and state[0] == "healthy":
                assert state[1] == "distributex"
                break
            assert time.monotonic() < deadline, state
            time.sleep(1)
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, timeout=60)


def test_parked_waiter_shows_in_metrics_and_status_of_twin(server_factory) -> None:
    # The gauges come from the same status read that /status serves.
    server = server_factory(CONFIG)
    assert server.call(q("get", "a", "p")).body == "YES"
    waiter = ParkedWait(server, "b", "p")
    deadline = time.monotonic() + 15
    while 'distributex_waiters{pool="p"} 1.0' not in server.call("/metrics").body:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    doc = json.loads(server.call("/status?pool=p").body)
    assert [w["host"] for w in doc["pools"][0]["waiters"]] == ["b"]
    waiter.hang_up()


def stream_head(server: Server, path: str, token: str | None = None) -> str:
    """The status line and headers of a streamed answer (the body never ends)."""
    auth_line = f"Authorization: Bearer {token}\r\n" if token else ""
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n{auth_line}\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            assert chunk, data
            data += chunk
    return data.split(b"\r\n\r\n")[0].decode()


def test_status_stream_and_metrics_behind_authentication(server_factory) -> None:
    from tests.test_auth import DB1_TOKEN, POOLS, TOKENS, call

    closed = server_factory(TOKENS + POOLS)
    assert stream_head(closed, "/status/events").startswith("HTTP/1.1 401")
    head = stream_head(closed, "/status/events", DB1_TOKEN)
    assert head.startswith("HTTP/1.1 200") and "text/event-stream" in head
    # The authentication layer's refusals are in the same exposition, once each.
    text = call(closed, "/metrics", DB1_TOKEN).body
    assert 'distributex_request_refusals_total{status="401"} 1.0' in text
    assert text.count("# TYPE distributex_refusals_total counter") == 1
    opened = server_factory(TOKENS + "status_public: true\n" + POOLS)
    assert stream_head(opened, "/status/events").startswith("HTTP/1.1 200")


def _allowed_cpus(pid: int, tid: int | None = None) -> str:
    status = Path(f"/proc/{pid}" + (f"/task/{tid}" if tid else "") + "/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith("Cpus_allowed_list:"))
    return line.split(":", 1)[1].strip()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux CPU affinity")
def test_cpus_keeps_every_thread_on_them(server_factory, tmp_path: Path) -> None:
    cpu = max(os.sched_getaffinity(0))  # one CPU this test may use
    config = f"backend: sqlite\nsqlite_path: {tmp_path / 'state.db'}\nautocreate: true\n"
    server = server_factory(config, args=["--cpus", str(cpu)])
    assert server.call(q("get", "a", "p")).body == "YES"  # the SQLite thread runs by now
    threads = [int(t) for t in os.listdir(f"/proc/{server.proc.pid}/task")]
    assert len(threads) >= 2  # the event loop and the SQLite thread
    assert {_allowed_cpus(server.proc.pid, t) for t in threads} == {str(cpu)}
    line = next(x for x in server.log.read_text().splitlines() if " serving " in x)
    if (os.cpu_count() or 1) > 1:  # the start-up line names them
        assert line.endswith(f", CPU {cpu})")


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("x", "argument --cpus: 'x' is not a CPU list (numbers and ranges: 1 or 0,2-3)"),
        ("0,", "argument --cpus: '0,' is not a CPU list (numbers and ranges: 1 or 0,2-3)"),
        ("3-1", "argument --cpus: '3-1' is an empty range of CPUs"),
        ("0-99999999999", "argument --cpus: CPU 99999999999 is out of range (0-8191)"),
        ("4096", "--cpus: this process may not use CPU 4096 (it may use "),
        ("4096-4099", "--cpus: this process may not use CPU 4096-4099 (it may use "),
        ("\u0661", "argument --cpus: '\u0661' is not a CPU list (numbers and ranges: 1 or 0,2-3)"),
    ],
)
def test_cpus_refused_in_one_line(value: str, error: str) -> None:
    cmd = [sys.executable, "-m", "distributex", "-p", "0", "--cpus", value]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(f"distributexd: error: {error}")
