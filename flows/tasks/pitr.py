"""Tasks of point-in-time recovery: plan (refusals first), restore the base backup, replay, stop.

Nothing here connects to the production server: the database block is read only for its database name
(the layout folder) and its role name (to log in to the recovered copy through its private socket).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from prefect import get_run_logger

from blocks.storage import load_store
from flows.core.base_catalog import BaseCatalog, read_base_catalog
from flows.core.base_layout import TAR_SUFFIX, BaseBackupManifest, base_manifest_key, pitr_drill_key
from flows.core.chain import archive_lineage, follow, list_archive
from flows.core.drill import CheckResult
from flows.core.leases import release_lease, take_lease
from flows.core.locations import StorageList, StorageRef
from flows.core.manifest import Manifest
from flows.core.pgtools import find_tool
from flows.core.pitr.drill import (
    Canary,
    PitrDrillRecord,
    check_canary,
    check_position,
    check_tables,
    run_amcheck,
    write_canary,
)
from flows.core.pitr.errors import PitrDrillFailed, RecoveryRefused
from flows.core.pitr.extract import Extracted, extract_base_backup, server_user
from flows.core.pitr.recovery import (
    PitrReport,
    RecoveryProgress,
    build_report,
    configure,
    replay,
    verify_extracted,
)
from flows.core.pitr.selection import Choice, choose_base_backup
from flows.core.pitr.server import PgServer
from flows.core.pitr.spool import WalSpool
from flows.core.pitr.targets import RecoveryTarget
from flows.core.pitr.workdir import preflight, prepare_work_directory, work_directory
from flows.core.restore_sources import Fallback, Source, check_source, choose_first, read_with_fallback
from flows.core.wal import parse_lsn, segno_of_lsn
from flows.core.wal_archive import ArchiveLocation
from flows.tasks.backup import load_database
from flows.tasks.common import dbops_task, human_bytes
from flows.tasks.restore import open_sources
from flows.tasks.wal import open_archive


@dataclass
class RecoveryPlan:
    """What the recovery will do, decided before anything is downloaded. Holds no password."""

    database: str  # the database name (layout folder)
    login_user: str  # the block's role, to log in to the recovered copy (trust on its private socket)
    storage: StorageList  # the primary, then its copies
    archive: ArchiveLocation
    choice: Choice
    target: RecoveryTarget
    data_directory: Path
    port: int
    user: str | None
    location: str = ""  # the location the base backup was chosen in
    skipped: list[Fallback] = field(default_factory=list)  # locations before it, and why


@dbops_task("plan_recovery")
def plan_recovery(
    database: str,
    storage: StorageList,
    prefix: str,
    archive: ArchiveLocation,
    target: RecoveryTarget,
    data_directory: str,
    port: int,
) -> RecoveryPlan:
    """Refuse what can be refused without downloading: directory, port, no base backup, the window.
    With a storage list, the base backup is chosen in the first location that holds one reaching the
    target (the WAL archive is the same for all)."""
    logger = get_run_logger()
    params = load_database(database).params()
    path = Path(data_directory).expanduser().absolute()
    user = server_user()
    preflight(path, port, user=user)
    wal = open_archive(archive)

    def pick(source: Source) -> Choice:
        catalog = read_base_catalog(source.store, prefix, params.database)
        for key, why in catalog.unreadable:
            logger.warning("ignoring base backup manifest %s in %s: %s", key, source.name, why)
        return choose_base_backup(
            catalog, target, wal, where=f"{source.name}:{prefix or '/'} for {params.database}"
        )

    choice, source, skipped = choose_first(open_sources(storage), pick, (RecoveryRefused,))
    for passed in skipped:
        logger.warning("base backup not chosen from %s", passed.describe())
    preflight(path, port, choice.manifest, user)  # now with the backup's size against free disk space
    m = choice.manifest
    logger.info(
        "%s: base backup %s (ended %s, %s stored, timeline %d); %s",
        target.describe(),
        m.tar_key,
        m.ended_at.isoformat(timespec="seconds"),
        human_bytes(m.bytes),
        m.timeline,
        choice.sentence(),
    )
    return RecoveryPlan(
        database=params.database,
        login_user=params.user,
        storage=storage,
        archive=archive,
        choice=choice,
        target=target,
        data_directory=path,
        port=port,
        user=user,
        location=source.name,
        skipped=skipped,
    )


@dataclass
class Restored:
    extracted: Extracted
    verified: str
    seconds: float
    location: str = ""  # where the base backup was read from
    fallbacks: list[str] = field(default_factory=list)  # locations passed over before it, and why


@dbops_task("restore_base_backup")
def restore_base_backup(plan: RecoveryPlan, run_id: str, pg_bindir: str | None = None) -> Restored:
    """Stream the base backup into the data directory (sha256 while reading), then pg_verifybackup. Read
    from the first location of the storage list whose copy is intact; one that fails its sha256 check is
    removed from the data directory and the next location is read."""
    logger = get_run_logger()
    m = plan.choice.manifest
    stem = m.tar_key.removesuffix(TAR_SUFFIX)
    start = time.monotonic()
    last = [start]

    def progress(stored: int, raw: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 10:
            last[0] = now
            logger.info(
                "base backup: %s of %s read, %s unpacked",
                human_bytes(stored),
                human_bytes(m.bytes),
                human_bytes(raw),
            )

    def check(source: Source) -> str:
        return check_source(source, base_manifest_key(stem), m.tar_key, m, BaseBackupManifest.from_json)[1]

    def attempt(source: Source) -> Extracted:
        lease = take_lease(source.store, stem, run_id, "point-in-time recovery", timedelta(hours=24))
        try:  # a failed extraction has removed what it unpacked
            return extract_base_backup(source.store, m, plan.data_directory, plan.user, progress)
        finally:
            release_lease(source.store, lease)

    extracted, source, fallbacks = read_with_fallback(
        open_sources(plan.storage),
        check,
        attempt,
        what=f"base backup {stem.rsplit('/', 1)[-1]}",
        log=logger.warning,
    )
    verified = verify_extracted(plan.data_directory, m, pg_bindir)
    seconds = time.monotonic() - start
    logger.info(
        "base backup extracted into %s: %s in %.1f s; %s",
        plan.data_directory,
        human_bytes(extracted.tar_bytes),
        seconds,
        verified,
    )
    return Restored(extracted, verified, seconds, source.name, [f.describe() for f in fallbacks])


@dbops_task("replay_to_target", retry=False)
def replay_to_target(
    plan: RecoveryPlan,
    restored: Restored,
    *,
    cluster_name: str,
    ahead: int,
    timeout_s: float,
    pg_bindir: str | None = None,
) -> tuple[PitrReport, PgServer]:
    """Configure recovery, start the server on the spool, and wait for the target (or say why not)."""
    logger = get_run_logger()
    m = plan.choice.manifest
    work = prepare_work_directory(plan.data_directory, plan.user)
    wal = open_archive(plan.archive)
    first = segno_of_lsn(parse_lsn(m.start_lsn), m.wal_segment_size)
    spool = WalSpool(wal, plan.choice.scan, work / "spool", first, ahead=ahead, user=plan.user)
    configure(plan.data_directory, work, spool, plan.target, plan.port, cluster_name, plan.user)
    server = PgServer(
        data_directory=plan.data_directory,
        pg_ctl=find_tool("pg_ctl", m.server_version_num, pg_bindir).path,
        log_file=work / "server.log",
        socket_dir=work / "sock",
        port=plan.port,
        user=plan.user,
    )

    def progress(p: RecoveryProgress) -> None:
        logger.info(
            "replay: %d segment(s), LSN %s, replayed up to %s, %s downloaded%s",
            p.segments_replayed,
            p.lsn or "(not yet consistent)",
            p.replay_timestamp.isoformat(timespec="seconds") if p.replay_timestamp else "-",
            human_bytes(p.bytes_downloaded),
            f", about {p.eta_seconds:.0f} s left (estimate)" if p.eta_seconds is not None else "",
        )

    logger.info("starting the recovered server on port %d (log %s)", plan.port, server.log_file)
    done = replay(
        server,
        spool,
        wal,
        plan.target,
        plan.choice,
        plan.login_user,
        plan.database,
        timeout=timeout_s,
        on_progress=progress,
        base_bytes=restored.extracted.stored_bytes,
    )
    report = build_report(
        plan.database,
        plan.choice,
        plan.target,
        plan.data_directory,
        plan.port,
        restored.extracted,
        restored.seconds,
        restored.verified,
        done,
        spool,
        server,
    )
    report.location, report.fallbacks = restored.location, restored.fallbacks
    return report, server


@dbops_task("stop_recovered_server")
def stop_recovered_server(server: PgServer) -> None:
    server.stop()


def work_directory_of(data_directory: str) -> Path:
    return work_directory(Path(data_directory).expanduser().absolute())


# -- the PITR drill ---------------------------------------------------------------------------------------


@dbops_task("measure_rpo")
def measure_rpo(
    database: str, storage: StorageList, prefix: str, archive: ArchiveLocation
) -> datetime | None:
    """When the newest archived WAL segment was archived (the drill's RPO is its age at the start)."""
    params = load_database(database).params()

    def pick(source: Source) -> BaseCatalog:
        catalog = read_base_catalog(source.store, prefix, params.database)
        if not catalog.backups:
            raise RecoveryRefused(
                f"there is no base backup of {params.database} in {source.name}:{prefix or '/'}; take one "
                "(base-backup flow) before the PITR drill can run; nothing was written to the database"
            )
        return catalog

    catalog, _, _ = choose_first(open_sources(storage), pick, (RecoveryRefused,))
    wal = open_archive(archive)
    contents = list_archive(wal, catalog.backups[0].manifest.wal_segment_size)  # fails closed, never short
    lineage, _problem = archive_lineage(wal, contents)
    return follow(contents, lineage).last_archived_at


@dbops_task("write_drill_canary", retry=False)
def write_drill_canary(
    database: str, archive: ArchiveLocation, restore_point: str, run_id: str, write: bool, timeout_s: float
) -> Canary:
    """On production: canary token, restore point, WAL switch; then wait for that segment in the archive."""
    from flows.core.wal_archive import wait_for
    from flows.tasks.session import direct_session

    block = load_database(database)
    with direct_session(block) as conn:
        conn.execute("SET statement_timeout = '60s'")
        canary = write_canary(conn, restore_point, run_id, write=write)
    wal = open_archive(archive)
    key, waited = wait_for(lambda: wal.find(canary.walfile), timeout_s)
    if key is None:
        raise PitrDrillFailed(
            f"{canary.walfile} (holding restore point {restore_point}) did not reach {wal.url} within "
            f"{timeout_s:.0f} s; archiving does not work end to end: run wal-archive-check"
        )
    get_run_logger().info(
        "restore point %s at %s; %s archived after %.1f s",
        restore_point,
        canary.restore_point_lsn,
        canary.walfile,
        waited,
    )
    return canary


@dbops_task("read_latest_dump_manifest")
def read_latest_dump_manifest(storage: StorageList, prefix: str, database: str) -> Manifest | None:
    """The newest dump's manifest in the first location holding one (None: no dump anywhere)."""
    from flows.core.catalog import read_catalog
    from flows.core.errors import StorageFault

    sources = open_sources(storage)
    errors: list[StorageFault] = []
    for source in sources:
        try:
            catalog = read_catalog(source.store, prefix, database)
        except StorageFault as exc:
            get_run_logger().warning("dumps of %s not read from %s: %s", database, source.role, exc)
            errors.append(exc)
            continue
        if catalog.backups:
            return catalog.backups[0].manifest
    if len(errors) == len(sources):
        raise errors[0]  # fail closed: "no dump" is not known when nothing could be read
    return None


@dbops_task("check_recovered_copy", retry=False)
def check_recovered_copy(
    report: PitrReport,
    server: PgServer,
    canary: Canary | None,
    dump: Manifest | None,
    database: str,
    pg_bindir: str | None = None,
    server_version_num: int = 0,
) -> list[CheckResult]:
    checks: list[CheckResult] = []
    with server.connect(report.superuser, database) as conn:
        if canary is not None and canary.token:
            checks.append(check_canary(conn, canary.token))
        checks.append(check_tables(conn, dump))
    tool = find_tool("pg_amcheck", server_version_num, pg_bindir)
    checks.append(run_amcheck(tool, str(server.socket_dir), server.port, report.superuser, database))
    if canary is not None:
        checks.append(check_position(report.reached_lsn, report.timeline, canary))
    for c in checks:
        get_run_logger().info("%s %s: %s", "ok" if c.ok else "FAILED", c.name, c.detail)
    return checks


@dbops_task("write_pitr_drill_record")
def write_pitr_drill_record(storage: StorageRef, tar_key: str, record: PitrDrillRecord) -> str:
    """Beside the base backup, in the location it was read from (where the recovery was proven)."""
    key = pitr_drill_key(tar_key.removesuffix(TAR_SUFFIX))
    load_store(storage).put_bytes(key, record.to_json())
    return key
