"""Nothing the command started runs on without the lock: jobs that left its process group.

``set -m`` puts a background job in a process group of its own, ``setsid``
in a session of its own (and forks, so the job is an orphan at once). Both
must end before the lock is released: when the command ends, and when the
lock is lost. A client killed with SIGKILL leaves it to the watchdog, which
reaches the command's group and session (not a job that left the session).
Real servers, real clients, real shells.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_until
from tests.test_client_robustness import (  # noqa: F401 - fixtures used by name
    _pids,
    _stop_everything,
    alive,
    srv,
    start,
    wait_dead,
    wait_for_file,
)

Server = Any  # conftest.Server

pytestmark = pytest.mark.timeout(60)


def jobs_then(tmp_path: Path, then: str) -> list[str]:
    """A bash command that starts two jobs out of its process group, then runs ``then``.

    Each job appends to ``<name>.log`` every 0.05 s and writes its pid to
    ``<name>.pid`` first; the command goes on once both pids are there.
    """
    loop = "echo $$ > {f}.tmp; mv {f}.tmp {f}.pid; while :; do echo x >> {f}.log; sleep 0.05; done"
    group_job = loop.format(f=tmp_path / "group")
    session_job = loop.format(f=tmp_path / "session")
    script = (
        "set -m\n"
        f"bash -c '{group_job}' &\n"  # a process group of its own
        f"setsid bash -c '{session_job}' &\n"  # a session of its own, orphaned by setsid's fork
        f"until [ -s {tmp_path}/group.pid ] && [ -s {tmp_path}/session.pid ]; do sleep 0.01; done\n"
        f"{then}\n"
    )
    return ["--", "bash", "-c", script]


def job_pids(tmp_path: Path) -> list[int]:
    pids = [int(wait_for_file(tmp_path / f"{name}.pid")) for name in ("group", "session")]
    _pids.extend(pids)
    return pids


def waiters(server: Server, pool: str) -> list[str]:
    doc = json.loads(server.call(f"/status?pool={pool}").body)
    return [w["host"] for w in doc["pools"][0]["waiters"]]


def test_jobs_out_of_the_group_end_before_the_next_holder_runs(
    server: Server, tmp_path: Path
) -> None:
    go, seen = tmp_path / "go", tmp_path / "seen"
    then = f"while [ ! -e {go} ]; do sleep 0.02; done; exit 0"
    a = start([*srv(server.port), "--host-id", "A", "-r", "p", *jobs_then(tmp_path, then)])
    pids = job_pids(tmp_path)
    # B, once granted, records which of A's jobs still exist.
    check = " ".join(f"$(kill -0 {pid} 2>/dev/null && echo alive || echo gone)" for pid in pids)
    b = start([*srv(server.port), "--host-id", "B", "-r", "p", f"echo {check} > {seen}"])
    wait_until(lambda: waiters(server, "p") == ["B"], 10, "B queued behind A")
    go.touch()
    assert a.wait(20) == 0, a.stderr.read() if a.stderr else ""
    assert b.wait(20) == 0, b.stderr.read() if b.stderr else ""
    assert seen.read_text().split() == ["gone", "gone"], "the lock passed on while A's jobs ran"
    assert not any(alive(pid) for pid in pids)
    stderr = a.stderr.read() if a.stderr else ""
    assert "left processes running" in stderr, stderr


def test_jobs_out_of_the_group_end_when_the_lock_is_lost(server: Server, tmp_path: Path) -> None:
    lease = tmp_path / "lease"
    then = f"echo $DISTRIBUTEX_LEASE > {lease}; exec sleep 30"
    short = ["--ttl", "6", "--grace", "1"]  # renewed every 2 s: the loss is seen soon
    a = start([*srv(server.port), "--host-id", "A", "-r", "p", *short, *jobs_then(tmp_path, then)])
    pids = job_pids(tmp_path)
    token = wait_for_file(lease).strip()
    assert server.call(f"/release/?host=A&pool=p&lease={token}").body == "OK"
    assert a.wait(20) == 73, a.stderr.read() if a.stderr else ""
    assert not any(alive(pid) for pid in pids), "a job ran on after the lock was lost"


def test_a_set_m_job_ends_when_the_client_is_killed(server: Server, tmp_path: Path) -> None:
    short = ["--ttl", "6", "--grace", "1"]
    a = start([*srv(server.port), "-r", "p", *short, *jobs_then(tmp_path, "exec sleep 30")])
    group_job, _session_job = job_pids(tmp_path)
    a.kill()
    a.wait()
    # The watchdog: SIGTERM at once to the command's group and session.
    assert wait_dead(group_job, 5), "a set -m job ran on, unlocked, after the client died"
