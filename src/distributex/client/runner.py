"""Run one command under a cluster lock (and/or a local flock): the heart of ``distributex``.

Order of events:

1. ``-l``: take the local ``flock`` on ``<lock-dir>/<pool>.lock`` (polled, so
   ``--timeout``, ``--no-wait`` and signals apply to it too).
2. Take the server lock with :meth:`Client.acquire` in a helper thread, so a
   signal can abort the wait (the connection is closed and the server drops
   us from its queue).
3. Run the command in its own session (so its whole process group can be
   signalled; its top process also gets SIGKILL if we die, PR_SET_PDEATHSIG),
   as a child subreaper (orphans of the command are adopted by us, so nothing
   it starts gets out of reach: :mod:`distributex.client.processes`), then
   start a :class:`LeaseKeeper`: renewal every ttl/3, retries every
   min(1, ttl/10) s, and the lease is declared lost ``grace + margin``
   seconds before it can run out at the server (margin = min(1, ttl/10)).
   The supervision loop checks that deadline itself every 50 ms as well.
4. Supervise the command:

   * lease lost: SIGTERM to all the command's processes; SIGKILL ``grace``
     seconds later (never later than ``margin`` before the lease's earliest
     possible expiry);
     exit :data:`EXIT_LOST`. So the command is dead before another host can
     be granted the lock.
   * SIGINT/SIGTERM/SIGHUP to us: forwarded to the group; a second signal
     sends SIGKILL to all the command's processes.
   * the command's top process ended but left processes running
     (background jobs, in its group or not; daemons it started): SIGTERM to
     all of them, SIGKILL ``grace`` seconds later, and the lock is released
     once none runs. The lock covers everything the command started.

5. ``--min-hold``: keep the lock (renewing) until that long after the grant,
   unless a signal came.
6. Release by lease token, drop the local lock, exit with the command's
   status (or :data:`EXIT_LOST` if the release answered GONE and the lease
   was not confirmed alive after the command ended).

Steps 1, 2 and 6 are :class:`Runner`'s; steps 3 to 5 are
:class:`~distributex.client.supervisor.Supervisor`'s, with the deadlines of
:mod:`distributex.client.grace`; the local lock file is found by
:mod:`distributex.client.local_lock`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import threading
import time
from typing import TextIO

from distributex.client import core, exits
from distributex.client.config import ConfigProblem
from distributex.client.connection import Connection
from distributex.client.errors import (
    AuthenticationFailed,
    DistributexError,
    LockRefused,
    LockTimeout,
    ServerUnavailable,
)
from distributex.client.exits import (
    EXIT_CONFIG,
    EXIT_LOCALLOCK,
    EXIT_LOST,
    EXIT_SOFTWARE,
    EXIT_TIMEOUT,
)
from distributex.client.grace import effective_grace, kill_margin
from distributex.client.keeper import LeaseKeeper
from distributex.client.local_lock import lock_file_name, open_lock_file
from distributex.client.run_state import POLL, Exit, RunState, Settings
from distributex.client.supervisor import Supervisor
from distributex.client.sync import CancelToken, Client, Lease

__all__ = ["EXIT_LOST", "Exit", "Runner", "Settings"]

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Ignored while we run: a stopped client could not renew its lease (the
# command runs in its own session, so the terminal does not stop it either).
JOB_CONTROL_SIGNALS = (signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)


class Runner(RunState):
    """Runs :class:`Settings`' command under its locks; :meth:`run` returns the exit status."""

    def __init__(self, settings: Settings, err: TextIO | None = None) -> None:
        super().__init__(settings, err)
        self.deadline = None if settings.timeout is None else core.clock() + settings.timeout

    def run(self) -> int:
        saved = {sig: signal.signal(sig, self.on_signal) for sig in FORWARDED_SIGNALS}
        saved.update({sig: signal.signal(sig, signal.SIG_IGN) for sig in JOB_CONTROL_SIGNALS})
        try:
            return self._run()
        except Exit as exc:
            if exc.message:
                self.say(exc.message)
            return exc.code
        except Exception as exc:  # never a traceback; the lock was released on the way out
            self.say(f"internal error: {exc!r}")
            return EXIT_SOFTWARE
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)

    def _remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - core.clock())

    # -- the phases --------------------------------------------------------------------

    def _run(self) -> int:
        s = self.s
        fd: int | None = None
        client: Client | None = None
        lease: Lease | None = None
        try:
            if s.local:
                fd = self._local_lock()
            if s.server:
                try:
                    client = self._connection().client(s.host_id)
                except ConfigProblem as exc:
                    raise Exit(EXIT_CONFIG, f"{exc}; command not run") from None
                lease = self._server_lock(client)
            return self._hold(client, lease)
        finally:
            if fd is not None:
                os.close(fd)  # closing the last fd drops the flock

    def _connection(self) -> Connection:
        s = self.s
        assert s.server is not None
        return Connection(
            s.server, s.port, s.http_timeout, s.cacert, s.cert, s.key, s.token, token_from=""
        )

    def _local_lock(self) -> int:
        fd, directory = open_lock_file(self.s.pool, self.s.lock_dir)
        path = os.path.join(directory, lock_file_name(self.s.pool))
        while True:
            try:
                # -s: the local lock is shared too (flock -s), as on the server.
                kind = fcntl.LOCK_SH if self.s.shared else fcntl.LOCK_EX
                fcntl.flock(fd, kind | fcntl.LOCK_NB)
                self.debug(f"local lock {path} taken")
                return fd
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise Exit(EXIT_LOCALLOCK, f"cannot lock {path}: {exc.strerror}") from None
            problem = None
            if self.signals:
                problem = self.interrupted("while waiting for the local lock")
            elif not self.s.wait:
                problem = Exit(EXIT_TIMEOUT, f"local lock {path} is busy; command not run")
            elif self.deadline is not None and core.clock() >= self.deadline:
                problem = Exit(
                    EXIT_TIMEOUT,
                    f"local lock {path} not obtained within {self.s.timeout:g}s; command not run",
                )
            if problem is not None:
                os.close(fd)
                raise problem
            time.sleep(POLL)

    def _server_lock(self, client: Client) -> Lease:
        s = self.s
        cancel = CancelToken()
        outcome: dict[str, object] = {}

        def acquire() -> None:
            try:
                outcome["lease"] = client.acquire(
                    s.pool,
                    timeout=self._remaining(),
                    ttl=s.ttl,
                    wait=s.wait,
                    cancel=cancel,
                    shared=s.shared,
                )
            except BaseException as exc:
                outcome["error"] = exc

        how = "trying" if not s.wait else "waiting for"
        who = f"'{client.host}'" if client.host else "the identity its credentials prove"
        self.debug(f"{how} pool '{s.pool}' on {client.url} as {who}")
        worker = threading.Thread(target=acquire, name="distributex-acquire", daemon=True)
        worker.start()
        while worker.is_alive():
            if self.signals:
                cancel.cancel()
            worker.join(POLL)
        lease = outcome.get("lease")
        if self.signals:
            if isinstance(lease, Lease):
                client.release_quietly(lease)
            raise self.interrupted("while waiting for the lock")
        if isinstance(lease, Lease):
            self.debug(
                f"lock on pool '{s.pool}' from {client.address} as '{lease.host}': "
                f"fence {lease.fence}, ttl {lease.ttl}"
            )
            if not lease.token:
                self.say(
                    f"warning: {client.address} granted pool '{s.pool}' without a lease "
                    "(a 0.7 server?): no renewal and no lost-lock protection; running anyway"
                )
            return lease
        error = outcome.get("error")
        assert isinstance(error, BaseException)
        where = f"pool '{s.pool}' on {client.address}"
        if isinstance(error, LockTimeout):
            timed = f"not obtained within {s.timeout:g}s" if s.wait else "is busy"
            message = f"{where} {timed}"
        elif isinstance(error, AuthenticationFailed):
            message = f"{where}: {error.reason}"
        elif isinstance(error, LockRefused):
            message = f"{where}: request refused ({error.reason})"
        elif isinstance(error, ServerUnavailable):
            message = str(error)
        elif isinstance(error, ValueError | DistributexError):
            message = f"{where}: {error}"
        else:
            message = f"{where}: internal error: {error!r}"
        raise Exit(exits.code_for(error), f"{message}; command not run")

    def _hold(self, client: Client | None, lease: Lease | None) -> int:
        s = self.s
        granted_at = core.clock()
        keeper: LeaseKeeper | None = None
        grace = s.grace
        if client is not None and lease is not None:
            grace = effective_grace(s.grace, lease.ttl)
            if grace < s.grace:
                self.debug(f"granted ttl {lease.ttl:g}s is short: grace cut to {grace:.2f}s")
            margin = kill_margin(lease.ttl) if lease.ttl else 0.0
            # Started once the command runs: no other thread exists when we fork it.
            keeper = LeaseKeeper(client, lease, ttl=s.ttl, lost_margin=grace + margin)
        supervisor = Supervisor(self)
        stopped: Exit | None = None
        try:
            code = supervisor.run(client, lease, keeper, grace, granted_at)
        except Exit as exc:  # the command did not run: still release first
            stopped, code = exc, exc.code
        finally:
            if keeper is not None:
                keeper.stop()
        if client is not None and lease is not None:
            held = client.release_quietly(lease, self._release_timeout(lease))
            if held is None:
                self.say(
                    f"could not release pool '{s.pool}' (server unreachable); "
                    "it frees itself when the lease expires"
                )
            if stopped is None and code != EXIT_LOST and supervisor.command_end is not None:
                if held is False and lease.renewed_at < supervisor.command_end:
                    # GONE: the lease ended at a moment we cannot know, and nothing
                    # confirmed it alive after the command ended.
                    self.say(
                        f"lock on pool '{s.pool}' was already gone at release (released by "
                        "someone else, or lost by the server), maybe before the command ended"
                    )
                    return EXIT_LOST
                if lease.lost.is_set():
                    self.say(
                        f"lock on pool '{s.pool}' lost during --min-hold, after the command "
                        f"ended ({lease.lost_reason})"
                    )
        if stopped is not None:
            raise stopped
        return code

    def _release_timeout(self, lease: Lease) -> float:
        # A lease presumed lost for silence: the server is probably still away; don't linger.
        if lease.lost.is_set():
            return min(self.s.http_timeout, 2.0)
        return self.s.http_timeout
