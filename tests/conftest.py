"""Fixtures: real distributexd processes on loopback, on free ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    tmp_path: Path, config: str | None = None, args: list[str] | None = None
) -> Server:
    port = free_port()
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

    def factory(config: str | None = None, args: list[str] | None = None) -> Server:
        server = start_server(tmp_path, config, args)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop(signal.SIGKILL)


@pytest.fixture
def server(server_factory) -> Server:
    """A server on the built-in default configuration."""
    return server_factory()
