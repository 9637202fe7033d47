"""Run the command once its locks are held, and watch it and its lease until
everything it started has ended: :class:`Supervisor`.

* lease lost: SIGTERM to all the command's processes, SIGKILL ``grace``
  seconds later (never later than the margin before the lease's earliest
  possible expiry); a :class:`WatchdogProcess` does the same if this client
  stops running;
* signals to us: the first is forwarded to the command's group, a second
  one kills all its processes;
* the top process ended but left processes running: they are stopped too,
  as the lock covers everything the command started;
* ``--min-hold``: the lock is kept until that long after the grant.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import time
from collections.abc import Callable

from distributex.client import core
from distributex.client.core import Lease
from distributex.client.exits import EXIT_LOST, EXIT_NOEXEC, EXIT_NOTFOUND
from distributex.client.grace import kill_deadline, watchdog_deadlines
from distributex.client.keeper import LeaseKeeper
from distributex.client.processes import (
    CommandProcesses,
    children,
    parent_death_signal,
    scan,
    subreaper,
)
from distributex.client.run_state import POLL, Exit, RunState
from distributex.client.sync import Client
from distributex.client.watchdog_process import WatchdogProcess

# How long to wait for the command's processes to vanish after SIGKILL before giving up on them.
KILL_WAIT = 5.0
# While the command runs, orphans it left that ended are reaped this often.
REAP_EVERY = 1.0


class Supervisor:
    """Runs :class:`~.run_state.Settings`' command and watches it; :meth:`run` returns its status.

    :attr:`command_end` is when the command and all it started had ended.
    """

    def __init__(self, state: RunState) -> None:
        self.state = state
        self.s = state.s
        self.say = state.say
        self.debug = state.debug
        self.signals = state.signals  # the same queue the signal handler fills
        self.command_end: float | None = None

    def run(
        self,
        client: Client | None,
        lease: Lease | None,
        keeper: LeaseKeeper | None,
        grace: float,
        granted_at: float,
    ) -> int:
        if self.signals:
            raise self.state.interrupted("before the command started")
        if keeper is not None and keeper.check_deadline():
            raise Exit(
                EXIT_LOST, f"lock lost before the command started: {keeper.lease.lost_reason}"
            )
        dog = WatchdogProcess()
        dog.start()
        with subreaper():
            try:
                spare = children(scan(), os.getpid())  # ours, not the command's
                # The child arms the watchdog itself before it runs the command: a
                # client stopped right after the fork cannot leave it unwatched.
                watch = dog.arm_in_child(*watchdog_deadlines(lease, grace), grace)
                proc = self._spawn(self._environment(client, lease), watch)
            except BaseException:
                dog.finish()
                raise
            dog.feed(proc.pid, *watchdog_deadlines(lease, grace), grace)
            if keeper is not None:
                keeper.start()
            try:
                return self._watch(
                    proc, CommandProcesses(proc.pid, spare), dog, lease, keeper, grace, granted_at
                )
            finally:
                dog.kill()

    def _environment(self, client: Client | None, lease: Lease | None) -> dict[str, str]:
        env = dict(os.environ)
        for key in ("DISTRIBUTEX_SERVER", "DISTRIBUTEX_FENCE", "DISTRIBUTEX_LEASE"):
            env.pop(key, None)
        env["DISTRIBUTEX_POOL"] = self.s.pool
        host = lease.host if lease is not None and lease.host else self.s.host_id
        if host:
            env["DISTRIBUTEX_HOST"] = host
        else:
            env.pop("DISTRIBUTEX_HOST", None)
        if client is not None:
            env["DISTRIBUTEX_SERVER"] = client.url if client.tls else client.address
        if lease is not None:
            if lease.fence is not None:
                env["DISTRIBUTEX_FENCE"] = str(lease.fence)
            if lease.token is not None:
                env["DISTRIBUTEX_LEASE"] = lease.token
        return env

    def _spawn(
        self, env: dict[str, str], watch: Callable[[], None] | None = None
    ) -> subprocess.Popen[bytes]:
        s = self.s
        argv = s.argv if s.argv is not None else ["/bin/sh", "-c", s.shell_command or ""]
        death = parent_death_signal()

        def preexec() -> None:  # in the child, between fork and exec
            if death is not None:
                death()
            if watch is not None:
                watch()

        try:
            # A new session: the command's whole process group can be signalled,
            # and no terminal job control stops it for reading the terminal.
            return subprocess.Popen(argv, env=env, start_new_session=True, preexec_fn=preexec)
        except FileNotFoundError:
            raise Exit(EXIT_NOTFOUND, f"{argv[0]}: command not found") from None
        except PermissionError:
            raise Exit(EXIT_NOEXEC, f"{argv[0]}: permission denied") from None
        except OSError as exc:
            raise Exit(EXIT_NOEXEC, f"{argv[0]}: cannot run: {exc.strerror}") from None
        except subprocess.SubprocessError as exc:
            raise Exit(EXIT_NOEXEC, f"{argv[0]}: cannot run: {exc}") from None

    def _watch(
        self,
        proc: subprocess.Popen[bytes],
        tree: CommandProcesses,
        dog: WatchdogProcess,
        lease: Lease | None,
        keeper: LeaseKeeper | None,
        grace: float,
        granted_at: float,
    ) -> int:
        s = self.s
        pgid = proc.pid
        rc: int | None = None
        lost = False  # the lease was lost while (part of) the command ran
        draining = False  # the top process ended; what it left running is being stopped
        kill_at: float | None = None
        killed_at: float | None = None
        reaped_at = core.clock()
        forwarded = 0
        while True:
            now = core.clock()
            if rc is None:
                rc = proc.poll()
            if lost or draining:
                tree.follow_up()  # processes forked or adopted since the last signal
            elif now - reaped_at >= REAP_EVERY:
                tree.reap()
                reaped_at = now
            if dog.fired() and not lost and lease is not None:
                # We did not run while the lease ran out (stopped, frozen, starved):
                # the watchdog stopped the command for us.
                lease.mark_lost("this client did not run while its lease ran out")
            elif dog.died():
                self.say(
                    "warning: the watchdog ended unexpectedly: the command is no longer "
                    "stopped if this client stops running"
                )
            else:
                term_at, dog_kill_at = watchdog_deadlines(lease, grace)
                if lost or draining:  # we sent SIGTERM ourselves; one is enough
                    term_at = math.inf
                dog.feed(pgid, term_at, dog_kill_at, grace)
            # The keeper checks the deadline too, but its sleeps may stand still
            # during a suspend: compare the lease clock here as well.
            if keeper is not None and not lost and keeper.check_deadline():
                lost = True
                if dog.fired():
                    self.say(
                        f"lock on pool '{s.pool}' lost ({keeper.lease.lost_reason}); "
                        "the watchdog stopped the command, as this client was not running"
                    )
                else:
                    self.say(
                        f"lock on pool '{s.pool}' lost ({keeper.lease.lost_reason}); "
                        "stopping the command"
                    )
                tree.signal(signal.SIGTERM)
                kill_at = min(kill_at or math.inf, kill_deadline(now, grace, lease))
            while self.signals:
                sig = self.signals.pop(0)
                forwarded += 1
                if forwarded == 1:
                    self.debug(f"forwarding {signal.Signals(sig).name} to the command")
                    tree.signal_group(sig)
                else:
                    self.debug("second signal: killing the command")
                    tree.signal(signal.SIGKILL)
                    killed_at = killed_at or now
            if rc is not None and not draining and not lost:
                if not tree.running():
                    break
                draining = True
                self.say(
                    "the command left processes running (in its process group, its session "
                    "or started by it): terminating them before the lock is released"
                )
                tree.signal(signal.SIGTERM)
                kill_at = min(kill_at or math.inf, kill_deadline(now, grace, lease))
            if kill_at is not None and killed_at is None and now >= kill_at:
                tree.signal(signal.SIGKILL)  # all of them, not just the top process
                killed_at = now
            if rc is not None and (draining or lost):
                if not tree.running():
                    break
                if killed_at is not None and now - killed_at > KILL_WAIT:
                    self.say("processes of the command survived SIGKILL; releasing anyway")
                    break
            time.sleep(POLL)
        self.command_end = core.clock()
        if dog.finish() and not lost and lease is not None:
            lease.mark_lost("this client did not run while its lease ran out")
            self.say(f"lock on pool '{s.pool}' lost: the watchdog stopped the command")
            return EXIT_LOST
        if lost:  # already said why
            return EXIT_LOST
        if lease is not None and lease.lost_at is not None and lease.lost_at <= self.command_end:
            self.say(f"lock on pool '{s.pool}' was lost before the command ended")
            return EXIT_LOST
        code = 128 - rc if rc < 0 else rc
        self._min_hold(keeper, granted_at)
        return code

    def _min_hold(self, keeper: LeaseKeeper | None, granted_at: float) -> None:
        if self.s.min_hold <= 0:
            return
        if self.state.signalled:
            self.debug("a signal came: no --min-hold")
            return
        until = granted_at + self.s.min_hold
        if core.clock() < until:
            self.debug(f"holding the lock for {until - core.clock():.1f}s more (--min-hold)")
        while core.clock() < until:
            if self.signals:
                self.debug("signal: ending --min-hold early")
                return
            if keeper is not None and keeper.check_deadline():
                return  # reported after the release
            time.sleep(min(POLL, max(0.0, until - core.clock())))
