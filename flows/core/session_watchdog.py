"""Watch another process's PostgreSQL sessions and cancel a lock wait or a statement that runs too long.

`lock_timeout` and `statement_timeout` only hold when they reach the session, and how they get there
depends on the driver: libpq reads `PGOPTIONS`, asyncpg ignores it and takes `server_settings`, an
application's `env.py` (or a revision) may set them back to 0. The migration guard must not depend on
any of that, so while Alembic runs, dbops watches the sessions that carry the run's unique
application_name from its own connection, every `poll_s` seconds, and cancels (pg_cancel_backend) a
session that has waited for a lock longer than lock_timeout, or run one statement longer than
statement_timeout. The cancelled statement fails with SQLSTATE 57014; `cancelled` says why, so the
caller can treat a cancelled lock wait exactly like PostgreSQL's own 55P03.

The watchdog gives the server's own timeout a head start (`grace_s`): when the setting did reach the
session, PostgreSQL cancels first, with its own error. When the watchdog cannot see the sessions for
longer than `blind_limit_s` (its connection is lost and cannot be made again), it calls `on_blind`
(the Alembic runner stops the child: an unwatched migration is not allowed to go on waiting).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import psycopg

from flows.core.postgres import ConnParams, connect, server_version_num

LOCK = "lock"
STATEMENT = "statement"


@dataclass(frozen=True)
class Cancellation:
    pid: int
    reason: str  # LOCK | STATEMENT
    seconds: float  # how long it had waited (LOCK) or run (STATEMENT) when it was cancelled
    query: str


# waitstart (PostgreSQL 14+) is when the backend began to wait for the lock; older servers leave it
# to the watchdog's own first sighting.
_POLL = """
SELECT a.pid, a.query_start,
       CASE WHEN a.wait_event_type = 'Lock' THEN cardinality(pg_blocking_pids(a.pid)) > 0 ELSE false END,
       extract(epoch FROM clock_timestamp() - a.query_start)::float8,
       {waiting},
       left(a.query, 200)
FROM pg_stat_activity a
WHERE a.application_name = %s AND a.state = 'active' AND a.pid <> pg_backend_pid()
"""
_WAITSTART = (
    "(SELECT extract(epoch FROM clock_timestamp() - min(l.waitstart))::float8 "
    "FROM pg_locks l WHERE l.pid = a.pid AND NOT l.granted)"
)
_CANCEL = (
    "SELECT pg_cancel_backend(pid) FROM pg_stat_activity "
    "WHERE pid = %s AND query_start = %s AND state = 'active'"
)


class SessionWatchdog:
    """A thread that enforces lock_timeout / statement_timeout (milliseconds, 0 = no limit) on the
    sessions named `application_name`, whatever driver opened them.

    Examples:
        name = "dbops-migrate-1a2b3c"
        with SessionWatchdog(params, name, lock_timeout_ms=2000, statement_timeout_ms=0) as dog:
            subprocess.run([...])  # sessions with that application_name
        if dog.cancelled: ...
    """

    def __init__(
        self,
        params: ConnParams,
        application_name: str,
        *,
        lock_timeout_ms: int,
        statement_timeout_ms: int,
        poll_s: float = 0.2,
        grace_s: float = 0.25,
        blind_limit_s: float = 10.0,
        on_blind: Callable[[], None] | None = None,
    ) -> None:
        self.params = replace(params, application_name=f"dbops-watchdog {application_name}"[:63])
        self.application_name = application_name
        self.lock_s = lock_timeout_ms / 1000
        self.statement_s = statement_timeout_ms / 1000
        self.poll_s = poll_s
        self.grace_s = grace_s
        self.blind_limit_s = blind_limit_s
        self.on_blind = on_blind
        self.cancelled: list[Cancellation] = []
        self.blind_for: float | None = None  # seconds without sight when on_blind was called
        self._first_wait: dict[tuple[int, object], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"watchdog-{application_name}", daemon=True)
        self._conn: psycopg.Connection | None = None
        self._query = _POLL

    @property
    def active(self) -> bool:
        return self.lock_s > 0 or self.statement_s > 0

    def __enter__(self) -> SessionWatchdog:
        if self.active:
            # Connect before the watched work starts: a guard that cannot run blocks the migration.
            self._conn = self._connect()
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        if self._conn is not None:
            self._conn.close()

    @property
    def reason(self) -> str | None:
        """Why the watchdog cancelled a statement (LOCK wins over STATEMENT), None if it did not."""
        reasons = {c.reason for c in self.cancelled}
        return LOCK if LOCK in reasons else (STATEMENT if reasons else None)

    def end_sessions(self) -> int:
        """Terminate the watched sessions, after their client was killed: a backend waiting for a lock does
        not notice that its client is gone, and would sit in the lock queue, blocking the application,
        until it got the lock. Best effort (the caller is already failing); returns how many ended."""
        try:
            with connect(self.params, options="-c statement_timeout=5000") as conn:
                rows = conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = %s AND pid <> pg_backend_pid()",
                    (self.application_name,),
                ).fetchall()
        except Exception:  # nothing more can be done from here
            return 0
        return sum(1 for (ended,) in rows if ended)

    # -- the thread ----------------------------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection:
        # Its own reads must never hang: short timeouts on the watchdog's session.
        conn = connect(self.params, options="-c statement_timeout=5000 -c lock_timeout=1000")
        waiting = _WAITSTART if server_version_num(conn) >= 140000 else "NULL::float8"
        self._query = _POLL.format(waiting=waiting)
        return conn

    def _loop(self) -> None:
        blind_since: float | None = None
        while not self._stop.wait(self.poll_s):
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = self._connect()
                self._poll(self._conn)
                blind_since = None
            except Exception:  # any failure to look is "blind"; counted below
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
                now = time.monotonic()
                blind_since = blind_since or now
                if now - blind_since > self.blind_limit_s and self.blind_for is None:
                    self.blind_for = now - blind_since
                    if self.on_blind is not None:
                        self.on_blind()

    def _poll(self, conn: psycopg.Connection) -> None:
        rows = conn.execute(self._query, (self.application_name,)).fetchall()
        now = time.monotonic()
        seen = set()
        for pid, query_start, lock_wait, running_s, waiting_s, query in rows:
            key = (pid, query_start)
            if not lock_wait:
                self._first_wait.pop(key, None)
            else:
                seen.add(key)
                first = self._first_wait.setdefault(key, now)
                waited = waiting_s if waiting_s is not None else now - first
                if self.lock_s > 0 and waited > self.lock_s + self.grace_s:
                    self._cancel(conn, pid, query_start, LOCK, waited, query)
                    continue
            if self.statement_s > 0 and running_s is not None and running_s > self.statement_s + self.grace_s:
                self._cancel(conn, pid, query_start, STATEMENT, running_s, query)
        for key in list(self._first_wait):
            if key not in seen:
                del self._first_wait[key]

    def _cancel(
        self, conn: psycopg.Connection, pid: int, query_start: object, reason: str, seconds: float, query: str
    ) -> None:
        # Only the statement we judged: a session that moved on to its next statement is left alone.
        row = conn.execute(_CANCEL, (pid, query_start)).fetchone()
        if row and row[0]:
            self.cancelled.append(Cancellation(pid, reason, round(seconds, 3), query or ""))
