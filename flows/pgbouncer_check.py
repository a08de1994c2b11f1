"""pgbouncer_check: is the application's PgBouncer keeping up? Every 15 minutes.

1. console    SHOW POOLS, SHOW STATS, SHOW DATABASES, SHOW CONFIG from PgBouncer's admin console
2. server     (optional) max_connections and connections in use of PostgreSQL itself
3. judge      per pool: clients waiting and for how long; busy server connections against
              pool_size + reserve_pool; per database: average wait; in total: PgBouncer's server
              connections against PostgreSQL's max_connections
4. report     a table artifact with every figure; Failed with the first critical check's sentence
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel, Field

from flows.core.health import Check, Status, first_critical, worst
from flows.core.health.pooler import PgBouncerUnhealthy, PoolerThresholds, judge
from flows.tasks.common import (
    artifact_key,
    failed_state,
    failure_sentence,
    judged_description,
    publish_failure,
    table_lines,
)
from flows.tasks.pooler import read_connection_limits, read_pgbouncer_console


class PgBouncerReport(BaseModel):
    pgbouncer: str = Field(description="The PgBouncer block checked.")
    version: str = Field(description="PgBouncer's SHOW VERSION.")
    pool_mode: str = Field(description="pool_mode from SHOW CONFIG.")
    status: Status = Field(description="The worst status of the checks.")
    checks: list[Check] = Field(description="Every check with its figure.")


@flow(name="pgbouncer-check", log_prints=True)
def pgbouncer_check(
    pgbouncer: str,
    database: str | None = None,
    thresholds: PoolerThresholds | None = None,
) -> PgBouncerReport:
    """Check PgBouncer's pools; Failed, with what to do, when clients queue for a server connection.

    Args:
        pgbouncer: Name of a PostgresDatabase block pointing at PgBouncer (its host, listen_port, and a user
            in stats_users or admin_users); its database is ignored: the console database pgbouncer is used.
        database: Optional PostgresDatabase block of PostgreSQL itself (its own port, not PgBouncer's), to
            compare PgBouncer's server connections with max_connections.
        thresholds: When waits, busy pools and PostgreSQL's connection count become warnings or a failure.
    """
    logger = get_run_logger()
    report: PgBouncerReport | None = None
    published = False  # a judged failure keeps its table: every check with its figure
    try:
        thresholds = thresholds or PoolerThresholds()
        snap = read_pgbouncer_console(pgbouncer)
        server = read_connection_limits(database) if database else None
        checks = judge(snap, server, thresholds)
        report = PgBouncerReport(
            pgbouncer=pgbouncer,
            version=snap.version,
            pool_mode=snap.config.get("pool_mode", ""),
            status=worst(checks),
            checks=checks,
        )
        _publish(report)
        published = True
        for check in checks:
            if check.status in ("warning", "critical"):
                logger.warning("%s %s: %s (%s)", check.status, check.name, check.sentence, check.figure)
        critical = first_critical(checks)
        if critical is not None:
            raise PgBouncerUnhealthy(f"PgBouncer {pgbouncer}: {critical.sentence}")
        logger.info("PgBouncer %s: %s (%d checks)", pgbouncer, report.status, len(checks))
        return report
    except Exception as exc:
        if published and report is not None:
            _publish(report, failure_sentence(exc))  # the sentence on top of the table it judged
            return failed_state(exc)
        rows = [c.row() for c in report.checks] if report is not None else []
        return publish_failure(
            artifact_key("pgbouncer-check", pgbouncer), f"PgBouncer {pgbouncer}", exc, table_lines(rows)
        )


def _publish(report: PgBouncerReport, failure: str | None = None) -> None:
    create_table_artifact(
        key=artifact_key("pgbouncer-check", report.pgbouncer),
        table=[c.row() for c in report.checks],
        description=judged_description(
            f"{report.version} ({report.pgbouncer}, pool_mode {report.pool_mode}): {report.status}", failure
        ),
    )


if __name__ == "__main__":  # pragma: no cover
    import sys

    pgbouncer_check(pgbouncer=sys.argv[1], database=sys.argv[2] if len(sys.argv) > 2 else None)
