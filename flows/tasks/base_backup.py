"""Tasks of the base-backup runbook: preflight, stream, confirm WAL, verify, manifest, retention."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from prefect import get_run_logger
from prefect.runtime import flow_run
from prefect.variables import Variable

from blocks.storage import load_store
from flows.core.base_backup import (
    BaseBackupFailed,
    BaseBackupResult,
    TarVerification,
    WalNotArchived,
    backup_label_text,
    first_missing,
    stream_base_backup,
    verify_stored_base_backup,
)
from flows.core.base_catalog import (
    BaseCatalog,
    BaseCleanup,
    carry_out_base,
    plan_base_cleanup,
    read_base_catalog,
)
from flows.core.base_layout import (
    BaseBackupManifest,
    BaseVerification,
    BaseVerifyMethod,
    base_manifest_key,
    base_stem,
    pg_manifest_key,
    tar_key,
)
from flows.core.base_preflight import (
    ClusterFacts,
    check_cluster_settings,
    check_replication_connection,
    check_replication_role,
    read_cluster,
)
from flows.core.errors import ConfigurationError, ObjectExists, TransientError
from flows.core.layout import check_database_name
from flows.core.locations import StorageRef
from flows.core.objectstore import part_size_for
from flows.core.pgtools import PgTool, find_tool
from flows.core.postgres import ConnParams
from flows.core.retention import RetentionPlan
from flows.core.wal import format_lsn, parse_lsn, parse_wal_name, segment_name, segno_of_lsn
from flows.core.wal_archive import ArchiveLocation, WalArchive, wait_for
from flows.tasks.backup import load_database
from flows.tasks.common import Progress, dbops_task, human_bytes
from flows.tasks.session import direct_session
from flows.tasks.wal import open_archive

#: the Prefect Variable the WAL archive check's deployment reads its `archive` parameter from
ARCHIVE_VARIABLE = "dbops_wal_archive"


@dataclass
class BasePreflight:
    """What the base backup needs to know before it starts. `params` holds the password: never log it."""

    block: str
    params: ConnParams
    database: str
    server: str
    cluster: ClusterFacts
    pg_basebackup: PgTool


def resolve_archive(archive: ArchiveLocation | None) -> ArchiveLocation:
    """The `archive` parameter, else the Prefect Variable the WAL archive check's deployment uses."""
    if archive is not None:
        return archive
    raw = Variable.get(ARCHIVE_VARIABLE, default=None)
    if raw in (None, ""):
        raise ConfigurationError(
            f"no WAL archive given and no Prefect Variable {ARCHIVE_VARIABLE}; pass archive (the WAL archive "
            "check's location), or include_wal=true for a self-contained base backup"
        )
    value = json.loads(raw) if isinstance(raw, str) else raw
    return ArchiveLocation.model_validate(value)


@dbops_task("check_base_backup_source")
def check_base_backup_source(database: str, include_wal: bool, pg_bindir: str | None = None) -> BasePreflight:
    """The role may replicate, pg_hba.conf lets it, the server can stream, and the result will be usable."""
    block = load_database(database)
    params = block.params()
    check_database_name(params.database)  # it names the backup folder: no `..`, no slash
    with direct_session(block) as conn:  # refuses a connection pooler before anything else
        cluster = read_cluster(conn)
        check_replication_role(conn, params.user)
        check_cluster_settings(conn, cluster, include_wal)
    check_replication_connection(params)
    tool = find_tool("pg_basebackup", cluster.server_version_num, pg_bindir)
    get_run_logger().info(
        "%s: PostgreSQL %s, system %s, %s in all databases, archive_mode=%s; using %s %s",
        params.where,
        cluster.server_version,
        cluster.system_identifier,
        human_bytes(cluster.cluster_bytes) if cluster.cluster_bytes is not None else "unknown size",
        cluster.archive_mode,
        tool.path,
        tool.version,
    )
    return BasePreflight(database, params, params.database, f"{params.host}:{params.port}", cluster, tool)


class StemTaken(TransientError):
    """Another base backup created the same key first; a retry picks the next free name."""


def _missing_in_archive(pre: BasePreflight, archive: WalArchive, start_wal: str | None) -> str | None:
    """The first segment from `start_wal` up to the server's current one that the archive lacks."""
    if start_wal is None:
        return None
    size = pre.cluster.wal_segment_size
    with load_database(pre.block).connect() as conn:
        current = str(conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()[0])  # type: ignore[index]
    first, last = parse_wal_name(start_wal, size), parse_wal_name(current, size)
    names = [segment_name(first.tli, s, size) for s in range(first.segno, max(last.segno, first.segno) + 1)]
    return first_missing(names, lambda n: archive.find(n) is not None)


@dbops_task("upload_base_backup")
def upload_base_backup(
    pre: BasePreflight,
    storage: StorageRef,
    prefix: str,
    include_wal: bool,
    archive: ArchiveLocation | None,
    level: int,
    zstd_threads: int,
    manifest_checksums: str | None,
    archive_wait_seconds: float,
) -> tuple[str, BaseBackupResult]:
    """Stream pg_basebackup into storage under a fresh key (conditional create); a failure leaves nothing."""
    store = load_store(storage)
    logger = get_run_logger()
    when = datetime.now(UTC).replace(microsecond=0)
    stem = base_stem(prefix, pre.database, when)
    while store.head(base_manifest_key(stem)) or store.head(tar_key(stem)):
        when += timedelta(seconds=1)  # taken: the conditional create below settles any race that is left
        stem = base_stem(prefix, pre.database, when)
    key = tar_key(stem)
    label = backup_label_text(pre.database, when)
    opened = open_archive(archive) if archive is not None else None

    def stalled(start_wal: str | None) -> str:
        missing = _missing_in_archive(pre, opened, start_wal) if opened is not None else None
        where = opened.url if opened is not None else "the archive"
        first = f"WAL segment {missing}" if missing else f"the WAL of this backup (from {start_wal})"
        return (
            f"{first} did not reach {where} within {archive_wait_seconds:.0f} s while the server waited "
            f"for it at the end of base backup {label}; nothing was stored and no manifest written: fix "
            "archive_command (see pg_stat_archiver and the server log), then run the backup again"
        )

    logger.info("base backup of %s to %s/%s (label %s)", pre.params.where, store.url, key, label)
    progress = Progress(f"base backup of {pre.server}", total=pre.cluster.cluster_bytes)
    try:
        result = stream_base_backup(
            pre.params,
            store,
            key,
            tool=pre.pg_basebackup,
            label=label,
            include_wal=include_wal,
            segment_size=pre.cluster.wal_segment_size,
            level=level,
            zstd_threads=zstd_threads,
            part_size=part_size_for(pre.cluster.cluster_bytes),
            manifest_checksums=manifest_checksums,
            archive_wait_seconds=archive_wait_seconds,
            on_archive_stall=stalled,
            progress=progress,
        )
    except ObjectExists as exc:
        raise StemTaken(
            f"another base backup of {pre.database} created {key} first (same second); this copy was "
            "discarded without replacing it, and the task retries under the next free name"
        ) from exc
    store.put_bytes(pg_manifest_key(stem), result.pg_manifest, if_absent=True)
    logger.info(
        "stored %s (%s from %s of tar) in %.1f s, %s/s; start %s, stop %s",
        key,
        human_bytes(result.bytes),
        human_bytes(result.raw_bytes),
        result.seconds,
        human_bytes(result.raw_bytes / result.seconds),
        result.facts.start_wal,
        result.facts.stop_wal,
    )
    return stem, result


@dbops_task("confirm_wal_archived", retry=False)
def confirm_wal_archived(
    pre: BasePreflight,
    storage: StorageRef,
    archive: ArchiveLocation,
    stem: str,
    result: BaseBackupResult,
    timeout_seconds: float,
) -> list[str]:
    """Every segment start..stop must be in the archive before the backup counts (pgBackRest's rule).

    The stop segment is switched out when it is still the server's current one (the server normally did
    so itself). On timeout the tar and PostgreSQL's backup_manifest are removed: without its WAL it is
    not a backup, and no manifest may ever point at it.
    """
    logger = get_run_logger()
    facts = result.facts
    needed = facts.needed_segments()
    with load_database(pre.block).connect() as conn:
        current = str(conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0])  # type: ignore[index]
        # the segment being written now (XLByteToSeg: at a boundary it is the next, still empty one)
        if segno_of_lsn(parse_lsn(current), facts.segment_size) <= segno_of_lsn(
            facts.stop_lsn - 1, facts.segment_size
        ):
            conn.execute("SELECT pg_switch_wal()")
            logger.info(
                "switched WAL: the backup's stop segment %s was still the current one", facts.stop_wal
            )
    opened = open_archive(archive)
    confirmed: set[str] = set()

    def all_there() -> str | None:
        for name in needed:
            if name not in confirmed:
                if opened.find(name) is None:
                    return None
                confirmed.add(name)
        return "all"

    found, waited = wait_for(all_there, timeout_seconds, interval=0.5)
    if found is None:
        missing = next(n for n in needed if n not in confirmed)
        load_store(storage).delete([result.key, pg_manifest_key(stem)])
        raise WalNotArchived(
            f"WAL segment {missing} of base backup {stem.rsplit('/', 1)[-1]} did not reach {opened.url} "
            f"within {timeout_seconds:.0f} s ({len(confirmed)} of {len(needed)} segments there); the tar was "
            "removed and no manifest written, so it is not a backup: fix archive_command (see "
            "pg_stat_archiver and the server log), then run the backup again"
        )
    logger.info(
        "all %d WAL segment(s) %s..%s are in %s (waited %.1f s)",
        len(needed),
        needed[0],
        needed[-1],
        opened.url,
        waited,
    )
    return needed


@dbops_task("verify_base_backup")
def verify_base_backup(
    storage: StorageRef, result: BaseBackupResult, method: BaseVerifyMethod
) -> TarVerification:
    """Read the stored object back: a base backup counts only if its tar listing can be walked to the end."""
    store = load_store(storage)
    head = store.head(result.key)
    if head is None or head.size != result.bytes:
        raise BaseBackupFailed(
            f"{result.key} is {head.size if head else 'missing'} bytes in storage, expected {result.bytes}; "
            "the upload did not land intact"
        )
    verification = verify_stored_base_backup(
        store,
        result.key,
        full=method == "full",
        expected_sha256=result.sha256,
        expected_wal=result.wal_files or None,
    )
    get_run_logger().info("verified %s: %s", result.key, verification.detail())
    return verification


@dbops_task("write_base_manifest")
def write_base_manifest(
    pre: BasePreflight,
    storage: StorageRef,
    stem: str,
    result: BaseBackupResult,
    include_wal: bool,
    wal_archived: bool,
    level: int,
    method: BaseVerifyMethod,
    verification: TarVerification | None,
) -> BaseBackupManifest:
    """The manifest goes up last (conditional create): from this moment the tar is a base backup."""
    from flows import __version__

    facts = result.facts
    manifest = BaseBackupManifest(
        database=pre.database,
        server=pre.server,
        system_identifier=pre.cluster.system_identifier,
        server_version=pre.cluster.server_version.split(" ", 1)[0],
        server_version_num=pre.cluster.server_version_num,
        pg_basebackup_version=pre.pg_basebackup.version,
        label=facts.label,
        started_at=result.started_at,
        ended_at=result.ended_at,
        start_lsn=_lsn(facts.start_lsn),
        stop_lsn=_lsn(facts.stop_lsn),
        start_wal=facts.start_wal,
        stop_wal=facts.stop_wal,
        timeline=facts.timeline,
        wal_segment_size=pre.cluster.wal_segment_size,
        wal_included=include_wal,
        wal_archived=wal_archived,
        tar_key=result.key,
        bytes=result.bytes,
        raw_bytes=result.raw_bytes,
        sha256=result.sha256,
        compression_level=level,
        pg_manifest_key=pg_manifest_key(stem),
        database_bytes=pre.cluster.cluster_bytes,
        flow_run_id=str(flow_run.get_id()) if flow_run.get_id() else None,
        verified=verification is not None,
        verification=BaseVerification(
            method=method,
            verified_at=datetime.now(UTC) if verification else None,
            detail=verification.detail() if verification else "not verified (verify=none)",
        ),
        dbops_version=__version__,
    )
    store = load_store(storage)
    key = base_manifest_key(stem)
    try:
        store.put_bytes(key, manifest.to_json(), if_absent=True)
    except ObjectExists:
        existing = BaseBackupManifest.from_json(store.get_bytes(key))
        if (existing.tar_key, existing.sha256) != (result.key, result.sha256):
            raise BaseBackupFailed(
                f"another base backup already wrote {key}; it was not replaced, and {result.key} has no "
                "manifest (an orphan retention removes); run the base backup again"
            ) from None
        return existing
    return manifest


def _lsn(lsn: int) -> str:
    return format_lsn(lsn)


@dbops_task("read_base_catalog")
def read_base_backup_catalog(storage: StorageRef, prefix: str, database: str) -> BaseCatalog:
    return read_base_catalog(load_store(storage), prefix, database)


@dbops_task("plan_base_cleanup")
def plan_base_backup_cleanup(
    storage: StorageRef, catalog: BaseCatalog, plan: RetentionPlan, now: datetime, prefix: str, database: str
) -> BaseCleanup:
    return plan_base_cleanup(load_store(storage), catalog, plan, now=now, prefix=prefix, database=database)


@dbops_task("delete_expired_base_backups")
def delete_expired_base_backups(
    storage: StorageRef, cleanup: BaseCleanup, prefix: str, database: str
) -> BaseCleanup:
    """Manifests first, leases looked for again, then the tars: a recovery that leased one keeps it."""
    return carry_out_base(load_store(storage), cleanup, prefix, database)
