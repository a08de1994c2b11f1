"""migrate: the "apply the application's Alembic revisions to production" runbook, as a flow.

0. lock        the migration advisory lock of production for the whole run: a second migrator fails fast
1. plan        current revisions, pending ones; refuse several heads, unknown stamps, a target behind,
               INVALID indexes on production, a staging block that reaches production's database
               (server system identifier + name); nothing pending → Completed "already at <rev>"
2. lint        offline SQL per revision (an artifact), DDL lint; blocking findings stop unless waived
3. pre-backup  a verified nightly-dump-style backup of production: the rollback point
4. staging     refresh staging from that backup (staging re-identified on the connection that drops
               it; never a database a protected block names), upgrade it with production's guards, check
               the revision, and when every revision can be undone: downgrade to the start and upgrade again
5. approval    (optional) pause with a form: lint result, staging timings, backup key; the approver is kept
6. production  one revision per transaction, lock_timeout on every session, lock timeouts retried inside
               retry_budget, then `alembic current` must equal the target
7. report      a table artifact; Failed with one sentence whenever production was not migrated

Never scheduled: started from the UI, or by a deploy pipeline (`dbops migrate --wait`).
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import BaseModel, Field

from flows.core.alembic_runner import AlembicApp
from flows.core.compression import DEFAULT_LEVEL, Compression
from flows.core.ddl_rules import apply_waivers, blocking
from flows.core.errors import DbopsError, MigrationError
from flows.core.identity import Guard
from flows.core.locations import StorageList, StorageRef, parse_locations
from flows.core.migrate_plan import (
    ApprovalRejected,
    LintBlocked,
    Plan,
    PreBackupFailed,
    StagingFailed,
    duration_ms,
    lint_message,
    normalise_waivers,
    resolve_alembic_ini,
    trigger_of,
)
from flows.nightly_dump import BackupReport, DumpOptions, take_backup
from flows.tasks.common import (
    artifact_key,
    completed_state,
    database_lock,
    failed_state,
    failure_sentence,
    judged_description,
)
from flows.tasks.identity import check_guard, protected_databases
from flows.tasks.migrate import (
    LintOutcome,
    db_params,
    downgrade_database,
    hold_migration_lock,
    lint_migration,
    plan_migration,
    refresh_staging,
    require_at,
    run_origin,
    upgrade_database,
    verify_current,
)
from flows.tasks.session import check_database_route


class MigrateOptions(BaseModel):
    """Less common knobs."""

    driver: str = Field(
        default="postgresql+psycopg",
        description="SQLAlchemy driver in the DATABASE_URL handed to the application's Alembic "
        "(postgresql+asyncpg for applications whose env.py uses asyncpg).",
    )
    lock_wait_hours: float = Field(
        default=3.0,
        gt=0,
        description="How long to wait for the db:<database> concurrency limit held by another dbops job "
        "(a nightly dump, a reindex) before the backup and again before production.",
    )
    approval_poll_seconds: int = Field(
        default=10, ge=1, le=300, description="How often a paused run checks whether it was resumed."
    )
    maintenance_database: str = Field(
        default="postgres", description="Database on the staging server used to drop and create staging."
    )
    retry_first_delay_s: float = Field(
        default=1.0,
        gt=0,
        description="Seconds before the first retry of a revision that hit lock_timeout; doubles each time.",
    )
    alembic_env: list[str] = Field(
        default_factory=list,
        description="Names of worker environment variables the application's env.py needs besides "
        "DATABASE_URL (e.g. APP_ENV); they are passed to Alembic as they are. Alembic otherwise sees only "
        "PATH, HOME, locale, TZ, TMPDIR, PYTHONPATH, VIRTUAL_ENV, PGSSL* and the database settings; the "
        "password always goes through a private passfile, so PGPASSWORD is refused here.",
    )


class MigrationApproval(RunInput):
    """The form a person fills in to let the migration reach production."""

    approve: bool = Field(
        default=False, description="Tick to apply the migration to production; leave unticked to reject it."
    )
    approver: str = Field(description="Your name or e-mail: recorded in the run's report.")
    comment: str = Field(default="", description="Optional: why, ticket number; recorded in the report.")


class RevisionTiming(BaseModel):
    revision: str = Field(description="Alembic revision id")
    staging_s: float | None = Field(default=None, description="Seconds on staging (first upgrade)")
    staging_again_s: float | None = Field(default=None, description="Seconds on staging after the downgrade")
    production_s: float | None = Field(default=None, description="Seconds on production")
    attempts: int = Field(default=0, description="Production attempts (lock timeouts are retried)")


class MigrateReport(BaseModel):
    database: str = Field(description="Production database block")
    staging_database: str = Field(description="Staging database block")
    trigger: str = Field(default="", description="UI, api, schedule or python")
    target: str = Field(description="Requested target")
    from_revision: str = Field(default="", description="Production's revision before the run")
    to_revision: str = Field(default="", description="The resolved target revision")
    pending: list[str] = Field(default_factory=list)
    timings: list[RevisionTiming] = Field(default_factory=list)
    findings: list[str] = Field(default_factory=list, description="Lint findings: revision rule [state]")
    waivers: list[str] = Field(default_factory=list)
    not_rendered: dict[str, str] = Field(default_factory=dict, description="Revisions without offline SQL")
    sql_sha256: str = Field(default="", description="sha256 of the offline SQL that was linted")
    backup_key: str = Field(default="", description="The pre-backup: the rollback point")
    backup_revision: str | None = Field(default=None, description="Alembic revision held by the backup")
    approver: str = Field(default="", description="Who approved (require_approval)")
    production_end: str = Field(default="", description="Production's revision at the end")
    dry_run: bool = False
    outcome: str = Field(default="running", description="applied, already at, dry run, failed: why")

    def timing(self, revision: str) -> RevisionTiming:
        for t in self.timings:
            if t.revision == revision:
                return t
        t = RevisionTiming(revision=revision)
        self.timings.append(t)
        return t


@flow(name="migrate", log_prints=True)
def migrate(
    database: str,
    staging_database: str,
    storage: StorageList,
    prefix: str = "",
    alembic: str = "examples/imagemanager",
    target: str = "head",
    refresh_staging: bool = True,
    require_approval: bool = False,
    approval_timeout: Annotated[int, Field(ge=1)] = 3600,
    waivers: list[str] | None = None,
    lock_timeout: str = "5s",
    statement_timeout: str = "0",
    retry_budget: Annotated[float, Field(ge=0)] = 300.0,
    dry_run: bool = False,
    options: MigrateOptions | None = None,
) -> MigrateReport:
    """Apply the application's pending Alembic revisions to production, after a verified backup, a lint of
    their SQL and a rehearsal on staging restored from that backup. Fails, production untouched, when any
    of these finds a problem; fails cleanly, at the last good revision, when production's locks or a
    revision do.

    Args:
        database: Production PostgresDatabase block (e.g. imagemanager-prod).
        staging_database: Staging PostgresDatabase block: a database of its own (not protected) that is
            dropped and restored from the pre-backup before the revisions are tried on it.
        storage: Storage block slug for the pre-backup: s3-bucket/NAME or local-file-system/NAME; given
            the nightly dump's list (primary first, then copies), the pre-backup goes to the primary only.
        prefix: Folder inside the storage for the backups (e.g. prod); may be empty.
        alembic: The application's alembic.ini, or the folder holding it (its script directory works too);
            relative paths are tried from the worker's working directory, then from the dbops checkout.
        target: Revision to migrate to: head, or a revision id.
        refresh_staging: Restore the fresh pre-backup into staging first, so the revisions meet
            production's data (false: upgrade staging as it is).
        require_approval: Pause after staging until a person approves in the UI; reject or timeout fails
            the run with production untouched.
        approval_timeout: Seconds to wait for the approval.
        waivers: Lint findings to accept: a rule id (everywhere), rule@revision or revision:rule.
        lock_timeout: How long one migration statement may wait for a table lock (5s, 500ms, 1min); set
            after the migration lock is held, so the application never queues behind a migration longer.
        statement_timeout: Longest single statement (e.g. 30min); 0 means no limit.
        retry_budget: Seconds during which a revision that hit lock_timeout is retried with doubling
            delays; 0: no retries.
        dry_run: Plan, lint and publish the SQL only: no lock, no backup, no staging, no production.
        options: Less common settings (Alembic driver, waits, approval polling, staging maintenance db).
    """
    logger = get_run_logger()
    options = options or MigrateOptions()
    report = MigrateReport(
        database=database, staging_database=staging_database, target=target, dry_run=dry_run
    )
    report.trigger = trigger_of(*run_origin())
    ini: str | None = None
    in_production = False
    try:
        lock_ms = duration_ms(lock_timeout, "lock_timeout")
        statement_ms = duration_ms(statement_timeout, "statement_timeout")
        report.waivers = normalise_waivers(waivers or [])
        apply_waivers([], report.waivers)  # a misspelt rule id fails now, not after the backup
        primary = parse_locations(storage)[0]  # the pre-backup is a rollback point: one place is enough
        ini = str(resolve_alembic_ini(alembic))

        # 0. both blocks reach PostgreSQL itself: the lock and lock_timeout mean nothing through a pooler
        check_database_route(database)
        check_database_route(staging_database, options.maintenance_database if refresh_staging else None)

        with ExitStack() as held:
            lock = None if dry_run else held.enter_context(hold_migration_lock(database))

            # 1. plan
            plan = plan_migration(
                database=database,
                staging_database=staging_database,
                alembic_ini=ini,
                driver=options.driver,
                target=target,
                maintenance_database=options.maintenance_database,
                alembic_env=options.alembic_env,
            )
            report.from_revision, report.to_revision = plan.start_label, plan.target
            report.pending = plan.pending
            if not plan.pending:
                report.production_end = plan.start_label
                report.outcome = f"already at {plan.start_label}"
                return completed_state(report.outcome, report)

            staging_guard = None
            if refresh_staging and not dry_run:  # a protected staging is refused before any work
                assert plan.staging is not None  # plan_migration identified it
                staging_guard = Guard(
                    block=staging_database,
                    planned=plan.staging,
                    action="refresh staging",
                    protected=protected_databases(options.maintenance_database),
                )
                check_guard(staging_guard)

            # 2. lint
            linted = lint_migration(
                database=database,
                alembic_ini=ini,
                driver=options.driver,
                plan=plan,
                waivers=report.waivers,
                alembic_env=options.alembic_env,
            )
            _record_lint(report, linted)
            blocked = blocking(linted.findings)
            if blocked:
                raise LintBlocked(lint_message(blocked))
            if dry_run:
                report.production_end = plan.start_label
                report.outcome = (
                    f"dry run: would apply {', '.join(plan.pending)} ({plan.start_label} → {plan.target}); "
                    f"offline SQL sha256 {linted.sha256[:12]}; nothing was changed"
                )
                logger.info(report.outcome)
                return completed_state(report.outcome, report)

            # 3. pre-backup: no backup, no migration
            with database_lock(database, wait_seconds=options.lock_wait_hours * 3600):
                backup = _pre_backup(database, primary, prefix)
            report.backup_key, report.backup_revision = backup.key, backup.alembic_revision
            logger.info("rollback point: %s (alembic %s)", backup.key, backup.alembic_revision)

            # 4. staging gate
            with database_lock(
                staging_database,
                wait_seconds=options.lock_wait_hours * 3600,
                maintenance_database=options.maintenance_database,
            ):
                _staging_gate(
                    report,
                    plan,
                    ini,
                    options,
                    staging=staging_database,
                    storage=primary.block,
                    prefix=prefix,
                    backup=backup,
                    refresh=refresh_staging,
                    lock_ms=lock_ms,
                    statement_ms=statement_ms,
                    retry_budget=retry_budget,
                    guard=staging_guard,
                )

            # 5. approval
            if require_approval:
                _ask_approval(report, linted, options, approval_timeout)

            # 6. production
            in_production = True
            with database_lock(database, wait_seconds=options.lock_wait_hours * 3600):
                applied = upgrade_database(
                    database=database,
                    alembic_ini=ini,
                    driver=options.driver,
                    target=plan.target,
                    lock_timeout_ms=lock_ms,
                    statement_timeout_ms=statement_ms,
                    retry_budget_s=retry_budget,
                    expected_start=plan.start,
                    still_locked=lock.ensure_held if lock is not None else None,
                    backoff_first_s=options.retry_first_delay_s,
                    alembic_env=options.alembic_env,
                )
                _record_production(report, applied.seconds, applied.attempts)
                report.production_end = ",".join(
                    verify_current(
                        database=database,
                        alembic_ini=ini,
                        driver=options.driver,
                        target=plan.target,
                        alembic_env=options.alembic_env,
                    )
                )
        report.outcome = f"applied {len(plan.pending)} revision(s): {plan.start_label} → {plan.target}"
        return completed_state(report.outcome, report)
    except BaseException as exc:
        report.outcome = f"failed: {failure_sentence(exc)}"
        if in_production and ini is not None:
            if isinstance(exc, MigrationError) and exc.applied_seconds is not None:
                _record_production(report, exc.applied_seconds, exc.applied_attempts or {})
            _record_production_failure(report, ini, options.driver, options.alembic_env)
        if not isinstance(exc, Exception):  # cancellation, Prefect's pause and abort signals
            raise
        # the table artifact (outcome first) goes out in `finally`; the state carries the same sentence
        return failed_state(exc)
    finally:
        _publish(report)


def _record_lint(report: MigrateReport, linted: LintOutcome) -> None:
    report.sql_sha256 = linted.sha256
    report.not_rendered = linted.not_rendered
    report.findings = [
        f"{f.revision} {f.rule} [{'waived' if f.waived else f.severity}]: {f.statement[:160]}"
        for f in linted.findings
    ]


def _pre_backup(database: str, storage: StorageRef, prefix: str) -> BackupReport:
    """take_backup without its own lock (we hold db:<database>); anything short of a verified backup stops."""
    try:
        backup = take_backup(
            database=database,
            storage=storage,
            prefix=prefix,
            compression=Compression.zstd,
            compression_level=DEFAULT_LEVEL[Compression.zstd],
            include_globals=False,
            verify="list",
            options=DumpOptions(),
        )
    except DbopsError as exc:
        raise PreBackupFailed(
            f"the pre-backup of {database!r} failed, so nothing was migrated ({exc})"
        ) from exc
    if not backup.verified:
        raise PreBackupFailed(f"the pre-backup {backup.key} was not verified, so nothing was migrated")
    return backup


def _staging_gate(
    report: MigrateReport,
    plan: Plan,
    ini: str,
    options: MigrateOptions,
    staging: str,
    storage: str,
    prefix: str,
    backup: BackupReport,
    refresh: bool,
    lock_ms: int,
    statement_ms: int,
    retry_budget: float,
    guard: Guard | None,
) -> None:
    """Rehearse on production's data; any failure here ends the run before production is touched."""
    logger = get_run_logger()
    try:
        if refresh:
            assert guard is not None  # the plan identified staging
            refresh_staging(
                staging_database=staging,
                storage=storage,
                prefix=prefix,
                source_database=backup.database,
                backup_key=backup.key,
                maintenance=options.maintenance_database,
                guard=guard,
            )
        # what every Alembic step on staging shares: production's guards, the same application
        alembic: dict[str, Any] = {
            "database": staging,
            "alembic_ini": ini,
            "driver": options.driver,
            "lock_timeout_ms": lock_ms,
            "statement_timeout_ms": statement_ms,
            "alembic_env": options.alembic_env,
        }
        retries: dict[str, Any] = {
            "retry_budget_s": retry_budget,
            "backoff_first_s": options.retry_first_delay_s,
        }
        first = upgrade_database(
            **alembic, **retries, target=plan.target, expected_start=plan.start if refresh else None
        )
        for rev, seconds in first.seconds.items():
            report.timing(rev).staging_s = seconds
        require_at(staging, first.end, plan.target)
        if plan.downgradable:
            back_to = ",".join(first.start) or "base"
            downgrade_database(**alembic, target=back_to, start=first.end)
            again = upgrade_database(**alembic, **retries, target=plan.target)
            for rev, seconds in again.seconds.items():
                report.timing(rev).staging_again_s = seconds
            require_at(staging, again.end, plan.target)
        else:
            logger.info("not every pending revision has a downgrade(): the downgrade round trip is skipped")
    except DbopsError as exc:
        raise StagingFailed(
            f"staging {db_params(staging).where} failed the rehearsal, so production was not touched: {exc}"
        ) from exc


def _approval_text(report: MigrateReport, linted: LintOutcome) -> str:
    lines = [
        f"## Migrate {report.database}: {report.from_revision} → {report.to_revision}",
        "",
        f"Pending: {', '.join(report.pending)}",
        f"Rollback point (pre-backup): `{report.backup_key}` (alembic {report.backup_revision or 'none'})",
        f"Offline SQL sha256: `{linted.sha256}`",
        "",
        "| revision | staging | staging after downgrade |",
        "| --- | --- | --- |",
    ]
    for t in report.timings:
        lines.append(f"| {t.revision} | {_s(t.staging_s)} | {_s(t.staging_again_s)} |")
    lines += ["", f"Lint: {len(linted.findings)} finding(s)" + (":" if linted.findings else ", none")]
    lines += [f"- {f}" for f in report.findings]
    if linted.not_rendered:
        lines += [
            f"- {rev}: offline SQL not rendered ({why}); review by hand"
            for rev, why in linted.not_rendered.items()
        ]
    lines += ["", "Tick **approve** and give your name to apply it to production; submit unticked to reject."]
    return "\n".join(lines)


def _ask_approval(report: MigrateReport, linted: LintOutcome, options: MigrateOptions, timeout: int) -> None:
    """Pause (the run keeps its locks) until a person approves or rejects in the UI, or the timeout."""
    logger = get_run_logger()
    form = MigrationApproval.with_initial_data(description=_approval_text(report, linted), approve=False)
    try:
        answer = pause_flow_run(
            wait_for_input=form, timeout=timeout, poll_interval=options.approval_poll_seconds
        )
    except FlowPauseTimeout:
        raise ApprovalRejected(
            f"nobody approved the migration within {timeout} s, so production was not touched; start it "
            "again when someone can approve"
        ) from None
    who = answer.approver.strip() or "someone without a name"
    if not answer.approve:
        report.approver = f"rejected by {who}" + (f" ({answer.comment})" if answer.comment else "")
        raise ApprovalRejected(f"{who} rejected the migration, so production was not touched")
    report.approver = who + (f" ({answer.comment})" if answer.comment else "")
    logger.info("approved by %s", report.approver)


def _record_production(report: MigrateReport, seconds: dict[str, float], attempts: dict[str, int]) -> None:
    for rev, s in seconds.items():
        report.timing(rev).production_s = s
    for rev, n in attempts.items():
        report.timing(rev).attempts = n


def _record_production_failure(
    report: MigrateReport, ini: str, driver: str, alembic_env: list[str] | None = None
) -> None:
    """Production's revision after a failed production step (best effort: the report must still go out)."""
    try:
        current = AlembicApp(Path(ini), driver=driver, pass_env=tuple(alembic_env or ())).current(
            db_params(report.database)
        )
        report.production_end = ",".join(current) or "base"
    except Exception as exc:
        report.production_end = f"unknown ({exc})"


def _publish(report: MigrateReport) -> None:
    rows = [
        {"item": "outcome", "value": report.outcome},
        {"item": "trigger", "value": report.trigger},
        {
            "item": "revisions",
            "value": f"{report.from_revision or '?'} → {report.to_revision or report.target}",
        },
        {"item": "production now at", "value": report.production_end or "unchanged"},
        {"item": "pending", "value": ", ".join(report.pending) or "none"},
    ]
    for t in report.timings:
        rows.append(
            {
                "item": f"revision {t.revision}",
                "value": f"staging {_s(t.staging_s)}, staging again {_s(t.staging_again_s)}, production "
                f"{_s(t.production_s)} ({t.attempts} attempt(s))",
            }
        )
    rows += [
        {"item": "lint findings", "value": "; ".join(report.findings) or "none"},
        {"item": "waivers", "value": ", ".join(report.waivers) or "none"},
        {
            "item": "offline SQL not rendered",
            "value": "; ".join(f"{k}: {v}" for k, v in report.not_rendered.items()) or "none",
        },
        {"item": "SQL sha256", "value": report.sql_sha256 or "-"},
        {"item": "backup key (rollback point)", "value": report.backup_key or "none"},
        {"item": "backup alembic revision", "value": report.backup_revision or "-"},
        {"item": "approver", "value": report.approver or "-"},
        {"item": "dry run", "value": str(report.dry_run).lower()},
    ]
    try:
        name = db_params(report.database).database
    except Exception:
        name = report.database
    create_table_artifact(
        key=artifact_key("migrate", name),
        table=rows,
        description=judged_description(f"Migrate {report.database}", report.outcome.removeprefix("failed: "))
        if report.outcome.startswith("failed: ")
        else f"Migrate {report.database}: {report.outcome}"[:500],
    )


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"
