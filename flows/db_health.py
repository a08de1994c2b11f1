"""db_health: the seed's "Database Maintenance", "Monitor Database Size" and "Analyze Queries" psql
one-liners as an hourly flow that says what is wrong, how bad, what to do, and how it is trending.

1. check     one direct session (never through a pooler), every group of checks under its own
             statement_timeout: size and growth (history kept per database identity in a Prefect
             Variable, one point a day), disk, slow and stuck work, connections, wraparound, sequences
             and integer keys, vacuum and statistics, indexes (invalid, unused, duplicate, prescribed),
             cache and I/O, replication slots and standby lag, top queries (pg_stat_statements)
2. vacuum    only with vacuum=true: plain VACUUM (ANALYZE) of exactly the tables the dead-rows check
             flagged, under lock_timeout and the db:<database> slot (never VACUUM FULL); then the vacuum
             checks again
3. report    markdown artifact db-health-<database>: status line, the warnings and criticals with what to
             do, then the figures and the 14-day size sparkline; the full result is the return value.
             Failed on any critical, with the first critical's sentence; warnings leave it Completed
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.core.health.database import DatabaseUnhealthy, HealthReport
from flows.core.health.report import render, status_line
from flows.core.health.thresholds import HealthThresholds, PrescribedIndex
from flows.tasks.common import (
    artifact_key,
    database_lock,
    database_name_of,
    failed_state,
    failure_sentence,
    judged_description,
    publish_failure,
)
from flows.tasks.health import check_database_health, vacuum_flagged_tables


@flow(name="db-health", log_prints=True)
def db_health(
    database: str,
    thresholds: HealthThresholds | None = None,
    prescribed_indexes: list[PrescribedIndex] | None = None,
    vacuum: bool = False,
    statement_timeout: float = 10.0,
    lock_timeout: float = 5.0,
    lock_wait_hours: float = 1.0,
) -> HealthReport:
    """Check one database's health; Failed, with what to do, when a check is critical.

    Args:
        database: Name of the PostgresDatabase block of the database to check (a role with pg_monitor is
            enough; checks needing more are skipped with the GRANT that enables them).
        thresholds: When each figure becomes a warning or critical (every field is described in the form).
        prescribed_indexes: Indexes the application relies on, which must exist and be valid; empty for
            none; left out, the image manager's four (idx_projects_meta_group, idx_images_project, partial
            idx_images_deleted, idx_classifications_image).
        vacuum: Run a plain VACUUM (ANALYZE) (never FULL) on exactly the tables the dead-rows check flagged.
        statement_timeout: Seconds each check's query may take; one that takes longer is that check's
            failure and the other checks still run.
        lock_timeout: Seconds VACUUM may wait for a table's lock before that table is reported and skipped.
        lock_wait_hours: How long vacuum=true waits for the db:<database> slot (a dump or reindex holds it).
    """
    logger = get_run_logger()
    report: HealthReport | None = None
    published = False
    try:
        thresholds = thresholds or HealthThresholds()
        report = check_database_health(database, thresholds, prescribed_indexes, statement_timeout)
        if vacuum and report.vacuum_tables:
            with database_lock(database, wait_seconds=lock_wait_hours * 3600):
                report = vacuum_flagged_tables(database, report, thresholds, lock_timeout, statement_timeout)
        elif vacuum:
            logger.info(
                "vacuum=true: no table is past its autovacuum trigger by the margin; nothing to vacuum"
            )
        _publish(report)
        published = True
        for check in report.problems:
            logger.warning("%s %s: %s (%s)", check.status, check.name, check.sentence, check.figure)
        critical = report.first_critical()
        if critical is not None:
            raise DatabaseUnhealthy(f"{report.database}: {critical.sentence}")
        logger.info("%s", status_line(report))
        return report
    except Exception as exc:
        if published and report is not None:
            _publish(report, failure_sentence(exc))  # the sentence on top of the report it judged
            return failed_state(exc)
        return publish_failure(
            artifact_key("db-health", database_name_of(database)), f"Health of {database}", exc
        )


def _publish(report: HealthReport, failure: str | None = None) -> None:
    create_markdown_artifact(
        key=artifact_key("db-health", report.database),
        markdown=render(report, failure),
        description=judged_description(status_line(report), failure),
    )


if __name__ == "__main__":  # pragma: no cover
    import sys

    db_health(database=sys.argv[1])
