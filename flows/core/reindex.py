"""Running REINDEX INDEX CONCURRENTLY so that writers never wait on it for longer than lock_timeout.

One statement on an autocommit connection (never in a transaction block), `lock_timeout` short and
`statement_timeout = 0`; a lock timeout (SQLSTATE 55P03) or a deadlock is retried with backoff, and the
invalid `<index>_ccnew` a failed attempt leaves behind is dropped with DROP INDEX CONCURRENTLY before the
next attempt (it would otherwise be maintained on every write). While the statement waits, a second
connection asks pg_stat_activity / pg_blocking_pids who it waits for, so a failure can name the session
(typically one idle in transaction) that stalled it. A session-level advisory lock keeps two reindexers
apart even when the Prefect concurrency lease fails (PITFALLS, "Prefect 3").
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Literal

import psycopg
from psycopg import errors as pgerrors
from psycopg import sql

from flows.core.errors import (
    DbopsError,
    ReindexBusy,
    ReindexFailed,  # noqa: F401 - defined in flows.core.errors, importable here
)
from flows.core.postgres import ConnParams, connect, scalar

REINDEX_APPLICATION = "dbops-reindex"
ADVISORY_LOCK_NAME = "dbops:reindex"

#: SQLSTATEs after which another attempt may succeed: lock_not_available, deadlock_detected.
RETRYABLE = (pgerrors.LockNotAvailable, pgerrors.DeadlockDetected)

Status = Literal["rebuilt", "failed", "refused"]


@dataclass(frozen=True)
class Blocker:
    """A session the REINDEX waited for, as pg_stat_activity showed it while it waited."""

    pid: int
    application_name: str
    state: str
    xact_start: str
    query: str
    waiting_for: str

    def describe(self) -> str:
        app = self.application_name or "no application_name"
        return (
            f"pid {self.pid} ({app}, {self.state}, transaction started {self.xact_start}) "
            f"held the {self.waiting_for}"
        )


@dataclass
class RebuildResult:
    schema: str
    name: str
    status: Status
    attempts: int
    seconds: float
    error: str | None = None
    blockers: list[Blocker] = field(default_factory=list)
    leftovers_dropped: list[str] = field(default_factory=list)
    leftovers_remaining: list[str] = field(default_factory=list)

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    def describe_blockers(self) -> str:
        return "; ".join(b.describe() for b in self.blockers)


def reindex_params(params: ConnParams) -> ConnParams:
    """The rebuild's own application_name, so a DBA can tell it apart in pg_stat_activity."""
    return replace(params, application_name=REINDEX_APPLICATION)


def set_session_timeouts(conn: psycopg.Connection, lock_timeout_s: float) -> None:
    """A short lock_timeout (writers queue behind a waiting lock request), no statement_timeout."""
    conn.execute("SELECT set_config('lock_timeout', %s, false)", (f"{max(int(lock_timeout_s * 1000), 1)}ms",))
    conn.execute("SELECT set_config('statement_timeout', '0', false)")


# -- the advisory lock ------------------------------------------------------------------------------------


@contextmanager
def reindex_advisory_lock(params: ConnParams) -> Iterator[psycopg.Connection]:
    """Hold a session-level advisory lock on a dedicated connection for the whole run."""
    conn = connect(reindex_params(params), autocommit=True)
    try:
        got = scalar(conn, "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (ADVISORY_LOCK_NAME,))
        if not got:
            holder = advisory_lock_holder(conn)
            raise ReindexBusy(
                f"another reindex already runs on {params.where} ({holder}); wait for it to finish, "
                "or end that session if it is stuck"
            )
        yield conn
        conn.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (ADVISORY_LOCK_NAME,))
    finally:
        conn.close()


def advisory_lock_holder(conn: psycopg.Connection) -> str:
    row = conn.execute(
        """
        SELECT a.pid, a.application_name, a.backend_start
        FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
        WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
          AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtextextended(%s, 0)
        """,
        (ADVISORY_LOCK_NAME,),
    ).fetchone()
    if row is None:
        return "holder not visible"
    return f"pid {row[0]}, application {row[1] or '-'}, connected since {row[2]:%Y-%m-%d %H:%M:%S %Z}"


# -- who is the REINDEX waiting for -----------------------------------------------------------------------

BLOCKERS_QUERY = """
SELECT a.wait_event_type, a.wait_event, b.pid, b.application_name, b.state,
       to_char(b.xact_start AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'), left(b.query, 200)
FROM pg_stat_activity a
CROSS JOIN LATERAL unnest(pg_blocking_pids(a.pid)) AS bp(pid)
JOIN pg_stat_activity b ON b.pid = bp.pid
WHERE a.pid = %s
"""


def waiting_for(wait_event: str | None) -> str:
    if wait_event == "relation":
        return "lock on the table the REINDEX needs"
    if wait_event in ("virtualxid", "transactionid"):
        return "old transaction/snapshot the REINDEX waits out"
    return f"lock the REINDEX waited for ({wait_event})"


PROGRESS_QUERY = """
SELECT phase, blocks_done, blocks_total, tuples_done, tuples_total, lockers_done, lockers_total
FROM pg_stat_progress_create_index WHERE pid = %s
"""


def describe_progress(
    phase: str, blocks: tuple[int, int], tuples: tuple[int, int], lockers: tuple[int, int], rate: float | None
) -> str:
    """One line from pg_stat_progress_create_index: the phase, how far into it, and an ETA for it."""
    for unit, (done, total) in (("blocks", blocks), ("tuples", tuples), ("sessions waited for", lockers)):
        if total:
            line = f"{phase}: {done:,}/{total:,} {unit} ({done / total:.0%})"
            if rate and unit == "blocks" and done < total:
                line += f", about {int((total - done) / rate)} s left in this phase"
            return line
    return phase


class BlockerWatch:
    """Polls pg_blocking_pids(<rebuild pid>) from its own connection while the rebuild runs, and, with
    `progress`, reports pg_stat_progress_create_index every `progress_interval` seconds: a REINDEX of a
    large index runs for an hour, and someone watching the UI must see it move (or see what it waits on).
    """

    def __init__(
        self,
        params: ConnParams,
        pid: int,
        interval: float = 0.05,
        progress: Callable[[str], None] | None = None,
        progress_interval: float = 10.0,
    ) -> None:
        self.params = params
        self.pid = pid
        self.interval = interval
        self.progress = progress
        self.progress_interval = progress_interval
        self._last_blocks: tuple[float, int] | None = None
        self.blockers: dict[int, Blocker] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"reindex-watch-{pid}", daemon=True)

    def _report_progress(self, conn: psycopg.Connection) -> None:
        row = conn.execute(PROGRESS_QUERY, (self.pid,)).fetchone()
        if row is None or self.progress is None:
            return
        phase, blocks_done, blocks_total, tuples_done, tuples_total, lockers_done, lockers_total = row
        now = time.monotonic()
        rate = None
        if self._last_blocks is not None and blocks_done > self._last_blocks[1]:
            rate = (blocks_done - self._last_blocks[1]) / max(now - self._last_blocks[0], 1e-6)
        self._last_blocks = (now, blocks_done)
        line = describe_progress(
            phase,
            (blocks_done, blocks_total),
            (tuples_done, tuples_total),
            (lockers_done, lockers_total),
            rate,
        )
        if "waiting" in phase and self.blockers:
            line += f"; waiting for pid {', '.join(str(pid) for pid in self.blockers)}"
        self.progress(line)

    def __enter__(self) -> BlockerWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            conn = connect(replace(self.params, application_name=f"{REINDEX_APPLICATION}-watch"))
        except DbopsError:
            return
        last_report = time.monotonic()
        with conn:
            while not self._stop.wait(self.interval):
                try:
                    rows = conn.execute(BLOCKERS_QUERY, (self.pid,)).fetchall()
                    for _, event, pid, app, state, xact_start, query in rows:
                        if pid not in self.blockers:
                            self.blockers[pid] = Blocker(
                                pid,
                                app or "",
                                state or "",
                                xact_start or "-",
                                query or "",
                                waiting_for(event),
                            )
                    if self.progress is not None and time.monotonic() - last_report >= self.progress_interval:
                        last_report = time.monotonic()
                        self._report_progress(conn)
                except psycopg.Error:
                    return


# -- leftovers --------------------------------------------------------------------------------------------


def leftovers_of(conn: psycopg.Connection, schema: str, table: str) -> list[tuple[int, str]]:
    """Invalid `_ccnew` / `_ccold` indexes on a table: what failed concurrent builds leave behind."""
    rows = conn.execute(
        """
        SELECT c.oid::bigint, c.relname
        FROM pg_index i
        JOIN pg_class c ON c.oid = i.indexrelid
        JOIN pg_class t ON t.oid = i.indrelid
        JOIN pg_namespace n ON n.oid = t.relnamespace
        WHERE n.nspname = %s AND t.relname = %s AND NOT i.indisvalid
          AND c.relname ~ '_cc(new|old)[0-9]*$'
        ORDER BY 2
        """,
        (schema, table),
    ).fetchall()
    return [(int(oid), name) for oid, name in rows]


def drop_index_concurrently(
    params: ConnParams,
    schema: str,
    name: str,
    lock_timeout_s: float,
    retries: int = 3,
    backoff_s: float = 1.0,
    sleep: Callable[[float], None] = time.sleep,
) -> str | None:
    """DROP INDEX CONCURRENTLY with the same lock discipline as the rebuild; the error text, or None."""
    statement = sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}.{}").format(
        sql.Identifier(schema), sql.Identifier(name)
    )
    error = None
    with connect(reindex_params(params)) as conn:
        set_session_timeouts(conn, lock_timeout_s)
        for attempt in range(retries + 1):
            try:
                conn.execute(statement)
                return None
            except RETRYABLE as exc:
                error = first_line(exc)
                if attempt < retries:
                    sleep(backoff_s * 2**attempt)
            except psycopg.Error as exc:
                return first_line(exc)
    return error


# -- the rebuild ------------------------------------------------------------------------------------------


def table_of(conn: psycopg.Connection, schema: str, name: str) -> str | None:
    row = conn.execute(
        """
        SELECT t.relname FROM pg_index i
        JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_class t ON t.oid = i.indrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %s AND c.relname = %s
        """,
        (schema, name),
    ).fetchone()
    return row[0] if row else None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def rebuild_index(
    params: ConnParams,
    schema: str,
    name: str,
    *,
    lock_timeout_s: float,
    retries: int,
    backoff_s: float = 1.0,
    on_retry: Callable[[int, RebuildResult], None] | None = None,  # after a failed attempt, before cleanup
    sleep: Callable[[float], None] = time.sleep,
    progress: Callable[[str], None] | None = None,
    progress_interval: float = 10.0,
) -> RebuildResult:
    """REINDEX INDEX CONCURRENTLY one index; lock timeouts retried, leftovers of failed attempts dropped.

    Returns a result rather than raising for database-side failures, so the caller can go on with the
    next index; connection failures raise the named errors of flows.core.postgres.
    """
    params = reindex_params(params)
    result = RebuildResult(schema, name, "failed", 0, 0.0)
    statement = sql.SQL("REINDEX INDEX CONCURRENTLY {}.{}").format(
        sql.Identifier(schema), sql.Identifier(name)
    )
    start = time.monotonic()
    with connect(params) as conn:
        set_session_timeouts(conn, lock_timeout_s)
        table = table_of(conn, schema, name)
        if table is None:
            result.error = f"index {schema}.{name} no longer exists"
            return result
        pid = conn.info.backend_pid
        for attempt in range(1, retries + 2):
            result.attempts = attempt
            before = {oid for oid, _ in leftovers_of(conn, schema, table)}
            retryable = False
            with BlockerWatch(params, pid, progress=progress, progress_interval=progress_interval) as watch:
                try:
                    conn.execute(statement)
                    result.status, result.error = "rebuilt", None
                except RETRYABLE as exc:
                    result.error, retryable = first_line(exc), True
                except pgerrors.FeatureNotSupported as exc:
                    result.status, result.error = "refused", first_line(exc)
                except psycopg.OperationalError as exc:
                    if conn.broken:
                        result.error = f"lost the connection during the rebuild: {first_line(exc)}"
                        break
                    result.error = first_line(exc)
                except psycopg.Error as exc:
                    result.error = first_line(exc)
            for blocker in watch.blockers.values():
                if blocker.pid not in {b.pid for b in result.blockers}:
                    result.blockers.append(blocker)
            if result.status == "rebuilt" or result.status == "refused":
                break
            will_retry = retryable and attempt <= retries
            if will_retry and on_retry is not None:
                on_retry(attempt, result)
            for oid, leftover in leftovers_of(conn, schema, table):
                if oid in before:
                    continue
                problem = drop_index_concurrently(
                    params, schema, leftover, lock_timeout_s, retries, backoff_s
                )
                (result.leftovers_remaining if problem else result.leftovers_dropped).append(leftover)
            if not will_retry:
                break
            sleep(backoff_s * 2 ** (attempt - 1))
    if result.status == "failed" and conn.broken:
        with connect(params) as fresh:  # the failed attempt's leftover still has to go
            for oid, leftover in leftovers_of(fresh, schema, table):
                if oid not in before:
                    problem = drop_index_concurrently(
                        params, schema, leftover, lock_timeout_s, retries, backoff_s
                    )
                    (result.leftovers_remaining if problem else result.leftovers_dropped).append(leftover)
    result.seconds = round(time.monotonic() - start, 3)
    return result


# -- VACUUM ANALYZE ---------------------------------------------------------------------------------------


def vacuum_analyze(
    params: ConnParams, tables: list[tuple[str, str]] | None, lock_timeout_s: float
) -> dict[str, str | None]:
    """VACUUM ANALYZE the given tables (or, with None, the whole database); errors per table, not raised."""
    outcome: dict[str, str | None] = {}
    with connect(reindex_params(params)) as conn:
        set_session_timeouts(conn, lock_timeout_s)
        if tables is None:
            try:
                conn.execute("VACUUM (ANALYZE, SKIP_LOCKED)")  # a busy table is skipped, not waited for
                outcome["(database)"] = None
            except psycopg.Error as exc:
                outcome["(database)"] = first_line(exc)
            return outcome
        for schema, table in tables:
            statement = sql.SQL("VACUUM ANALYZE {}.{}").format(sql.Identifier(schema), sql.Identifier(table))
            try:
                conn.execute(statement)
                outcome[f"{schema}.{table}"] = None
            except psycopg.Error as exc:
                outcome[f"{schema}.{table}"] = first_line(exc)
    return outcome


def analyze_tables(params: ConnParams, tables: list[tuple[str, str]], lock_timeout_s: float) -> None:
    """ANALYZE before trusting a catalog estimate: stale reltuples make healthy indexes look bloated."""
    with connect(reindex_params(params)) as conn:
        set_session_timeouts(conn, lock_timeout_s)
        for schema, table in tables:
            try:
                conn.execute(sql.SQL("ANALYZE {}.{}").format(sql.Identifier(schema), sql.Identifier(table)))
            except psycopg.Error:
                continue  # the estimate stays as it was; the rebuild decides on that
