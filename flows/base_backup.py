"""base_backup: the physical backup runbook, as a flow; with the WAL archive it makes recovery to any moment
possible (the archive alone restores nothing).

1. preflight   the role may replicate (REPLICATION, a pg_hba.conf `replication` line), max_wal_senders, no
               extra tablespaces, archiving on unless the WAL goes in the backup; every storage location
               takes a write (a copy location that does not is recorded and skipped)
2. stream      pg_basebackup -Ft -D - --checkpoint=fast through zstd and sha256 into the primary storage
               (multipart on S3), its tar read on the fly for backup_label, global/pg_control and
               backup_manifest; PostgreSQL's backup_manifest stored beside it
3. WAL         every segment from the backup's start to its stop LSN confirmed in the archive (WAL switched
               if needed, waited for with a timeout); include_wal=true puts it in the tar instead
4. verify      the stored object read back, its tar listing walked (verify=full also re-hashes it)
5. manifest    written last: from now on the tar is a base backup
6. copies      the base backup copied from the primary into each copy location (tar, PostgreSQL's
               backup_manifest, manifest last), sha256 checked
7. retention   only after a verified base backup: expire by the GFS policy, never one a recovery reads; in
               each location with its own policy, never in a copy that missed this run's base backup
8. WAL expiry  WAL older than the oldest base backup kept in ANY location (and older than wal_keep_days)
               leaves the archive; a location whose base backups cannot be read blocks it
9. report      a table artifact, and a Failed run with one sentence when anything went wrong (a failed
               copy too, after the primary base backup is safe: the sentence says so and names the copy)

It holds the same `db:` slot as the nightly dump, so a dump and a base backup of one database never
overlap.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel, Field

from flows.core.base_catalog import BaseCleanup, plan_base_retention
from flows.core.base_layout import BaseVerifyMethod, base_manifest_key
from flows.core.layout import check_prefix
from flows.core.locations import StorageList, StorageLocation, StorageRef, parse_locations
from flows.core.retention import RetentionPlan, RetentionPolicy
from flows.core.wal_archive import ArchiveLocation
from flows.tasks.backup import check_storage
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
from flows.tasks.base_backup import (
    check_base_backup_source,
    confirm_wal_archived,
    delete_expired_base_backups,
    plan_base_backup_cleanup,
    read_base_backup_catalog,
    resolve_archive,
    upload_base_backup,
    verify_base_backup,
    write_base_manifest,
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
from flows.tasks.wal_expiry import expire_wal, kept_base_backups


class BaseBackupOptions(BaseModel):
    """Less common knobs; the defaults suit a nightly base backup of a busy OLTP cluster."""

    wal_timeout_seconds: float = Field(
        default=300,
        gt=0,
        description="How long the backup's WAL may take to reach the archive (the server's own wait at the "
        "end of pg_basebackup, then dbops' confirmation of every segment) before the run fails.",
    )
    compression_level: int = Field(default=3, ge=1, le=19, description="zstd level of the stored tar.")
    zstd_threads: int = Field(
        default=1,
        ge=0,
        le=32,
        description="libzstd worker threads (0: compress in the flow's own thread); more than 1 only helps "
        "on a worker with idle cores.",
    )
    manifest_checksums: Literal["SHA256", "CRC32C", "NONE"] = Field(
        default="SHA256",
        description="Checksum PostgreSQL records per file in its backup_manifest (pg_verifybackup checks "
        "them after a restore). SHA256 is the safest; CRC32C is cheaper on a CPU-bound server.",
    )
    lock_wait_hours: float = Field(
        default=3.0,
        gt=0,
        description="How long to wait for the db:<database> slot held by another dbops job (a dump).",
    )
    pg_bindir: str | None = Field(
        default=None, description="Directory with pg_basebackup; default: the server's major version's."
    )


class BaseBackupReport(StoredBackupReport):
    label: str
    start_wal: str
    stop_wal: str
    start_lsn: str
    stop_lsn: str
    timeline: int
    wal_included: bool
    wal: str = Field(description="How the WAL was confirmed (archived segments, or in the tar).")
    retention: str = "not run"
    kept: list[str] = Field(default_factory=list)
    deleted: list[str] = Field(default_factory=list)
    orphans_removed: list[str] = Field(default_factory=list)
    in_use: list[str] = Field(
        default_factory=list, description="Expired base backups kept: a recovery reads them."
    )
    left_alone: list[str] = Field(default_factory=list, description="Foreign or unreadable: never deleted.")
    wal_expiry: str = Field(default="not run", description="What WAL expiry removed (step 8).")
    locations: list[LocationReport] = Field(
        default_factory=list,
        description="The primary, then each copy: copied or failed, and its own retention.",
    )


@flow(name="base-backup", log_prints=True)
def base_backup(
    database: str,
    storage: StorageList,
    prefix: str = "",
    archive: ArchiveLocation | None = None,
    include_wal: bool = False,
    verify: BaseVerifyMethod = "list",
    retention: RetentionPolicy | None = None,
    wal_keep_days: Annotated[int, Field(ge=0)] = 2,
    dry_run: bool = False,
    options: BaseBackupOptions | None = None,
) -> BaseBackupReport:
    """Take a physical base backup of the cluster behind one database block, confirm its WAL, verify it,
    then expire old base backups.

    Args:
        database: Name of the PostgresDatabase block (e.g. imagemanager-prod); its role needs REPLICATION
            and a `replication` line in pg_hba.conf. The backup is of the whole cluster, filed under this
            database's name.
        storage: Storage block slug (s3-bucket/NAME or local-file-system/NAME), or a list of them (or a
            comma-separated string): the first is the primary, the others copies, each optionally with its
            own retention, S3 storage class and encryption.
        prefix: Folder inside the storage for this environment's backups (e.g. prod); may be empty.
        archive: Where archive_command stores WAL (the WAL archive check's parameter); empty: the Prefect
            Variable dbops_wal_archive. Every segment the backup needs is confirmed there before the
            manifest is written (not with include_wal).
        include_wal: Put the WAL the backup needs into the tar (pg_basebackup -X fetch): it then reaches
            consistency without the archive, which is not waited for (it is still needed to recover past
            the backup's end).
        verify: list (default): read the stored object back and walk its tar listing; full: also compare
            the sha256 of every stored byte; none: skip (retention then does not run).
        retention: Keep-last / daily / weekly / monthly / max-age policy for base backups; empty: keep all.
            A location's own retention replaces it there.
        wal_keep_days: WAL expiry never removes WAL younger than this many days (step 8).
        dry_run: Plan retention (and WAL expiry) and report it, delete nothing.
        options: Less common settings (WAL timeout, compression, checksums, slot wait, tool location).
    """
    logger = get_run_logger()
    try:
        options = options or BaseBackupOptions()
        parse_locations(storage)  # bad slugs and a slug named twice: refused before the lock
        check_prefix(prefix)
        # With its WAL in the tar the backup needs no archive to be consistent: nothing to wait for.
        location = None if include_wal else resolve_archive(archive)
        # the same place under two block names: refused before anything is written
        primary, copies = open_locations(storage)

        with database_lock(database, wait_seconds=options.lock_wait_hours * 3600):
            # 1. preflight
            pre = check_base_backup_source(database, include_wal, options.pg_bindir)
            primary_url = check_storage(primary, prefix)
            logger.info("storage %s is writable", primary_url)
            copy_rows = check_copies(copies, prefix)

            # 2. stream
            stem, result = upload_base_backup(
                pre,
                primary,
                prefix,
                include_wal=include_wal,
                archive=location,
                level=options.compression_level,
                zstd_threads=options.zstd_threads,
                manifest_checksums=None
                if options.manifest_checksums == "NONE"
                else options.manifest_checksums,
                archive_wait_seconds=options.wal_timeout_seconds,
            )

            # 3. WAL
            if location is not None:
                needed = confirm_wal_archived(
                    pre, primary, location, stem, result, timeout_seconds=options.wal_timeout_seconds
                )
                wal = f"{len(needed)} segment(s) {needed[0]}..{needed[-1]} confirmed in {location.describe()}"
            else:
                wal = f"in the tar: {len(result.wal_files)} file(s) in pg_wal, consistent without the archive"

            # 4. verify
            verification = None
            if verify != "none":
                verification = verify_base_backup(primary, result, verify)

            # 5. manifest
            manifest = write_base_manifest(
                pre,
                primary,
                stem,
                result,
                include_wal=include_wal,
                wal_archived=location is not None,
                level=options.compression_level,
                method=verify,
                verification=verification,
            )
            report = BaseBackupReport(
                database=pre.database,
                key=result.key,
                manifest_key=base_manifest_key(stem),
                label=manifest.label,
                start_wal=manifest.start_wal,
                stop_wal=manifest.stop_wal,
                start_lsn=manifest.start_lsn,
                stop_lsn=manifest.stop_lsn,
                timeline=manifest.timeline,
                wal_included=include_wal,
                wal=wal,
                **stored_figures(result, manifest.verified, manifest.verification.detail),
            )

            report.locations = [primary_row(primary, primary_url, report), *copy_rows]

            # 6. copies, from the primary whose manifest is written
            # 7. retention, in each location with its own policy
            def run_retention(
                target: RetentionReport, where: StorageLocation, policy: RetentionPolicy | None
            ) -> None:
                _retention(report.database, target, where, prefix, policy, dry_run)

            copy_then_retain(report, primary, primary_url, copies, retention, run_retention)

            # 8. WAL expiry, below what any location keeps
            _wal_expiry(report, prefix, location, wal_keep_days, dry_run)

        # 9. report
        failure = copies_outcome(primary_url, report.key, copy_rows)
        _publish(report, None if failure is None else str(failure))
        if failure is not None:
            return failed_state(failure)
        return report
    except Exception as exc:
        key = artifact_key("base-backup", database_name_of(database))
        return publish_failure(key, f"Base backup of {database} into {storage_text(storage)}", exc)


def _retention(
    database: str,
    report: RetentionReport,
    storage: StorageRef,
    prefix: str,
    retention: RetentionPolicy | None,
    dry_run: bool,
) -> None:
    """Only a verified base backup may replace old ones; a recovery's lease keeps what it reads.
    `report` is the run's report (the primary) or a copy location's row."""

    def plan(policy: RetentionPolicy, now: datetime) -> tuple[RetentionPlan, BaseCleanup]:
        catalog = read_base_backup_catalog(storage, prefix, database)
        retention_plan = plan_base_retention(catalog, policy, now)
        cleanup = plan_base_backup_cleanup(
            storage, catalog, retention_plan, now=now, prefix=prefix, database=database
        )
        return retention_plan, cleanup

    def delete(cleanup: BaseCleanup) -> BaseCleanup:
        return delete_expired_base_backups(storage, cleanup, prefix, database)

    apply_retention(report, retention, dry_run, noun="base backup", plan=plan, delete=delete)


def _wal_expiry(
    report: BaseBackupReport,
    prefix: str,
    location: ArchiveLocation | None,
    wal_keep_days: int,
    dry_run: bool,
) -> None:
    """After retention: the WAL older than the oldest base backup kept in any location (the primary or a
    copy: one archive serves them all) can go. Anything that makes "kept" uncertain (no verified backup
    this run, an unreadable manifest, a location that cannot be listed) leaves the archive alone."""
    logger = get_run_logger()
    if location is None:
        report.wal_expiry = "skipped: include_wal=true, so this run has no archive location to expire"
    elif not report.verified:
        report.wal_expiry = "skipped: this base backup was not verified, so no WAL is removed"
    else:
        where = [
            (StorageLocation(block=row.location), frozenset(row.deleted) if dry_run else frozenset[str]())
            for row in report.locations
        ]
        where[0] = (where[0][0], frozenset(report.deleted) if dry_run else frozenset[str]())
        kept = kept_base_backups(where, prefix, report.database)
        if kept.blocked:
            report.wal_expiry = f"skipped: {kept.blocked}"
        else:
            done = expire_wal(location, kept.manifests, wal_keep_days=wal_keep_days, dry_run=dry_run)
            verb = "would remove" if dry_run else "removed"
            report.wal_expiry = (
                f"{done.status}: {verb} {done.count} segment(s) {done.first}..{done.last}, "
                f"keeping from {done.cut}"
                if done.count
                else f"{done.status}: {done.reason}"
            )
            if done.blocked:
                logger.warning("WAL expiry blocked: %s", done.reason)
    logger.info("WAL expiry: %s", report.wal_expiry)


def _publish(report: BaseBackupReport, failure: str | None = None) -> None:
    rate = report.raw_bytes / report.seconds if report.seconds else 0
    rows = [
        {"item": "key", "value": report.key},
        {"item": "manifest", "value": report.manifest_key},
        {"item": "label", "value": report.label},
        {"item": "WAL", "value": report.wal},
        {"item": "start", "value": f"{report.start_lsn} ({report.start_wal}), timeline {report.timeline}"},
        {"item": "consistent at", "value": f"{report.stop_lsn} ({report.stop_wal})"},
        {"item": "stored bytes", "value": f"{report.bytes} ({human_bytes(report.bytes)})"},
        {"item": "tar bytes", "value": f"{report.raw_bytes} ({human_bytes(report.raw_bytes)})"},
        {"item": "sha256", "value": report.sha256},
        {"item": "duration", "value": f"{report.seconds:.1f} s"},
        {"item": "throughput", "value": f"{human_bytes(rate)}/s of tar"},
        {"item": "verified", "value": report.verification},
        *retention_rows(report),
        *(location_rows(report.locations) if len(report.locations) > 1 else []),
        {"item": "WAL expiry", "value": report.wal_expiry},
    ]
    create_table_artifact(
        key=artifact_key("base-backup", report.database),
        table=rows,
        description=judged_description(f"Base backup of {report.database}: {report.key}", failure),
    )


if __name__ == "__main__":  # pragma: no cover
    import sys

    base_backup(database=sys.argv[1], storage=sys.argv[2])
