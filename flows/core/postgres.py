"""Connecting to PostgreSQL and handing libpq tools their credentials, without leaking the password.

psycopg reports connection failures as one OperationalError with libpq's text; we turn the common ones
into named errors with a fix, and keep the password out of conninfo strings that could be logged.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.abc import Params

from flows.core.childenv import child_environment
from flows.core.errors import (
    AuthenticationFailed,
    DatabaseMissing,
    DatabaseUnreachable,
    DbopsError,
    PermissionDenied,
)
from flows.core.pooler_refusal import pooler_login_refusal
from flows.core.tablenames import table_key


@dataclass(frozen=True)
class ConnParams:
    """Where and as whom to connect; the block turns into this so `core` never imports Prefect."""

    host: str
    port: int
    database: str
    user: str
    password: str | None = None
    sslmode: str = "prefer"
    application_name: str = "dbops"
    connect_timeout: int = 10

    def with_database(self, database: str) -> ConnParams:
        return replace(self, database=database)

    @property
    def where(self) -> str:
        return f"{self.user}@{self.host}:{self.port}/{self.database}"

    def conninfo(self) -> str:
        """A conninfo without the password: safe to log; the password goes in as a separate keyword."""
        return psycopg.conninfo.make_conninfo(
            host=self.host,
            port=self.port,
            dbname=self.database,
            user=self.user,
            sslmode=self.sslmode,
            application_name=self.application_name,
            connect_timeout=self.connect_timeout,
        )

    def __repr__(self) -> str:  # never show the password, even in a traceback's locals
        return f"ConnParams({self.where}, sslmode={self.sslmode})"


def classify_connect_error(exc: psycopg.Error, params: ConnParams) -> DbopsError:
    """Turn libpq's text into a named error with one sentence; the password never appears in it."""
    text = str(exc)
    where = params.where
    pooler = pooler_login_refusal(text, params.host, params.port)
    if pooler is not None:  # PgBouncer's own words: not "is the server up?" but "wrong port"
        return pooler
    if "password authentication failed" in text or "authentication failed" in text:
        return AuthenticationFailed(
            f"PostgreSQL rejected the password for user {params.user!r} at {params.host}:{params.port}; "
            "fix the password in the database block"
        )
    if re.search(r'database ".*" does not exist', text):
        return DatabaseMissing(
            f"database {params.database!r} does not exist on {params.host}:{params.port}; "
            "create it or fix the database name in the block"
        )
    if "no pg_hba.conf entry" in text:
        return PermissionDenied(
            f"pg_hba.conf on {params.host}:{params.port} does not allow {where}; add a host entry for this "
            "client or use another user"
        )
    if re.search(r'role ".*" does not exist', text):
        return AuthenticationFailed(
            f"role {params.user!r} does not exist on {params.host}:{params.port}; fix the user in the block"
        )
    if "permission denied" in text:
        return PermissionDenied(f"permission denied connecting as {where}; grant CONNECT on the database")
    if "translate host name" in text or "Name or service not known" in text:
        return DatabaseUnreachable(f"cannot resolve host {params.host!r}; fix the host in the database block")
    if (
        "too many connections" in text
        or "the database system is starting up" in text
        or ("shutting down" in text)
    ):
        return DatabaseUnreachable(
            f"PostgreSQL at {params.host}:{params.port} is not accepting connections "
            "right now; it will be retried"
        )
    first = scrub(text.strip().splitlines()[0] if text.strip() else type(exc).__name__, params.password)
    return DatabaseUnreachable(
        f"cannot reach PostgreSQL at {params.host}:{params.port} ({first}); check that the server is up "
        "and the host and port in the block are right"
    )


def connect(params: ConnParams, *, autocommit: bool = True, **kwargs: Any) -> psycopg.Connection:
    try:
        return psycopg.connect(
            params.conninfo(),
            password=params.password or None,
            autocommit=autocommit,
            **kwargs,
        )
    except psycopg.OperationalError as exc:
        raise classify_connect_error(exc, params) from None


def scrub(text: str, *secrets_: str | None) -> str:
    """Remove secrets from text meant for logs, artifacts and exceptions."""
    for secret in secrets_:
        if secret:
            text = text.replace(secret, "********")
    return re.sub(r"(password\s*=\s*)\S+", r"\1********", text, flags=re.IGNORECASE)


#: passfiles live in private temporary directories named
#: `dbops-pass-<host>-<pid>-<process start>-<random>` (host: a short hash of the host name, so a /tmp
#: shared between containers never has one judge the pids of another)
PASS_DIR_PREFIX = "dbops-pass-"
_PASS_DIR_RE = re.compile(
    re.escape(PASS_DIR_PREFIX) + r"(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-(?P<start>\d+|x)-"
)


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def pass_dir_prefix(pid: int | None = None) -> str:
    """The name prefix of the passfile directories process `pid` (default: this one) creates."""
    pid = os.getpid() if pid is None else pid
    start = _process_start(pid)
    return f"{PASS_DIR_PREFIX}{_host_tag()}-{pid}-{start[1] if start else 'x'}-"


def _process_start(pid: int) -> tuple[str, str] | None:
    """(state, start time) of a process from /proc/<pid>/stat; the start time tells a reused pid apart."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], fields[19]


def _process_alive(pid: int, start: str) -> bool:
    """Whether the process that created a passfile directory still runs (not a zombie, not a reused pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process has that pid now: not ours to judge, keep the directory
    now = _process_start(pid)
    if now is None:
        return True  # no /proc: the pid answers, so assume it is the creator
    state, started = now
    return state != "Z" and (start == "x" or started == start)


def remove_stale_passfiles(directory: str | None = None) -> list[Path]:
    """Remove passfile directories of this user whose creating process is gone (killed with SIGKILL, or
    a crashed worker), so a password does not outlive the run that needed it; never one a live process
    uses. Directories of another user, or not named by this version, are left alone."""
    removed: list[Path] = []
    host = _host_tag()
    root = Path(directory or tempfile.gettempdir())
    try:
        entries = list(root.glob(PASS_DIR_PREFIX + "*"))
    except OSError:
        return removed
    for entry in entries:
        m = _PASS_DIR_RE.match(entry.name)
        if not m or m.group("host") != host:
            continue
        try:
            st = entry.lstat()
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            continue
        if _process_alive(int(m.group("pid")), m.group("start")):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


@contextmanager
def passfile(params: ConnParams) -> Iterator[str]:
    """The path of a 0600 passfile holding the password (os.devnull without one), removed afterwards.

    It sits in a private 0700 directory named after this process, so the next run can tell a directory
    left by a killed run (removed first) from one a live run is using.
    """
    remove_stale_passfiles()
    if not params.password:
        yield os.devnull
        return
    tmp = tempfile.mkdtemp(prefix=pass_dir_prefix())
    try:
        path = Path(tmp) / f"pgpass-{secrets.token_hex(4)}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)

        def esc(value: str) -> str:
            return value.replace("\\", "\\\\").replace(":", "\\:")

        with os.fdopen(fd, "w") as f:
            f.write(":".join(["*", "*", "*", esc(params.user), esc(params.password)]) + "\n")
        yield str(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def libpq_environment(params: ConnParams) -> Iterator[dict[str, str]]:
    """Environment for pg_dump & co: the password in a 0600 passfile, never in argv or a PG* variable.

    Built on `child_environment`: the worker's own variables reach the tool only when allowlisted
    (PGSSL* yes, AWS_* or PREFECT_API_KEY no); where and as whom to connect come from the block.
    """
    extra = {
        "PGHOST": params.host,
        "PGPORT": str(params.port),
        "PGUSER": params.user,
        "PGDATABASE": params.database,
        "PGSSLMODE": params.sslmode,
        "PGAPPNAME": params.application_name,
        "PGCONNECT_TIMEOUT": str(params.connect_timeout),
    }
    with passfile(params) as path:
        extra["PGPASSFILE"] = path
        yield child_environment(extra)


def one_row(
    conn: psycopg.Connection, query: str | sql.SQL | sql.Composed, params: Params | None = None
) -> tuple[Any, ...]:
    """The row of a query that always returns exactly one (SHOW, SELECT f(), count(*)): psycopg types
    `fetchone()` as optional, so the "no row" case is named here once instead of at every call."""
    row = conn.execute(query, params).fetchone()
    if row is None:
        raise DbopsError(f"PostgreSQL returned no row for {query!r}, which always returns one; report it")
    return row


def scalar(
    conn: psycopg.Connection, query: str | sql.SQL | sql.Composed, params: Params | None = None
) -> Any:
    """The first column of `one_row`."""
    return one_row(conn, query, params)[0]


def server_version_num(conn: psycopg.Connection) -> int:
    return int(scalar(conn, "SHOW server_version_num"))


def version_text(version_num: int) -> str:
    """server_version_num as people write it: 150018 -> "15.18", 90624 -> "9.6.24" (before 10 the
    major version had two parts)."""
    if version_num >= 100000:
        return f"{version_num // 10000}.{version_num % 10000}"
    return f"{version_num // 10000}.{version_num // 100 % 100}.{version_num % 100}"


def alembic_revision(conn: psycopg.Connection) -> str | None:
    """The Alembic revision recorded in the database, if it uses Alembic (public or search_path table)."""
    row = conn.execute("SELECT to_regclass('alembic_version') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return None
    revs = [r[0] for r in conn.execute("SELECT version_num FROM alembic_version ORDER BY 1").fetchall()]
    return ",".join(revs) if revs else None


def table_row_estimates(conn: psycopg.Connection) -> tuple[dict[str, int], dict[str, int]]:
    """Two row estimates per user table (keyed by `tablenames.table_key`: "schema.table", a name with a dot
    quoted), cheap on any size of database, each wrong in its own way, so the restore drill accepts a count
    that agrees with either:

    - live: the statistics' live-tuple count (n_live_tup), which follows every committed insert and
      delete; reltuples stands in after the statistics were reset (a crash). It is doubled for rows an
      ANALYZE counted while their inserting session had not yet flushed its statistics (a table
      bulk-loaded and analysed within a second, in one session).
    - planner: reltuples, as of the last VACUUM or ANALYZE, so it lags behind growth; -1 (never
      analysed, PostgreSQL 14+) tells readers it is unknown.
    """
    rows = conn.execute(
        """
        SELECT n.nspname, c.relname,
               CASE WHEN s.n_live_tup IS NULL OR (s.n_live_tup = 0 AND c.reltuples > 0)
                    THEN c.reltuples::bigint ELSE s.n_live_tup END,
               c.reltuples::bigint
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
        WHERE c.relkind IN ('r', 'p', 'm')
          AND n.nspname NOT IN ('pg_catalog', 'information_schema')
          AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'
        ORDER BY 1, 2
        """
    ).fetchall()
    live = {table_key(s, t): int(n) for s, t, n, _ in rows}
    planner = {table_key(s, t): int(r) for s, t, _, r in rows}
    return live, planner


def dumpable_tables(conn: psycopg.Connection) -> list[str]:
    """Plain tables whose rows pg_dump writes as TABLE DATA ("schema.table"): what verification expects.

    Partitioned parents hold no rows themselves, materialized views are refreshed rather than copied,
    and tables that belong to an extension are recreated by CREATE EXTENSION.
    """
    rows = conn.execute(
        """
        SELECT n.nspname, c.relname
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind = 'r' AND c.relpersistence <> 't'
          AND n.nspname NOT IN ('pg_catalog', 'information_schema')
          AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'
          AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                          AND d.objid = c.oid AND d.deptype = 'e')
        ORDER BY 1, 2
        """
    ).fetchall()
    return [f"{s}.{t}" for s, t in rows]


def unreadable_tables(conn: psycopg.Connection) -> list[str]:
    """Tables the connected role cannot SELECT: pg_dump would fail on them hours into the dump."""
    rows = conn.execute(
        """
        SELECT n.nspname || '.' || c.relname
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p', 'm', 'S')
          AND n.nspname NOT IN ('pg_catalog', 'information_schema')
          AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'
          AND NOT has_table_privilege(c.oid, 'SELECT')
        ORDER BY 1
        """
    ).fetchall()
    return [r[0] for r in rows]


def database_size(conn: psycopg.Connection) -> int:
    return int(scalar(conn, "SELECT pg_database_size(current_database())"))


def quote_ident(name: str) -> sql.Identifier:
    return sql.Identifier(name)


#: tables at most this large (heap bytes) get an exact count(*) in the dump's snapshot
EXACT_COUNT_MAX_BYTES = 8 * 1024 * 1024


@dataclass
class SnapshotFacts:
    """What the database held in the snapshot pg_dump dumped: exactly what the backup contains."""

    snapshot: str
    exact_row_counts: dict[str, int]
    alembic_revision: str | None
    #: dumpable tables in the snapshot (`dumpable_tables`); empty: pg_dump writes no TABLE DATA at all
    tables: list[str] | None = None


class ExportedSnapshot:
    """A REPEATABLE READ transaction whose snapshot pg_dump imports with `--snapshot`.

    Facts read in it (exact counts of small tables, the Alembic revision) describe precisely the rows the
    dump holds, so the restore drill can compare small tables exactly without false alarms from planner
    estimates that ANALYZE has not refreshed, or from writes between preflight and dump. The exporting
    transaction must stay open only until pg_dump has imported the snapshot; `release()` ends it as soon
    as pg_dump's output starts, so no session sits idle in transaction for the length of the dump.
    """

    def __init__(self, params: ConnParams, exact_count_max_bytes: int = EXACT_COUNT_MAX_BYTES) -> None:
        self.conn = connect(params, autocommit=False)
        try:
            self.conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            snapshot = str(scalar(self.conn, "SELECT pg_export_snapshot()"))
            small = self.conn.execute(
                """
                SELECT n.nspname, c.relname
                FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE c.relkind = 'r' AND c.relpersistence <> 't'
                  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                  AND n.nspname NOT LIKE 'pg_toast%%' AND n.nspname NOT LIKE 'pg_temp%%'
                  AND pg_relation_size(c.oid) <= %s
                  AND has_table_privilege(c.oid, 'SELECT')
                ORDER BY 1, 2
                """,
                (exact_count_max_bytes,),
            ).fetchall()
            counts = {}
            for schema, table in small:
                query = sql.SQL("SELECT count(*) FROM {}.{}").format(
                    sql.Identifier(schema), sql.Identifier(table)
                )
                counts[table_key(schema, table)] = int(scalar(self.conn, query))
            self.facts = SnapshotFacts(
                snapshot, counts, alembic_revision(self.conn), tables=dumpable_tables(self.conn)
            )
        except BaseException:
            self.conn.close()
            raise

    def release(self) -> None:
        if not self.conn.closed:
            try:
                self.conn.rollback()
            finally:
                self.conn.close()

    def __enter__(self) -> ExportedSnapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
