"""Tasks of point-in-time recovery: plan (refusals first), restore the base backup, replay, stop.

Nothing here connects to the production server: the database block is read only for its database name
(the layout folder) and its role name (to log in to the recovered copy through its private socket).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from prefect import get_run_logger

from blocks.storage import load_store
from flows.core.base_catalog import read_base_catalog
from flows.core.base_layout import TAR_SUFFIX, pitr_drill_key
from flows.core.chain import archive_lineage, follow, list_archive
from flows.core.drill import CheckResult
from flows.core.leases import release_lease, take_lease
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
from flows.core.wal import parse_lsn, segno_of_lsn
from flows.core.wal_archive import ArchiveLocation
from flows.tasks.backup import load_database
from flows.tasks.common import dbops_task, human_bytes
from flows.tasks.wal import open_archive


@dataclass
class RecoveryPlan:
    """What the recovery will do, decided before anything is downloaded. Holds no password."""

    database: str  # the database name (layout folder)
    login_user: str  # the block's role, to log in to the recovered copy (trust on its private socket)
    storage: str
    archive: ArchiveLocation
    choice: Choice
    target: RecoveryTarget
    data_directory: Path
    port: int
    user: str | None


@dbops_task("plan_recovery")
def plan_recovery(
    database: str,
    storage: str,
    prefix: str,
    archive: ArchiveLocation,
    target: RecoveryTarget,
    data_directory: str,
    port: int,
) -> RecoveryPlan:
    """Refuse what can be refused without downloading: directory, port, no base backup, the window."""
    logger = get_run_logger()
    params = load_database(database).params()
    path = Path(data_directory).expanduser().absolute()
    user = server_user()
    preflight(path, port, user=user)
    store = load_store(storage)
    catalog = read_base_catalog(store, prefix, params.database)
    for key, why in catalog.unreadable:
        logger.warning("ignoring base backup manifest %s: %s", key, why)
    wal = open_archive(archive)
    choice = choose_base_backup(
        catalog, target, wal, where=f"{storage}:{prefix or '/'} for {params.database}"
    )
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
    )


@dataclass
class Restored:
    extracted: Extracted
    verified: str
    seconds: float


@dbops_task("restore_base_backup")
def restore_base_backup(plan: RecoveryPlan, run_id: str, pg_bindir: str | None = None) -> Restored:
    """Stream the base backup into the data directory (sha256 while reading), then pg_verifybackup."""
    logger = get_run_logger()
    store = load_store(plan.storage)
    m = plan.choice.manifest
    stem = m.tar_key.removesuffix(TAR_SUFFIX)
    lease = take_lease(store, stem, run_id, "point-in-time recovery", timedelta(hours=24))
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

    try:
        extracted = extract_base_backup(store, m, plan.data_directory, plan.user, progress)
    finally:
        release_lease(store, lease)
    verified = verify_extracted(plan.data_directory, m, pg_bindir)
    seconds = time.monotonic() - start
    logger.info(
        "base backup extracted into %s: %s in %.1f s; %s",
        plan.data_directory,
        human_bytes(extracted.tar_bytes),
        seconds,
        verified,
    )
    return Restored(extracted, verified, seconds)


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
    return report, server


@dbops_task("stop_recovered_server")
def stop_recovered_server(server: PgServer) -> None:
    server.stop()


def work_directory_of(data_directory: str) -> Path:
    return work_directory(Path(data_directory).expanduser().absolute())


# -- the PITR drill ---------------------------------------------------------------------------------------


@dbops_task("measure_rpo")
def measure_rpo(database: str, storage: str, prefix: str, archive: ArchiveLocation) -> datetime | None:
    """When the newest archived WAL segment was archived (the drill's RPO is its age at the start)."""
    params = load_database(database).params()
    catalog = read_base_catalog(load_store(storage), prefix, params.database)
    if not catalog.backups:
        raise RecoveryRefused(
            f"there is no base backup of {params.database} in {storage}:{prefix or '/'}; take one "
            "(base-backup flow) before the PITR drill can run; nothing was written to the database"
        )
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
def read_latest_dump_manifest(storage: str, prefix: str, database: str) -> Manifest | None:
    from flows.core.catalog import read_catalog

    catalog = read_catalog(load_store(storage), prefix, database)
    return catalog.backups[0].manifest if catalog.backups else None


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
def write_pitr_drill_record(storage: str, tar_key: str, record: PitrDrillRecord) -> str:
    key = pitr_drill_key(tar_key.removesuffix(TAR_SUFFIX))
    load_store(storage).put_bytes(key, record.to_json())
    return key
