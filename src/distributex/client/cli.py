"""``distributex``: run a command under a cluster lock; ``status``, ``release`` and ``check``
beside it."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from distributex import __version__
from distributex.client import config, connection, exits
from distributex.client.argv import Parser
from distributex.client.config import ConfigProblem, arg
from distributex.client.exits import EXIT_CONFIG, EXIT_USAGE
from distributex.client.grace import min_ttl_for_grace
from distributex.client.runner import Runner, Settings
from distributex.client.sync import default_host_id

DEFAULT_TTL = 60.0
DEFAULT_GRACE = 10.0

DESCRIPTION = """\
Run a command while holding a lock of a distributex server (and/or a local
lock), so that only one host of the cluster runs it at a time.

  distributex -H dx.example.com -r pool1 '/usr/bin/puppet agent --onetime'
  distributex -H dx.example.com -r backup --no-wait -- /usr/local/bin/backup --full

Who holds what: distributex status [-H SERVER] [-p PORT] [POOL] [--json] [--watch]
Free another host's lock (admin token): distributex release -r POOL --host HOST
Check a deployment keeps the lock rules: distributex check -r POOL --duration SECONDS
(see distributex status --help, distributex release --help, distributex check --help).
"""

EPILOG_TEMPLATE = """\
command:
  A single COMMAND string is run by /bin/sh -c (as in 0.7). Words after --
  are run directly, without a shell. The command runs in its own session
  and process group, with stdin/stdout/stderr inherited, and gets:
    DISTRIBUTEX_SERVER  host:port of the lock server (unset with a local lock only)
    DISTRIBUTEX_POOL    the pool
    DISTRIBUTEX_HOST    the host identity used for the lock
    DISTRIBUTEX_FENCE   fencing token of the grant (an increasing integer)
    DISTRIBUTEX_LEASE   lease token (for curl .../renew/ or .../release/)

{exits}

lease, renewal and lost locks:
  The lease lives --ttl seconds (the server may grant less: the pool's
  expire) and is renewed every ttl/3; a failed renewal is retried every
  min(1, ttl/10) s, so brief network blips do not matter. The lock is LOST
  when the server answers that the lease is gone, or when no renewal got
  through until grace + margin seconds before the lease could run out
  (margin = min(1, ttl/10)). Then the command's process group gets SIGTERM,
  and SIGKILL --grace seconds later, so it is dead before the server can
  give the lock to anyone else. Lease time counts while this machine is
  suspended (CLOCK_BOOTTIME). Hence --ttl must be at least about
  2 x (grace + 1) (e.g. --grace 10 needs --ttl >= 22); if the server grants
  a shorter TTL, grace is shortened to fit.

process group and watchdog:
  The lock covers everything the command started: its process group, its
  session, and (Linux: distributex adopts the command's orphans as a child
  subreaper) every process it started, also with set -m or setsid. When the
  command ends, or the lock is lost, what is left running gets SIGTERM,
  then SIGKILL after --grace, before the lock is released; the exit status
  stays the command's. A watchdog process, fed the lease's deadlines after
  each renewal, stops the group and session on the same schedule if this
  client cannot (stopped with SIGSTOP, frozen, starved of CPU) or dies; the
  client then exits 73. Without prctl and /proc (BSD, macOS) only the
  process group is reached. Ctrl-Z (SIGTSTP) is ignored: a stopped client
  would lose its lock.

signals:
  SIGINT, SIGTERM and SIGHUP are forwarded to the command's process group;
  a second one sends SIGKILL. The lock is released when the command has
  ended; after a signal there is no --min-hold. A signal while waiting for
  the lock (or connecting) stops at once (exit 128+N).

host identity:
  Default: the name distributex 0.7 sent, gethostbyaddr(gethostname())[0]
  (the first name of this host in /etc/hosts or DNS; the plain host name if
  that lookup fails or takes over 5 s).
  The server sees one holder per host name: two clients with the same
  --host-id share the lock. Use -l (or distinct --host-id) to keep jobs on
  one machine apart.

local lock (-l):
  flock(2) on <lock-dir>/<pool>.lock, held while the command runs (not
  inherited by the command), so a crashed client never leaves a stale lock.
  Lock dir: --lock-dir, else /run/lock/distributex, /var/lock/distributex,
  $XDG_RUNTIME_DIR/distributex, $TMPDIR/distributex-UID (first usable).
  -l without any server (no -H, DISTRIBUTEX_SERVER or config server) locks
  only locally.

TLS and authentication:
  -H https://dx.example.com:9889 (or --cacert/--cert with a plain host name)
  talks TLS, checking the server's certificate against --cacert (default:
  the system's CAs) and its name against -H. --cert/--key present a client
  certificate (mutual TLS). The bearer token is read from the environment
  variable DISTRIBUTEX_TOKEN or from --token-file FILE (first line), never
  from the command line (which other users can read in the process list).
  With a token or a client certificate and no --host-id, no host name is
  sent: the server takes the identity they prove.

defaults (highest first): options; environment DISTRIBUTEX_SERVER,
  DISTRIBUTEX_PORT, DISTRIBUTEX_HOST_ID, DISTRIBUTEX_TTL, DISTRIBUTEX_GRACE,
  DISTRIBUTEX_LOCK_DIR, DISTRIBUTEX_HTTP_TIMEOUT, DISTRIBUTEX_CACERT,
  DISTRIBUTEX_CERT, DISTRIBUTEX_KEY, DISTRIBUTEX_TOKEN (the token itself),
  DISTRIBUTEX_TOKEN_FILE; the config file(s); built-in.
  Config: $DISTRIBUTEX_CONFIG if set (empty: none), else /etc/distributex/
  client.conf then ~/.config/distributex/client.conf (later wins). Format:
  "key = value" lines, # comments; keys: server, port, host_id, ttl, grace,
  lock_dir, http_timeout, cacert, cert, key, token_file.
"""


EPILOG = EPILOG_TEMPLATE.replace("{exits}", exits.help_text("run"))


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="distributex",
        usage="%(prog)s [options] -r POOL [-H SERVER] [-p PORT] [-l] (COMMAND | -- ARGV...)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "command", nargs="*", metavar="COMMAND",
        help="command to run by sh -c when the lock is held",
    )  # fmt: skip
    p.add_argument("-r", "--pool", required=True, metavar="POOL", help="resource pool")
    p.add_argument(
        "-l", "--local", action="store_true",
        help="also take a local flock: no overlap of this pool on this host",
    )  # fmt: skip
    p.add_argument(
        "-s", "--shared", action="store_true",
        help="a shared lock: runs beside other --shared holders of the pool, never beside "
        "a holder without it (as flock -s; the server's max_shared bounds how many)",
    )  # fmt: skip
    when = p.add_mutually_exclusive_group()
    when.add_argument(
        "--timeout", type=arg(config.seconds), metavar="SECONDS",
        help="give up waiting for the lock after this long (exit 75); default: wait forever",
    )  # fmt: skip
    when.add_argument(
        "--no-wait", action="store_true", help="try once; if the lock is busy exit 75"
    )
    p.add_argument(
        "--ttl", type=arg(config.seconds), metavar="SECONDS",
        help=f"lease time to ask for, renewed every ttl/3 (env DISTRIBUTEX_TTL; default "
        f"{DEFAULT_TTL:g}; 0: the pool's expire)",
    )  # fmt: skip
    p.add_argument(
        "--grace", type=arg(config.seconds), metavar="SECONDS",
        help=f"if the lock is lost: SIGTERM, then SIGKILL this much later (env "
        f"DISTRIBUTEX_GRACE; default {DEFAULT_GRACE:g})",
    )  # fmt: skip
    p.add_argument(
        "--min-hold", type=arg(config.seconds), default=0.0, metavar="SECONDS",
        help="keep the lock at least this long after it was granted, even if the command ends "
        "sooner (a cron job then runs once per period across the cluster)",
    )  # fmt: skip
    p.add_argument(
        "--host-id", metavar="NAME",
        help="identity shown to the server (env DISTRIBUTEX_HOST_ID; default: the name 0.7 "
        "sent: the first name of this host's entry in /etc/hosts or DNS, else its host name)",
    )  # fmt: skip
    p.add_argument(
        "--lock-dir", metavar="DIR", help="directory of -l lock files (env DISTRIBUTEX_LOCK_DIR)"
    )
    connection.add_options(
        p, "server: host name, host:port, or http(s)://host[:port] (env DISTRIBUTEX_SERVER)"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="say what happens, on stderr")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def resolve(
    args: argparse.Namespace,
    command_argv: list[str] | None,
    parser: argparse.ArgumentParser,
    env: dict[str, str],
) -> Settings:
    """Settings from the parsed options, the environment and the config files."""
    values = config.load(env)

    def pick(name: str, convert: Callable[[str], object], builtin: object) -> object:
        return config.pick(name, getattr(args, name), env, values, convert, builtin)

    conn = connection.resolve(args, parser, env, values)
    ttl = pick("ttl", config.seconds, DEFAULT_TTL)
    grace = pick("grace", config.seconds, DEFAULT_GRACE)
    if args.host_id is not None and not config.encodable(args.host_id):
        parser.error(f"--host-id {args.host_id!r}: not valid UTF-8 text")
    # With credentials the server knows who we are: send no host unless told.
    host_id = pick("host_id", config.text, None) or (
        None if conn.token is not None or conn.cert is not None else default_host_id()
    )
    lock_dir = pick("lock_dir", str, None) or None
    assert isinstance(ttl, float) and isinstance(grace, float)

    if command_argv is not None and args.command:
        parser.error("give the command either as one string or after --, not both")
    if command_argv is None and len(args.command) > 1:
        parser.error(
            "give the command as one quoted string (run by sh -c), or after -- (run directly)"
        )
    if command_argv is not None and not command_argv:
        parser.error("no command after --")
    if command_argv is None and (not args.command or not args.command[0].strip()):
        parser.error("no command given")
    if not args.pool:
        parser.error("the pool (-r) must not be empty")
    if not config.encodable(args.pool):
        parser.error(f"the pool (-r) {args.pool!r} is not valid UTF-8 text")
    if conn.server is None and not args.local:
        parser.error(
            "no server: give -H SERVER (or set DISTRIBUTEX_SERVER), or -l for a local lock only"
        )
    if conn.server is not None and ttl and ttl < min_ttl_for_grace(grace):
        parser.error(
            f"--grace {grace:g} needs --ttl >= {min_ttl_for_grace(grace):g} "
            f"(got {ttl:g}): the command must be stopped before the lease can run out, "
            "and renewals need room to retry; raise --ttl or lower --grace"
        )
    return Settings(
        pool=args.pool,
        host_id=str(host_id) if host_id else None,
        server=conn.server,
        port=conn.port,
        local=args.local,
        lock_dir=str(lock_dir) if lock_dir else None,
        timeout=args.timeout,
        wait=not args.no_wait,
        shared=args.shared,
        ttl=ttl or None,
        grace=grace,
        min_hold=args.min_hold,
        http_timeout=conn.http_timeout,
        argv=command_argv,
        shell_command=None if command_argv is not None else args.command[0],
        verbose=args.verbose,
        token=conn.token,
        cacert=conn.cacert,
        cert=conn.cert,
        key=conn.key,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """The ``distributex`` command; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    # 'distributex status|release ...' (the seed's usage always starts with options).
    if args_list[:1] == ["status"]:
        from distributex.client import status

        return status.main(args_list[1:])
    if args_list[:1] == ["release"]:
        from distributex.client import release

        return release.main(args_list[1:])
    if args_list[:1] == ["check"]:
        from distributex.client import check

        return check.main(args_list[1:])
    command_argv: list[str] | None = None
    if "--" in args_list:
        cut = args_list.index("--")
        args_list, command_argv = args_list[:cut], args_list[cut + 1 :]
    parser = build_parser()
    args = parser.parse_args(args_list)
    try:
        settings = resolve(args, command_argv, parser, dict(os.environ))
    except ConfigProblem as exc:
        print(f"distributex: {exc}; command not run", file=sys.stderr)
        return EXIT_CONFIG
    logger = logging.getLogger("distributex.client")
    if settings.verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("distributex: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    else:
        # The runner reports what matters in one line; no library log noise for cron mail.
        logger.addHandler(logging.NullHandler())
    logger.propagate = False
    return Runner(settings).run()


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["EXIT_USAGE", "build_parser", "main"]
