"""Tasks of db_health: read every check through one direct session (keeping the size history in a Prefect
Variable per database identity), and VACUUM (ANALYZE) the tables the dead-rows check flagged."""

from __future__ import annotations

from datetime import UTC, datetime

import psycopg
from prefect import get_run_logger
from prefect.variables import Variable
from psycopg import sql

from flows.core.errors import IdentityUnknown
from flows.core.health.database import HealthReport, inspect_database, is_local, recheck_vacuum
from flows.core.health.history import SizeHistory, history_variable_name
from flows.core.health.thresholds import HealthThresholds, PrescribedIndex
from flows.core.identity import system_identifier
from flows.core.reindex import set_session_timeouts
from flows.tasks.backup import load_database
from flows.tasks.common import artifact_key, dbops_task
from flows.tasks.session import direct_session


def inspect_block(
    database: str,
    thresholds: HealthThresholds,
    prescribed: list[PrescribedIndex] | None,
    statement_timeout: float,
    keep_history: bool = True,
) -> HealthReport:
    """Every check on one direct connection (never through a pooler); the size history is read before
    and, with keep_history, written after. Needs no flow run: `dbops health` calls it as it is."""
    block = load_database(database)
    params = block.params()
    conn, _ = block.connect_direct()
    with conn:
        variable, note = None, ""
        try:
            variable = history_variable_name(system_identifier(conn), params.database)
        except IdentityUnknown as exc:
            note = f"size history not kept: {exc}"
        history = SizeHistory.from_value(Variable.get(variable, default=None)) if variable else SizeHistory()
        report = inspect_database(
            conn,
            database=params.database,
            where=params.where,
            thresholds=thresholds,
            prescribed=prescribed,
            statement_timeout=statement_timeout,
            history=history,
            local_host=is_local(params.host),
            today=datetime.now(UTC).date(),
            wal_check_artifact=artifact_key("wal-archive-check", database),
        )
    if keep_history and variable and report.database_bytes is not None:
        Variable.set(variable, report.history.to_value(), overwrite=True)
    report.history_note = note
    return report


@dbops_task("check_database_health")
def check_database_health(
    database: str,
    thresholds: HealthThresholds,
    prescribed: list[PrescribedIndex] | None,
    statement_timeout: float,
) -> HealthReport:
    """Every check of the database, the day's size point kept for the trend."""
    report = inspect_block(database, thresholds, prescribed, statement_timeout)
    logger = get_run_logger()
    if report.history_note:
        logger.warning("%s", report.history_note)
    logger.info(
        "%s: %s (%d checks, %d warnings, %d critical)",
        report.where,
        report.status,
        len(report.checks),
        sum(c.status == "warning" for c in report.checks),
        sum(c.status == "critical" for c in report.checks),
    )
    return report


def vacuum_table(conn: psycopg.Connection, schema: str, table: str) -> str | None:
    """Plain VACUUM (ANALYZE) of one table (never FULL); the error's first line, or None when done."""
    try:
        conn.execute(sql.SQL("VACUUM (ANALYZE) {}.{}").format(sql.Identifier(schema), sql.Identifier(table)))
        return None
    except psycopg.Error as exc:
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


@dbops_task("vacuum_flagged_tables", retry=False)
def vacuum_flagged_tables(
    database: str,
    report: HealthReport,
    thresholds: HealthThresholds,
    lock_timeout: float,
    statement_timeout: float,
) -> HealthReport:
    """VACUUM (ANALYZE) exactly the tables the dead-rows check flagged, under lock_timeout (a table another
    session locks is reported, not waited for), then the vacuum checks read again."""
    logger = get_run_logger()
    block = load_database(database)
    done: dict[str, str | None] = {}
    with direct_session(block) as conn:
        set_session_timeouts(conn, lock_timeout)
        for schema, table in report.vacuum_tables:
            qualified = f"{schema}.{table}"
            done[qualified] = problem = vacuum_table(conn, schema, table)
            if problem:
                logger.warning("VACUUM (ANALYZE) %s failed: %s", qualified, problem)
            else:
                logger.info("VACUUM (ANALYZE) %s done", qualified)
        after = recheck_vacuum(conn, report, thresholds, statement_timeout)
    return after.model_copy(update={"vacuumed": done})
