"""Tasks of the migrate runbook: each does one thing to one database and says so in the run's log.

Alembic always runs in a subprocess (flows.core.alembic_runner); these tasks load the blocks, call it,
and turn its results into what the flow reports. Retries of a revision that hit lock_timeout happen
inside `upgrade_database`, not as Prefect task retries, because the budget is in seconds and the
revisions before the one that waited stay applied.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from uuid import UUID

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from blocks.postgres import load_database
from blocks.storage import load_store
from flows.core.alembic_errors import LockTimeout, MigrationFailed, RevisionMoved
from flows.core.alembic_runner import AlembicApp
from flows.core.catalog import read_catalog
from flows.core.database_admin import drop_database
from flows.core.ddl_lint import lint
from flows.core.ddl_rules import Finding
from flows.core.errors import ConfigurationError, MigrationError
from flows.core.identity import Guard, require_distinct, resolve
from flows.core.migrate_plan import (
    LockBudgetExhausted,
    Plan,
    backoff_delays,
    existing_tables,
    invalid_indexes,
    make_plan,
    refuse_invalid_indexes,
    sql_sha256,
    timings,
)
from flows.core.migration_lock import MigrationLock, migration_lock
from flows.core.pgtools import find_tool
from flows.core.postgres import ConnParams, connect, server_version_num
from flows.core.restore import RestoreRequest, restore_backup
from flows.core.restore_choice import parse_selector, select_backup
from flows.tasks.common import artifact_key, dbops_task


def db_params(block_name: str) -> ConnParams:
    return load_database(block_name).params()


_APPS: dict[tuple[str, str, str, tuple[str, ...]], AlembicApp] = {}


def _app(alembic_ini: str, driver: str, alembic_env: list[str] | None = None) -> AlembicApp:
    """One AlembicApp per flow run: its revision tree is read once (a subprocess each time otherwise), and
    a long-lived worker still sees a new application version in the next run. `alembic_env`: names of
    worker environment variables the application's env.py needs (MigrateOptions.alembic_env)."""
    names = tuple(alembic_env or ())
    key = (flow_run.get_id() or "", alembic_ini, driver, names)
    if key not in _APPS:
        _APPS.clear()  # only the current run's app is worth keeping
        _APPS[key] = AlembicApp(Path(alembic_ini), driver=driver, pass_env=names)
    return _APPS[key]


@contextmanager
def hold_migration_lock(database: str) -> Iterator[MigrationLock]:
    """The PostgreSQL side of "never two migrators": fails at once, naming the holder's pid and name.

    The lock session's application_name carries the flow run's name, so the second run's message tells
    the person which run holds it.
    """
    params = db_params(database)
    name = f"dbops-migrate {flow_run.get_name() or 'manual'}"[:63]
    with migration_lock(replace(params, application_name=name)) as lock:
        get_run_logger().info("holding the migration lock of %s (pid %d, %s)", params.where, lock.pid, name)
        yield lock


def run_origin() -> tuple[list[str], bool, object | None, str | None]:
    """(tags, auto_scheduled, deployment_id, created_by) of the current flow run, for the report."""
    from prefect.client.orchestration import get_client

    run_id = flow_run.get_id()
    if not run_id:
        return [], False, None, None
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(run_id))
    created_by = run.created_by.display_value if run.created_by else None
    return list(run.tags or []), bool(run.auto_scheduled), run.deployment_id, created_by


# -- 1. plan -----------------------------------------------------------------------------------------------


@dbops_task("plan_migration")
def plan_migration(
    database: str,
    staging_database: str,
    alembic_ini: str,
    driver: str,
    target: str,
    maintenance_database: str = "postgres",
    alembic_env: list[str] | None = None,
) -> Plan:
    """Where production is and what is pending; refuse what a person must sort out first.

    Production and staging are told apart by what the servers say they are (system identifier and
    database), not by the blocks' spelling: `localhost` and `127.0.0.1` reach one database.
    """
    logger = get_run_logger()
    prod, staging = db_params(database), db_params(staging_database)
    prod_id, staging_id = resolve(prod), resolve(staging, maintenance_database)
    require_distinct(database, prod_id, staging_database, staging_id)
    app = _app(alembic_ini, driver, alembic_env)
    start = app.current(prod)
    plan = make_plan(app, start, target)
    plan.production, plan.staging = prod_id, staging_id
    if plan.pending:
        with connect(prod) as conn:
            refuse_invalid_indexes(prod.database, invalid_indexes(conn))
    logger.info(
        "production %s at %s; target %s; pending: %s",
        prod.where,
        plan.start_label,
        plan.target,
        ", ".join(plan.pending) or "nothing",
    )
    return plan


# -- 2. lint -----------------------------------------------------------------------------------------------


@dataclass
class LintOutcome:
    findings: list[Finding]
    sql: dict[str, str]
    not_rendered: dict[str, str]  # revision -> why its offline SQL could not be produced
    sha256: str


@dbops_task("lint_migration")
def lint_migration(
    database: str,
    alembic_ini: str,
    driver: str,
    plan: Plan,
    waivers: list[str],
    alembic_env: list[str] | None = None,
) -> LintOutcome:
    """Render `alembic upgrade a:b --sql` per revision (env.py gets production's DATABASE_URL, without
    password: nothing connects), keep it as an artifact, and lint it. A revision whose SQL cannot be
    rendered is a blocking finding of its own unless waived."""
    logger = get_run_logger()
    app = _app(alembic_ini, driver, alembic_env)
    params = db_params(database)
    offline = app.offline_sql(plan.start[0] if len(plan.start) == 1 else None, plan.target, params)
    with connect(params) as conn:
        tables = existing_tables(conn)
    findings = lint(dict(offline), existing_tables=tables, waivers=waivers, not_rendered=offline.failed)
    for f in findings:
        state = "waived" if f.waived else f.severity
        (logger.info if f.waived else logger.warning)(
            "lint %s %s [%s]: %s", f.revision, f.rule, state, f.statement
        )
    sha = sql_sha256(offline)
    parts = [f"# Offline SQL of {', '.join(plan.pending)}\n", f"sha256 `{sha}`\n"]
    for rev, sql in offline.items():
        parts.append(f"## {rev}\n\n```sql\n{sql.strip()}\n```\n")
    for rev, why in offline.failed.items():
        parts.append(f"## {rev}\n\nnot rendered: {why}\n")
    create_markdown_artifact(
        key=artifact_key("migrate-sql", db_params(database).database),
        markdown="\n".join(parts),
        description=f"Offline SQL to {plan.target}",
    )
    return LintOutcome(findings=findings, sql=dict(offline), not_rendered=dict(offline.failed), sha256=sha)


# -- 4. staging --------------------------------------------------------------------------------------------


@dbops_task("refresh_staging")
def refresh_staging(
    staging_database: str,
    storage: str,
    prefix: str,
    source_database: str,
    backup_key: str,
    maintenance: str,
    guard: Guard,
) -> float:
    """Drop staging and restore the pre-backup into it (create mode: a temporary database renamed on
    success), so staging holds production's data at the revision production is at.

    `guard` holds staging as the plan identified it: the connection that drops staging checks first that
    it reaches that server and that incarnation of staging, and that it is no protected database."""
    logger = get_run_logger()
    block = load_database(staging_database)
    if block.protected:
        raise ConfigurationError(
            f"staging block {staging_database!r} is protected, and refreshing staging drops its database; "
            "use an unprotected staging block, or run with refresh_staging=false"
        )
    params = block.params()
    store = load_store(storage)
    backup = select_backup(
        read_catalog(store, prefix, source_database), parse_selector(backup_key), source_database
    )
    admin = params.with_database(maintenance)
    with connect(admin) as conn:
        version = server_version_num(conn)
        guard.check(conn)
        drop_database(conn, params.database)
    tool = find_tool("pg_restore", version, bindir=None)
    run_id = (flow_run.get_id() or "manual")[:8]
    result = restore_backup(
        RestoreRequest(
            store=store,
            backup=backup,
            target=params,
            tool=tool,
            mode="create",
            run_id=run_id,
            maintenance_database=maintenance,
            guard=guard,
        ),
        log=logger.info,
    )
    logger.info("staging %s refreshed from %s in %.1f s", params.where, backup_key, result.seconds)
    return result.seconds


# -- 4 and 6: upgrades -------------------------------------------------------------------------------------


@dataclass
class Applied:
    """What one upgrade of one database did."""

    start: list[str]
    end: list[str]
    seconds: dict[str, float] = field(default_factory=dict)  # revision -> seconds of its successful run
    attempts: dict[str, int] = field(default_factory=dict)  # revision -> attempts (lock timeouts retried)


@dbops_task("upgrade_database", retry=False)
def upgrade_database(
    database: str,
    alembic_ini: str,
    driver: str,
    target: str,
    lock_timeout_ms: int,
    statement_timeout_ms: int,
    retry_budget_s: float,
    expected_start: list[str] | None = None,
    still_locked: Callable[[], None] | None = None,
    backoff_first_s: float = 1.0,
    alembic_env: list[str] | None = None,
) -> Applied:
    """`alembic upgrade` one revision at a time, each in its own transaction, with lock_timeout and
    statement_timeout on every session; a revision that waited longer than lock_timeout is retried
    with doubling delays until `retry_budget_s` is spent (the ones before it stay applied)."""
    params = db_params(database)
    app = _app(alembic_ini, driver, alembic_env)
    start = app.current(params)
    if expected_start is not None and start != expected_start:
        raise RevisionMoved(
            f"{params.where} is at {','.join(start) or 'base'}, not at {','.join(expected_start) or 'base'} "
            "as planned; another migration ran meanwhile: check it, then start again"
        )
    applied = Applied(start=start, end=list(start))
    try:
        return _upgrade_with_retries(
            app,
            params,
            target=target,
            lock_timeout_ms=lock_timeout_ms,
            statement_timeout_ms=statement_timeout_ms,
            retry_budget_s=retry_budget_s,
            applied=applied,
            still_locked=still_locked,
            backoff_first_s=backoff_first_s,
        )
    except MigrationError as exc:  # the flow reports timings of a failed run too
        _count(applied, exc.result.steps if exc.result is not None else [])
        exc.record_progress(applied.seconds, applied.attempts)
        raise


def _count(applied: Applied, steps: list) -> None:
    applied.seconds.update(timings(steps))
    for step in steps:
        applied.attempts[step.revision] = applied.attempts.get(step.revision, 0) + 1


def _upgrade_with_retries(
    app: AlembicApp,
    params: ConnParams,
    target: str,
    lock_timeout_ms: int,
    statement_timeout_ms: int,
    retry_budget_s: float,
    applied: Applied,
    still_locked: Callable[[], None] | None,
    backoff_first_s: float,
) -> Applied:
    logger = get_run_logger()
    delays = iter(backoff_delays(retry_budget_s, backoff_first_s))
    deadline = time.monotonic() + retry_budget_s
    known_start: list[str] | None = applied.start  # just read; after a lock timeout, read it again
    while True:
        if still_locked is not None:
            still_locked()
        try:
            result = app.upgrade(
                params,
                target,
                lock_timeout_ms=lock_timeout_ms,
                statement_timeout_ms=statement_timeout_ms,
                start=known_start,
            )
        except LockTimeout as exc:
            _count(applied, exc.result.steps if exc.result is not None else [])
            rev = exc.revision or "?"
            applied.attempts[rev] = applied.attempts.get(rev, 0) + 1
            delay = next(delays, None)
            if delay is None or time.monotonic() + delay > deadline + 0.001:
                applied.end = app.current(params)
                raise LockBudgetExhausted(
                    f"revision {rev} on {params.where} waited longer than lock_timeout "
                    f"({lock_timeout_ms} ms) {applied.attempts[rev]} time(s) within retry_budget "
                    f"{retry_budget_s:g} s and was rolled back each time; the database is at "
                    f"{','.join(applied.end) or 'base'}. Find the blocking session in pg_stat_activity "
                    "(long transaction or idle in transaction), then run the migration again"
                ) from None
            known_start = None
            logger.warning("%s; retrying in %.1f s", exc, delay)
            time.sleep(delay)  # backoff before the retry, not synchronisation
            continue
        for step in result.steps:
            logger.info("%s: %s applied in %.2f s", params.database, step.revision, step.seconds)
        _count(applied, result.steps)
        applied.end = result.end
        return applied


@dbops_task("downgrade_database", retry=False)
def downgrade_database(
    database: str,
    alembic_ini: str,
    driver: str,
    target: str,
    lock_timeout_ms: int,
    statement_timeout_ms: int,
    start: list[str] | None = None,
    alembic_env: list[str] | None = None,
) -> dict[str, float]:
    """Staging only: prove every pending revision's downgrade() works before production depends on it.

    `start` is where the upgrade just left it (the subprocess checks it still is)."""
    params = db_params(database)
    result = _app(alembic_ini, driver, alembic_env).downgrade(
        params,
        target,
        lock_timeout_ms=lock_timeout_ms,
        statement_timeout_ms=statement_timeout_ms,
        start=start,
    )
    get_run_logger().info(
        "%s: downgraded %s to %s", params.database, ", ".join(s.revision for s in result.steps), target
    )
    return {s.revision: round(s.seconds, 3) for s in result.steps}


@dbops_task("verify_current")
def verify_current(
    database: str, alembic_ini: str, driver: str, target: str, alembic_env: list[str] | None = None
) -> list[str]:
    """`alembic current` must equal the target after an upgrade; anything else is a failed run."""
    params = db_params(database)
    current = _app(alembic_ini, driver, alembic_env).current(params)
    require_at(database, current, target)
    return current


def require_at(database: str, current: list[str], target: str) -> None:
    """`alembic current` as read by the upgrade's own subprocess right after its last revision."""
    if current != [target]:
        raise MigrationFailed(
            f"{db_params(database).where} is at {','.join(current) or 'base'} after the upgrade, not at "
            f"{target}; check the revisions' upgrade() and the alembic_version table"
        )
