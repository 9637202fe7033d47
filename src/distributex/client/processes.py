"""Everything a command started: what the lock covers, and how the client ends it.

The command runs in a session and process group of its own (its pid is both
ids). It may leave them: ``set -m`` puts background jobs in groups of their
own, ``setsid`` in a session of their own, and a daemon forks twice so that
its parent dies and it is adopted by someone else. So the command's
processes are

* the members of its process group and of its session, and
* every descendant of the client's children that were not there before the
  command started (the command itself, and orphans adopted by the client).

On Linux the client makes itself a *child subreaper*
(``PR_SET_CHILD_SUBREAPER``) while the command runs: an orphan of the
command is adopted by the client rather than by init, so it stays a
descendant whatever it does, and the client reaps it once it ends. Where
there is no ``prctl`` or no ``/proc`` (the BSDs, macOS), only the command's
process group can be found and signalled (``killpg``): processes that leave
it are beyond reach.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37


def _prctl() -> Callable[..., int] | None:
    """libc's ``prctl`` (Linux), None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


def parent_death_signal() -> Callable[[], None] | None:
    """A preexec_fn giving the command SIGKILL when we die (Linux); None elsewhere.

    Only the command's top process gets it: the rest of its process group is
    left to the watchdog.
    """
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:  # runs in the child, between fork and exec
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # we died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


@contextlib.contextmanager
def subreaper() -> Iterator[bool]:
    """Be a child subreaper inside the block (True if that worked); restored after it.

    Restored because the runner may run inside a bigger program (tests do)
    that does not expect to adopt orphans afterwards.
    """
    prctl = _prctl()
    before = ctypes.c_int(0)
    if prctl is None or prctl(PR_GET_CHILD_SUBREAPER, ctypes.addressof(before), 0, 0, 0) != 0:
        yield False
        return
    became = prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    try:
        yield became
    finally:
        if became and not before.value:
            prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


@dataclass(frozen=True)
class Process:
    """One line of ``/proc/PID/stat``, the fields that matter here."""

    pid: int
    ppid: int
    pgrp: int
    session: int
    zombie: bool


def scan() -> dict[int, Process] | None:
    """Every process of the machine, by pid; None without a usable ``/proc``."""
    try:
        if int(Path("/proc/self/stat").read_bytes().split()[0]) != os.getpid():
            return None  # a /proc of another PID namespace
        entries = os.listdir("/proc")
    except (OSError, ValueError, IndexError):
        return None
    table: dict[int, Process] = {}
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                # After the name (which may hold anything): state ppid pgrp session ...
                fields = f.read().rsplit(b")", 1)[1].split()
            pid = int(entry)
            table[pid] = Process(
                pid, int(fields[1]), int(fields[2]), int(fields[3]), fields[0] == b"Z"
            )
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile
    return table


def children(table: dict[int, Process] | None, parent: int) -> frozenset[int]:
    if table is None:
        return frozenset()
    return frozenset(p.pid for p in table.values() if p.ppid == parent)


class CommandProcesses:
    """The processes of a command started as ``leader`` (see the module docstring).

    ``spare`` are our children that are not the command's (the watchdog, and
    whatever a program that runs the runner had started before).
    """

    def __init__(self, leader: int, spare: Collection[int]) -> None:
        self.leader = leader
        self.spare = frozenset(spare)
        self.me = os.getpid()
        self.sent: int | None = None  # the last signal sent to all of them
        self.reached: set[int] = set()  # the processes that got it

    def _members(self, table: dict[int, Process]) -> dict[int, Process]:
        roots = [p for p in children(table, self.me) if p not in self.spare]
        found: dict[int, Process] = {}
        by_parent: dict[int, list[Process]] = {}
        for process in table.values():
            by_parent.setdefault(process.ppid, []).append(process)
            if self.leader in (process.pgrp, process.session):
                found[process.pid] = process
        while roots:
            pid = roots.pop()
            if pid in table:
                found[pid] = table[pid]
            roots.extend(p.pid for p in by_parent.get(pid, ()) if p.pid not in found)
        found.pop(self.me, None)
        return found

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to the command's process group only (as a terminal would)."""
        _killpg(self.leader, sig)

    def signal(self, sig: int) -> None:
        """Send ``sig`` to every one of them (and to the group, for processes forked meanwhile)."""
        self.sent, self.reached = sig, set()
        _killpg(self.leader, sig)
        self.follow_up()

    def follow_up(self) -> None:
        """The last signal, to those that did not get it yet (forked since, or adopted)."""
        if self.sent is None:
            return
        table = scan()
        if table is None:
            return
        for pid, process in self._members(table).items():
            if pid not in self.reached and not process.zombie:
                self.reached.add(pid)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, self.sent)

    def running(self) -> bool:
        """Does any of them still run (zombies do not count; ours are reaped)?"""
        table = scan()
        if table is None:
            try:
                os.killpg(self.leader, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                pass
            return True
        members = self._members(table)
        self._reap(members)
        return any(not p.zombie for p in members.values())

    def reap(self) -> None:
        """Wait for the adopted orphans that ended, so that no zombie is left behind."""
        table = scan()
        if table is not None:
            self._reap(self._members(table))

    def _reap(self, members: dict[int, Process]) -> None:
        for process in members.values():
            # The leader is reaped by its Popen, which needs its exit status.
            if process.zombie and process.ppid == self.me and process.pid != self.leader:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(process.pid, os.WNOHANG)


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
