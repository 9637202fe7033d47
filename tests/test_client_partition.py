"""A server that stops answering while a command runs: the command must not run twice.

The server process is frozen with SIGSTOP (a network partition, as the client
sees it: connections open, no answers) while host A runs its command and host
B waits. A's client must stop its command before A's lease can have ended at
the server; when the server is thawed, its expiry timer hands the lock to B.
The commands write wall-clock timestamps, so the test checks the order.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import Server

CLI = [sys.executable, "-m", "distributex.client.cli"]

# Writes "start T" and, when terminated, "end T" to the file $1.
COMMAND = (
    'echo "start $(date +%s.%N)" >> "$1"; '
    'trap \'echo "end $(date +%s.%N)" >> "$1"; exit 143\' TERM; '
    "sleep 60 & wait"
)


def client(server: Server, host: str, log: Path, *extra: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTRIBUTEX_")}
    env["DISTRIBUTEX_CONFIG"] = ""
    args = ["-H", "127.0.0.1", "-p", str(server.port), "-r", "job", "--host-id", host]
    return subprocess.Popen(
        [*CLI, *args, *extra, "--", "sh", "-c", COMMAND, "sh", str(log)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def stamps(log: Path) -> dict[str, float]:
    if not log.exists():
        return {}
    return {
        word: float(t) for word, t in (line.split() for line in log.read_text().split("\n") if line)
    }


def wait_for(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


@pytest.mark.timeout(60)
def test_frozen_server_never_lets_two_hosts_run(server: Server, tmp_path: Path) -> None:
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    a = client(server, "host-a", log_a, "--ttl", "6", "--grace", "1")
    try:
        wait_for(lambda: "start" in stamps(log_a), 15)
        a_started = stamps(log_a)["start"]  # just after the grant (and its renewal)
        b = client(server, "host-b", log_b, "--ttl", "6", "--grace", "1")
        time.sleep(0.4)  # B is parked in the queue; A's next renewal is due at +2 s
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            # A's last renewal that got through was sent by a_started, so its
            # lease ends at the server by a_started + 6. Thaw just after that,
            # whatever A does: had A kept running, B would now overlap it.
            time.sleep(max(0.0, a_started + 6.3 - time.time()))
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        assert a.wait(15) == 73
        assert "lost" in a.stderr.read()
        # The server's own timer ends A's lease and hands the slot to B.
        wait_for(lambda: "start" in stamps(log_b), 15)
        assert stamps(log_a)["end"] < stamps(log_b)["start"]
        b.send_signal(signal.SIGTERM)
        b.wait(15)
    finally:
        for proc in (a, locals().get("b")):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
