"""restore_drill: a backup counts only once dbops has restored it. Weekly, after the Sunday dump.

1. staleness   hours since the newest backup ended; above the threshold the run ends Failed
2. restore     the latest backup into a fresh scratch database named after the run (sha256 checked);
               with a storage list, from the first location whose copy is intact (the others as restore)
3. check       tables from the manifest exist, row counts agree with its estimates (exact for small
               tables), Alembic revision equals the manifest's, pg_amcheck passes
4. drop        the scratch database, also when a check failed; re-identified first on the connection
               that drops it, and never a database a protected block names
5. record      RTO and result in `<stem>.drill.json` beside the manifest in the location read; a table
               artifact that names that location and why any before it was passed over
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Annotated

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from blocks.storage import load_locations
from flows.core.drill import CheckResult, scratch_name
from flows.core.errors import DrillFailed
from flows.core.identity import DatabaseIdentity, Guard
from flows.core.layout import check_location
from flows.core.listing import is_stale, stale_message, staleness_hours
from flows.core.locations import StorageList
from flows.core.restore_choice import BackupNotFound, Selector
from flows.core.restore_sources import NotInAnyLocation, read_from_line
from flows.tasks.common import (
    artifact_key,
    failed_state,
    failure_sentence,
    human_bytes,
    judged_description,
    publish_failure,
    table_lines,
)
from flows.tasks.identity import check_guard, protected_databases
from flows.tasks.restore import (
    check_restored_database,
    check_target_server,
    choose_backup,
    drop_scratch_database,
    location_ref,
    record_drill,
    restore_database,
)


class DrillReport(BaseModel):
    source_database: str = Field(description="The database name in the object layout.")
    key: str | None = Field(default=None, description="The backup that was drilled.")
    staleness_hours: float | None = Field(default=None, description="Hours since the newest backup ended.")
    max_age_hours: float = Field(description="The staleness threshold.")
    scratch_database: str = Field(description="Where it was restored (dropped afterwards).")
    rto_seconds: float | None = Field(default=None, description="Restore duration until usable.")
    passed: bool = Field(default=False, description="Restore and every check succeeded.")
    checks: list[dict[str, str]] = Field(default_factory=list, description="name, result, detail per check.")
    location: str | None = Field(default=None, description="The storage location the backup was read from.")
    fallbacks: list[str] = Field(
        default_factory=list, description="Locations passed over before it, each with why."
    )


@flow(name="restore-drill", log_prints=True)
def restore_drill(
    storage: StorageList,
    source_database: str,
    scratch: str,
    prefix: str = "",
    max_age_hours: Annotated[float, Field(gt=0)] = 26.0,
    row_tolerance: Annotated[float, Field(ge=0, le=1)] = 0.1,
    exact_below: Annotated[int, Field(ge=0)] = 1000,
    amcheck: bool = True,
    jobs: Annotated[int, Field(ge=1, le=64)] = 1,
    maintenance_database: str = "postgres",
) -> DrillReport:
    """Restore the latest backup into a scratch database, check it, drop it, and record the result.

    Args:
        storage: Storage block slug holding the backups (s3-bucket/NAME or local-file-system/NAME), or a
            list of them (the primary first, then its copies; a list, or slugs separated by commas): the
            latest backup is read from the first location whose copy is intact.
        source_database: Whose backups: the database name used in the object layout (e.g. imagemanager).
        scratch: PostgresDatabase block of the server to restore into (its server and credentials; the
            database it names is never touched: the scratch database is drill_<source>_<run id>).
        prefix: Folder inside the storage the backups were written under (e.g. prod); may be empty.
        max_age_hours: The run fails when the newest backup ended longer ago than this (default 26 h).
        row_tolerance: Allowed relative difference between restored row counts and the manifest's
            estimates for large tables (default 0.1 = 10 %).
        exact_below: For manifests without exact counts (written by older dbops): tables estimated below
            this many rows must match exactly. Newer manifests carry exact counts of every table up to
            8 MB, read in the dump's own snapshot, and those always must match exactly.
        amcheck: Run pg_amcheck (heap and B-tree checks) on the restored database.
        jobs: pg_restore --jobs (above 1 the backup is downloaded to a temporary file first).
        maintenance_database: Database on the scratch server used to create and drop databases.
    """
    logger = get_run_logger()
    report: DrillReport | None = None
    published = False  # a judged failure keeps its table: every check with its detail
    try:
        load_locations(storage)  # every slug a storage block, no place named twice (or under two names)
        check_location(prefix, source_database)
        try:
            found = choose_backup(storage, prefix, source_database, Selector("latest"))
        except (BackupNotFound, NotInAnyLocation) as exc:
            if not isinstance(exc, BackupNotFound) and not isinstance(exc.__cause__, BackupNotFound):
                raise
            found = None
        hours = staleness_hours(found.catalog) if found is not None else None
        stale = is_stale(hours, max_age_hours)
        (logger.error if stale else logger.info)(
            "newest backup of %s: %s h old (threshold %s h)", source_database, hours, max_age_hours
        )
        run_id = str(flow_run.get_id() or f"manual{int(time.time())}")
        name = scratch_name(source_database, run_id.replace("-", ""))
        report = DrillReport(
            source_database=source_database,
            staleness_hours=hours,
            max_age_hours=max_age_hours,
            scratch_database=name,
        )
        if found is None:
            _publish(report)
            published = True
            raise DrillFailed(stale_message(source_database, hours, max_age_hours))

        chosen = found.backup
        report.key = chosen.manifest.dump_key
        report.location = found.location
        server = check_target_server(scratch, maintenance_database)
        guard = Guard(
            block=scratch,
            planned=DatabaseIdentity(server.identity.system_identifier, name),
            action="restore the drill's scratch database",
            protected=protected_databases(maintenance_database),
        )
        check_guard(guard)
        dropping = replace(guard, action="drop the drill's scratch database")
        checks: list[CheckResult] = []
        rto: float | None = None
        restored = 0
        try:
            t0 = time.monotonic()
            try:
                result = restore_database(
                    storage,
                    chosen,
                    server,
                    database=name,
                    mode="create",
                    jobs=jobs,
                    no_owner=False,
                    maintenance_database=maintenance_database,
                    workdir=None,
                    run_id=run_id.replace("-", "")[:8],
                    timeout_s=None,
                    guard=guard,
                )
                if result.identity is not None:
                    dropping = dropping.with_planned(result.identity)  # the scratch database as created
                rto = time.monotonic() - t0
                restored = result.raw_bytes
                report.location, report.fallbacks = result.location, result.fallbacks
                logger.info("restored %s into %s in %.1f s (RTO)", human_bytes(restored), name, rto)
            except Exception as exc:
                checks.append(CheckResult("restore", ok=False, detail=str(exc)))
            if not checks:
                try:
                    checks = check_restored_database(
                        chosen,
                        server.params.with_database(name),
                        tool_dir=str(server.pg_restore.path.parent),
                        server_version=server.server_version_num,
                        row_tolerance=row_tolerance,
                        exact_below=exact_below,
                        amcheck=amcheck,
                    )
                except Exception as exc:
                    checks.append(CheckResult("checks", ok=False, detail=f"the checks could not run: {exc}"))
        finally:
            drop_scratch_database(server.params, name, maintenance_database, dropping)
            report.rto_seconds = round(rto, 3) if rto is not None else None
            report.checks = [
                {"check": c.name, "result": "ok" if c.ok else "FAILED", "detail": c.detail} for c in checks
            ]
            report.passed = bool(checks) and all(c.ok for c in checks)
            record_drill(
                location_ref(storage, report.location or found.location),
                chosen,
                checks,
                rto_seconds=rto or 0.0,
                restored_bytes=restored,
                scratch=name,
                server=f"{server.params.host}:{server.params.port}",
                flow_run_id=str(flow_run.get_id()) if flow_run.get_id() else None,
            )
            _publish(report)
            published = True

        failed = [c for c in checks if not c.ok]
        if failed:
            first = failed[0]
            extra = f" (and {len(failed) - 1} more check(s))" if len(failed) > 1 else ""
            also = f"; also, {stale_message(source_database, hours, max_age_hours)}" if stale else ""
            raise DrillFailed(
                f"restore drill of {chosen.stem.rsplit('/', 1)[-1]} failed: {first.name}: "
                f"{first.detail}{extra}{also}; the backup cannot be trusted, see the restore-drill artifact"
            )
        if stale:
            raise DrillFailed(stale_message(source_database, hours, max_age_hours))
        logger.info("drill passed: %s restored and checked, RTO %.1f s", chosen.manifest.dump_key, rto or 0)
        return report
    except Exception as exc:
        if published and report is not None:
            _publish(report, failure_sentence(exc))  # the sentence on top of the checks it judged
            return failed_state(exc)
        return publish_failure(
            artifact_key("restore-drill", source_database),
            f"Restore drill of {source_database} on {scratch}",
            exc,
            table_lines(_rows(report)) if report is not None else [],
        )


def _publish(report: DrillReport, failure: str | None = None) -> None:
    create_table_artifact(
        key=artifact_key("restore-drill", report.source_database),
        table=_rows(report),
        description=judged_description(f"Restore drill of {report.source_database}", failure),
    )


def _rows(report: DrillReport) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = [
        {"item": "backup", "value": report.key or "none"},
        {"item": "read from", "value": read_from_line(report.location or "-", report.fallbacks)},
        {"item": "backup staleness (hours)", "value": report.staleness_hours},
        {"item": "staleness threshold (hours)", "value": report.max_age_hours},
        {"item": "scratch database", "value": f"{report.scratch_database} (dropped)"},
        {"item": "RTO (seconds)", "value": report.rto_seconds},
        {"item": "result", "value": "passed" if report.passed else "FAILED"},
    ]
    rows += [{"item": c["check"], "value": f"{c['result']}: {c['detail']}"} for c in report.checks]
    return rows
