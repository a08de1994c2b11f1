"""PgBouncer's health, read from its admin console (the database `pgbouncer`): are clients waiting for a
server connection, how long, is a pool saturated, and do PgBouncer's server connections fit into
PostgreSQL's max_connections?

Readers take a psycopg connection to the console (`SHOW POOLS`, `SHOW STATS`, `SHOW DATABASES`,
`SHOW CONFIG`; a user listed in PgBouncer's `stats_users` is enough) and return plain rows; judges are
pure and return `Check`s with the figures. The application goes through PgBouncer: a pool whose clients
queue is the application waiting, which is why it is worth a check every 15 minutes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg
from pydantic import BaseModel, Field

from flows.core.errors import (
    AuthenticationFailed,
    ConfigurationError,
    DatabaseUnreachable,
    PgBouncerUnhealthy,  # noqa: F401 - defined in flows.core.errors, importable here
)
from flows.core.health import Check
from flows.core.postgres import ConnParams, scrub

#: PgBouncer's own pseudo-database: its pool is the console, not an application's
ADMIN_DATABASE = "pgbouncer"


class PoolerThresholds(BaseModel):
    """When PgBouncer's figures become a warning or a failed run."""

    warn_maxwait_seconds: float = Field(
        default=1.0, ge=0, description="Warning when the oldest waiting client has waited this long (s)."
    )
    critical_maxwait_seconds: float = Field(
        default=10.0,
        ge=0,
        description="Critical (the run fails) when the oldest waiting client has waited this long (s).",
    )
    warn_saturation: float = Field(
        default=0.8,
        gt=0,
        le=1,
        description="Warning when this fraction of a pool's server connections (pool_size + "
        "reserve_pool) is busy; all of them busy with clients waiting is critical.",
    )
    warn_server_connections: float = Field(
        default=0.8,
        gt=0,
        le=1,
        description="Warning when PostgreSQL's connections in use reach this fraction of max_connections "
        "minus superuser_reserved_connections (needs the database block).",
    )
    critical_server_connections: float = Field(
        default=0.95, gt=0, le=1, description="Critical at this fraction (needs the database block)."
    )


# -- readers -----------------------------------------------------------------------------------------------


def connect_console(params: ConnParams) -> psycopg.Connection:
    """A connection to PgBouncer's console at the block's host and port (database `pgbouncer`), with
    sentences for PgBouncer's own refusals."""
    console = params.with_database(ADMIN_DATABASE)
    try:
        return psycopg.connect(console.conninfo(), password=console.password or None, autocommit=True)
    except psycopg.OperationalError as exc:
        text = str(exc)
        where = f"{params.host}:{params.port}"
        if "not allowed" in text:
            raise ConfigurationError(
                f"PgBouncer at {where} does not let {params.user!r} read its console; add the user to "
                "stats_users (or admin_users) in pgbouncer.ini and reload PgBouncer"
            ) from None
        if 'database "pgbouncer" does not exist' in text:
            raise ConfigurationError(
                f"{where} is PostgreSQL, not PgBouncer (it has no console database pgbouncer); point the "
                "pgbouncer block at PgBouncer's listen_addr and listen_port"
            ) from None
        if "authentication failed" in text or "no such user" in text:
            raise AuthenticationFailed(
                f"PgBouncer at {where} rejected the login of {params.user!r} to its console; fix the user or "
                "password of the pgbouncer block (PgBouncer's auth_file or auth_query decides)"
            ) from None
        first = scrub(text.strip().splitlines()[0] if text.strip() else type(exc).__name__, params.password)
        raise DatabaseUnreachable(
            f"cannot reach PgBouncer's console at {where} ({first}); check that PgBouncer runs and the "
            "block's host and port are its listen_addr and listen_port"
        ) from None


def console_rows(conn: psycopg.Connection, command: str) -> list[dict[str, object]]:
    """One console command as rows of dicts (the console speaks the simple query protocol only)."""
    cur = conn.execute(command, prepare=False)
    if not cur.description:
        return []
    names = [d.name for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


@dataclass
class PgBouncerSnapshot:
    version: str
    pools: list[dict[str, object]]
    stats: list[dict[str, object]]
    databases: list[dict[str, object]]
    config: dict[str, str]


def read_pgbouncer(conn: psycopg.Connection) -> PgBouncerSnapshot:
    version = str(console_rows(conn, "SHOW VERSION")[0].get("version", ""))
    config = {str(r["key"]): str(r["value"]) for r in console_rows(conn, "SHOW CONFIG")}
    return PgBouncerSnapshot(
        version=version,
        pools=console_rows(conn, "SHOW POOLS"),
        stats=console_rows(conn, "SHOW STATS"),
        databases=console_rows(conn, "SHOW DATABASES"),
        config=config,
    )


@dataclass
class ServerLimits:
    """PostgreSQL's side: how many connections it allows ordinary roles, and how many are in use."""

    max_connections: int
    superuser_reserved: int
    in_use: int
    where: str = ""

    @property
    def usable(self) -> int:
        return max(self.max_connections - self.superuser_reserved, 1)


def read_server_limits(conn: psycopg.Connection, where: str = "") -> ServerLimits:
    row = conn.execute(
        "SELECT current_setting('max_connections')::int, "
        "current_setting('superuser_reserved_connections')::int, "
        "(SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')"
    ).fetchone()
    assert row is not None
    return ServerLimits(int(row[0]), int(row[1]), int(row[2]), where)


# -- judges (pure) -----------------------------------------------------------------------------------------


def _int(row: dict[str, object], key: str) -> int:
    value = row.get(key)
    return int(value) if isinstance(value, int | float | str) and str(value).strip() else 0


def _maxwait_seconds(pool: dict[str, object]) -> float:
    return _int(pool, "maxwait") + _int(pool, "maxwait_us") / 1_000_000


def _servers(pool: dict[str, object]) -> int:
    return sum(_int(pool, k) for k in ("sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login"))


@dataclass
class PoolLimit:
    pool_size: int
    reserve: int

    @property
    def total(self) -> int:
        return self.pool_size + self.reserve


@dataclass
class _Limits:
    by_database: dict[str, PoolLimit] = field(default_factory=dict)
    default: PoolLimit = field(default_factory=lambda: PoolLimit(20, 0))


def _limits(snap: PgBouncerSnapshot) -> _Limits:
    default = PoolLimit(
        int(snap.config.get("default_pool_size", "20") or 20),
        int(snap.config.get("reserve_pool_size", "0") or 0),
    )
    by_db = {}
    for db in snap.databases:
        name = str(db.get("name"))
        size = _int(db, "pool_size") or default.pool_size
        reserve = _int(db, "reserve_pool") if db.get("reserve_pool") is not None else default.reserve
        by_db[name] = PoolLimit(size, reserve)
    return _Limits(by_db, default)


def check_waiting(pool: dict[str, object], thresholds: PoolerThresholds) -> Check:
    name = f"waiting clients {pool.get('database')}/{pool.get('user')}"
    waiting, active = _int(pool, "cl_waiting"), _int(pool, "cl_active")
    maxwait = _maxwait_seconds(pool)
    figure = f"{waiting} waiting, {active} active clients; oldest waiting {maxwait:.1f} s"
    if waiting == 0:
        return Check(name=name, status="ok", figure=figure)
    status = "critical" if maxwait >= thresholds.critical_maxwait_seconds else "warning"
    return Check(
        name=name,
        status=status,
        figure=figure,
        message=f"{waiting} clients of pool {pool.get('database')}/{pool.get('user')} wait for a server "
        f"connection, the oldest for {maxwait:.1f} s",
        action="look for long transactions holding the pool's server connections (pg_stat_activity, "
        "state 'idle in transaction' or long 'active'), or raise pool_size if PostgreSQL has room",
    )


def check_saturation(pool: dict[str, object], limit: PoolLimit, thresholds: PoolerThresholds) -> Check:
    name = f"pool saturation {pool.get('database')}/{pool.get('user')}"
    busy, waiting = _int(pool, "sv_active"), _int(pool, "cl_waiting")
    ratio = busy / limit.total if limit.total else 1.0
    figure = (
        f"{busy} of {limit.total} server connections busy (pool_size {limit.pool_size} + reserve_pool "
        f"{limit.reserve}), {_servers(pool)} open, {ratio:.0%}"
    )
    if busy >= limit.total and waiting > 0:
        status = "critical"
    elif ratio >= thresholds.warn_saturation:
        status = "warning"
    else:
        return Check(name=name, status="ok", figure=figure)
    return Check(
        name=name,
        status=status,
        figure=figure,
        message=f"pool {pool.get('database')}/{pool.get('user')} has {busy} of its {limit.total} server "
        f"connections busy" + (f" and {waiting} clients waiting" if waiting else ""),
        action="find what holds them (long transactions, idle in transaction) or raise pool_size / "
        "reserve_pool_size within PostgreSQL's max_connections",
    )


def check_stats(row: dict[str, object], thresholds: PoolerThresholds) -> Check:
    name = f"traffic {row.get('database')}"
    wait_s = _int(row, "avg_wait_time") / 1_000_000
    figure = (
        f"{_int(row, 'avg_xact_count')} transactions/s, average transaction "
        f"{_int(row, 'avg_xact_time') / 1000:.1f} ms, average wait for a server {wait_s * 1000:.1f} ms"
    )
    if wait_s < thresholds.warn_maxwait_seconds:
        return Check(name=name, status="ok", figure=figure)
    return Check(
        name=name,
        status="warning",
        figure=figure,
        message=f"clients of {row.get('database')} wait {wait_s:.1f} s on average for a server connection",
        action="the pool is too small for the load or transactions are too long; see the pool checks",
    )


def check_server_connections(
    snap: PgBouncerSnapshot, server: ServerLimits | None, thresholds: PoolerThresholds
) -> Check:
    name = "server connections"
    pools = [p for p in snap.pools if p.get("database") != ADMIN_DATABASE]
    held = sum(_servers(p) for p in pools)
    limits = _limits(snap)
    may_open = sum(limits.by_database.get(str(p.get("database")), limits.default).total for p in pools)
    figure = f"PgBouncer holds {held} server connections, its pools may open {may_open}"
    if server is None:
        return Check(name=name, status="skipped", figure=figure + "; no database block to compare with")
    at = f" {server.where}" if server.where else ""
    figure += f"; PostgreSQL{at} has {server.in_use} of {server.usable} connections in use"
    ratio = server.in_use / server.usable
    status = (
        "critical"
        if ratio >= thresholds.critical_server_connections
        else "warning"
        if ratio >= thresholds.warn_server_connections or may_open > server.usable
        else "ok"
    )
    if status == "ok":
        return Check(name=name, status="ok", figure=figure)
    if ratio >= thresholds.warn_server_connections:
        message = f"PostgreSQL has {server.in_use} of {server.usable} connections in use ({ratio:.0%})"
    else:
        message = (
            f"PgBouncer's pools may open {may_open} server connections, PostgreSQL allows {server.usable}"
        )
    return Check(
        name=name,
        status=status,
        figure=figure,
        message=message,
        action="lower pool_size / max_db_connections in pgbouncer.ini or raise max_connections, so "
        "PostgreSQL never refuses PgBouncer (and dbops' own direct connections)",
    )


def judge(snap: PgBouncerSnapshot, server: ServerLimits | None, thresholds: PoolerThresholds) -> list[Check]:
    """Every check, pool by pool, then the totals."""
    limits = _limits(snap)
    checks: list[Check] = []
    for pool in snap.pools:
        if pool.get("database") == ADMIN_DATABASE:
            continue
        limit = limits.by_database.get(str(pool.get("database")), limits.default)
        checks.append(check_waiting(pool, thresholds))
        checks.append(check_saturation(pool, limit, thresholds))
    for row in snap.stats:
        if row.get("database") != ADMIN_DATABASE:
            checks.append(check_stats(row, thresholds))
    checks.append(check_server_connections(snap, server, thresholds))
    return checks
