"""db_health's checks of one database, in the order a person reads them, and the result they make.

`inspect_database` takes an open connection (autocommit) and runs every group through
`probe.run_group`: each group's queries under their own statement_timeout, so a slow or locked one is
that group's critical check and the rest still run; a lost connection ends the run with one sentence.
A role with pg_monitor is enough; what needs more is skipped with the GRANT that enables it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime

import psycopg
from pydantic import BaseModel, Field

from flows.core.errors import DbopsError
from flows.core.health import Check, Status, first_critical, worst
from flows.core.health.activity import activity_checks
from flows.core.health.cache import cache_checks
from flows.core.health.connections import connection_checks
from flows.core.health.history import SizeHistory
from flows.core.health.indexes import index_checks
from flows.core.health.probe import HealthInterrupted, Probe, run_group
from flows.core.health.queries import top_query_checks
from flows.core.health.replication import replication_checks
from flows.core.health.sequences import sequence_checks
from flows.core.health.size import disk_checks, size_checks
from flows.core.health.thresholds import SEED_PRESCRIBED, HealthThresholds, PrescribedIndex
from flows.core.health.vacuum import vacuum_checks
from flows.core.health.wraparound import wraparound_checks

LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", ""}


class DatabaseUnhealthy(DbopsError):
    """A check found something critical: the run fails so the failure automation notifies."""


class HealthReport(BaseModel):
    """The full result of one db_health run (the flow's return value; the artifact is drawn from it)."""

    database: str = Field(description="Database checked.")
    where: str = Field(description="user@host:port/database, without the password.")
    server_version: str = Field(default="", description="PostgreSQL's server_version.")
    role: str = Field(default="", description="The role the checks ran as.")
    has_monitor: bool = Field(default=True, description="Whether that role has pg_monitor's rights.")
    checked_at: str = Field(description="UTC time of the run, ISO 8601.")
    status: Status = Field(default="ok", description="Worst status of the checks.")
    checks: list[Check] = Field(default_factory=list, description="Every check with its figure.")
    database_bytes: int | None = Field(default=None, description="pg_database_size of this database.")
    growth_per_day: float | None = Field(default=None, description="Bytes per day over the kept history.")
    history: SizeHistory = Field(default_factory=SizeHistory, description="Daily sizes kept between runs.")
    history_note: str = Field(default="", description="Why the history was not kept, when it was not.")
    largest_tables: list[tuple[str, int]] = Field(
        default_factory=list, description="20 largest tables (bytes)."
    )
    largest_indexes: list[tuple[str, int]] = Field(
        default_factory=list, description="20 largest indexes (bytes)."
    )
    top_queries: list[dict[str, object]] = Field(
        default_factory=list, description="pg_stat_statements top 10."
    )
    vacuum_tables: list[tuple[str, str]] = Field(
        default_factory=list, description="(schema, table) the dead-rows check flagged: vacuum=true's list."
    )
    vacuumed: dict[str, str | None] = Field(
        default_factory=dict, description="vacuum=true: table -> None when vacuumed, else the error."
    )
    wal_check_artifact: str = Field(default="", description="Artifact key of the WAL archive check's result.")
    seconds: dict[str, float] = Field(default_factory=dict, description="Seconds each group of checks took.")

    @property
    def problems(self) -> list[Check]:
        return [c for c in self.checks if c.status in ("critical", "warning")]

    def first_critical(self) -> Check | None:
        return first_critical(self.checks)


def is_local(host: str) -> bool:
    """dbops and PostgreSQL share a machine: only then is the data directory's free space readable."""
    return host in LOCAL_HOSTS or host.startswith("/")


def _session_facts(conn: psycopg.Connection) -> tuple[str, str, bool]:
    row = conn.execute(
        "SELECT current_user, current_setting('server_version'), "
        "pg_has_role(current_user, 'pg_monitor', 'USAGE')"
    ).fetchone()
    assert row is not None
    return str(row[0]), str(row[1]), bool(row[2])


def inspect_database(
    conn: psycopg.Connection,
    *,
    database: str,
    where: str,
    thresholds: HealthThresholds | None = None,
    prescribed: Sequence[PrescribedIndex] | None = None,
    statement_timeout: float = 10.0,
    history: SizeHistory | None = None,
    local_host: bool = False,
    today: date | None = None,
    wal_check_artifact: str = "",
) -> HealthReport:
    """Every check of this database (and of its server where the figure is the server's)."""
    thresholds = thresholds or HealthThresholds()
    prescribed = SEED_PRESCRIBED if prescribed is None else tuple(prescribed)
    today = today or datetime.now(UTC).date()
    try:
        role, version, monitor = _session_facts(conn)
    except psycopg.Error as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise HealthInterrupted(
            f"lost the connection to {where} before the checks ({first}); check that "
            "PostgreSQL is up, then run db_health again"
        ) from None
    probe = Probe(
        conn=conn,
        thresholds=thresholds,
        statement_timeout=statement_timeout,
        where=where,
        database=database,
        role=role,
        has_monitor=monitor,
        local_host=local_host,
    )
    report = HealthReport(
        database=database,
        where=where,
        server_version=version,
        role=role,
        has_monitor=monitor,
        checked_at=datetime.now(UTC).isoformat(timespec="seconds"),
        wal_check_artifact=wal_check_artifact,
    )
    kept = history or SizeHistory()

    def size(p: Probe) -> list[Check]:
        size_checks(p)  # reads the figures into findings; judged below with the growth they imply
        assert p.findings.database_bytes is not None
        report.history = kept.record(today, p.findings.database_bytes)
        report.growth_per_day = report.history.growth_per_day()
        return size_checks_judged(p, report.growth_per_day)

    checks: list[Check] = []
    checks += run_group(probe, "size", size)
    checks += run_group(probe, "disk", lambda p: disk_checks(p, report.growth_per_day))
    checks += run_group(probe, "slow and stuck work", activity_checks)
    checks += run_group(probe, "connections", connection_checks)
    checks += run_group(probe, "wraparound", wraparound_checks)
    checks += run_group(probe, "sequences", sequence_checks)
    checks += run_group(probe, "vacuum", vacuum_checks)
    checks += run_group(probe, "indexes", lambda p: index_checks(p, prescribed))
    checks += run_group(probe, "cache and I/O", cache_checks)
    checks += run_group(probe, "replication", replication_checks)
    checks += run_group(probe, "top queries", top_query_checks)
    f = probe.findings
    if f.free_bytes is not None and f.database_bytes is not None:
        report.history = report.history.record(today, f.database_bytes, f.free_bytes)
    report.checks = checks
    report.status = worst(checks)
    report.database_bytes = f.database_bytes
    report.largest_tables = f.largest_tables
    report.largest_indexes = f.largest_indexes
    report.top_queries = f.top_queries
    report.seconds = dict(f.seconds)
    report.vacuum_tables = list(f.vacuum_tables)
    return report


def size_checks_judged(probe: Probe, growth: float | None) -> list[Check]:
    from flows.core.health.size import SizeFigures, check_size

    f = probe.findings
    figures = SizeFigures(f.database_bytes or 0, f.largest_tables, f.largest_indexes)
    return [check_size(figures, growth, probe.database)]


def recheck_vacuum(
    conn: psycopg.Connection, report: HealthReport, thresholds: HealthThresholds, statement_timeout: float
) -> HealthReport:
    """After vacuum=true: the vacuum group read again, its checks replacing the earlier ones."""
    role, _, monitor = _session_facts(conn)
    probe = Probe(conn, thresholds, statement_timeout, report.where, report.database, role, monitor)
    fresh = run_group(probe, "vacuum", vacuum_checks)
    names = {c.name for c in fresh} | {"vacuum"}
    checks = [c for c in report.checks if c.name not in names]
    at = next((i for i, c in enumerate(report.checks) if c.name in names), len(checks))
    checks[at:at] = fresh
    return report.model_copy(
        update={
            "checks": checks,
            "status": worst(checks),
            "vacuum_tables": list(probe.findings.vacuum_tables),
        }
    )
