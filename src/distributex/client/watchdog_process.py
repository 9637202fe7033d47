"""The client's side of :mod:`distributex.client.watchdog`: a
:class:`WatchdogProcess` started before the command, fed its deadlines while
the command runs, and told when it is done.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
from collections.abc import Callable

from distributex.client import watchdog
from distributex.client.exits import EXIT_SOFTWARE
from distributex.client.run_state import Exit

# How long the watchdog may take to start.
WATCHDOG_START = 10.0


class WatchdogProcess:
    """The client's side of :mod:`distributex.client.watchdog`: start it, feed it, end it."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.fed: tuple[float, float] | None = None
        self.warned = False

    def start(self) -> None:
        """Start the watchdog and wait until it reads its input (raises :class:`Exit`)."""
        script = os.path.abspath(watchdog.__file__)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", script],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                start_new_session=True,  # out of reach of Ctrl-Z and of signals to our group
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise Exit(EXIT_SOFTWARE, f"cannot start the watchdog: {exc}; command not run") from exc
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], WATCHDOG_START)
        if not ready or self.proc.stdout.readline().strip() != b"ready":
            self.kill()
            raise Exit(EXIT_SOFTWARE, "the watchdog did not start; command not run")

    def feed(self, pgid: int, term_at: float, kill_at: float, grace: float) -> None:
        """Tell it the command's group and deadlines (only when they changed)."""
        if self.proc is None or self.fed == (term_at, kill_at):
            return
        self._send(f"watch {pgid} {term_at!r} {kill_at!r} {grace!r}\n")
        self.fed = (term_at, kill_at)

    def arm_in_child(
        self, term_at: float, kill_at: float, grace: float
    ) -> Callable[[], None] | None:
        """A preexec step: the command's child process tells the watchdog its own group.

        One ``write`` of a short line to the watchdog's pipe (atomic), made
        between fork and exec; the pipe is closed at exec.
        """
        if self.proc is None or self.proc.stdin is None:
            return None
        fd = self.proc.stdin.fileno()
        tail = f" {term_at!r} {kill_at!r} {grace!r}\n"

        def arm() -> None:
            os.write(fd, f"watch {os.getpid()}{tail}".encode("ascii"))

        return arm

    def fired(self) -> bool:
        """Did it signal the command (because we did not act in time)?"""
        return self.proc is not None and self.proc.poll() == watchdog.FIRED

    def died(self) -> bool:
        """Did it end on its own, other than by firing (someone killed it)?"""
        if self.proc is None or self.warned:
            return False
        code = self.proc.poll()
        self.warned = code is not None and code != watchdog.FIRED
        return self.warned

    def finish(self) -> bool:
        """Tell it we are done and reap it; True if it had fired."""
        if self.proc is None:
            return False
        self._send("done\n")
        try:
            self.proc.wait(WATCHDOG_START)
        except subprocess.TimeoutExpired:
            self.kill()
        return self.proc.returncode == watchdog.FIRED

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def _send(self, line: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.write(line.encode("ascii"))
            self.proc.stdin.flush()
