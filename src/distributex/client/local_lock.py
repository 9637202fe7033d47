"""The local lock file of ``distributex -l``: where it lives and how it is opened.

One file per pool, ``flock``-ed by :class:`~distributex.client.runner.Runner`.
A directory shared by all users is preferred, so every user's jobs on this
machine exclude each other; else one of this user's own.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from urllib.parse import quote

from distributex.client.exits import EXIT_LOCALLOCK
from distributex.client.run_state import Exit


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
