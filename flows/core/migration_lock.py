"""The migration lock: a session-level advisory lock, so two migrations of one database never overlap.

Session-level on a dedicated autocommit connection (PITFALLS.md): a transaction-level lock would be
released by Alembic's per-migration commits and would block CREATE INDEX CONCURRENTLY. It backs up
Prefect's `db:<name>` concurrency limit, whose lease renewals have failed in some 3.x releases.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg

from flows.core.errors import MigrationLockHeld, MigrationLockLost
from flows.core.postgres import ConnParams, connect, scalar

LOCK_NAMESPACE = "dbops-migrate"


def lock_key(database: str) -> int:
    """A stable signed 64-bit key for "dbops-migrate:<database>" (sha256, not Python's salted hash())."""
    digest = hashlib.sha256(f"{LOCK_NAMESPACE}:{database}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _split(key: int) -> tuple[int, int]:
    """How pg_locks shows a bigint advisory key: classid = high 32 bits, objid = low 32 bits, objsubid 1."""
    unsigned = key & 0xFFFFFFFFFFFFFFFF
    return unsigned >> 32, unsigned & 0xFFFFFFFF


@dataclass(frozen=True)
class LockHolder:
    pid: int
    application_name: str
    user: str | None
    client_addr: str | None
    backend_start: str | None
    state: str | None


def lock_holders(conn: psycopg.Connection, key: int) -> list[LockHolder]:
    """Sessions holding the advisory lock `key` in the current database."""
    classid, objid = _split(key)
    rows = conn.execute(
        """
        SELECT l.pid, coalesce(a.application_name, ''), a.usename, a.client_addr::text,
               a.backend_start::text, a.state
        FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
        WHERE l.locktype = 'advisory' AND l.granted
          AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND l.classid = %s::bigint::oid AND l.objid = %s::bigint::oid AND l.objsubid = 1
        ORDER BY l.pid
        """,
        (classid, objid),
    ).fetchall()
    return [LockHolder(*row) for row in rows]


@dataclass
class MigrationLock:
    """A held lock; `conn` is its dedicated session (do not run migrations on it)."""

    database: str
    key: int
    conn: psycopg.Connection
    pid: int

    def still_held(self) -> bool:
        """False when the lock session died (then another migration could start): check between steps."""
        try:
            return any(h.pid == self.pid for h in lock_holders(self.conn, self.key))
        except psycopg.Error:
            return False

    def ensure_held(self) -> None:
        if not self.still_held():
            raise MigrationLockLost(
                f"the migration lock of database {self.database!r} was lost (its session ended); stop and "
                "check that no other migration is running before retrying"
            )


@contextmanager
def migration_lock(params: ConnParams) -> Iterator[MigrationLock]:
    """Hold the migration lock of `params.database` for the duration of the block, or fail at once.

    Examples:
        with migration_lock(params) as lock:
            app.upgrade(params, "head", lock_timeout_ms=5000)
    """
    key = lock_key(params.database)
    conn = connect(params, autocommit=True)
    try:
        got = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
        if not got or not got[0]:
            holders = lock_holders(conn, key)
            if holders:
                h = holders[0]
                who = f"pid {h.pid}, application_name {h.application_name!r}"
                if h.user:
                    who += f", user {h.user}"
                if h.client_addr:
                    who += f", from {h.client_addr}"
                raise MigrationLockHeld(
                    f"another migration of database {params.database!r} holds the migration lock ({who}); "
                    f"wait for it to finish, or end that session (pg_terminate_backend({h.pid})) if it is "
                    "stuck",
                    pid=h.pid,
                    application_name=h.application_name,
                )
            raise MigrationLockHeld(
                f"another session held the migration lock of database {params.database!r} a moment ago; "
                "retry once it has finished"
            )
        pid = int(scalar(conn, "SELECT pg_backend_pid()"))
        lock = MigrationLock(params.database, key, conn, pid)
        try:
            yield lock
        finally:
            if not conn.closed:
                with contextlib.suppress(psycopg.Error):  # the session is gone, and the lock with it
                    conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
    finally:
        conn.close()
