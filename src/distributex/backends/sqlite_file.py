"""The SQLite state file: made with its schema, checked when opened, known by its identity.

``application_id`` marks the file as distributex's and ``user_version`` is
its schema; a file of another program, a newer schema or a corrupt file stop
the server at start with one line. The store adapter
(:mod:`distributex.backends.sqlite`) opens the file through here.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3

from distributex.backends.base import BackendUnavailable

# "DxX1" as a 32-bit integer: marks the file as distributex's.
APPLICATION_ID = 0x44785831
SCHEMA_VERSION = 1
# Rows past their expiry are deleted this often.
# How long a transaction waits for another process holding the file.
BUSY_TIMEOUT_MS = 1000

_SCHEMA = (
    """CREATE TABLE kv (
        key     TEXT PRIMARY KEY,
        value   BLOB NOT NULL,
        version INTEGER NOT NULL,
        expires REAL
    ) WITHOUT ROWID""",
    "CREATE TABLE meta (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL)",
    "INSERT INTO meta (id, seq) VALUES (1, 0)",
    f"PRAGMA application_id = {APPLICATION_ID}",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)


class StateFileError(BackendUnavailable):
    """The state file cannot be used (another program's, a newer schema, corrupt)."""


def open_state_file(path: str, description: str, sync: str) -> sqlite3.Connection:
    """A connection to the state file at ``path`` (made if missing), checked, in WAL mode.

    ``sync``: the ``synchronous`` pragma (FULL, NORMAL). Raises
    :class:`StateFileError` with one line saying what is wrong.
    """
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise StateFileError(f"{description}: folder {folder} does not exist")
    try:
        # Lease tokens are secrets (they release locks): the file is the owner's.
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=True)
    except OSError as exc:
        raise StateFileError(f"{description}: {exc.strerror or exc}") from None
    try:
        _check_file(conn, description)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StateFileError(f"{description}: cannot use WAL mode (got {mode})")
        conn.execute(f"PRAGMA synchronous = {sync}")
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise StateFileError(f"{description}: not a usable SQLite file ({exc})") from None
    except BaseException:
        conn.close()
        raise
    return conn


def file_identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of the file at ``path``: another file there is another identity."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return None
    return found.st_dev, found.st_ino


def _check_file(conn: sqlite3.Connection, description: str) -> None:
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    schema = conn.execute("PRAGMA user_version").fetchone()[0]
    tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    if app_id == 0 and schema == 0 and tables == 0:
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Made by another process meanwhile? Then check it as found.
            if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
                for statement in _SCHEMA:
                    conn.execute(statement)
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        schema = conn.execute("PRAGMA user_version").fetchone()[0]
    if app_id != APPLICATION_ID:
        raise StateFileError(
            f"{description}: not a distributex state file (another program's "
            "database); give sqlite_path a file of its own"
        )
    if schema > SCHEMA_VERSION:
        raise StateFileError(
            f"{description}: written by a newer distributex (schema {schema}; "
            f"this version reads {SCHEMA_VERSION})"
        )
    problem = conn.execute("PRAGMA quick_check").fetchone()[0]
    if problem != "ok":
        raise StateFileError(f"{description}: the file is damaged ({problem})")
