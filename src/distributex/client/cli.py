"""``distributex``: run a command under a cluster lock (built on :mod:`distributex.client.sync`)."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from distributex import __version__
from distributex.client.argv import Parser
from distributex.client.runner import (
    EXIT_CONFIG,
    EXIT_USAGE,
    Runner,
    Settings,
    min_ttl_for_grace,
)
from distributex.client.sync import (
    DEFAULT_PORT,
    DEFAULT_TIMEOUT,
    MAX_SECONDS,
    check_token,
    default_host_id,
    split_server,
)

DEFAULT_TTL = 60.0
DEFAULT_GRACE = 10.0
SYSTEM_CONFIG = "/etc/distributex/client.conf"
CONFIG_KEYS = (
    "server",
    "port",
    "host_id",
    "ttl",
    "grace",
    "lock_dir",
    "http_timeout",
    "cacert",
    "cert",
    "key",
    "token_file",
)

DESCRIPTION = """\
Run a command while holding a lock of a distributex server (and/or a local
lock), so that only one host of the cluster runs it at a time.

  distributex -H dx.example.com -r pool1 '/usr/bin/puppet agent --onetime'
  distributex -H dx.example.com -r backup --no-wait -- /usr/local/bin/backup --full

Who holds what: distributex status [-H SERVER] [-p PORT] [POOL] [--json] [--watch]
(see distributex status --help).
"""

EPILOG = """\
command:
  A single COMMAND string is run by /bin/sh -c (as in 0.7). Words after --
  are run directly, without a shell. The command runs in its own session
  and process group, with stdin/stdout/stderr inherited, and gets:
    DISTRIBUTEX_SERVER  host:port of the lock server (unset with a local lock only)
    DISTRIBUTEX_POOL    the pool
    DISTRIBUTEX_HOST    the host identity used for the lock
    DISTRIBUTEX_FENCE   fencing token of the grant (an increasing integer)
    DISTRIBUTEX_LEASE   lease token (for curl .../renew/ or .../release/)

exit status:
  N      the command's exit status (0 only if the command ran and exited 0)
  128+N  the command died of signal N; or we got signal N before it started
  2      usage error (bad option or option combination, text that is not UTF-8)
  69     server unreachable, timed out, answered 503, or closed the connection
         before answering (at its connection limit?) (command not run)
  70     internal error (command not run)
  71     the local lock file (-l) cannot be used (command not run)
  73     the lock was lost while the command ran; the command was stopped.
         Also: the final release found the lease already gone (GONE) and no
         renewal after the command's end had confirmed it (it may have
         ended while the command ran)
  75     lock not obtained: --timeout ran out, or busy with --no-wait (not run)
  77     request refused by the server (INVALID: unknown pool, host not
         allowed, a pool the token may not use, a --host-id that is not the
         proven identity, bad parameter) (command not run)
  67     not authenticated: the server wants a token and got none it accepts
         (HTTP 401) (command not run)
  76     TLS failed: the server's certificate is not trusted (--cacert), it
         refused our client certificate (--cert/--key), or it does not speak
         TLS (command not run)
  78     bad configuration file or environment variable, or a --cacert,
         --cert, --key or token file that cannot be used (command not run)
  79     the server's certificate names another server than -H (command not run)
  126    command not executable, 127 command not found (-- form)
  Every non-zero status of our own comes with one line on stderr.

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


class ConfigProblem(Exception):
    """A bad configuration file or environment variable."""


def config_files(env: dict[str, str]) -> list[Path]:
    if "DISTRIBUTEX_CONFIG" in env:
        chosen = env["DISTRIBUTEX_CONFIG"]
        return [Path(chosen)] if chosen else []
    xdg = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return [Path(SYSTEM_CONFIG), Path(xdg) / "distributex" / "client.conf"]


def read_config(paths: list[Path], required: bool) -> dict[str, tuple[str, str]]:
    """key -> (value, where) from ``key = value`` files; later files win."""
    values: dict[str, tuple[str, str]] = {}
    for path in paths:
        try:
            text = path.read_text()
        except FileNotFoundError:
            if required:
                raise ConfigProblem(f"{path}: no such config file (DISTRIBUTEX_CONFIG)") from None
            continue
        except OSError as exc:
            raise ConfigProblem(f"{path}: cannot read: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise ConfigProblem(f"{path}: not UTF-8 text (byte {exc.start})") from None
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            key, sep, value = line.partition("=")
            key = key.strip().lower().replace("-", "_")
            if not sep:
                raise ConfigProblem(f"{path}:{number}: expected 'key = value', got {raw.strip()!r}")
            if key not in CONFIG_KEYS:
                raise ConfigProblem(
                    f"{path}:{number}: unknown key {key!r} (known: {', '.join(CONFIG_KEYS)})"
                )
            values[key] = (value.strip().strip("\"'"), f"{path}:{number}")
    return values


def _seconds(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise ValueError("must be a number of seconds >= 0")
    if value > MAX_SECONDS:
        raise ValueError(f"must be at most {MAX_SECONDS:.0f} seconds (about 3 years)")
    return value


def _encodable(text: str) -> bool:
    """Valid text (command-line bytes that are not UTF-8 come as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text(text: str) -> str:
    if not _encodable(text):
        raise ValueError("not valid UTF-8 text")
    return text


def _port(text: str) -> int:
    value = int(text)
    if not 0 < value < 65536:
        raise ValueError("must be a port number 1-65535")
    return value


def _positive(text: str) -> float:
    value = _seconds(text)
    if value <= 0:
        raise ValueError("must be > 0")
    return value


def _arg(convert: Callable[[str], object]) -> Callable[[str], object]:
    def checked(text: str) -> object:
        try:
            return convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None

    checked.__name__ = convert.__name__.strip("_")
    return checked


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
    p.add_argument(
        "-H", "--server", metavar="SERVER",
        help="server host name, or host:port (env DISTRIBUTEX_SERVER)",
    )  # fmt: skip
    p.add_argument("-r", "--pool", required=True, metavar="POOL", help="resource pool")
    p.add_argument(
        "-p", "--port", type=_arg(_port), metavar="PORT",
        help=f"server port (env DISTRIBUTEX_PORT; default {DEFAULT_PORT})",
    )  # fmt: skip
    p.add_argument(
        "-l", "--local", action="store_true",
        help="also take a local flock: no overlap of this pool on this host",
    )  # fmt: skip
    when = p.add_mutually_exclusive_group()
    when.add_argument(
        "--timeout", type=_arg(_seconds), metavar="SECONDS",
        help="give up waiting for the lock after this long (exit 75); default: wait forever",
    )  # fmt: skip
    when.add_argument(
        "--no-wait", action="store_true", help="try once; if the lock is busy exit 75"
    )
    p.add_argument(
        "--ttl", type=_arg(_seconds), metavar="SECONDS",
        help=f"lease time to ask for, renewed every ttl/3 (env DISTRIBUTEX_TTL; default "
        f"{DEFAULT_TTL:g}; 0: the pool's expire)",
    )  # fmt: skip
    p.add_argument(
        "--grace", type=_arg(_seconds), metavar="SECONDS",
        help=f"if the lock is lost: SIGTERM, then SIGKILL this much later (env "
        f"DISTRIBUTEX_GRACE; default {DEFAULT_GRACE:g})",
    )  # fmt: skip
    p.add_argument(
        "--min-hold", type=_arg(_seconds), default=0.0, metavar="SECONDS",
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
    p.add_argument(
        "--http-timeout", type=_arg(_positive), metavar="SECONDS",
        help=f"timeout of each HTTP call (env DISTRIBUTEX_HTTP_TIMEOUT; default "
        f"{DEFAULT_TIMEOUT:g})",
    )  # fmt: skip
    p.add_argument(
        "--cacert", metavar="FILE",
        help="CA certificate(s) to check the server's certificate with (env DISTRIBUTEX_CACERT; "
        "default: the system's); implies TLS",
    )  # fmt: skip
    p.add_argument(
        "--cert", metavar="FILE",
        help="client certificate for mutual TLS (env DISTRIBUTEX_CERT); implies TLS",
    )  # fmt: skip
    p.add_argument(
        "--key", metavar="FILE",
        help="the client certificate's private key, if not in --cert (env DISTRIBUTEX_KEY)",
    )  # fmt: skip
    p.add_argument(
        "--token-file", metavar="FILE",
        help="file whose first line is the bearer token (env DISTRIBUTEX_TOKEN holds the token "
        "itself); never give a token on the command line",
    )  # fmt: skip
    p.add_argument("-v", "--verbose", action="store_true", help="say what happens, on stderr")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def _default(
    name: str,
    given: object,
    env: dict[str, str],
    config: dict[str, tuple[str, str]],
    convert: Callable[[str], object],
    builtin: object,
) -> object:
    """Option value, else DISTRIBUTEX_<NAME>, else the config file, else the built-in."""
    if given is not None:
        return given
    var = f"DISTRIBUTEX_{name.upper()}"
    if env.get(var):
        try:
            return convert(env[var])
        except ValueError as exc:
            raise ConfigProblem(f"environment {var}={env[var]!r}: {exc}") from None
    if name in config:
        value, where = config[name]
        if value == "":
            return builtin
        try:
            return convert(value)
        except ValueError as exc:
            raise ConfigProblem(f"{where}: {name} = {value!r}: {exc}") from None
    return builtin


def resolve(
    args: argparse.Namespace,
    command_argv: list[str] | None,
    parser: argparse.ArgumentParser,
    env: dict[str, str],
) -> Settings:
    """Settings from the parsed options, the environment and the config files."""
    config = read_config(config_files(env), required=bool(env.get("DISTRIBUTEX_CONFIG")))

    def pick(name: str, convert: Callable[[str], object], builtin: object) -> object:
        return _default(name, getattr(args, name), env, config, convert, builtin)

    server = pick("server", _text, None) or None
    if "DISTRIBUTEX_SERVER" in env and not env["DISTRIBUTEX_SERVER"] and args.server is None:
        server = None  # DISTRIBUTEX_SERVER= (empty) turns a configured server off
    port = pick("port", _port, None)
    ttl = pick("ttl", _seconds, DEFAULT_TTL)
    grace = pick("grace", _seconds, DEFAULT_GRACE)
    if args.host_id is not None and not _encodable(args.host_id):
        parser.error(f"--host-id {args.host_id!r}: not valid UTF-8 text")
    cacert = pick("cacert", _text, None) or None
    cert = pick("cert", _text, None) or None
    key = pick("key", _text, None) or None
    token = read_token(args, env, config)
    # With credentials the server knows who we are: send no host unless told.
    host_id = pick("host_id", _text, None) or (
        None if token is not None or cert is not None else default_host_id()
    )
    lock_dir = pick("lock_dir", str, None) or None
    http_timeout = pick("http_timeout", _positive, DEFAULT_TIMEOUT)
    assert isinstance(ttl, float) and isinstance(grace, float)
    assert isinstance(http_timeout, float)

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
    if not _encodable(args.pool):
        parser.error(f"the pool (-r) {args.pool!r} is not valid UTF-8 text")
    if server is None and not args.local:
        parser.error(
            "no server: give -H SERVER (or set DISTRIBUTEX_SERVER), or -l for a local lock only"
        )
    if server is not None:
        try:
            scheme, _host, _chosen = split_server(
                str(server), port if isinstance(port, int) else None
            )
        except ValueError as exc:
            parser.error(f"bad server: {exc}")
        if scheme == "http" and (cacert or cert):
            parser.error("--cacert and --cert need TLS: write the server as https://HOST[:PORT]")
        if ttl and ttl < min_ttl_for_grace(grace):
            parser.error(
                f"--grace {grace:g} needs --ttl >= {min_ttl_for_grace(grace):g} "
                f"(got {ttl:g}): the command must be stopped before the lease can run out, "
                "and renewals need room to retry; raise --ttl or lower --grace"
            )
    if key and not cert:
        parser.error("--key needs --cert (the client certificate)")
    return Settings(
        pool=args.pool,
        host_id=str(host_id) if host_id else None,
        server=str(server) if server else None,
        port=port if isinstance(port, int) else None,
        local=args.local,
        lock_dir=str(lock_dir) if lock_dir else None,
        timeout=args.timeout,
        wait=not args.no_wait,
        ttl=ttl or None,
        grace=grace,
        min_hold=args.min_hold,
        http_timeout=http_timeout,
        argv=command_argv,
        shell_command=None if command_argv is not None else args.command[0],
        verbose=args.verbose,
        token=token,
        cacert=str(cacert) if cacert else None,
        cert=str(cert) if cert else None,
        key=str(key) if key else None,
    )


def read_token(
    args: argparse.Namespace, env: dict[str, str], config: dict[str, tuple[str, str]]
) -> str | None:
    """The bearer token: --token-file, else $DISTRIBUTEX_TOKEN, else $DISTRIBUTEX_TOKEN_FILE,
    else the config's token_file. Errors never show the token."""
    if args.token_file is None and env.get("DISTRIBUTEX_TOKEN"):
        try:
            return check_token(env["DISTRIBUTEX_TOKEN"])
        except ValueError as exc:
            raise ConfigProblem(f"environment DISTRIBUTEX_TOKEN: {exc}") from None
    path = args.token_file or env.get("DISTRIBUTEX_TOKEN_FILE")
    where = "--token-file" if args.token_file else "environment DISTRIBUTEX_TOKEN_FILE"
    if not path and "token_file" in config and config["token_file"][0]:
        path, where = config["token_file"][0], config["token_file"][1] + ": token_file"
    if not path:
        return None
    try:
        with open(path, "rb") as file:
            first = file.read(4096).split(b"\n", 1)[0]
        return check_token(first.decode("ascii"))
    except OSError as exc:
        raise ConfigProblem(f"{where} {path}: cannot read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        why = (
            exc
            if isinstance(exc, ValueError) and not isinstance(exc, UnicodeError)
            else ("the token must be printable ASCII without spaces")
        )
        raise ConfigProblem(f"{where} {path}: {why}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """The ``distributex`` command; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["status"]:
        # 'distributex status ...' (the seed's usage always starts with options).
        from distributex.client.status import main as status_main

        return status_main(args_list[1:])
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
