"""The exit statuses of every ``distributex`` command, in one table.

``distributex`` (run a command), ``distributex status``, ``distributex
release`` and ``distributex check`` share these codes; ``--help`` prints the table's rows and
docs/client.md explains them. An error of the client library maps to its
code through :func:`code_for`, the same way for every command.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

from distributex.client.errors import (
    AuthenticationFailed,
    CertificateMismatch,
    DistributexError,
    LockRefused,
    LockTimeout,
    ServerUnavailable,
    TLSFailed,
)

EXIT_OK = 0
EXIT_NOT_HELD = 1  # release: the host held nothing in the pool
EXIT_USAGE = 2
EXIT_VIOLATION = 65  # check: the history broke a lock rule
EXIT_NOT_AUTHENTICATED = 67  # 401: token or client certificate missing or not accepted
EXIT_INCONCLUSIVE = 68  # check: no lease was granted, so nothing was proven
EXIT_UNAVAILABLE = 69
EXIT_SOFTWARE = 70
EXIT_LOCALLOCK = 71
EXIT_LOST = 73
EXIT_TIMEOUT = 75
EXIT_TLS = 76  # server certificate not trusted, ours refused, or no TLS there
EXIT_REFUSED = 77
EXIT_CONFIG = 78
EXIT_NAME_MISMATCH = 79  # the server's certificate names another server
EXIT_NOEXEC = 126
EXIT_NOTFOUND = 127


@dataclass(frozen=True)
class ExitStatus:
    code: int
    meaning: str
    commands: str  # which commands use it: "run", "status", "release", "check", or "all"


TABLE: tuple[ExitStatus, ...] = (
    ExitStatus(EXIT_OK, "success (release: the lock was freed)", "all"),
    ExitStatus(EXIT_NOT_HELD, "the host held no lock of the pool; nothing freed", "release"),
    ExitStatus(
        EXIT_USAGE, "usage error (bad option or combination, text that is not UTF-8)", "all"
    ),
    ExitStatus(
        EXIT_VIOLATION,
        "a lock rule was broken: more holders than maxlocks at once, a fence out of grant "
        "order, a wait starved, or a released lease renewed (the report names the leases)",
        "check",
    ),
    ExitStatus(
        EXIT_NOT_AUTHENTICATED,
        "not authenticated (HTTP 401): no token or client certificate, or one the server "
        "does not accept; the line names what was missing",
        "all",
    ),
    ExitStatus(
        EXIT_INCONCLUSIVE,
        "no lease was granted during the check (every call failed or was answered NO): "
        "nothing was proven",
        "check",
    ),
    ExitStatus(
        EXIT_UNAVAILABLE,
        "server unreachable, timed out, answered 503, or closed the connection before "
        "answering (at its connection limit?)",
        "all",
    ),
    ExitStatus(EXIT_SOFTWARE, "internal error", "all"),
    ExitStatus(EXIT_LOCALLOCK, "the local lock file (-l) cannot be used", "run"),
    ExitStatus(
        EXIT_LOST,
        "the lock was lost while the command ran; the command was stopped. Also: the final "
        "release found the lease already gone and no renewal after the command's end had "
        "confirmed it",
        "run",
    ),
    ExitStatus(EXIT_TIMEOUT, "lock not obtained: --timeout ran out, or busy with --no-wait", "run"),
    ExitStatus(
        EXIT_TLS,
        "TLS failed: the server's certificate is not trusted (--cacert), it refused our "
        "client certificate (--cert/--key), or it does not speak TLS",
        "all",
    ),
    ExitStatus(
        EXIT_REFUSED,
        "refused by the server (INVALID: unknown pool, host not allowed, a pool the token may "
        "not use, an identity the credentials do not prove, a forced release without an admin "
        "token, bad parameter)",
        "all",
    ),
    ExitStatus(
        EXIT_CONFIG,
        "bad configuration file or environment variable, or a --cacert, --cert, --key or "
        "token file that cannot be used",
        "all",
    ),
    ExitStatus(EXIT_NAME_MISMATCH, "the server's certificate names another server than -H", "all"),
    ExitStatus(EXIT_NOEXEC, "command not executable (-- form)", "run"),
    ExitStatus(EXIT_NOTFOUND, "command not found (-- form)", "run"),
)


def help_text(command: str) -> str:
    """The ``exit status:`` section of ``command``'s ``--help`` (run, status, release, check)."""
    lines = ["exit status:"]
    if command == "run":
        lines.append("  N      the command's exit status (0 only if it ran and exited 0)")
        lines.append("  128+N  the command died of signal N; or we got signal N before it started")
    for row in TABLE:
        if row.commands not in ("all", command) or (command == "run" and row.code == EXIT_OK):
            continue
        lines += textwrap.wrap(
            row.meaning, 78, initial_indent=f"  {row.code:<5}  ", subsequent_indent=" " * 9
        )
    if command == "run":
        lines.append("  Every status of our own but 0 comes with one line on stderr; the")
        lines.append("  command is not run unless the status is N, 128+N, 73, 126 or 127.")
    else:
        lines.append("  Every status from 2 up comes with one line on stderr.")
    return "\n".join(lines)


def code_for(error: BaseException) -> int:
    """The exit status of a failed client call."""
    if isinstance(error, LockTimeout):
        return EXIT_TIMEOUT
    if isinstance(error, AuthenticationFailed):
        return EXIT_NOT_AUTHENTICATED
    if isinstance(error, LockRefused):
        return EXIT_REFUSED
    if isinstance(error, CertificateMismatch):
        return EXIT_NAME_MISMATCH
    if isinstance(error, TLSFailed):
        return EXIT_TLS
    if isinstance(error, ServerUnavailable):
        return EXIT_UNAVAILABLE
    if isinstance(error, DistributexError):
        return EXIT_SOFTWARE
    return EXIT_SOFTWARE
