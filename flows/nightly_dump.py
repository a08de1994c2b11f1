"""nightly_dump: the backup runbook, as a flow.

1. preflight   the database answers, pg_dump can dump it, every storage location takes a write (a copy
               location that does not is recorded and skipped: the primary backup comes first)
2. dump        pg_dump -Fc streamed through zstd and sha256 into the primary (multipart on S3)
3. globals     roles and tablespaces beside it (optional)
4. verify      the stored object read back through pg_restore --list
5. manifest    written last: from now on the dump is a backup
6. copies      the backup copied from the primary into each copy location, sha256 checked, its manifest
               written there last (server-side when both are on one S3 endpoint)
7. retention   only after a verified backup: expire by policy, remove stale orphans; in each location
               with its own policy, never in a copy that missed this run's backup
8. report      a table artifact, and a Failed run with one sentence when anything went wrong (a failed
               copy too, after the primary backup is safe: the sentence says so and names the copy)
"""

from __future__ import annotations

from datetime import datetime

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel, Field

from blocks.storage import Location
from flows.core.compression import DEFAULT_LEVEL, LEVEL_RANGE, Compression
from flows.core.errors import ConfigurationError
from flows.core.expiry import Cleanup
from flows.core.layout import check_prefix
from flows.core.locations import StorageList, StorageLocation, StorageRef, parse_locations
from flows.core.manifest import VerifyMethod
from flows.core.retention import RetentionPlan, RetentionPolicy, plan_from_catalog
from flows.tasks.backup import (
    check_database,
    check_storage,
    delete_expired_backups,
    discard_if_implausible,
    plan_backup_cleanup,
    read_backup_catalog,
    upload_dump,
    upload_globals,
    verify_backup,
    write_manifest,
)
from flows.tasks.backup_copies import (
    check_copies,
    copies_outcome,
    copy_then_retain,
    open_locations,
    primary_row,
    storage_text,
)
from flows.tasks.backup_report import (
    LocationReport,
    StoredBackupReport,
    location_rows,
    retention_rows,
    stored_figures,
)
from flows.tasks.common import (
    artifact_key,
    database_lock,
    database_name_of,
    failed_state,
    human_bytes,
    judged_description,
    publish_failure,
)
from flows.tasks.retention import RetentionReport, apply_retention


class DumpOptions(BaseModel):
    """Less common knobs; the defaults are what a nightly dump of a busy OLTP database wants."""

    lock_wait_timeout_s: int = Field(
        default=300,
        ge=1,
        description="pg_dump gives up (and the task retries) when a table lock is not granted in this time, "
        "instead of queueing behind an ACCESS EXCLUSIVE lock and blocking everyone behind it.",
    )
    min_bytes: int = Field(
        default=512,
        ge=0,
        description="A dump smaller than this many bytes is treated as a failure (an empty archive).",
    )
    min_ratio_of_previous: float = Field(
        default=0.2,
        ge=0,
        le=1,
        description="A dump whose pg_dump output is smaller than this fraction of the previous backup's "
        "is treated as implausible and fails (tables emptied, wrong database). 0 disables the check.",
    )
    pg_bindir: str | None = Field(
        default=None, description="Directory with pg_dump/pg_restore; default: the server's major version's."
    )
    lock_wait_hours: float = Field(
        default=3.0,
        gt=0,
        description="How long to wait for the db:<database> concurrency limit held by another dbops job.",
    )
    zstd_threads: int = Field(
        default=1,
        ge=0,
        le=32,
        description="libzstd worker threads (0: compress in the flow's own thread). More than 1 only helps "
        "on a worker with idle cores, when compression is slower than pg_dump's extraction.",
    )


class BackupReport(StoredBackupReport):
    alembic_revision: str | None
    retention: str
    kept: list[str] = Field(default_factory=list)
    deleted: list[str] = Field(default_factory=list)
    orphans_removed: list[str] = Field(default_factory=list)
    in_use: list[str] = Field(
        default_factory=list, description="Expired backups kept: a restore or drill reads them."
    )
    left_alone: list[str] = Field(
        default_factory=list, description="Foreign objects and unreadable manifests: reported, never deleted."
    )
    locations: list[LocationReport] = Field(
        default_factory=list,
        description="The primary, then each copy: copied or failed, and its own retention.",
    )


def take_backup(
    database: str,
    storage: StorageRef,
    prefix: str,
    compression: Compression,
    compression_level: int,
    include_globals: bool,
    verify: VerifyMethod,
    options: DumpOptions,
    copies: list[Location] | None = None,
) -> BackupReport:
    """Steps 1-5 without the lock: migrate's pre-backup calls this while already holding it. `storage` is
    the primary; `copies` are only checked here (step 1), the flow copies into them after step 5."""
    logger = get_run_logger()
    pre = check_database(database, options.pg_bindir)
    location = check_storage(storage, prefix)
    logger.info("storage %s is writable", location)
    copy_rows = check_copies(copies or [], prefix)
    previous = read_backup_catalog(storage, prefix, pre.database).newest()
    stem, result = upload_dump(
        pre,
        storage=storage,
        prefix=prefix,
        compression=compression,
        level=compression_level,
        lock_wait_timeout_s=options.lock_wait_timeout_s,
        min_bytes=options.min_bytes,
        expected_bytes=previous.manifest.raw_bytes if previous is not None else None,
        zstd_threads=options.zstd_threads,
    )
    if previous is not None:
        discard_if_implausible(
            storage,
            result,
            previous_raw_bytes=previous.manifest.raw_bytes,
            previous_stem=previous.stem,
            min_ratio=options.min_ratio_of_previous,
        )
    globals_object = upload_globals(pre, storage, stem) if include_globals else None
    verification = None
    if verify != "none":
        verification = verify_backup(pre, storage, result, compression=compression, method=verify)
    manifest = write_manifest(
        pre,
        storage,
        stem=stem,
        result=result,
        compression=compression,
        level=compression_level,
        method=verify,
        verification=verification,
        globals_object=globals_object,
    )
    report = BackupReport(
        database=pre.database,
        key=result.key,
        manifest_key=f"{stem}.manifest.json",
        **stored_figures(result, manifest.verified, manifest.verification.detail),
        alembic_revision=manifest.alembic_revision,
        retention="not run",
    )
    primary = storage if isinstance(storage, StorageLocation) else StorageLocation(block=storage)
    report.locations = [primary_row(primary, location, report), *copy_rows]
    return report


@flow(name="nightly-dump", log_prints=True)
def nightly_dump(
    database: str,
    storage: StorageList,
    prefix: str = "",
    compression: Compression = Compression.zstd,
    compression_level: int | None = None,
    globals: bool = False,  # the parameter name users see in the UI
    verify: VerifyMethod = "list",
    retention: RetentionPolicy | None = None,
    retention_dry_run: bool = False,
    options: DumpOptions | None = None,
) -> BackupReport:
    """Back up one database to storage, verify it, then expire old backups.

    Args:
        database: Name of the PostgresDatabase block to back up (e.g. imagemanager-prod).
        storage: Storage block slug (s3-bucket/NAME or local-file-system/NAME), or a list of them (or a
            comma-separated string): the first is the primary, the others copies (3-2-1: another bucket,
            region or medium), each optionally with its own retention, S3 storage class and encryption.
        prefix: Folder inside the storage for this environment's backups (e.g. prod); may be empty.
        compression: zstd (in-process, default), gzip (pg_dump's own) or none.
        compression_level: zstd 1-19 (default 3: tuned for pg_dump output, smaller than pg_dump -Fc) or
            gzip 0-9 (default 6).
        globals: Also store roles and tablespaces (pg_dumpall --globals-only --no-role-passwords).
        verify: list (default): stream the stored object back into pg_restore --list and check every table
            has data; full: also re-read every byte and compare the sha256; none: skip (retention then
            does not run, because only verified backups may replace old ones).
        retention: Keep-last / daily / weekly / monthly / max-age policy; empty: keep everything. A
            location's own retention replaces it there.
        retention_dry_run: Plan retention and report it, delete nothing.
        options: Less common settings (lock waits, plausibility checks, pg_dump location).
    """
    try:
        options = options or DumpOptions()
        parse_locations(storage)  # bad slugs and a slug named twice: refused before the lock
        check_prefix(prefix)
        level = DEFAULT_LEVEL[compression] if compression_level is None else compression_level
        low, high = LEVEL_RANGE[compression]
        if not low <= level <= high:
            raise ConfigurationError(
                f"compression_level {level} is out of range for {compression.value}; use {low} to {high}"
            )

        # the same place under two block names: refused before anything is written
        primary, copies = open_locations(storage)

        with database_lock(database, wait_seconds=options.lock_wait_hours * 3600):
            # 1-5. preflight, dump, globals, verify, manifest
            report = take_backup(
                database,
                primary,
                prefix,
                compression=compression,
                compression_level=level,
                include_globals=globals,
                verify=verify,
                options=options,
                copies=copies,
            )

            # 6. copies, from the primary whose manifest is written
            # 7. retention, in each location with its own policy
            def run_retention(
                target: RetentionReport, where: StorageLocation, policy: RetentionPolicy | None
            ) -> None:
                _retention(report.database, target, where, prefix, policy, retention_dry_run)

            primary_url = report.locations[0].url
            copy_then_retain(report, primary, primary_url, copies, retention, run_retention)

        # 8. report
        failure = copies_outcome(primary_url, report.key, report.locations[1:])
        _publish(report, None if failure is None else str(failure))
        if failure is not None:
            return failed_state(failure)
        return report
    except Exception as exc:
        key = artifact_key("nightly-dump", database_name_of(database))
        return publish_failure(key, f"Nightly dump of {database} into {storage_text(storage)}", exc)


def _retention(
    database: str,
    report: RetentionReport,
    storage: StorageRef,
    prefix: str,
    retention: RetentionPolicy | None,
    dry_run: bool,
) -> None:
    """Only a verified backup may replace old ones; a restore's or drill's lease keeps what it reads.
    `report` is the run's report (the primary) or a copy location's row."""

    def plan(policy: RetentionPolicy, now: datetime) -> tuple[RetentionPlan, Cleanup]:
        catalog = read_backup_catalog(storage, prefix, database)
        retention_plan = plan_from_catalog(catalog, policy, now)
        cleanup = plan_backup_cleanup(
            storage, catalog, retention_plan, now=now, prefix=prefix, database=database
        )
        return retention_plan, cleanup

    def delete(cleanup: Cleanup) -> Cleanup:
        return delete_expired_backups(storage, cleanup, prefix, database)

    apply_retention(report, retention, dry_run, noun="backup", plan=plan, delete=delete)


def _publish(report: BackupReport, failure: str | None = None) -> None:
    rate = report.raw_bytes / report.seconds if report.seconds else 0
    rows = [
        {"item": "key", "value": report.key},
        {"item": "manifest", "value": report.manifest_key},
        {"item": "stored bytes", "value": f"{report.bytes} ({human_bytes(report.bytes)})"},
        {"item": "pg_dump bytes", "value": f"{report.raw_bytes} ({human_bytes(report.raw_bytes)})"},
        {"item": "sha256", "value": report.sha256},
        {"item": "duration", "value": f"{report.seconds:.1f} s"},
        {"item": "throughput", "value": f"{human_bytes(rate)}/s of pg_dump output"},
        {"item": "verified", "value": report.verification},
        {"item": "alembic revision", "value": report.alembic_revision or "none"},
        *retention_rows(report),
        *(location_rows(report.locations) if len(report.locations) > 1 else []),
    ]
    create_table_artifact(
        key=artifact_key("nightly-dump", report.database),
        table=rows,
        description=judged_description(f"Backup of {report.database}: {report.key}", failure),
    )


if __name__ == "__main__":  # pragma: no cover
    import sys

    nightly_dump(database=sys.argv[1], storage=sys.argv[2])
