"""Fixtures: real distributexd processes on loopback, on free ports."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.pki import Pki


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(
    condition: Callable[[], object],
    timeout: float = 20,
    what: str = "condition",
    every: float = 0.05,
) -> float:
    """Poll ``condition`` until it is true: the seconds it took (AssertionError at ``timeout``)."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if condition():
            return time.monotonic() - began
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout}s")


def freeze(proc: subprocess.Popen) -> None:
    """SIGSTOP ``proc`` and wait until every thread of it is stopped.

    kill() returns before the signal lands: a thread running on the other core
    may still answer a request sent just after it (a store "frozen" that way
    answered a write the test meant to hang).
    """
    proc.send_signal(signal.SIGSTOP)

    def stopped() -> bool:
        states = []
        for stat in glob.glob(f"/proc/{proc.pid}/task/*/stat"):
            with contextlib.suppress(OSError), open(stat) as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
        return bool(states) and all(state in ("T", "t") for state in states)

    wait_until(stopped, 10, f"process {proc.pid} stopped", every=0.005)


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")


@dataclass
class Answer:
    status: int
    body: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Server:
    """A distributexd process started by a test."""

    proc: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call(self, path: str, timeout: float = 10) -> Answer:
        """GET a path (e.g. '/get/?host=a&pool=p'); returns status, body, headers."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
                return Answer(resp.status, resp.read().decode(), dict(resp.headers))
        except urllib.error.HTTPError as err:
            return Answer(err.code, err.read().decode(), dict(err.headers))

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(
    tmp_path: Path,
    config: str | None = None,
    args: list[str] | None = None,
    port: int | None = None,
) -> Server:
    port = port or free_port()
    cmd = [sys.executable, "-m", "distributex", "-p", str(port)]
    if config is not None:
        cfg = tmp_path / f"distributex-{port}.yaml"
        cfg.write_text(textwrap.dedent(config))
        cmd += ["-c", str(cfg)]
    cmd += args or []
    log = tmp_path / f"distributexd-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    server = Server(proc, port, log)
    try:
        wait_for_port(port, proc)
    except RuntimeError:
        server.stop(signal.SIGKILL)
        raise RuntimeError(f"distributexd did not start: {log.read_text()}") from None
    return server


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator:
    """Call with YAML text (or None for the built-in default) to start a server."""
    started: list[Server] = []

    def factory(
        config: str | None = None, args: list[str] | None = None, port: int | None = None
    ) -> Server:
        server = start_server(tmp_path, config, args, port)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop(signal.SIGKILL)


@pytest.fixture
def server(server_factory) -> Server:
    """A server on the built-in default configuration."""
    return server_factory()


@pytest.fixture
def skewed_factory(tmp_path: Path) -> Iterator:
    """Start a distributexd whose clocks read ``skew`` seconds ahead (libfaketime).

    The library is preloaded into the server itself (not through the
    ``faketime`` wrapper, whose child would outlive a kill of the wrapper).
    """
    libraries = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    if not libraries:
        pytest.skip("libfaketime is not installed (scripts/test.sh installs faketime)")
    started: list[Server] = []

    def factory(text: str, skew: int) -> Server:  # skew < 0: behind
        port = free_port()
        cfg = tmp_path / f"skewed-{port}.yaml"
        cfg.write_text(text)
        log = tmp_path / f"skewed-{port}.log"
        env = {**os.environ, "LD_PRELOAD": libraries[0], "FAKETIME": f"{skew:+d}s"}
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "distributex", "-c", str(cfg), "-p", str(port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        server = Server(proc, port, log)
        started.append(server)
        wait_for_port(port, proc)
        return server

    yield factory
    for server in started:
        server.stop(signal.SIGKILL)


# -- shared backends: real memcached, several servers on one store ---------------------------


@dataclass
class Memcached:
    """A memcached process started by the tests (Debian's package)."""

    proc: subprocess.Popen | None
    port: int

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def start(self) -> None:
        """(Re)start it on the same port, empty."""
        self.stop()
        cmd = ["memcached", "-l", "127.0.0.1", "-p", str(self.port), "-U", "0", "-M", "-m", "64"]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]  # memcached refuses to run as root
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, self.proc)


def start_memcached() -> Memcached:
    if shutil.which("memcached") is None:
        pytest.skip("memcached is not installed (scripts/test.sh installs it)")
    server = Memcached(None, free_port())
    server.start()
    return server


@pytest.fixture(scope="session")
def memcached() -> Iterator[Memcached]:
    """One memcached for the session; tests keep apart by key prefix."""
    server = start_memcached()
    yield server
    server.stop()


@dataclass
class EtcdMember:
    """One etcd process (Debian's etcd-server) on loopback ports, its data in a temp dir."""

    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    cluster: str  # the --initial-cluster value
    proc: subprocess.Popen | None = None
    # Clients over https only, each with a certificate of this PKI's CA (``web1``'s for
    # ours); etcd's own certificate is ``etcd`` (its gateway is its client too).
    tls: Pki | None = None

    @property
    def url(self) -> str:
        scheme = "http" if self.tls is None else "https"
        return f"{scheme}://127.0.0.1:{self.client_port}"

    def start(self) -> None:
        """Start it (again: its data dir keeps what it had)."""
        cmd = [
            "etcd",
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.url}",
            f"--advertise-client-urls={self.url}",
            f"--listen-peer-urls=http://127.0.0.1:{self.peer_port}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{self.peer_port}",
            f"--initial-cluster={self.cluster}",
            "--initial-cluster-state=new",
            "--initial-cluster-token=distributex-tests",
            "--logger=zap",
            "--log-outputs=stderr",
            "--log-level=warn",
        ]
        if self.tls is not None:
            cmd += [
                f"--cert-file={self.tls.cert('etcd')}",
                f"--key-file={self.tls.key('etcd')}",
                f"--trusted-ca-file={self.tls.ca}",
                "--client-cert-auth",
            ]
        log = open(self.data_dir.parent / f"{self.name}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log)
        log.close()

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None

    def is_leader(self) -> bool:
        """Whether it runs and says it is the leader."""
        if self.proc is None:
            return False
        with contextlib.suppress(OSError, ValueError):
            status = self.post("/v3/maintenance/status", {}, timeout=2)
            return status.get("leader") == status["header"]["member_id"]
        return False

    def post(self, path: str, body: dict, timeout: float = 5) -> dict:
        """A call to its v3 HTTP gateway (e.g. '/v3/maintenance/status')."""
        request = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), method="POST"
        )
        context = None
        if self.tls is not None:
            context = ssl.create_default_context(cafile=self.tls.ca)
            context.load_cert_chain(self.tls.cert("web1"), self.tls.key("web1"))
        with urllib.request.urlopen(request, timeout=timeout, context=context) as resp:
            return json.loads(resp.read())


@dataclass
class EtcdCluster:
    """An etcd cluster of one or more members, started by a test."""

    members: list[EtcdMember]

    @property
    def endpoints(self) -> str:
        return ",".join(m.url for m in self.members)

    def wait_ready(self, timeout: float = 30) -> None:
        """Until every running member serves a linearizable read (the quorum is there)."""
        deadline = time.monotonic() + timeout
        for member in self.members:
            if member.proc is None:
                continue
            while True:
                try:
                    member.post("/v3/kv/range", {"key": "cmVhZHk="}, timeout=2)
                    break
                except (OSError, ValueError):
                    if member.proc.poll() is not None:
                        raise RuntimeError(f"etcd {member.name} exited") from None
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"etcd {member.name} not ready in {timeout}s") from None
                    time.sleep(0.1)

    def leader(self) -> EtcdMember:
        for member in self.members:
            if member.is_leader():
                return member
        raise RuntimeError("no etcd member is the leader")

    def stop(self) -> None:
        for member in self.members:
            member.stop()


def start_etcd(tmp: Path, size: int = 1, tls: Pki | None = None) -> EtcdCluster:
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed (scripts/test.sh installs etcd-server)")
    tmp.mkdir(parents=True, exist_ok=True)
    names = [f"m{i}-{uuid.uuid4().hex[:6]}" for i in range(size)]
    ports = [(free_port(), free_port()) for _ in range(size)]
    initial = ",".join(
        f"{name}=http://127.0.0.1:{peer}" for name, (_c, peer) in zip(names, ports, strict=True)
    )
    members = [
        EtcdMember(name, client, peer, tmp / name, initial, tls=tls)
        for name, (client, peer) in zip(names, ports, strict=True)
    ]
    cluster = EtcdCluster(members)
    for member in members:
        member.start()
    try:
        cluster.wait_ready()
    except RuntimeError:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One single-member etcd for the session; tests keep apart by key prefix."""
    cluster = start_etcd(tmp_path_factory.mktemp("etcd"))
    yield cluster
    cluster.stop()


@pytest.fixture
def etcd3(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A three-member etcd cluster of the test's own."""
    cluster = start_etcd(tmp_path / "etcd", size=3)
    yield cluster
    cluster.stop()


@dataclass
class RedisServer:
    """A redis-server process started by the tests (Debian's package), nothing saved to disk."""

    proc: subprocess.Popen | None
    port: int
    args: list[str] = field(default_factory=list)  # more options (a replica's, a Sentinel's)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    dir: str | None = None  # its own: a replica's sync writes a dump there, loaded at start

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def start(self) -> None:
        """(Re)start it on the same port, empty."""
        self.stop()
        self.dir = tempfile.mkdtemp(prefix="distributex-redis-")
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        cmd += ["--save", "", "--appendonly", "no", "--dir", self.dir, *self.args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, self.proc)

    def command(self, *args: str) -> str:
        """One command through redis-cli; its answer as text."""
        cmd = ["redis-cli", "-p", str(self.port), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()


def start_redis() -> RedisServer:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (scripts/test.sh installs it)")
    server = RedisServer(None, free_port())
    server.start()
    return server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One Redis for the session; tests keep apart by key prefix."""
    server = start_redis()
    yield server
    server.stop()


@dataclass
class Cluster:
    """The servers of one backend; requests are spread over them in turn."""

    servers: list[Server]
    backend: str
    _turn: int = 0

    def next(self) -> Server:
        server = self.servers[self._turn % len(self.servers)]
        self._turn += 1
        return server

    def call(self, path: str, timeout: float = 10) -> Answer:
        return self.next().call(path, timeout)


BACKEND_KEYS = {
    "inmemory": "backend: inmemory\n",
    "sqlite": "backend: sqlite\nsqlite_path: {path}\n",
    "memcache": "backend: memcache\nmemcachehost: 127.0.0.1\nmemcacheport: {port}\n"
    "key_prefix: t{prefix}/\n",
    "redis": "backend: redis\nredis_url: {url}\nkey_prefix: t{prefix}/\n",
    "etcd": "backend: etcd\netcd_endpoints: {endpoints}\nkey_prefix: t{prefix}/\n",
}


@pytest.fixture(params=["inmemory", "sqlite", "memcache", "redis", "etcd"])
def backend_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def cluster_factory(
    backend_name: str, server_factory, request: pytest.FixtureRequest, tmp_path: Path
):
    """Call with the pools part of a config: one inmemory server, or several sharing a store."""

    def factory(pools: str, servers: int = 2) -> Cluster:
        if backend_name == "inmemory":
            head, count = BACKEND_KEYS["inmemory"], 1
        elif backend_name == "sqlite":
            head = BACKEND_KEYS["sqlite"].format(path=tmp_path / f"state-{free_port()}.db")
            count = servers  # several processes on one file
        elif backend_name == "etcd":
            endpoints = request.getfixturevalue("etcd").endpoints
            head = BACKEND_KEYS["etcd"].format(endpoints=endpoints, prefix=uuid.uuid4().hex)
            count = servers
        elif backend_name == "redis":
            rs = request.getfixturevalue("redis_server")
            head = BACKEND_KEYS["redis"].format(url=rs.url, prefix=uuid.uuid4().hex)
            count = max(servers, 3) if servers > 1 else servers  # three servers, one Redis
        else:
            mc = request.getfixturevalue("memcached")
            # A prefix of its own: tests share the session's memcached, and a
            # reused number (a free port comes back) would share their pools.
            head = BACKEND_KEYS["memcache"].format(port=mc.port, prefix=uuid.uuid4().hex)
            count = servers
        config = head + textwrap.dedent(pools)
        return Cluster([server_factory(config) for _ in range(count)], backend_name)

    return factory


def request_read_by_server(port: int) -> bool:
    """An accepted connection on ``port`` whose request the server has read (receive queue 0)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, queues = fields[1], fields[3], fields[4]
            rx_queue = int(queues.split(":")[1], 16)
            if state == "01" and int(local.rsplit(":", 1)[1], 16) == port and rx_queue == 0:
                return True
    return False
