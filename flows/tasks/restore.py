"""Tasks of the restore runbook and the restore drill: each does one thing to the world."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from prefect import get_run_logger

from blocks.postgres import load_database
from blocks.storage import load_locations, load_store, open_archive
from flows.core.catalog import Backup, Catalog, drill_key, read_catalog
from flows.core.database_admin import drop_database
from flows.core.drill import (
    CheckResult,
    DrillCheck,
    DrillRecord,
    check_alembic,
    check_amcheck,
    check_row_counts,
    check_tables,
    failed_summary,
    restored_tables,
)
from flows.core.errors import ConfigurationError, ObjectNotFound, RolesFileMissing
from flows.core.identity import DatabaseIdentity, Guard, identify_database
from flows.core.layout import manifest_key
from flows.core.listing import BackupListing, list_backups_across
from flows.core.locations import StorageList, StorageRef, parse_locations
from flows.core.manifest import Manifest
from flows.core.pg_restore import Mode, RestoreResult
from flows.core.pgtools import PgTool, find_tool
from flows.core.postgres import ConnParams, connect, server_version_num, version_text
from flows.core.restore import RestoreRequest, restore_backup
from flows.core.restore_choice import BackupNotFound, Selector, select_backup
from flows.core.restore_sources import (
    Fallback,
    Source,
    check_source,
    choose_first,
    read_with_fallback,
    without_unchecked_copies,
)
from flows.core.roles import apply_globals
from flows.core.wal_archive import ArchiveLocation
from flows.tasks.common import Progress, dbops_task, human_bytes
from flows.tasks.session import direct_session


@dataclass
class Target:
    """The server a restore writes to; no password in its repr (ConnParams hides it)."""

    block: str
    params: ConnParams
    protected: bool
    server_version_num: int
    pg_restore: PgTool
    identity: DatabaseIdentity  # the block's database as planned (oid None: it does not exist yet)


def open_sources(storage: StorageList) -> list[Source]:
    """The storage list's locations, opened, the primary first (the same place named twice is refused)."""
    return [Source(loc.slug, loc.store, primary=i == 0) for i, loc in enumerate(load_locations(storage))]


def location_ref(storage: StorageList, slug: str) -> StorageRef:
    """The storage list's entry for `slug`, with its settings (S3 storage class, encryption), for writing a
    record into the location that was read."""
    for location in parse_locations(storage):
        if location.block == slug:
            return location
    return slug


@dataclass
class ChosenBackup:
    """The backup a selector names, from the first location that holds one matching."""

    backup: Backup
    catalog: Catalog  # that location's
    location: str
    skipped: list[Fallback]  # locations before it, and why they were passed over


@dbops_task("choose_backup")
def choose_backup(storage: StorageList, prefix: str, database: str, selector: Selector) -> ChosenBackup:
    """Latest, latest before, or a key, on the first location holding a match (copies whose bytes were
    not sha256-checked are not candidates)."""
    logger = get_run_logger()

    def pick(source: Source) -> tuple[Catalog, Backup]:
        catalog = without_unchecked_copies(read_catalog(source.store, prefix, database))
        return catalog, select_backup(catalog, selector, database)

    (catalog, backup), source, skipped = choose_first(open_sources(storage), pick, (BackupNotFound,))
    for passed in skipped:
        logger.warning("%s of %s not chosen from %s", selector.describe(), database, passed.describe())
    return ChosenBackup(backup, catalog, source.name, skipped)


def target_of(block_name: str) -> tuple[ConnParams, bool]:
    """The block's connection details and protected flag, without connecting."""
    block = load_database(block_name)
    return block.params(), block.protected


@dbops_task("check_target_server")
def check_target_server(block_name: str, maintenance_database: str, pg_bindir: str | None = None) -> Target:
    """Connect to the target server's maintenance database and find a matching pg_restore."""
    block = load_database(block_name)
    params, protected = block.params(), block.protected
    with direct_session(block, maintenance_database) as conn:  # refuses a connection pooler
        version = server_version_num(conn)
        identity = identify_database(conn, params.database)
    tool = find_tool("pg_restore", version, pg_bindir)
    get_run_logger().info(
        "target %s:%s (PostgreSQL %s), %s; using %s %s",
        params.host,
        params.port,
        version_text(version),
        identity,
        tool.path,
        tool.version,
    )
    return Target(
        block=block_name,
        params=params,
        protected=protected,
        server_version_num=version,
        pg_restore=tool,
        identity=identity,
    )


@dbops_task("restore_globals")
def restore_globals(storage: StorageList, backup: Backup, target: Target, maintenance_database: str) -> str:
    """Create the roles (and tablespaces) of the stored roles file that the target server lacks; existing
    ones are left exactly as they are. Returns what was created and what was already present."""
    if not backup.manifest.globals_key:
        raise RolesFileMissing(
            f"backup {backup.stem.rsplit('/', 1)[-1]} has no roles file; run without globals, or pick a "
            "backup taken with globals=true"
        )
    data = _read_first(open_sources(storage), backup.manifest.globals_key)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigurationError(
            f"the roles file {backup.manifest.globals_key} is not UTF-8 text; it is damaged"
        ) from None
    result = apply_globals(text, target.params.with_database(maintenance_database))
    detail = f"roles file: {result.summary()}"
    get_run_logger().info(detail)
    return detail


def _read_first(sources: list[Source], key: str) -> bytes:
    """A small object (the roles file) from the first location that has it."""
    for source in sources[:-1]:
        try:
            return source.store.get_bytes(key)
        except ObjectNotFound as exc:
            get_run_logger().warning("%s: %s; reading it from the next location", source.role, exc)
    return sources[-1].store.get_bytes(key)


@dbops_task("restore_database")
def restore_database(
    storage: StorageList,
    backup: Backup,
    target: Target,
    database: str,
    mode: Mode,
    jobs: int,
    no_owner: bool,
    maintenance_database: str,
    workdir: str | None,
    run_id: str,
    timeout_s: float | None,
    lock_timeout_s: int | None = None,
    guard: Guard | None = None,
) -> RestoreResult:
    """Stream the backup into pg_restore (sha256 checked before anything commits) into `database`, read
    from the first location of the storage list whose copy is intact; a copy that fails its sha256 check
    is cleaned up like any failed restore and the next location is read (the result says which)."""
    logger = get_run_logger()
    manifest = backup.manifest
    name = backup.stem.rsplit("/", 1)[-1]
    progress = Progress(f"restore of {name} into {database}", total=manifest.raw_bytes)

    def check(source: Source) -> str:
        key = manifest_key(backup.stem)
        return check_source(source, key, manifest.dump_key, manifest, Manifest.from_json)[1]

    def attempt(source: Source) -> RestoreResult:
        req = RestoreRequest(
            store=source.store,  # the read lease goes where the backup is read
            backup=backup,
            target=target.params.with_database(database),
            tool=target.pg_restore,
            mode=mode,
            jobs=jobs,
            no_owner=no_owner,
            maintenance_database=maintenance_database,
            workdir=workdir,
            run_id=run_id,
            timeout_s=timeout_s,
            lock_timeout_s=lock_timeout_s,
            guard=guard,
        )
        return restore_backup(req, progress=progress, log=logger.info)

    result, source, fallbacks = read_with_fallback(
        open_sources(storage), check, attempt, what=f"backup {name}", log=logger.warning
    )
    result.location = source.name
    result.fallbacks = [f.describe() for f in fallbacks]
    logger.info(
        "restored %s (%s archive) from %s into %s in %.1f s, %s/s",
        result.key,
        human_bytes(result.raw_bytes),
        source.name,
        result.database,
        result.seconds,
        human_bytes(result.raw_bytes / result.seconds),
    )
    if result.warnings:
        logger.warning("pg_restore said: %s", result.warnings[-2000:])
    return result


@dbops_task("check_restored_database", retry=False)
def check_restored_database(
    backup: Backup,
    params: ConnParams,
    tool_dir: str,
    server_version: int,
    row_tolerance: float,
    exact_below: int,
    amcheck: bool,
) -> list[CheckResult]:
    """Tables, row counts, Alembic revision and pg_amcheck on the restored copy."""
    logger = get_run_logger()
    manifest = backup.manifest
    with connect(params) as conn:
        tables = restored_tables(conn)
        checks = [check_tables(manifest, tables)]
        checks.append(
            check_row_counts(conn, manifest, tables, tolerance=row_tolerance, exact_below=exact_below)
        )
        checks.append(check_alembic(conn, manifest))
    if amcheck:
        checks.append(check_amcheck(params, find_tool("pg_amcheck", server_version, tool_dir)))
    for check in checks:
        (logger.info if check.ok else logger.error)(
            "%s %s: %s", "ok" if check.ok else "FAILED", check.name, check.detail
        )
    return checks


@dbops_task("drop_scratch_database")
def drop_scratch_database(params: ConnParams, name: str, maintenance_database: str, guard: Guard) -> None:
    """Drop the drill's scratch database, re-identified on the connection that drops it (`guard`)."""
    with connect(params.with_database(maintenance_database)) as conn:
        guard.check(conn)
        drop_database(conn, name)
    get_run_logger().info("dropped scratch database %s", name)


@dbops_task("record_drill")
def record_drill(
    storage: StorageRef,
    backup: Backup,
    checks: list[CheckResult],
    rto_seconds: float,
    restored_bytes: int,
    scratch: str,
    server: str,
    flow_run_id: str | None,
) -> DrillRecord:
    """Write `<stem>.drill.json` beside the manifest in the location that was read (where the backup was
    proven): the listing shows when it was last proven."""
    record = DrillRecord(
        dump_key=backup.manifest.dump_key,
        drilled_at=datetime.now(UTC),
        passed=bool(checks) and all(c.ok for c in checks),
        rto_seconds=round(rto_seconds, 3),
        restored_bytes=restored_bytes,
        scratch_database=scratch,
        server=server,
        checks=[DrillCheck(name=c.name, ok=c.ok, detail=c.detail) for c in checks],
        flow_run_id=flow_run_id,
        summary=failed_summary(checks) if checks else "restore failed",
    )
    load_store(storage).put_bytes(drill_key(backup.stem), record.to_json())
    return record


@dbops_task("read_backup_listing")
def read_backup_listing(
    storage: StorageList, prefix: str, database: str, archive: ArchiveLocation | None = None
) -> BackupListing:
    """Backups with their drill records, base backups, the recoverable window (read from `archive`), and
    what was left alone; with a storage list, where each backup is present and verified: the same code
    `dbops backups list` runs."""
    wal = open_archive(archive) if archive is not None else None
    locations = [(loc.slug, loc.store) for loc in load_locations(storage)]
    return list_backups_across(locations, prefix, database, archive=wal)
