"""The twistd plugin: the 0.7 start-up line ``twistd -n distributex -c FILE`` keeps working."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Memcached, free_port, wait_for_port

# Not "twisted": with distributex installed, twisted/plugins/ makes a bare
# namespace package importable even when Twisted itself is not installed.
pytest.importorskip("twisted.scripts.twistd")

# The seed's example, on the inmemory backend (the memcache one is not built yet).
SEED_CONFIG = """\
backend: inmemory
pools:
    - name: pool1
      expire: 300

    - name: pool2
      expire: 300
      servers: acme1, acme2
"""


def twistd_command() -> list[str]:
    """twistd of the interpreter running the tests (``python -m twisted`` is ``twist``)."""
    script = Path(sys.executable).parent / "twistd"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def call(port: int, path: str, timeout: float = 10) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Twistd:
    """A ``twistd -n distributex`` process."""

    def __init__(
        self,
        tmp_path: Path,
        args: list[str],
        config: str | None = SEED_CONFIG,
        twistd_args: tuple[str, ...] = (),
    ):
        self.port = free_port()
        self.log = tmp_path / f"twistd-{self.port}.out"
        # Tests serve on loopback only; the plugin's own default is 0.7's every
        # interface (checked without listening in test_default_bind_is_every_interface).
        bind = [] if "-b" in args or "--bind" in args else ["-b", "127.0.0.1"]
        cmd = [
            *twistd_command(),
            "-n",
            *twistd_args,
            "distributex",
            "-p",
            str(self.port),
            *bind,
            *args,
        ]
        if config is not None:
            cfg = tmp_path / "distributex.yaml"
            cfg.write_text(config)
            cmd += ["-c", str(cfg)]
        with open(self.log, "wb") as out:
            # cwd: twistd writes twistd.pid in the current directory
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)

    def output(self) -> str:
        return self.log.read_text()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def twistd(tmp_path: Path) -> Iterator:
    started: list[Twistd] = []

    def factory(
        args: list[str] | None = None,
        config: str | None = SEED_CONFIG,
        twistd_args: tuple[str, ...] = (),
    ) -> Twistd:
        server = Twistd(tmp_path, args or [], config, twistd_args)
        started.append(server)
        try:
            wait_for_port(server.port, server.proc)
        except RuntimeError as exc:
            server.stop(signal.SIGKILL)
            raise RuntimeError(f"{exc}: {server.output()}") from None
        return server

    yield factory
    for server in started:
        server.stop(signal.SIGKILL)


def run_twistd(tmp_path: Path, args: list[str], config: str | None) -> subprocess.CompletedProcess:
    """Run twistd to completion (for the cases where it must refuse to start)."""
    cmd = [*twistd_command(), "-n", "distributex", *args]
    if config is not None:
        cfg = tmp_path / "distributex.yaml"
        cfg.write_text(config)
        cmd += ["-c", str(cfg)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=tmp_path)


def test_seed_transcript(twistd) -> None:
    server = twistd()
    transcript = [
        ("/get/?host=me&pool=pool1", "YES"),
        ("/get/?host=them&pool=pool1", "NO"),
        ("/release/?host=me&pool=pool1", "OK"),
        ("/get/?host=them&pool=pool1", "YES"),
        ("/release/?host=them&pool=pool1", "OK"),
    ]
    for path, body in transcript:
        assert call(server.port, path) == (200, body), path
    assert call(server.port, "/get/?host=intruder&pool=pool2") == (403, "INVALID")
    assert call(server.port, "/get/?host=acme1&pool=pool2") == (200, "YES")
    assert "on http://127.0.0.1:" in server.output()


def test_default_bind_is_every_interface(tmp_path: Path) -> None:
    """0.7 sites' clients are on other hosts: unless told, listen as 0.7 did."""
    cfg = tmp_path / "distributex.yaml"
    cfg.write_text(SEED_CONFIG)
    probe = (
        "import sys\n"
        "from distributex.twisted_service import Options\n"
        "for argv in (['-c', sys.argv[1]], ['-c', sys.argv[1], '-b', '127.0.0.2']):\n"
        "    options = Options()\n"
        "    options.parseOptions(argv)\n"
        "    print(options.config_obj.bind)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, str(cfg)], capture_output=True, text=True, timeout=30
    )
    assert result.stdout.split() == ["0.0.0.0", "127.0.0.2"], result.stderr


def test_wait_is_event_driven(twistd) -> None:
    server = twistd()
    assert call(server.port, "/get/?host=holder&pool=pool1") == (200, "YES")
    answers: list[tuple[float, tuple[int, str]]] = []

    def waiter() -> None:
        answer = call(server.port, "/wait/?host=waiter&pool=pool1", timeout=20)
        answers.append((time.monotonic(), answer))

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.5)
    assert not answers, "the waiter was answered while the pool was held"
    released = time.monotonic()
    assert call(server.port, "/release/?host=holder&pool=pool1") == (200, "OK")
    thread.join(10)
    assert answers and answers[0][1] == (200, "YES")
    assert answers[0][0] - released < 0.5  # 0.7 polled every 1-2 s


def test_sigterm_stops_with_exit_0(twistd) -> None:
    server = twistd()
    assert call(server.port, "/get/?host=me&pool=pool1") == (200, "YES")
    assert server.stop(signal.SIGTERM) == 0
    assert "stopping" in server.output()


# The seed README's example, verbatim: memcache on localhost:11211.
SEED_MEMCACHE_CONFIG = SEED_CONFIG.replace("backend: inmemory", "backend: memcache")


@pytest.fixture
def memcached_11211() -> Iterator[None]:
    """A memcached on the seed's default port (or the one already there)."""
    with socket.socket() as sock:
        taken = sock.connect_ex(("127.0.0.1", 11211)) == 0
    if taken:
        with socket.create_connection(("127.0.0.1", 11211), timeout=5) as sock:
            sock.sendall(b"version\r\n")
            if not sock.recv(100).startswith(b"VERSION"):
                pytest.skip("port 11211 is taken by something that is not memcached")
        yield
        return
    server = Memcached(None, 11211)
    server.start()
    yield
    server.stop()


def test_seed_memcache_config_starts_unchanged(
    twistd, memcached_11211: None, tmp_path: Path
) -> None:
    # Two servers on the very example of the 0.7 README share one lock state.
    first = twistd(config=SEED_MEMCACHE_CONFIG, twistd_args=("--pidfile", str(tmp_path / "a")))
    second = twistd(config=SEED_MEMCACHE_CONFIG, twistd_args=("--pidfile", str(tmp_path / "b")))
    assert call(first.port, "/get/?host=me&pool=pool1") == (200, "YES")
    assert call(second.port, "/get/?host=them&pool=pool1") == (200, "NO")
    assert call(second.port, "/release/?host=me&pool=pool1") == (200, "OK")
    assert call(first.port, "/get/?host=them&pool=pool1") == (200, "YES")
    assert call(first.port, "/release/?host=them&pool=pool1") == (200, "OK")


def test_unreachable_memcached_is_one_line_and_no_pidfile(tmp_path: Path) -> None:
    config = SEED_MEMCACHE_CONFIG.replace("backend: memcache", "backend: memcache\nmemcacheport: 1")
    pidfile = tmp_path / "dx.pid"
    cmd = [*twistd_command(), "-n", "--pidfile", str(pidfile), "distributex"]
    cfg = tmp_path / "distributex.yaml"
    cfg.write_text(config)
    result = subprocess.run(
        [*cmd, "-b", "127.0.0.1", "-p", str(free_port()), "-c", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "memcached localhost:1 unreachable" in output
    assert "Traceback" not in output
    assert not pidfile.exists()


def test_bad_config_exits_with_one_line(tmp_path: Path) -> None:
    config = "pools:\n    - name: pool1\n      expire: -5\n"
    result = run_twistd(tmp_path, [], config)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "distributex.yaml:3:" in lines[0] and "expire" in lines[0]
    assert not (tmp_path / "twistd.pid").exists()


def test_explicit_asyncio_reactor_accepted(twistd) -> None:
    server = twistd(twistd_args=("-r", "asyncio"))
    assert call(server.port, "/get/?host=me&pool=pool1") == (200, "YES")
    assert "AsyncioSelectorReactor" in server.output()


def test_other_reactor_refused(tmp_path: Path) -> None:
    result = subprocess.run(
        [*twistd_command(), "-n", "-r", "poll", "distributex"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "asyncio reactor" in result.stderr and "Traceback" not in result.stderr


def test_port_in_use_exits_non_zero(twistd, tmp_path: Path) -> None:
    first = twistd()
    other = tmp_path / "other"  # its own twistd.pid
    other.mkdir()
    result = run_twistd(other, ["-p", str(first.port), "-b", "127.0.0.1"], None)
    assert result.returncode == 1  # as distributexd
    output = result.stdout + result.stderr
    assert "cannot listen on 127.0.0.1" in output
    assert "Traceback" not in output
    assert not (other / "twistd.pid").exists()


def test_daemonize_pidfile_logfile(tmp_path: Path) -> None:
    port = free_port()
    pidfile = tmp_path / "dx.pid"
    logfile = tmp_path / "dx.log"
    cfg = tmp_path / "distributex.yaml"
    cfg.write_text(SEED_CONFIG)
    cmd = [*twistd_command(), "--pidfile", str(pidfile), "--logfile", str(logfile)]
    cmd += ["distributex", "-c", str(cfg), "-p", str(port), "-b", "127.0.0.1"]
    # -d is twistd's default; the parent returns once the daemon has started.
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=tmp_path)
    pid = None
    try:
        assert result.returncode == 0, result.stderr
        pid = int(pidfile.read_text().strip())
        assert alive(pid)
        wait_for_port(port)
        assert call(port, "/get/?host=me&pool=pool1") == (200, "YES")
        assert call(port, "/get/?host=them&pool=pool1") == (200, "NO")
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(pid)
        assert not pidfile.exists()
        log = logfile.read_text()
        assert "[distributex#info] distributex" in log and f":{port}/" in log
        assert "stopping" in log
    finally:
        if pid is not None and alive(pid):
            os.kill(pid, signal.SIGKILL)
