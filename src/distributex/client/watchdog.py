"""The command's watchdog: stops the command when the ``distributex`` client cannot.

The client renews its lease and stops the command when the lease is lost. A
client that is not running (``kill -STOP``, a debugger, a machine so loaded
that it gets no CPU) does neither, and the server hands the lock to another
host when the lease runs out. This small process, in a session of its own
(so Ctrl-Z and signals to the client's process group do not reach it),
holds the deadlines the client last fed it and acts on them alone:

* ``term_at`` passed: SIGTERM to the command's process group and session
  (a shell's ``set -m`` jobs leave its group, not its session);
* ``kill_at`` passed: SIGKILL to the group and session (repeated for a moment, for
  processes forked meanwhile). ``kill_at`` lies before the earliest moment
  the server may end the lease, so the command is dead before anyone else
  can be granted the lock, and a stopped command is never resumed;
* the client vanished (end of file on stdin without ``done``): SIGTERM now,
  SIGKILL ``grace`` seconds later (never after ``kill_at``): nobody renews
  the lease any more.

It exits 0 after ``done`` and :data:`FIRED` once it has signalled the group,
so the client can tell that the command was stopped for it.

Protocol on stdin, one line each (times on :func:`clock`, which is the same
clock in every process of the machine)::

    watch PGID TERM_AT KILL_AT GRACE     arm, or move the deadlines
    done                                 the client has finished; exit 0

It answers ``ready`` on stdout once it reads its input. It is run as a
script (``python -I -S watchdog.py``) and imports only the standard library,
so it starts in a few milliseconds; :mod:`processes` (stdlib only too) is
loaded from beside it when it first signals.

Limits: it shares the machine with the client; if the whole machine is
frozen (or the watchdog itself is SIGSTOPped or starved as well), it cannot
act either. The lease's margins (``--grace`` and the kill margin) are what
it has to work in.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import select
import signal
import sys
import time
from pathlib import Path
from types import ModuleType

FIRED = 3
# Never sleep longer than this: sleeps stand still during a suspend of the machine.
TICK = 0.25
# SIGKILLs sent to the group, POLL apart, for processes forked meanwhile (the
# group may never look empty: its leader stays a zombie until the client reaps it).
KILL_TIMES = 3
POLL = 0.05

_CLOCK_ID = getattr(time, "CLOCK_BOOTTIME", None)


def clock() -> float:
    """CLOCK_BOOTTIME where there is one (as the client's lease clock), else monotonic."""
    if _CLOCK_ID is not None:
        with contextlib.suppress(OSError):
            return time.clock_gettime(_CLOCK_ID)
    return time.monotonic()


def _processes() -> ModuleType | None:
    """:mod:`distributex.client.processes`, loaded from beside this script (no package here)."""
    name = "distributex_watchdog_processes"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("processes.py"))
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    except Exception:  # never let this stop the group's signal
        del sys.modules[name]
        return None
    return module


def _killpg(pgid: int, sig: int) -> bool:
    """Signal the group and the session it leads; False if neither has a member left."""
    found = False
    processes = _processes()
    table = processes.scan() if processes is not None else None
    for process in (table or {}).values():
        if process.session == pgid and process.pgrp != pgid and not process.zombie:
            found = True
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(process.pid, sig)
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return found
    except PermissionError:
        pass
    return True


class Watchdog:
    def __init__(self) -> None:
        self.pgid: int | None = None
        self.term_at = math.inf
        self.kill_at = math.inf
        self.grace = 0.0
        self.termed = False
        self.fired = False

    def feed(self, line: str) -> bool:
        """Take one line of input; False when the watchdog should stop."""
        words = line.split()
        if words == ["done"]:
            return False
        if len(words) == 5 and words[0] == "watch":
            self.pgid = int(words[1])
            self.term_at, self.kill_at, self.grace = map(float, words[2:])
        return True

    def orphaned(self, now: float) -> None:
        """The client is gone: stop the command on the grace schedule."""
        self.term_at = min(self.term_at, now)
        self.kill_at = min(self.kill_at, now + self.grace)

    def act(self, now: float) -> bool:
        """Signal the group if a deadline passed; False once the group is killed."""
        if self.pgid is None:
            return True
        if now >= self.kill_at:
            self.fired = True
            for _ in range(KILL_TIMES):
                if not _killpg(self.pgid, signal.SIGKILL):
                    break
                time.sleep(POLL)
            return False
        if now >= self.term_at and not self.termed:
            self.fired = self.termed = True
            _killpg(self.pgid, signal.SIGTERM)
        return True


def main() -> int:
    # Signals meant for the client's terminal or group are not for us.
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(sig, signal.SIG_IGN)
    dog = Watchdog()
    fd = sys.stdin.fileno()
    os.set_blocking(fd, False)
    print("ready", flush=True)
    pending = b""
    client_alive = True
    while True:
        now = clock()
        if not dog.act(now):
            break
        wake = min(dog.term_at if not dog.termed else math.inf, dog.kill_at)
        timeout = max(0.0, min(TICK, wake - now))
        readable = client_alive and select.select([fd], [], [], timeout)[0]
        if not client_alive:
            time.sleep(timeout)
            continue
        if not readable:
            continue
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            continue
        if not chunk:  # the client died (or closed us without "done")
            if dog.pgid is None:
                return 0
            client_alive = False
            dog.orphaned(clock())
            continue
        pending += chunk
        *lines, pending = pending.split(b"\n")
        if not all(dog.feed(line.decode("ascii", "replace")) for line in lines):
            return 0
    return FIRED if dog.fired else 0


if __name__ == "__main__":
    sys.exit(main())
