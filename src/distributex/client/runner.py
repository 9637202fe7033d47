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
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import math
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO
from urllib.parse import quote

from distributex.client import core, exits, watchdog
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
    EXIT_NOEXEC,
    EXIT_NOTFOUND,
    EXIT_SOFTWARE,
    EXIT_TIMEOUT,
)
from distributex.client.processes import (
    CommandProcesses,
    children,
    parent_death_signal,
    scan,
    subreaper,
)
from distributex.client.sync import CancelToken, Client, Lease, LeaseKeeper, one_line

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
POLL = 0.05
# How long to wait for the command's processes to vanish after SIGKILL before giving up on them.
KILL_WAIT = 5.0
# While the command runs, orphans it left that ended are reaped this often.
REAP_EVERY = 1.0


def kill_margin(ttl: float) -> float:
    """Seconds kept between the SIGKILL and the earliest possible lease expiry."""
    return min(1.0, ttl / 10)


def min_ttl_for_grace(grace: float) -> float:
    """The shortest TTL that leaves renewal room with this grace (grace + margin <= ttl/2)."""
    return 2 * grace + 2 if grace >= 4 else 2.5 * grace


def effective_grace(grace: float, ttl: float | None) -> float:
    """``grace``, shortened if the granted TTL is too short for it (pool expire < --ttl)."""
    if not ttl:
        return grace
    return max(0.0, min(grace, ttl / 2 - kill_margin(ttl)))


# Ignored while we run: a stopped client could not renew its lease (the
# command runs in its own session, so the terminal does not stop it either).
JOB_CONTROL_SIGNALS = (signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)
# How long the watchdog may take to start.
WATCHDOG_START = 10.0
# A healthy client stops the command itself: the watchdog's SIGTERM comes this much later.
WATCHDOG_SLACK = 0.25


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


def lock_file_name(pool: str) -> str:
    name = quote(pool, safe="") + ".lock"
    if len(name) > 200:
        name = hashlib.sha256(pool.encode()).hexdigest() + ".lock"
    return name


def lock_dir_candidates() -> list[tuple[str, bool]]:
    """(directory, shared by all users?) in order of preference."""
    dirs = [("/run/lock/distributex", True), ("/var/lock/distributex", True)]
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        dirs.append((os.path.join(runtime, "distributex"), False))
    dirs.append((os.path.join(tempfile.gettempdir(), f"distributex-{os.getuid()}"), False))
    return dirs


def _open_in(directory: str, pool: str, shared: bool) -> int:
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if shared:  # every user's jobs lock in the same place; sticky like /tmp
            os.chmod(directory, 0o1777)
    path = os.path.join(directory, lock_file_name(pool))
    flags = os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, os.O_RDWR | flags, 0o666)
    except PermissionError:
        # Made by another user without write permission for us: flock needs no write.
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)


def open_lock_file(pool: str, lock_dir: str | None) -> tuple[int, str]:
    """An open fd of the pool's local lock file, and its directory."""
    if lock_dir:
        try:
            return _open_in(lock_dir, pool, False), lock_dir
        except OSError as exc:
            raise Exit(
                EXIT_LOCALLOCK, f"cannot use lock directory {lock_dir}: {exc.strerror}"
            ) from None
    last: OSError | None = None
    for directory, shared in lock_dir_candidates():
        try:
            return _open_in(directory, pool, shared), directory
        except OSError as exc:
            last = exc
    raise Exit(EXIT_LOCALLOCK, f"no usable lock directory (last error: {last}); use --lock-dir")


class Runner:
    """Runs :class:`Settings`' command under its locks; :meth:`run` returns the exit status."""

    def __init__(self, settings: Settings, err: TextIO | None = None) -> None:
        self.s = settings
        self.err = err or sys.stderr
        self.signals: list[int] = []
        self.signalled = False  # any forwarded signal ever came (signals is a queue)
        self.deadline = None if settings.timeout is None else core.clock() + settings.timeout

    def say(self, message: str) -> None:
        # A broken stderr (its reader gone, e.g. journald restarted) must never
        # stand between us and stopping the command or releasing the lock.
        with contextlib.suppress(OSError, ValueError):
            print(f"distributex: {one_line(message, 500)}", file=self.err, flush=True)

    def debug(self, message: str) -> None:
        if self.s.verbose:
            self.say(message)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.signalled = True
        self.signals.append(signum)

    def run(self) -> int:
        saved = {sig: signal.signal(sig, self._on_signal) for sig in FORWARDED_SIGNALS}
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

    def _interrupted(self, what: str) -> Exit:
        sig = self.signals[0]
        return Exit(128 + sig, f"got {signal.Signals(sig).name} {what}; command not run")

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
                problem = self._interrupted("while waiting for the local lock")
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
            raise self._interrupted("while waiting for the lock")
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
        self.command_end: float | None = None
        stopped: Exit | None = None
        try:
            code = self._supervise(client, lease, keeper, grace, granted_at)
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
            if stopped is None and code != EXIT_LOST and self.command_end is not None:
                if held is False and lease.renewed_at < self.command_end:
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

    def _kill_deadline(self, now: float, grace: float, lease: Lease | None) -> float:
        """When to SIGKILL after a SIGTERM now: after ``grace``, and before the lease can end."""
        at = now + grace
        if lease is not None and lease.ttl:
            at = min(at, lease.confirmed_until - kill_margin(lease.ttl))
        return at

    def _supervise(
        self,
        client: Client | None,
        lease: Lease | None,
        keeper: LeaseKeeper | None,
        grace: float,
        granted_at: float,
    ) -> int:
        if self.signals:
            raise self._interrupted("before the command started")
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
                watch = dog.arm_in_child(*self._watchdog_deadlines(lease, grace), grace)
                proc = self._spawn(self._environment(client, lease), watch)
            except BaseException:
                dog.finish()
                raise
            dog.feed(proc.pid, *self._watchdog_deadlines(lease, grace), grace)
            if keeper is not None:
                keeper.start()
            try:
                return self._watch(
                    proc, CommandProcesses(proc.pid, spare), dog, lease, keeper, grace, granted_at
                )
            finally:
                dog.kill()

    def _watchdog_deadlines(self, lease: Lease | None, grace: float) -> tuple[float, float]:
        """When the watchdog stops the command if we have not: (SIGTERM, SIGKILL)."""
        if lease is None or not lease.ttl or not lease.token:
            return math.inf, math.inf
        margin = kill_margin(lease.ttl)
        kill_at = lease.confirmed_until - margin
        return min(kill_at, kill_at - grace + WATCHDOG_SLACK), kill_at

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
                term_at, dog_kill_at = self._watchdog_deadlines(lease, grace)
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
                kill_at = min(kill_at or math.inf, self._kill_deadline(now, grace, lease))
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
                kill_at = min(kill_at or math.inf, self._kill_deadline(now, grace, lease))
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
        if self.signalled:
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
