"""The daemon's state in one SQLite database.

One connection behind one lock: every read and write goes through it, so
there is exactly one writer and no "database is locked" between our own
threads; WAL lets outside readers (``sqlite3 pyvirt.db``, a backup) read
while we write. Writes are ``BEGIN IMMEDIATE`` ... ``COMMIT`` and short: no
I/O and no VMM call happens inside a transaction.

The schema is versioned in ``PRAGMA user_version``: ``MIGRATIONS[i]`` takes a
database from version i to i+1, each in one transaction, so a daemon killed
during a migration leaves the old version intact. A database newer than this
pyvirt is refused (a downgrade would misread it).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

from pyvirt.manager.errors import ManagerError

__all__ = ["MIGRATIONS", "Store", "StoreError"]

MIGRATIONS: list[str] = [
    # 0 -> 1: the first schema
    """
    CREATE TABLE domains (
        uuid TEXT PRIMARY KEY, name TEXT UNIQUE NOT NULL, description TEXT NOT NULL DEFAULT '',
        autostart INTEGER NOT NULL DEFAULT 0, definition TEXT NOT NULL,
        managed_save TEXT, created REAL NOT NULL, updated REAL NOT NULL);
    CREATE TABLE runstate (
        uuid TEXT PRIMARY KEY REFERENCES domains(uuid) ON DELETE CASCADE,
        state TEXT NOT NULL, reason TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '',
        run_id INTEGER, pid INTEGER, start_ticks INTEGER,
        api_socket TEXT, console_socket TEXT, exit_file TEXT, started REAL,
        config TEXT, extra TEXT NOT NULL DEFAULT '{}');
    CREATE TABLE snapshots (
        domain TEXT NOT NULL REFERENCES domains(uuid) ON DELETE CASCADE, name TEXT NOT NULL,
        parent TEXT, created REAL NOT NULL, description TEXT NOT NULL DEFAULT '',
        state TEXT NOT NULL, memory TEXT, disks TEXT NOT NULL,
        current INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (domain, name));
    CREATE TABLE pools (
        name TEXT PRIMARY KEY, uuid TEXT NOT NULL, kind TEXT NOT NULL, path TEXT NOT NULL,
        autostart INTEGER NOT NULL DEFAULT 1, active INTEGER NOT NULL DEFAULT 0,
        created REAL NOT NULL);
    CREATE TABLE networks (
        name TEXT PRIMARY KEY, uuid TEXT NOT NULL, definition TEXT NOT NULL,
        autostart INTEGER NOT NULL DEFAULT 1, active INTEGER NOT NULL DEFAULT 0,
        runtime TEXT NOT NULL DEFAULT '{}');
    CREATE TABLE tasks (
        id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, object TEXT NOT NULL,
        state TEXT NOT NULL, progress REAL NOT NULL DEFAULT 0, message TEXT NOT NULL DEFAULT '',
        error TEXT, result TEXT, cleanup TEXT, created REAL NOT NULL, finished REAL);
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, kind TEXT NOT NULL,
        object TEXT NOT NULL, event TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '');
    CREATE INDEX events_object ON events (kind, object);
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # 1 -> 2: each volume's format as recorded when pyvirt made or adopted it
    # (storage.py): never probed again, since a guest owns a raw volume's bytes
    """
    CREATE TABLE volumes (
        pool TEXT NOT NULL REFERENCES pools(name) ON DELETE CASCADE, name TEXT NOT NULL,
        format TEXT NOT NULL, created REAL NOT NULL, PRIMARY KEY (pool, name));
    """,
    # 2 -> 3: the web GUI's accounts (auth.py): users with argon2 hashes, the
    # domains granted to them, login sessions (only the cookie's sha256 is kept),
    # and who started a task (a user sees their own tasks)
    """
    CREATE TABLE users (
        name TEXT PRIMARY KEY, hash TEXT NOT NULL, role TEXT NOT NULL,
        created REAL NOT NULL, updated REAL NOT NULL);
    CREATE TABLE grants (
        user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
        domain TEXT NOT NULL REFERENCES domains(uuid) ON DELETE CASCADE,
        PRIMARY KEY (user, domain));
    CREATE INDEX grants_domain ON grants (domain);
    CREATE TABLE sessions (
        id_hash TEXT PRIMARY KEY, user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
        csrf TEXT NOT NULL, created REAL NOT NULL, last_seen REAL NOT NULL,
        expires REAL NOT NULL);
    CREATE INDEX sessions_user ON sessions (user);
    CREATE TABLE task_owners (task INTEGER PRIMARY KEY, user TEXT NOT NULL);
    """,
]


class StoreError(ManagerError):
    """The database cannot be used (another version, damaged, not writable)."""


class Store:
    """The daemon's database (see the module's docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.close(fd)
            # isolation_level=None: we issue BEGIN/COMMIT ourselves
            self._db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None,
                                       check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the database {self.path}: {exc}") from None
        self._db.row_factory = sqlite3.Row
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise StoreError(f"the database {self.path} cannot be used: {exc}") from None

    def _migrate(self) -> None:
        version = self.schema_version()
        if version > len(MIGRATIONS):
            raise StoreError(f"the database {self.path} has schema version {version}, newer "
                             f"than this pyvirt's ({len(MIGRATIONS)})")
        for target in range(version, len(MIGRATIONS)):
            script = MIGRATIONS[target]
            # executescript commits first; run the statements ourselves in one transaction
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for stmt in _statements(script):
                    self._db.execute(stmt)
                self._db.execute(f"PRAGMA user_version={target + 1}")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def schema_version(self) -> int:
        with self._lock:
            row = self._db.execute("PRAGMA user_version").fetchone()
            return int(row[0])

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._db

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One transaction: committed when the block ends, rolled back if it raises."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        with self.read() as db:
            row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else str(row[0])

    def next_counter(self, key: str) -> int:
        """An integer that grows by one per call and survives restarts (run ids)."""
        with self.write() as db:
            row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            n = int(row[0]) + 1 if row is not None else 1
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, str(n)))
        return n

    def integrity_check(self) -> str:
        with self.read() as db:
            return str(db.execute("PRAGMA integrity_check").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _statements(script: str) -> list[str]:
    """The statements of a migration script (ours: no ';' inside literals)."""
    return [s.strip() for s in script.split(";") if s.strip()]
