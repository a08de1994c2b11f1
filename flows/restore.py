"""restore: the restore runbook, as a flow (and list_backups, the listing to choose from).

1. choose      the backup: latest, latest before <timestamp>, or a key; only backups with a manifest; with
               a storage list, on the first location (primary, then copies) holding one matching
2. refuse      a protected target, mode=replace, or globals=true, without confirm=<its database name>,
               before any connection to it
3. preflight   the target server answers; pg_restore of its major version; which database the target is
               (server system identifier + name): a database of any protected block needs confirm too
4. lock        db:<server>:<database>, so no dump, migrate or reindex runs against it meanwhile
5. globals     missing roles from the stored roles file first (optional, needs confirm; existing ones
               are left unchanged)
6. restore     streamed into pg_restore with the sha256 checked before anything commits;
               create: temporary database renamed on success; replace: one transaction; the target is
               re-identified on the connection that acts before each drop, rename or replace. Read from
               the first location whose copy is there, whole and described by its manifest; a copy that
               fails its sha256 check is cleaned up like any failed restore and the next location is read
7. report      a table artifact with the duration (the RTO figure), the location read and every location
               passed over with its reason; Failed with one sentence otherwise
"""

from __future__ import annotations

from typing import Annotated

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from blocks.storage import load_locations
from flows.core.identity import Guard
from flows.core.layout import check_location
from flows.core.locations import StorageList
from flows.core.pg_restore import Mode
from flows.core.restore_choice import (
    parse_selector,
    require_confirmation,
    require_globals_confirmation,
)
from flows.core.restore_sources import read_from_line
from flows.core.wal_archive import ArchiveLocation
from flows.tasks.common import artifact_key, database_lock, database_name_of, human_bytes, publish_failure
from flows.tasks.identity import check_guard, protected_databases
from flows.tasks.restore import (
    check_target_server,
    choose_backup,
    read_backup_listing,
    restore_database,
    restore_globals,
    target_of,
)


class RestoreOptions(BaseModel):
    """Less common knobs."""

    no_owner: bool = Field(
        default=False,
        description="Restore without ownership and grants (pg_restore --no-owner --no-privileges), e.g. onto "
        "a server that lacks the original roles.",
    )
    maintenance_database: str = Field(
        default="postgres",
        description="Database on the target server used to create, rename and drop databases.",
    )
    workdir: str | None = Field(
        default=None,
        description="Directory for the downloaded archive when jobs > 1 (default: the system temp dir); "
        "its free space is checked against the archive size first.",
    )
    pg_bindir: str | None = Field(
        default=None,
        description="Directory with pg_restore/psql; default: the target server's major version's.",
    )
    lock_wait_hours: float = Field(
        default=3.0, gt=0, description="How long to wait for the db:<target> concurrency limit."
    )
    lock_timeout_s: int = Field(
        default=60,
        ge=0,
        description="mode=replace: pg_restore gives up (rolls back, and the task retries) when a table "
        "lock is not granted in this time, instead of queueing behind the application's sessions; "
        "0 waits forever.",
    )
    timeout_hours: float = Field(
        default=24.0, gt=0, description="pg_restore is stopped (and nothing committed) after this long."
    )


class RestoreReport(BaseModel):
    source_database: str = Field(description="Whose backup was restored (the name in the object layout).")
    key: str = Field(description="The stored object that was restored.")
    backup_time: str = Field(description="When that backup's pg_dump ended (UTC).")
    target: str = Field(description="host:port/database it was restored into.")
    mode: str = Field(description="create or replace.")
    jobs: int = Field(description="pg_restore --jobs.")
    method: str = Field(description="stream (jobs=1) or file (downloaded first, jobs > 1).")
    bytes: int = Field(description="Stored bytes read (sha256-checked).")
    raw_bytes: int = Field(description="Archive bytes pg_restore read.")
    sha256: str = Field(description="sha256 of the stored object; equals the manifest's.")
    seconds: float = Field(description="Restore duration: the RTO figure.")
    alembic_revision: str | None = Field(default=None, description="Alembic revision in the backup.")
    globals: str = Field(default="not applied", description="What happened with the roles file.")
    location: str = Field(default="", description="The storage location the backup was read from.")
    fallbacks: list[str] = Field(
        default_factory=list,
        description="Locations passed over before it (primary first), each with why: missing, unreadable, "
        "or an object that failed its sha256 check.",
    )


@flow(name="restore", log_prints=True)
def restore(
    storage: StorageList,
    source_database: str,
    target: str,
    prefix: str = "",
    backup: str = "latest",
    mode: Mode = "create",
    jobs: Annotated[int, Field(ge=1, le=64)] = 1,
    confirm: str = "",
    globals: bool = False,  # the parameter name users see in the UI
    options: RestoreOptions | None = None,
) -> RestoreReport:
    """Restore one backup into a database: a new one (create) or an existing one (replace).

    Args:
        storage: Storage block slug holding the backups (s3-bucket/NAME or local-file-system/NAME), or a
            list of them (a list, or slugs separated by commas): the primary first, then its copies. The
            backup is read from the first location whose copy is intact; the report says which, and why
            the ones before it were passed over.
        source_database: Whose backups: the database name used in the object layout (e.g. imagemanager).
        target: Name of the PostgresDatabase block to restore into; its database is the one created or
            replaced (its server and credentials are used, nothing else).
        prefix: Folder inside the storage the backups were written under (e.g. prod); may be empty.
        backup: `latest`, `latest before 2026-03-01T14:00:00Z` (the newest backup whose pg_dump started
            before that time), or an explicit key (dump key, manifest key or file name) from
            `dbops backups list`.
        mode: create: the target database must not exist; it is restored into a temporary database that is
            renamed on success and dropped on failure. replace: pg_restore --clean --if-exists in a single
            transaction into the existing database; a failure rolls back (jobs must be 1).
        jobs: pg_restore --jobs. Above 1 the backup is first downloaded to a temporary file (free disk
            space is checked), because parallel pg_restore needs a seekable archive.
        confirm: The target database's exact name; required when the target block is protected, or its
            database is one a protected block names (through another host name or block), with
            mode=replace (it overwrites what is there now), and whenever globals=true (roles are
            server-wide).
        globals: Also create the roles (and tablespaces) of the backup's stored roles file that the target
            server lacks, first; roles that exist are left unchanged. Needs confirm.
        options: Less common settings (ownership, maintenance database, work directory, timeouts).
    """
    logger = get_run_logger()
    try:
        options = options or RestoreOptions()
        load_locations(storage)  # every slug a storage block, no place named twice (or under two names)
        check_location(prefix, source_database)
        selector = parse_selector(backup)

        # Refuse before anything connects to the target: only the block is read.
        params, protected = target_of(target)
        require_confirmation(protected, params.database, confirm)
        require_globals_confirmation(globals, params, confirm)

        found = choose_backup(storage, prefix, source_database, selector)
        chosen = found.backup
        m = chosen.manifest
        logger.info(
            "%s of %s in %s: %s (pg_dump ended %s, %s stored, alembic %s, %s)",
            selector.describe(),
            source_database,
            found.location,
            m.dump_key,
            f"{m.ended_at:%Y-%m-%d %H:%M:%S}Z",
            human_bytes(m.bytes),
            m.alembic_revision or "none",
            m.verification.detail if m.verified else "NOT verified when it was taken",
        )
        server = check_target_server(target, options.maintenance_database, options.pg_bindir)
        guard = Guard(
            block=target,
            planned=server.identity,
            action="restore into",
            protected=protected_databases(options.maintenance_database),
            confirm=confirm,
        )
        check_guard(guard)
        # after the identity check, so a protected database reached through an alias is named as such
        require_confirmation(False, params.database, confirm, replacing=mode == "replace")
        run_id = (flow_run.get_id() or "")[:8] or None
        lock_wait = options.lock_wait_hours * 3600
        with database_lock(target, wait_seconds=lock_wait, maintenance_database=options.maintenance_database):
            globals_detail = "not applied"
            if globals:
                globals_detail = restore_globals(storage, chosen, server, options.maintenance_database)
            result = restore_database(
                storage,
                chosen,
                server,
                database=params.database,
                mode=mode,
                jobs=jobs,
                no_owner=options.no_owner,
                maintenance_database=options.maintenance_database,
                workdir=options.workdir,
                run_id=run_id or "manual",
                timeout_s=options.timeout_hours * 3600,
                lock_timeout_s=options.lock_timeout_s or None,
                guard=guard,
            )
        report = RestoreReport(
            source_database=source_database,
            key=result.key,
            backup_time=f"{m.ended_at:%Y-%m-%d %H:%M:%S}Z",
            target=f"{params.host}:{params.port}/{result.database}",
            mode=mode,
            jobs=jobs,
            method=result.method,
            bytes=result.bytes,
            raw_bytes=result.raw_bytes,
            sha256=result.sha256,
            seconds=round(result.seconds, 3),
            alembic_revision=m.alembic_revision,
            globals=globals_detail,
            location=result.location,
            fallbacks=result.fallbacks,
        )
        _publish(report)
        return report
    except Exception as exc:
        return publish_failure(
            artifact_key("restore", database_name_of(target)),
            f"Restore of {source_database} ({backup}, mode {mode}) into {target}",
            exc,
        )


def _publish(report: RestoreReport) -> None:
    rate = report.raw_bytes / report.seconds if report.seconds else 0
    rows = [
        {"item": "backup", "value": report.key},
        {"item": "backup time", "value": report.backup_time},
        {"item": "read from", "value": read_from_line(report.location, report.fallbacks)},
        {"item": "target", "value": report.target},
        {"item": "mode", "value": f"{report.mode}, jobs={report.jobs} ({report.method})"},
        {"item": "duration (RTO)", "value": f"{report.seconds:.1f} s"},
        {"item": "throughput", "value": f"{human_bytes(rate)}/s of archive"},
        {"item": "stored bytes", "value": f"{report.bytes} ({human_bytes(report.bytes)})"},
        {"item": "sha256", "value": f"{report.sha256} (matches the manifest)"},
        {"item": "alembic revision", "value": report.alembic_revision or "none"},
        {"item": "roles", "value": report.globals},
    ]
    create_table_artifact(
        key=artifact_key("restore", report.target.rsplit("/", 1)[-1]),
        table=rows,
        description=f"Restore of {report.source_database} into {report.target}",
    )


@flow(name="list-backups", log_prints=True)
def list_backups(
    storage: StorageList, database: str, prefix: str = "", archive: ArchiveLocation | None = None
) -> list[dict[str, str]]:
    """The backups of one database, newest first, as a table artifact (`dbops backups list` prints it):
    dumps, base backups, and the line "recoverable to any moment from .. to .." (or the hole that breaks
    it), read from the WAL archive. With a storage list, each row says in which locations the backup is
    present and verified (column `locations`); a location that cannot be read says so.

    Args:
        storage: Storage block slug (s3-bucket/NAME or local-file-system/NAME), or a list of them (the
            primary first, then its copies; a list, or slugs separated by commas).
        database: The database name used in the object layout (e.g. imagemanager).
        prefix: Folder inside the storage (e.g. prod); may be empty.
        archive: Where archive_command stores WAL (the WAL check's parameter; prefect.yaml passes the
            dbops_wal_archive Variable). Without it the recoverable window is shown as unknown.
    """
    try:
        load_locations(storage)  # every slug a storage block, no place named twice (or under two names)
        check_location(prefix, database)
        listing = read_backup_listing(storage, prefix, database, archive)
        print(listing.window_line)
        window_row = [{"time": "recoverable", "key": listing.window_line}]
        create_table_artifact(
            key=artifact_key("backups", database),
            table=(listing.rows or [{"time": "no backups"}])
            + listing.base_rows
            + window_row
            + listing.left_alone,
            description=f"Backups of {database}: {listing.describe()}. {listing.window_line}",
        )
        return listing.rows
    except Exception as exc:
        return publish_failure(artifact_key("backups", database), f"Backups of {database} in {storage}", exc)
