"""What the phases of one ``distributex`` run share: its :class:`Settings`, the
signals that came, its voice on stderr, and :class:`Exit`, how a phase ends the run.

:mod:`distributex.client.runner` takes the locks and
:mod:`distributex.client.supervisor` runs the command; both report and watch
for signals through one :class:`RunState`.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from dataclasses import dataclass
from typing import TextIO

from distributex.client.core import one_line

# How often the waits of a run (local lock, server lock, command, --min-hold) look up.
POLL = 0.05


class Exit(Exception):
    """Stop with this exit status and (unless empty) this one-line message."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Settings:
    pool: str
    host_id: str | None  # None: the identity a token or certificate proves
    server: str | None = None
    port: int | None = None
    local: bool = False
    lock_dir: str | None = None
    timeout: float | None = None
    wait: bool = True
    shared: bool = False  # -s: a shared lock (mode=shared)
    ttl: float | None = 60.0
    grace: float = 10.0
    min_hold: float = 0.0
    http_timeout: float = 10.0
    argv: list[str] | None = None
    shell_command: str | None = None
    verbose: bool = False
    token: str | None = None
    cacert: str | None = None
    cert: str | None = None
    key: str | None = None


class RunState:
    """The settings, the forwarded signals not yet handled, and the run's messages."""

    def __init__(self, settings: Settings, err: TextIO | None = None) -> None:
        self.s = settings
        self.err = err or sys.stderr
        # A queue, only ever appended to and popped from: the phases share this list.
        self.signals: list[int] = []
        self.signalled = False  # any forwarded signal ever came (signals is a queue)

    def say(self, message: str) -> None:
        # A broken stderr (its reader gone, e.g. journald restarted) must never
        # stand between us and stopping the command or releasing the lock.
        with contextlib.suppress(OSError, ValueError):
            print(f"distributex: {one_line(message, 500)}", file=self.err, flush=True)

    def debug(self, message: str) -> None:
        if self.s.verbose:
            self.say(message)

    def on_signal(self, signum: int, _frame: object) -> None:
        self.signalled = True
        self.signals.append(signum)

    def interrupted(self, what: str) -> Exit:
        sig = self.signals[0]
        return Exit(128 + sig, f"got {signal.Signals(sig).name} {what}; command not run")
